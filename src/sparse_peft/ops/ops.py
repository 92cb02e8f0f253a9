"""``torch.library`` custom ops (namespace ``sparse_peft::``): CUDA kernels where built, the reference otherwise.

Every op has the same definition on every path (see :mod:`sparse_peft.ops.reference`, the spec):

- CPU, Meta and any device without a kernel run the reference;
- CUDA runs the native kernel when :func:`sparse_peft.ops._extension.load` succeeds and the dtypes are
  fp32/fp16/bf16, else the reference (fp64, e.g. under gradcheck, always takes the reference);
- ``partial_weight_grad`` and ``masked_lora_grad`` have no hand-written kernel: on CUDA they run torch's cuBLAS
  matmuls with fp32 accumulation/outputs on 16-bit inputs (``torch.mm(..., out_dtype=float32)``), which is the
  fastest option we measured for a dense (R, C) output; ``masked_lora_grad`` is row-blocked so the masked dense
  gradient never exists whole.

Autograd: all ops except the in-place ``scatter_add_delta_`` have a registered backward. The backward formulas of
``gather_weight_grad``, ``partial_weight_grad`` and ``masked_lora_grad`` (only needed for double backward and
gradcheck; these ops themselves live inside backward passes) are written with dense torch ops for clarity, not speed.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _extension, reference

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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
    """The extension module if every tensor has a kernel dtype and the build is available, else ``None``."""
    if any(t.dtype not in _KERNEL_DTYPES for t in tensors):
        return None
    return _extension.load()


# --------------------------------------------------------------------------------------------------- scatter_add_delta
@torch.library.custom_op("sparse_peft::scatter_add_delta", mutates_args=())
def _scatter_add_delta(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return reference.scatter_add_delta(weight, indices, values)


@_scatter_add_delta.register_kernel("cuda")
def _scatter_add_delta_cuda(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    ext = _native(weight)
    if ext is None:
        return reference.scatter_add_delta(weight, indices, values)
    return ext.scatter_add_delta(weight, indices, values)


@_scatter_add_delta.register_fake
def _(weight, indices, values):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _scatter_setup(ctx, inputs, output):
    _, indices, values = inputs
    ctx.save_for_backward(indices)
    ctx.values_dtype = values.dtype


def _scatter_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    grad_values = None
    if ctx.needs_input_grad[2]:
        grad_values = grad.reshape(-1).index_select(0, indices.long()).to(ctx.values_dtype)  # (k,)
    grad_weight = grad if ctx.needs_input_grad[0] else None  # d/dW is the identity
    return grad_weight, None, grad_values


_scatter_add_delta.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# -------------------------------------------------------------------------------------------------- scatter_add_delta_
@torch.library.custom_op("sparse_peft::scatter_add_delta_inplace", mutates_args=("weight",))
def _scatter_add_delta_inplace(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    reference.scatter_add_delta_(weight, indices, values, alpha)


@_scatter_add_delta_inplace.register_kernel("cuda")
def _scatter_add_delta_inplace_cuda(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float
) -> None:
    ext = _native(weight)
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
    return grad_output.new_empty((indices.numel(),), dtype=torch.float32)


def _gather_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gather_backward(ctx, grad):
    grad_output, input, indices = ctx.saved_tensors
    g, x = _tokens(grad_output, input)  # (T, d_out), (T, d_in)
    d_out, d_in = g.shape[1], x.shape[1]
    s = torch.zeros(d_out * d_in, dtype=torch.float32, device=grad.device)
    s = s.index_add_(0, indices.long(), grad.float()).view(d_out, d_in)  # (d_out, d_in) dense, double-backward only
    grad_g = grad_x = None
    if ctx.needs_input_grad[0]:
        grad_g = (x.float() @ s.t()).reshape(grad_output.shape).to(grad_output.dtype)
    if ctx.needs_input_grad[1]:
        grad_x = (g.float() @ s).reshape(input.shape).to(input.dtype)
    return grad_g, grad_x, None


_gather_weight_grad.register_autograd(_gather_backward, setup_context=_gather_setup)


# ------------------------------------------------------------------------------------------------ partial_weight_grad
def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result: 16-bit tensor-core GEMM with fp32 output on CUDA, fp32 GEMM otherwise."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in _MM_OUT_F32_DTYPES:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):  # a torch/cuBLAS without fp32-output 16-bit GEMMs
            pass
    return a.float() @ b.float()


def _partial_weight_grad_mm(
    grad_output: torch.Tensor, input: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]
) -> torch.Tensor:
    g, x = _tokens(grad_output, input)  # (T, d_out), (T, d_in)
    if rows is not None:
        g = g.index_select(1, rows.long())  # (T, R)
    if cols is not None:
        x = x.index_select(1, cols.long())  # (T, C)
    return _mm_f32(g.t(), x)  # (R, C)


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
    return grad_output.new_empty((r, c), dtype=torch.float32)


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
    grad_g = grad_x = None
    if ctx.needs_input_grad[0]:
        d = x_c.float() @ grad.t()  # (T, R)
        if rows is not None:
            d = torch.zeros(g.shape, dtype=torch.float32, device=d.device).index_add_(1, rows.long(), d)  # (T, d_out)
        grad_g = d.reshape(grad_output.shape).to(grad_output.dtype)
    if ctx.needs_input_grad[1]:
        d = g_r.float() @ grad  # (T, C)
        if cols is not None:
            d = torch.zeros(x.shape, dtype=torch.float32, device=d.device).index_add_(1, cols.long(), d)  # (T, d_in)
        grad_x = d.reshape(input.shape).to(input.dtype)
    return grad_g, grad_x, None, None


_partial_weight_grad.register_autograd(_partial_backward, setup_context=_partial_setup)


# --------------------------------------------------------------------------------------------------- masked_lora_grad
def _masked_lora_grad_blocked(
    grad_output, input, lora_a, lora_b, mask, scaling: float, block_bytes: int = 64 << 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same function as the reference, but the masked gradient exists one block of output rows at a time."""
    g, x = _tokens(grad_output, input)  # (T, d_out), (T, d_in)
    d_out, d_in = g.shape[1], x.shape[1]
    a, b = lora_a.float(), lora_b.float()  # (r, d_in), (d_out, r)
    grad_a = torch.zeros(a.shape, dtype=torch.float32, device=g.device)  # (r, d_in)
    grad_b = torch.empty(b.shape, dtype=torch.float32, device=g.device)  # (d_out, r)
    step = max(1, block_bytes // (4 * max(1, d_in)))
    for s in range(0, d_out, step):
        gm = _mm_f32(g[:, s : s + step].t(), x)  # (R, d_in)
        gm.masked_fill_(~mask[s : s + step].bool(), 0.0).mul_(scaling)
        grad_b[s : s + step] = gm @ a.t()  # (R, r)
        grad_a.addmm_(b[s : s + step].t(), gm)  # (r, d_in)
    return grad_a, grad_b


@torch.library.custom_op("sparse_peft::masked_lora_grad", mutates_args=())
def _masked_lora_grad(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.masked_lora_grad(grad_output, input, lora_a, lora_b, mask, scaling)


@_masked_lora_grad.register_kernel("cuda")
def _masked_lora_grad_cuda(grad_output, input, lora_a, lora_b, mask, scaling):
    return _masked_lora_grad_blocked(grad_output, input, lora_a, lora_b, mask, scaling)


@_masked_lora_grad.register_fake
def _(grad_output, input, lora_a, lora_b, mask, scaling):
    return (lora_a.new_empty(lora_a.shape, dtype=torch.float32), lora_b.new_empty(lora_b.shape, dtype=torch.float32))


def _masked_setup(ctx, inputs, output):
    *tensors, scaling = inputs
    ctx.scaling = scaling
    ctx.save_for_backward(*tensors)


def _masked_backward(ctx, grad_ga, grad_gb):
    grad_output, input, lora_a, lora_b, mask = ctx.saved_tensors
    g, x = _tokens(grad_output, input)  # (T, d_out), (T, d_in)
    a, b, m = lora_a.float(), lora_b.float(), mask.bool()
    gm = (g.float().t() @ x.float()).masked_fill_(~m, 0.0).mul_(ctx.scaling)  # G: (d_out, d_in), dense
    d_gm = torch.zeros_like(gm)
    d_a = d_b = None
    if grad_ga is not None:  # grad_A = B^T G
        d_b = gm @ grad_ga.float().t()  # (d_out, r)
        d_gm += b @ grad_ga.float()
    if grad_gb is not None:  # grad_B = G A^T
        d_a = grad_gb.float().t() @ gm  # (r, d_in)
        d_gm += grad_gb.float() @ a
    d_p = d_gm.masked_fill_(~m, 0.0).mul_(ctx.scaling)  # (d_out, d_in)
    grad_g = (x.float() @ d_p.t()).reshape(grad_output.shape).to(grad_output.dtype)
    grad_x = (g.float() @ d_p).reshape(input.shape).to(input.dtype)
    d_a = None if d_a is None else d_a.to(lora_a.dtype)
    d_b = None if d_b is None else d_b.to(lora_b.dtype)
    return grad_g, grad_x, d_a, d_b, None, None


_masked_lora_grad.register_autograd(_masked_backward, setup_context=_masked_setup)


# ---------------------------------------------------------------------------------------------------------- public API
def scatter_add_delta(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``weight + scatter(values)`` at flat ``indices`` into ``weight`` (``nn.Linear`` layout), out of place.

    Repeated indices are summed; the sum is formed in fp32 and rounded once to ``weight.dtype``. Differentiable in
    ``weight`` (identity) and ``values`` (the gradient gathered at ``indices``). Returns a contiguous tensor.
    """
    _check_indices(indices)
    if values.numel() != indices.numel():
        raise ValueError(f"sparse_peft: {indices.numel()} indices but {values.numel()} values")
    return _scatter_add_delta(weight, indices, values.reshape(-1))


def scatter_add_delta_(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """In place ``weight += alpha * scatter(values)`` (merge/unmerge). Not differentiable; returns ``weight``."""
    _check_indices(indices)
    if values.numel() != indices.numel():
        raise ValueError(f"sparse_peft: {indices.numel()} indices but {values.numel()} values")
    with torch.no_grad():
        _scatter_add_delta_inplace(weight.detach(), indices, values.detach().reshape(-1), float(alpha))
    return weight


def gather_weight_grad(grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """SDDMM: for every flat index ``k = i * d_in + j``, ``Σ_t grad_output[t, i] · input[t, j]`` in fp32, shape ``(k,)``.

    Equals ``(grad_output^T @ input).flatten()[indices]`` without forming the dense ``(d_out, d_in)`` gradient.
    Leading dims of ``grad_output (..., d_out)`` and ``input (..., d_in)`` are flattened into tokens.
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
    """``grad_output^T @ input`` restricted to output ``rows`` and/or input ``cols``: fp32 ``(R or d_out, C or d_in)``."""
    for t, name in ((rows, "rows"), (cols, "cols")):
        if t is not None:
            _check_indices(t, name)
    _tokens(grad_output, input)
    return _partial_weight_grad(grad_output, input, rows, cols)


def masked_lora_grad(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    mask: torch.Tensor,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_A, grad_B)`` of ``y = x (s · M ⊙ (B A))^T`` in fp32: ``B^T G`` and ``G A^T`` with ``G = s · M ⊙ (g^T x)``.

    On CUDA ``G`` is built one block of rows at a time (about 64 MB), never whole.
    """
    _tokens(grad_output, input)
    return _masked_lora_grad(grad_output, input, lora_a, lora_b, mask, float(scaling))
