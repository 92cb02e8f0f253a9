"""``torch.library`` custom ops (namespace ``sparse_peft::``): CUDA kernels where built, the reference otherwise.

Every op has the same definition on every path (see :mod:`sparse_peft.ops.reference`, the spec):

- CPU, Meta and any device without a kernel run the reference;
- CUDA runs the native kernel when :func:`sparse_peft.ops._extension.load` succeeds and every input's
  :func:`~sparse_peft.ops.reference.accumulate_dtype` is fp32 (fp32/fp16/bf16 inputs: the kernels accumulate in fp32),
  else the reference (fp64, e.g. under gradcheck, always takes the reference and accumulates in fp64);
- ``partial_weight_grad`` has no hand-written kernel: on CUDA it runs torch's cuBLAS matmuls with fp32
  accumulation/outputs on 16-bit inputs (``torch.mm(..., out_dtype=float32)``), which is the fastest option we
  measured for a dense (R, C) output.

Autograd: ``gather_weight_grad`` and ``partial_weight_grad`` have a registered backward, written with dense torch ops
for clarity, not speed (only needed for double backward and gradcheck: these ops themselves live inside backward
passes). The in-place ``scatter_add_delta_`` is not differentiable.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _extension, reference

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # accumulate_dtype is fp32 for exactly these
_MM_OUT_F32_DTYPES = (torch.float16, torch.bfloat16)


def _check_indices(indices: torch.Tensor, name: str = "indices") -> None:
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sparse_peft: {name} must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"sparse_peft: {name} must be 1-D, got shape {tuple(indices.shape)}")


def _tokens(grad_output: torch.Tensor, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten leading dims: ``(T, d_out)`` and ``(T, d_in)``."""
    g = grad_output.reshape(-1, grad_output.shape[-1])  # (T, d_out)
    x = input.reshape(-1, input.shape[-1])  # (T, d_in)
    if g.shape[0] != x.shape[0]:
        raise ValueError(
            f"sparse_peft: grad_output and input have different token counts ({g.shape[0]} vs {x.shape[0]})"
        )
    return g, x


def _native(*tensors: torch.Tensor):
    """The extension module if every tensor has a kernel dtype (the kernels accumulate in fp32, which is
    ``accumulate_dtype`` exactly for these) and the build is available, else ``None``."""
    if any(t.dtype not in _KERNEL_DTYPES for t in tensors):
        return None
    return _extension.load()


# -------------------------------------------------------------------------------------------------- scatter_add_delta_
@torch.library.custom_op("sparse_peft::scatter_add_delta_inplace", mutates_args=("weight",))
def _scatter_add_delta_inplace(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    reference.scatter_add_delta_(weight, indices, values, alpha)


@_scatter_add_delta_inplace.register_kernel("cuda")
def _scatter_add_delta_inplace_cuda(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float
) -> None:
    ext = _native(weight, values)
    if ext is None:
        reference.scatter_add_delta_(weight, indices, values, alpha)
    else:
        ext.scatter_add_delta_(weight, indices, values, alpha)


@_scatter_add_delta_inplace.register_fake
def _(weight, indices, values, alpha):
    return None


# ------------------------------------------------------------------------------------------------- gather_weight_grad
@torch.library.custom_op("sparse_peft::gather_weight_grad", mutates_args=())
def _gather_weight_grad(grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return reference.gather_weight_grad(grad_output, input, indices)


@_gather_weight_grad.register_kernel("cuda")
def _gather_weight_grad_cuda(grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    ext = _native(grad_output, input)
    if ext is None:
        return reference.gather_weight_grad(grad_output, input, indices)
    return ext.gather_weight_grad(grad_output, input, indices)


@_gather_weight_grad.register_fake
def _(grad_output, input, indices):
    return grad_output.new_empty((indices.numel(),), dtype=reference.accumulate_dtype(grad_output, input))


def _gather_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gather_backward(ctx, grad):
    grad_output, input, indices = ctx.saved_tensors
    g, x = _tokens(grad_output, input)  # (T, d_out), (T, d_in)
    d_out, d_in = g.shape[1], x.shape[1]
    acc = reference.accumulate_dtype(grad_output, input, grad)
    s = torch.zeros(d_out * d_in, dtype=acc, device=grad.device)
    s = s.index_add_(0, indices.long(), grad.to(acc)).view(d_out, d_in)  # (d_out, d_in) dense, double-backward only
    grad_g = grad_x = None
    if ctx.needs_input_grad[0]:
        grad_g = (x.to(acc) @ s.t()).reshape(grad_output.shape).to(grad_output.dtype)
    if ctx.needs_input_grad[1]:
        grad_x = (g.to(acc) @ s).reshape(input.shape).to(input.dtype)
    return grad_g, grad_x, None


_gather_weight_grad.register_autograd(_gather_backward, setup_context=_gather_setup)


# ------------------------------------------------------------------------------------------------ partial_weight_grad
def _mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in ``accumulate_dtype``: a 16-bit tensor-core GEMM with fp32 output on CUDA, else a GEMM in the
    accumulation dtype (fp32, or fp64 for fp64 inputs)."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in _MM_OUT_F32_DTYPES:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):  # a torch/cuBLAS without fp32-output 16-bit GEMMs
            pass
    acc = reference.accumulate_dtype(a, b)
    return a.to(acc) @ b.to(acc)


def _partial_weight_grad_mm(
    grad_output: torch.Tensor, input: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]
) -> torch.Tensor:
    g, x = _tokens(grad_output, input)  # (T, d_out), (T, d_in)
    if rows is not None:
        g = g.index_select(1, rows.long())  # (T, R)
    if cols is not None:
        x = x.index_select(1, cols.long())  # (T, C)
    return _mm_acc(g.t(), x)  # (R, C)


@torch.library.custom_op("sparse_peft::partial_weight_grad", mutates_args=())
def _partial_weight_grad(
    grad_output: torch.Tensor, input: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]
) -> torch.Tensor:
    return reference.partial_weight_grad(grad_output, input, rows, cols)


@_partial_weight_grad.register_kernel("cuda")
def _partial_weight_grad_cuda(grad_output, input, rows, cols):
    return _partial_weight_grad_mm(grad_output, input, rows, cols)


@_partial_weight_grad.register_fake
def _(grad_output, input, rows, cols):
    r = grad_output.shape[-1] if rows is None else rows.numel()
    c = input.shape[-1] if cols is None else cols.numel()
    return grad_output.new_empty((r, c), dtype=reference.accumulate_dtype(grad_output, input))


def _partial_setup(ctx, inputs, output):
    grad_output, input, rows, cols = inputs
    ctx.has_rows, ctx.has_cols = rows is not None, cols is not None
    ctx.save_for_backward(grad_output, input, *(t for t in (rows, cols) if t is not None))


def _partial_backward(ctx, grad):
    grad_output, input, *sel = ctx.saved_tensors
    rows = sel.pop(0) if ctx.has_rows else None
    cols = sel.pop(0) if ctx.has_cols else None
    g, x = _tokens(grad_output, input)  # (T, d_out), (T, d_in)
    g_r = g if rows is None else g.index_select(1, rows.long())  # (T, R)
    x_c = x if cols is None else x.index_select(1, cols.long())  # (T, C)
    acc = reference.accumulate_dtype(grad_output, input, grad)
    grad, grad_g, grad_x = grad.to(acc), None, None
    if ctx.needs_input_grad[0]:
        d = x_c.to(acc) @ grad.t()  # (T, R)
        if rows is not None:
            d = torch.zeros(g.shape, dtype=acc, device=d.device).index_add_(1, rows.long(), d)  # (T, d_out)
        grad_g = d.reshape(grad_output.shape).to(grad_output.dtype)
    if ctx.needs_input_grad[1]:
        d = g_r.to(acc) @ grad  # (T, C)
        if cols is not None:
            d = torch.zeros(x.shape, dtype=acc, device=d.device).index_add_(1, cols.long(), d)  # (T, d_in)
        grad_x = d.reshape(input.shape).to(input.dtype)
    return grad_g, grad_x, None, None


_partial_weight_grad.register_autograd(_partial_backward, setup_context=_partial_setup)


# ---------------------------------------------------------------------------------------------------------- public API
def scatter_add_delta_(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """In place ``weight += alpha * scatter(values)`` at flat ``indices`` into ``weight`` (``nn.Linear`` layout).

    Repeated indices are summed; the sum is formed in fp32 (fp64 when ``weight`` or ``values`` is fp64) and rounded
    once to ``weight.dtype``. Used by merge/unmerge and to build effective weights. Not differentiable; returns
    ``weight``.
    """
    _check_indices(indices)
    if values.numel() != indices.numel():
        raise ValueError(f"sparse_peft: {indices.numel()} indices but {values.numel()} values")
    with torch.no_grad():
        _scatter_add_delta_inplace(weight.detach(), indices, values.detach().reshape(-1), float(alpha))
    return weight


def gather_weight_grad(grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """SDDMM: for every flat index ``k = i * d_in + j``, ``Σ_t grad_output[t, i] · input[t, j]``, shape ``(k,)``.

    Equals ``(grad_output^T @ input).flatten()[indices]`` without forming the dense ``(d_out, d_in)`` gradient.
    Leading dims of ``grad_output (..., d_out)`` and ``input (..., d_in)`` are flattened into tokens. Summed and
    returned in fp32, or fp64 for fp64 inputs.
    """
    _check_indices(indices)
    _tokens(grad_output, input)
    return _gather_weight_grad(grad_output, input, indices)


def partial_weight_grad(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    cols: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``grad_output^T @ input`` restricted to output ``rows`` and/or input ``cols``, ``(R or d_out, C or d_in)``.

    Summed and returned in fp32, or fp64 for fp64 inputs.
    """
    for t, name in ((rows, "rows"), (cols, "cols")):
        if t is not None:
            _check_indices(t, name)
    _tokens(grad_output, input)
    return _partial_weight_grad(grad_output, input, rows, cols)
