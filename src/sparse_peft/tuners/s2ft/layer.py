"""S²FT layers: a frozen projection plus trainable row or column slices, with partial backprop.

For a column-trained layer (``o_proj``, ``down_proj``) adapter ``a`` holds indices ``cols`` (k,) and a delta
``D`` (d_out, k); for a row-trained layer (``v_proj``, ``up_proj``) ``rows`` (k,) and ``D`` (k, d_in). The effective
weight is ``W`` with the slice replaced by ``slice + M ⊙ D`` (``M`` = the slice's non-zero mask when
``preserve_sparsity``, else all ones). Nothing is ever permuted: the slice is addressed through its indices.

:class:`S2FTLinearFn` computes ``y = x W^T + b + Σ_cols x[:, cols] D^T + Σ_rows scatter_rows(x D^T)`` in one
autograd node, so the only activation a column-trained layer keeps for backward is ``x[:, cols]`` (T, k): the frozen
base matmul needs ``W`` (resident) for ``grad_x`` and nothing else. Backward returns the exact input gradient
``g W_eff`` and the weight gradient of the slice only (``sparse_peft.ops.partial_weight_grad``).

On a bitsandbytes base (``Linear4bit`` NF4/FP4, ``Linear8bitLt``) the function gets a callable that dequantizes the
frozen weight (:mod:`sparse_peft._quant`) in forward and again in backward, so nothing of size ``(d_out, d_in)`` is
kept in between; merging re-quantizes with the layer's own settings, keeping the zero pattern exactly, and unmerging
puts the replaced quantized weight back.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ... import _quant
from ... import ops as _ops
from ..._layout import LINEAR_TYPES, linear_shape, linear_weight
from ..._registry import BufferDict
from ...masks import pack_mask, unpack_mask
from .._common import base_fingerprint

SUPPORTED_LAYERS = LINEAR_TYPES  # plus bitsandbytes' Linear4bit / Linear8bitLt, see sparse_peft._quant
partial_weight_grad = (
    _ops.partial_weight_grad if hasattr(_ops, "partial_weight_grad") else _ops.reference.partial_weight_grad
)


def _effective_delta(delta: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``M ⊙ D`` for a boolean slice mask ``M`` shaped like ``D``; ``None`` means "no zeros in the slice"."""
    return delta if mask is None else delta * mask.to(delta.dtype)


class S2FTLinearFn(torch.autograd.Function):
    """``F.linear(x, W_eff, bias)`` with ``W_eff`` = ``W`` plus the slice deltas of every active adapter.

    ``specs`` holds one ``(axis, index, mask)`` per delta (``mask``: boolean, shaped like the delta, or ``None``).
    Saved for backward: ``W`` (the frozen, resident weight), ``x[:, cols]`` per column adapter, and ``x`` itself only
    if some adapter trains rows. ``weight`` may also be a callable returning ``W`` (a dequantizing bitsandbytes base):
    it is called in forward and again in backward, and nothing is saved for it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, specs, *deltas):
        getter = weight if callable(weight) and not isinstance(weight, torch.Tensor) else None
        out = F.linear(x, getter() if getter is not None else weight, bias)  # (..., d_out)
        last = out.dim() - 1
        slices, need_x = [], False
        for (axis, idx, mask), d in zip(specs, deltas):
            d_eff = _effective_delta(d, mask).to(x.dtype)
            if axis == "cols":
                xs = x.index_select(last, idx)  # (..., k)
                out = out + xs @ d_eff.t()  # (..., d_out)
                slices.append(xs)
            else:
                out = out.index_add(last, idx, x @ d_eff.t())  # rows += (..., k)
                need_x = True
        ctx.specs, ctx.n_slices, ctx.need_x = specs, len(slices), need_x
        ctx.has_bias = bias is not None
        ctx.getter = getter
        ctx.save_for_backward(None if getter is not None else weight, x if need_x else None, *slices, *deltas)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, x, *rest = ctx.saved_tensors
        slices, deltas = rest[: ctx.n_slices], rest[ctx.n_slices :]
        g = grad_out  # (..., d_out)
        last = g.dim() - 1
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.getter() if ctx.getter is not None else weight  # recomputed, e.g. dequantized again
            grad_x = g @ w.to(g.dtype)  # (..., d_in): the frozen part
            for (axis, idx, mask), d in zip(ctx.specs, deltas):
                d_eff = _effective_delta(d, mask).to(g.dtype)
                if axis == "cols":
                    grad_x = grad_x.index_add(last, idx, g @ d_eff)  # cols += (..., k)
                else:
                    grad_x = grad_x + g.index_select(last, idx) @ d_eff  # (..., d_in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.reshape(-1, g.shape[-1]).sum(0)
        grads, s = [], 0
        for i, ((axis, idx, mask), d) in enumerate(zip(ctx.specs, deltas)):
            if axis == "cols":
                xs = slices[s]
                s += 1
            if not ctx.needs_input_grad[4 + i]:
                grads.append(None)
                continue
            if axis == "cols":
                gd = partial_weight_grad(g, xs)  # (d_out, k) fp32
            else:
                gd = partial_weight_grad(g, x, rows=idx)  # (k, d_in) fp32
            if mask is not None:
                gd = gd * mask.to(gd.dtype)
            grads.append(gd.to(d.dtype))
        return (grad_x, None, grad_bias, None, *grads)


class S2FTLayer(BaseTunerLayer):
    """Adapter state of S²FT: per adapter, the trained axis, the slice indices, the slice delta and its mask."""

    adapter_layer_names = ("s2ft_delta",)
    other_param_names = ("s2ft_index", "s2ft_mask", "s2ft_fingerprint", "s2ft_axis")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.s2ft_delta = nn.ParameterDict({})  # (d_out, k) for "cols", (k, d_in) for "rows"; fp32 on 16-bit bases
        self.s2ft_index = BufferDict({}, persistent=True)  # (k,) int64, sorted
        self.s2ft_mask = BufferDict({}, persistent=True)  # packed non-zero mask of the slice; empty = no zeros
        self.s2ft_fingerprint = BufferDict({}, persistent=True)  # zero pattern of the whole base weight
        self.s2ft_axis: dict[str, str] = {}
        # (adapter, slice before merge) for an exact unmerge; on a bitsandbytes base the replaced quantized weight
        self._s2ft_unmerge: list[tuple[str, Any]] = []
        self._disable_adapters = False
        self.merged_adapters = []
        self.module_name: str = kwargs.pop("module_name", "")  # for error messages only
        self.kwargs = kwargs
        base = self.get_base_layer()
        _quant.check_supported(base, self.module_name, "S2FT")
        if _quant.quant_kind(base) == "4bit":
            base.support_avx512bf16_for_cpu = False  # bnb issue 2078: never repack this weight in place
        self.out_features, self.in_features = linear_shape(base)

    @property
    def quant_kind(self) -> Optional[str]:
        """``"4bit"`` / ``"8bit"`` for a bitsandbytes base, else ``None``."""
        return _quant.quant_kind(self.get_base_layer())

    def _linear_weight(self) -> torch.Tensor:
        """The base weight in ``nn.Linear`` layout ``(d_out, d_in)`` (a transposed view for Conv1D, a fresh
        dequantized tensor for a bitsandbytes base)."""
        return linear_weight(self.get_base_layer())

    def update_layer(
        self,
        adapter_name: str,
        axis: str,
        index: torch.Tensor,
        init_weights: bool = True,
        preserve_sparsity: bool = True,
        **kwargs: Any,
    ) -> None:
        if axis not in ("rows", "cols"):
            raise ValueError(f"S2FT axis must be 'rows' or 'cols', got {axis!r}")
        weight = self._linear_weight().detach()
        dim = 0 if axis == "rows" else 1
        index = index.to(device=weight.device, dtype=torch.int64)
        k = index.numel()
        shape = (k, self.in_features) if axis == "rows" else (self.out_features, k)
        self.s2ft_axis[adapter_name] = axis
        self.s2ft_index[adapter_name] = index
        delta = torch.zeros(shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
        if not init_weights:  # non-zero start for tests (global RNG, so two adapters differ)
            delta.copy_(torch.randn(shape) * 0.1)
        self.s2ft_delta[adapter_name] = nn.Parameter(delta)
        if preserve_sparsity and weight.device.type != "meta":
            keep = weight.index_select(dim, index) != 0  # (d_out, k) or (k, d_in)
            packed = (
                pack_mask(keep) if not bool(keep.all()) else torch.zeros(0, dtype=torch.uint8, device=weight.device)
            )
            self.s2ft_mask[adapter_name] = packed
            self.s2ft_fingerprint[adapter_name] = base_fingerprint(self.get_base_layer(), weight).to(weight.device)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def slice_mask(self, adapter_name: str) -> Optional[torch.Tensor]:
        """The boolean non-zero mask of the slice (shaped like the delta), or ``None`` when nothing is masked.

        Unpacked from the saved bits once and cached (keyed on the buffer's storage and version, so loading a
        state dict into the buffer invalidates it).
        """
        packed = self.s2ft_mask[adapter_name] if adapter_name in self.s2ft_mask else None
        if packed is None or packed.numel() == 0:
            return None
        key = (packed.data_ptr(), packed._version, packed.device)
        cache = self.__dict__.setdefault("_s2ft_mask_cache", {})
        hit = cache.get(adapter_name)
        if hit is None or hit[0] != key:
            hit = (key, unpack_mask(packed, self.s2ft_delta[adapter_name].shape))
            cache[adapter_name] = hit
        return hit[1]

    def delete_adapter(self, adapter_name: str) -> None:
        self.__dict__.get("_s2ft_mask_cache", {}).pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def slice_delta(self, adapter_name: str) -> torch.Tensor:
        """``M ⊙ D`` of ``adapter_name``: what is added to the slice, ``(d_out, k)`` or ``(k, d_in)``."""
        return _effective_delta(self.s2ft_delta[adapter_name].detach(), self.slice_mask(adapter_name))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense ``(d_out, d_in)`` delta of ``adapter_name`` (for inspection; zero outside the slice)."""
        d = self.slice_delta(adapter_name).float()
        dense = torch.zeros(self.out_features, self.in_features, dtype=d.dtype, device=d.device)
        dim = 0 if self.s2ft_axis[adapter_name] == "rows" else 1
        return dense.index_copy_(dim, self.s2ft_index[adapter_name], d)


class Linear(nn.Module, S2FTLayer):
    """S²FT around an ``nn.Linear`` or a transformers ``Conv1D``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        axis: str,
        index: torch.Tensor,
        init_weights: bool = True,
        preserve_sparsity: bool = True,
        **kwargs,
    ) -> None:
        super().__init__()
        S2FTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, axis, index, init_weights, preserve_sparsity)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Scatter ``slice + M ⊙ D`` into the base weight; the old slice is kept so unmerge is exact.

        A bitsandbytes base is dequantized, changed the same way and re-quantized keeping the zero pattern
        (:func:`sparse_peft._quant.requantize`); the replaced quantized weight is kept instead of the slice.
        """
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.s2ft_delta:
                continue
            w = self._linear_weight()  # (d_out, d_in): the weight itself, or a fresh dequantized copy
            dim = 0 if self.s2ft_axis[name] == "rows" else 1
            idx = self.s2ft_index[name]
            old = w.data.index_select(dim, idx)  # (d_out, k) or (k, d_in)
            new = (old.float() + self.slice_delta(name).float()).to(w.dtype)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"NaNs or infs detected while merging adapter {name!r}; the model is unchanged.")
            w.data.index_copy_(dim, idx, new)
            if self.quant_kind is not None:
                old = _quant.requantize(self.get_base_layer(), w, self.module_name)
            self._s2ft_unmerge.append((name, old))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            saved_name, old = self._s2ft_unmerge.pop()
            assert saved_name == name, "S2FT merge bookkeeping out of order"
            if self.quant_kind is not None:
                _quant.restore(self.get_base_layer(), old)
                continue
            w = self._linear_weight()
            dim = 0 if self.s2ft_axis[name] == "rows" else 1
            w.data.index_copy_(dim, self.s2ft_index[name], old.to(w.device))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x, *args, **kwargs)
        if self.merged:
            return self._base_forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.s2ft_delta]
        if not active:
            return self._base_forward(x, *args, **kwargs)
        specs = tuple((self.s2ft_axis[a], self.s2ft_index[a], self.slice_mask(a)) for a in active)
        deltas = (self.s2ft_delta[a] for a in active)
        base = self.get_base_layer()
        if self.quant_kind is None:
            return S2FTLinearFn.apply(x, self._linear_weight(), base.bias, specs, *deltas)
        dtype = _quant.compute_dtype(base, x)  # as bitsandbytes computes
        bias = None if base.bias is None else base.bias.to(dtype)
        weight = self._dequantized_as(dtype)
        return S2FTLinearFn.apply(x.to(dtype), weight, bias, specs, *deltas).to(x.dtype)

    def _dequantized_as(self, dtype: torch.dtype):
        """A callable giving the dequantized base weight ``(d_out, d_in)`` in ``dtype`` (called in forward and again
        in backward, so the dense weight is never kept)."""
        return lambda: _quant.dequantize(self.get_base_layer(), self.module_name).to(dtype)

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer alone; a bitsandbytes base through its dequantized weight (bitsandbytes issue 2078)."""
        if self.quant_kind is None:
            return self.base_layer(x, *args, **kwargs)
        return _quant.linear(self.get_base_layer(), x, self.module_name)

    def __repr__(self) -> str:
        return "s2ft." + super().__repr__()
