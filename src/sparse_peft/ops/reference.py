"""Pure-PyTorch definition of every sparse_peft op: the spec, the CPU path and the test oracle.

Conventions shared by all ops:

- ``weight`` is in ``nn.Linear`` layout ``(d_out, d_in)``; a flat index ``k`` addresses ``weight[k // d_in, k % d_in]``.
- ``input`` is ``(..., d_in)`` and ``grad_output`` is ``(..., d_out)``; leading dimensions are flattened into ``T``.
- Indices may be int32 or int64, unsorted and repeated. Repeated indices *accumulate* in
  :func:`scatter_add_delta_` (their values are summed), and each occurrence gets the same gradient in
  :func:`gather_weight_grad`.
- Results are accumulated in :func:`accumulate_dtype` of the inputs, ``torch.promote_types(float32, dtype)``: fp32
  for fp32/fp16/bf16 inputs, fp64 for fp64. ``scatter_add_delta_`` keeps ``weight.dtype`` (the sum is rounded once
  per element); the gradient ops return the accumulation dtype.
- Empty index sets, non-contiguous tensors and fp64/fp32/fp16/bf16 inputs are allowed. Indices must lie in
  ``[0, d_out * d_in)``: here an out-of-range index raises, the CUDA kernels skip it (scatter) or return 0 (gather).
- :mod:`sparse_peft.ops` wraps these functions as ``torch.library`` custom ops with CUDA kernels (fp32 accumulation,
  so fp64 inputs always take these functions); the kernels must compute exactly these functions (up to
  floating-point summation order).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch


def accumulate_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the ops sum in: ``torch.promote_types(float32, dtype)`` over the floating-point ``tensors``."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def scatter_add_delta_(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """In-place ``weight += alpha * scatter(values)`` (used by merge/unmerge). Returns ``weight``.

    Repeated indices are summed in :func:`accumulate_dtype` and the element is rounded once to ``weight.dtype``.
    """
    target = weight.data
    contiguous = target.is_contiguous()
    flat = target.view(-1) if contiguous else target.contiguous().view(-1)  # (d_out * d_in,)
    idx = indices.long()
    acc_dtype = accumulate_dtype(weight, values)
    if weight.dtype == acc_dtype:
        flat.index_add_(0, idx, values.detach().to(acc_dtype), alpha=alpha)
    else:  # accumulate in the wider dtype, round once
        uniq, inv = torch.unique(idx, return_inverse=True)
        acc = torch.zeros(uniq.numel(), dtype=acc_dtype, device=weight.device)
        acc.index_add_(0, inv, values.detach().to(acc_dtype))
        flat[uniq] = (flat[uniq].to(acc_dtype) + alpha * acc).to(weight.dtype)
    if not contiguous:  # a non-contiguous weight was updated through a contiguous copy
        target.copy_(flat.view(target.shape))
    return weight


def gather_weight_grad(grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """For every flat index ``k = i * d_in + j``: ``Σ_t grad_output[t, i] * input[t, j]`` (an SDDMM).

    Equal to ``(grad_output^T @ input).flatten()[indices]`` without forming the ``(d_out, d_in)`` gradient.
    Returns ``(len(indices),)`` values in :func:`accumulate_dtype` (fp32, or fp64 for fp64 inputs).

    How, by device (same function): on CPU torch's ``sparse.sampled_addmm`` on a CSR pattern of the indices, a tuned
    dot product per index, about 25x faster than the gather-dot and 3x faster than a dense ``g^T x`` and a gather at
    SmolLM2 sizes; where torch lacks it, a dense product over blocks of rows and a gather. Elsewhere a chunked
    gather-dot (:func:`_gather_dot`).
    """
    d_out, d_in = grad_output.shape[-1], input.shape[-1]
    idx = indices.long()
    if grad_output.device.type == "cpu":
        acc = accumulate_dtype(grad_output, input)
        g = grad_output.reshape(-1, d_out).to(acc)  # (T, d_out)
        x = input.reshape(-1, d_in).to(acc)  # (T, d_in)
        order = torch.argsort(idx)
        sidx = idx[order]  # (k,) row-major, as CSR wants; repeats stay adjacent and each gets its own dot
        if sidx.numel() and not (0 <= int(sidx[0]) and int(sidx[-1]) < d_out * d_in):
            raise IndexError(
                f"gather_weight_grad: indices must lie in [0, {d_out * d_in}), got {int(sidx[0])}..{int(sidx[-1])}"
            )
        try:
            vals = _sampled_addmm(g, x, sidx)  # (k,) in sorted order
        except (RuntimeError, NotImplementedError):
            vals = _gather_blocked(g, x, sidx)
        out = torch.empty_like(vals)
        out[order] = vals
        return out
    return _gather_dot(grad_output, input, idx)


def _sampled_addmm(g: torch.Tensor, x: torch.Tensor, sidx: torch.Tensor) -> torch.Tensor:
    """``(g^T x).flatten()[sidx]`` through ``torch.sparse.sampled_addmm``; ``g (T, d_out)``, ``x (T, d_in)``, sorted
    ``sidx (k,)``."""
    d_out, d_in = g.shape[1], x.shape[1]
    crow = torch.zeros(d_out + 1, dtype=torch.long)
    crow[1:] = torch.bincount(sidx // d_in, minlength=d_out).cumsum(0)  # (d_out + 1,) row starts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            crow, sidx % d_in, g.new_zeros(sidx.numel()), size=(d_out, d_in), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern, g.t().contiguous(), x, beta=0.0).values()  # (k,)


_BLOCK_ELEMS = 1 << 22  # _gather_blocked: at most 16 MB of fp32 dense gradient at a time


def _gather_blocked(
    g: torch.Tensor, x: torch.Tensor, sidx: torch.Tensor, block_elems: Optional[int] = None
) -> torch.Tensor:
    """``(g^T x).flatten()[sidx]`` as a matmul over blocks of output rows and a gather; sorted ``sidx (k,)``."""
    d_out, d_in = g.shape[1], x.shape[1]
    rows = max(1, (block_elems or _BLOCK_ELEMS) // max(1, d_in))
    out = torch.empty(sidx.numel(), dtype=g.dtype, device=g.device)
    starts = torch.arange(0, d_out + rows, rows, device=sidx.device) * d_in
    bounds = torch.searchsorted(sidx, starts).tolist()  # each row block is a contiguous run of sidx
    for b, r0 in enumerate(range(0, d_out, rows)):
        s, e = bounds[b], bounds[b + 1]
        if s < e:
            block = g[:, r0 : r0 + rows].t() @ x  # (B, d_in) transient
            out[s:e] = block.reshape(-1)[sidx[s:e] - r0 * d_in]
    return out


def _gather_dot(grad_output: torch.Tensor, input: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The definition, as a chunked gather of token rows and a dot product per index."""
    d_out, d_in = grad_output.shape[-1], input.shape[-1]
    acc = accumulate_dtype(grad_output, input)
    g_t = grad_output.reshape(-1, d_out).t().to(acc).contiguous()  # (d_out, T), token-contiguous rows
    x_t = input.reshape(-1, d_in).t().to(acc).contiguous()  # (d_in, T)
    rows, cols = idx // d_in, idx % d_in  # (k,)
    out = torch.empty(idx.numel(), dtype=acc, device=g_t.device)
    chunk = max(1, (1 << 24) // max(1, g_t.shape[1]))  # bound the (chunk, T) gathered rows to ~64 MB each
    for s in range(0, idx.numel(), chunk):
        g_r, x_c = g_t[rows[s : s + chunk]], x_t[cols[s : s + chunk]]  # (chunk, T) each
        out[s : s + chunk] = torch.bmm(g_r.unsqueeze(1), x_c.unsqueeze(2)).view(-1)  # (chunk,) row-wise dots
    return out


def partial_weight_grad(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    cols: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The weight gradient ``grad_output^T @ input`` restricted to output ``rows`` and/or input ``cols``.

    Returns ``(len(rows) or d_out, len(cols) or d_in)`` in :func:`accumulate_dtype`.
    """
    d_out, d_in = grad_output.shape[-1], input.shape[-1]
    g = grad_output.reshape(-1, d_out)  # (T, d_out)
    x = input.reshape(-1, d_in)  # (T, d_in)
    if rows is not None:
        g = g.index_select(1, rows.long())  # (T, R)
    if cols is not None:
        x = x.index_select(1, cols.long())  # (T, C)
    acc = accumulate_dtype(grad_output, input)
    return g.to(acc).t() @ x.to(acc)  # (R, C)
