"""SparseLoRA layers: ``y = x (W + Σ_a s_a M_a ⊙ (B_a A_a))^T + b`` with an exact, memory-lean gradient.

The naive implementation builds the dense ``M ⊙ BA`` per layer and lets autograd keep it (and the mask) alive until
backward. :class:`MaskedLoraLinearFn` instead saves only ``x``, ``A`` and ``B`` and recomputes the masked delta in
backward. Unlike LoRS it keeps the mask in the gradient, so ``grad_A`` and ``grad_B`` equal autograd's through the
dense formulation.

bitsandbytes bases (``Linear4bit`` NF4/FP4, ``Linear8bitLt``) are handled QLoRA-style: the function gets a callable
that dequantizes the base weight (:mod:`sparse_peft._quant`), calls it in forward and again in backward, and keeps
nothing of size ``(d_out, d_in)`` in between.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from transformers.pytorch_utils import Conv1D

from ... import _quant
from ..._registry import BufferDict
from ...masks import nm_mask, pack_mask, parse_nm, unpack_mask, unpack_mask_as
from .._common import base_fingerprint

SUPPORTED_LAYERS = (nn.Linear, Conv1D)  # plus bitsandbytes' Linear4bit / Linear8bitLt, see sparse_peft._quant


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _masks_as(
    packed_masks: Sequence[torch.Tensor], shape: tuple[int, int], ab: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Each adapter's M as 0/1 values in its compute dtype, ``(d_out, d_in)``; masks shared by adapters are unpacked
    once."""
    out, seen = [], {}
    for i, packed in enumerate(packed_masks):
        key = (id(packed), _compute_dtype(ab[2 * i]))
        if key not in seen:
            seen[key] = unpack_mask_as(packed, shape, key[1])
        out.append(seen[key])
    return out


def _masked_products(masks: Sequence[torch.Tensor], ab: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``M_a ⊙ (B_a @ A_a)`` per adapter, unscaled, in the compute dtype, ``(d_out, d_in)``.

    Outside ``M_a`` the entries are ``±0`` (a 0/1 multiply, several times faster on CPU than ``masked_fill``).
    """
    prods = []
    for i, mask in enumerate(masks):
        a, b = ab[2 * i], ab[2 * i + 1]  # (r, d_in), (d_out, r)
        ct = mask.dtype
        prods.append((b.to(ct) @ a.to(ct)).mul_(mask))  # (d_out, d_in)
    return prods


def _masked_delta(
    packed_masks: Sequence[torch.Tensor],
    shape: tuple[int, int],
    scalings: Sequence[float],
    ab: Sequence[torch.Tensor],
) -> Optional[torch.Tensor]:
    """Σ_a s_a · M_a ⊙ (B_a @ A_a), in fp32 (fp64 for fp64 adapters), ``(d_out, d_in)``; None without adapters."""
    prods = _masked_products(_masks_as(packed_masks, shape, ab), ab)
    if not prods:
        return None
    delta = prods[0].mul_(scalings[0])
    for d, s in zip(prods[1:], scalings[1:]):
        delta.add_(d, alpha=s)
    return delta


WeightArg = Union[torch.Tensor, Callable[[], torch.Tensor], None]


def _effective_weight(
    weight: Optional[torch.Tensor], prods: Sequence[torch.Tensor], scalings: Sequence[float], dtype: torch.dtype
) -> torch.Tensor:
    """``W + Σ_a s_a prods_a`` (``weight`` None: no base), ``(d_out, d_in)`` in ``dtype``.

    When the base and the products share a dtype (fp32 training) this is one fused pass per adapter.
    """
    if not prods:
        return weight.to(dtype)
    if weight is not None and weight.dtype == prods[0].dtype:
        out = torch.add(weight, prods[0], alpha=scalings[0])
        for d, s in zip(prods[1:], scalings[1:]):
            out.add_(d, alpha=s)
        return out.to(dtype)
    delta = prods[0] * scalings[0]  # low-precision base: sum the delta in fp32, add it once in the base dtype
    for d, s in zip(prods[1:], scalings[1:]):
        delta.add_(d, alpha=s)
    if weight is None:
        return delta.to(dtype)
    return (weight + delta.to(weight.dtype)).to(dtype)


class MaskedLoraLinearFn(torch.autograd.Function):
    """``F.linear(x, W + Σ_a s_a M_a ⊙ (B_a A_a), bias)``; ``weight=None`` means the delta alone.

    ``exact`` holds one flag per adapter (``None``: all exact). An exact adapter gets the gradient of the masked
    model, ``grad_A = s Bᵀ (M ⊙ gᵀx)``, which needs the dense ``gᵀx``. An adapter with ``False`` gets the LoRS-style
    gradient without the mask, ``grad_A = s (gB)ᵀ x``, two rank-r matmuls as in LoRA; forward and merge stay masked.

    ``weight`` may also be a callable returning the dense ``(d_out, d_in)`` weight (a dequantizing bitsandbytes
    base): it is called in forward and again in backward, so the dequantized weight is never saved.

    Saved for backward: ``x``, the (frozen) weight unless it comes from a callable, and the adapters' ``A``/``B``.
    The dense delta, the effective weight and the masks are rebuilt in backward; no ``(d_out, d_in)`` tensor outlives
    the forward. In backward each mask is unpacked once and used both for the effective weight (``grad_x``) and to
    mask the weight gradient.
    """

    @staticmethod
    def forward(ctx, x, weight: WeightArg, bias, packed_masks, shape, scalings, exact, *ab):
        getter = weight if callable(weight) and not isinstance(weight, torch.Tensor) else None
        dense = getter() if getter is not None else weight  # (d_out, d_in), transient for a getter
        prods = _masked_products(_masks_as(packed_masks, shape, ab), ab)  # [(d_out, d_in)] per adapter
        out = F.linear(x, _effective_weight(dense, prods, scalings, x.dtype), bias)  # (..., d_out)
        del prods
        ctx.save_for_backward(x, None if getter is not None else weight, *ab)
        ctx.getter = getter
        ctx.packed_masks, ctx.shape, ctx.scalings = packed_masks, shape, scalings
        ctx.exact = (True,) * len(packed_masks) if exact is None else tuple(exact)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *ab = ctx.saved_tensors
        d_out, d_in = ctx.shape
        g = grad_out.reshape(-1, d_out).to(x.dtype)  # (T, d_out); autocast may have made it lower precision than x
        x2 = x.reshape(-1, d_in)  # (T, d_in)
        masks = _masks_as(ctx.packed_masks, ctx.shape, ab)  # 0/1 in each adapter's compute dtype
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            dense = ctx.getter() if ctx.getter is not None else weight  # recomputed, e.g. dequantized again
            w_eff = _effective_weight(dense, _masked_products(masks, ab), ctx.scalings, g.dtype)
            grad_x = (g @ w_eff).reshape(x.shape)  # (..., d_in)
            del w_eff
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        grad_ab = [None] * len(ab)
        if ab and any(ctx.needs_input_grad[7:]):
            ct = _compute_dtype(ab[0])
            exact = [i for i, e in enumerate(ctx.exact) if e]
            grad_w = (g.t() @ x2).to(ct) if exact else None  # (d_out, d_in): the dense weight gradient, transient
            for i, (mask, s) in enumerate(zip(masks, ctx.scalings)):
                a, b = ab[2 * i], ab[2 * i + 1]
                if ctx.exact[i]:  # M ⊙ dL/dW; the last exact adapter may reuse grad_w's storage
                    gm = grad_w.mul_(mask) if i == exact[-1] else grad_w * mask  # (d_out, d_in)
                    grad_ab[2 * i] = (b.to(ct).t() @ gm).mul_(s).to(a.dtype)  # (r, d_in)
                    grad_ab[2 * i + 1] = (gm @ a.to(ct).t()).mul_(s).to(b.dtype)  # (d_out, r)
                else:  # LoRS-style: the unmasked low-rank gradient, s applied to the small results
                    gc, xc = g.to(ct), x2.to(ct)
                    grad_ab[2 * i] = ((gc @ b.to(ct)).t() @ xc).mul_(s).to(a.dtype)  # (r, T) @ (T, d_in)
                    grad_ab[2 * i + 1] = (gc.t() @ (xc @ a.to(ct).t())).mul_(s).to(b.dtype)  # (d_out, T) @ (T, r)
        return (grad_x, None, grad_bias, None, None, None, None, *grad_ab)


class SparseLoraLayer(BaseTunerLayer):
    """Adapter state of SparseLoRA, shared by the layer classes."""

    adapter_layer_names = ("sparse_lora_A", "sparse_lora_B")
    other_param_names = (
        "sparse_lora_mask",
        "sparse_lora_fingerprint",
        "sparse_lora_dropout",
        "r",
        "lora_alpha",
        "scaling",
        "exact_gradient",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.sparse_lora_A = nn.ParameterDict({})
        self.sparse_lora_B = nn.ParameterDict({})
        # Packed bits of M (1/32 of an fp32 weight); saved, so custom masks survive a round trip.
        self.sparse_lora_mask = BufferDict({}, persistent=True)
        # sha256 of the base's zero pattern when the adapter was created; checked on load.
        self.sparse_lora_fingerprint = BufferDict({}, persistent=True)
        self.sparse_lora_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.exact_gradient: dict[str, bool] = {}  # False: LoRS-style gradient without the mask
        self._quant_merge_saved: list = []  # quantized weights replaced by merges, for an exact unmerge
        self._disable_adapters = False
        self.merged_adapters = []
        self.module_name: str = kwargs.pop("module_name", "")  # for error messages only
        self.kwargs = kwargs
        base = self.get_base_layer()
        _quant.check_supported(base, self.module_name, "SparseLoRA")
        if _quant.quant_kind(base) == "4bit":
            base.support_avx512bf16_for_cpu = False  # bnb issue 2078: never repack this weight in place
        self.out_features, self.in_features = _quant.logical_shape(base)

    # ---- weight views ---------------------------------------------------------------------------------------
    @property
    def _fan_in_fan_out(self) -> bool:
        return isinstance(self.get_base_layer(), Conv1D)

    @property
    def quant_kind(self) -> Optional[str]:
        """``"4bit"`` / ``"8bit"`` for a bitsandbytes base, else ``None``."""
        return _quant.quant_kind(self.get_base_layer())

    def _linear_weight(self) -> torch.Tensor:
        """The base weight as ``nn.Linear`` stores it, ``(d_out, d_in)``: a view for Conv1D, a fresh dequantized
        tensor for a bitsandbytes base (which is why forward passes this method, not its result, for those)."""
        return _quant.logical_weight(self.get_base_layer(), self.module_name)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    # ---- adapter creation -----------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_weights: bool,
        mask_type: str = "base",
        nm_pattern: Optional[str] = None,
        exact_gradient: bool = True,
        **kwargs: Any,
    ) -> None:
        d_out, d_in = self.weight_shape
        if r > min(d_in, d_out):
            warnings.warn(
                f"SparseLoRA r={r} exceeds min(d_in, d_out)={min(d_in, d_out)} of a layer; the update "
                "cannot have higher rank than that."
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.exact_gradient[adapter_name] = bool(exact_gradient)
        self.sparse_lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        weight = self._linear_weight().detach()
        self.sparse_lora_A[adapter_name] = nn.Parameter(torch.empty(r, d_in, device=weight.device, dtype=torch.float32))
        self.sparse_lora_B[adapter_name] = nn.Parameter(
            torch.empty(d_out, r, device=weight.device, dtype=torch.float32)
        )
        self.reset_parameters(adapter_name, init_weights)
        if weight.device.type == "meta":
            mask = torch.ones(self.weight_shape, dtype=torch.bool, device="meta")
        elif mask_type == "nm":
            n, m = parse_nm(nm_pattern, field="SparseLoraConfig.nm_pattern")
            if d_in % m:
                raise ValueError(
                    f"SparseLoraConfig.nm_pattern={nm_pattern!r} needs every target's input size to be divisible "
                    f"by {m}; a target has d_in={d_in}. Exclude it with exclude_modules or use mask_type='base'."
                )
            mask = nm_mask(weight, n, m)
        else:  # "base", and "custom" until set_sparse_lora_masks is called
            mask = weight != 0
        self.sparse_lora_mask[adapter_name] = pack_mask(mask)
        fp = base_fingerprint(self.get_base_layer(), weight)
        self.sparse_lora_fingerprint[adapter_name] = fp.to(weight.device)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def reset_parameters(self, adapter_name: str, init_weights: bool) -> None:
        a, b = self.sparse_lora_A[adapter_name], self.sparse_lora_B[adapter_name]
        with torch.no_grad():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(b)
            else:
                nn.init.normal_(b, std=0.1)

    def set_mask(self, adapter_name: str, mask: torch.Tensor, module_name: str = "") -> None:
        """Replace M of ``adapter_name`` with a boolean ``(d_out, d_in)`` mask (``nn.Linear`` layout)."""
        where = f" for module {module_name!r}" if module_name else ""
        if adapter_name not in self.sparse_lora_mask:
            raise KeyError(f"no SparseLoRA adapter named {adapter_name!r}{where}")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"the mask{where} must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != self.weight_shape:
            raise ValueError(
                f"the mask{where} has shape {tuple(mask.shape)}, but the weight is (d_out, d_in)="
                f"{self.weight_shape}; pass masks in nn.Linear layout (transpose masks of Conv1D weights)."
            )
        if self.merged:
            raise RuntimeError(
                f"cannot change the mask{where} while adapters are merged; call unmerge_adapter() first."
            )
        device = self.sparse_lora_mask[adapter_name].device
        self.sparse_lora_mask[adapter_name] = pack_mask(mask.to(device=device).bool())

    def get_mask(self, adapter_name: str) -> torch.Tensor:
        """M of ``adapter_name`` as a boolean ``(d_out, d_in)`` tensor."""
        return unpack_mask(self.sparse_lora_mask[adapter_name], self.weight_shape)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s · M ⊙ (B A)`` in fp32, ``(d_out, d_in)``."""
        return _masked_delta(
            [self.sparse_lora_mask[adapter_name]],
            self.weight_shape,
            [self.scaling[adapter_name]],
            [self.sparse_lora_A[adapter_name], self.sparse_lora_B[adapter_name]],
        )


class Linear(nn.Module, SparseLoraLayer):
    """SparseLoRA around an ``nn.Linear`` or a transformers ``Conv1D``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_weights: bool = True,
        mask_type: str = "base",
        nm_pattern: Optional[str] = None,
        exact_gradient: bool = True,
        **kwargs,
    ) -> None:
        super().__init__()
        SparseLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name, r, lora_alpha, lora_dropout, init_weights, mask_type, nm_pattern, exact_gradient
        )

    def _write_delta(self, adapter_name: str, sign: float, safe_merge: bool = False) -> None:
        if self.quant_kind is not None:
            return self._write_delta_quantized(adapter_name, sign, safe_merge)
        base = self.get_base_layer()
        w = base.weight
        delta = self.get_delta_weight(adapter_name)  # (d_out, d_in) fp32, exactly 0 outside M
        if self._fan_in_fan_out:
            delta = delta.t()
        new = (w.data.float() + sign * delta).to(w.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"NaNs or infs detected while merging adapter {adapter_name!r}; the model is unchanged.")
        # W + 0 is exact in fp32, and fp32 -> low precision -> fp32 round-trips, so every position outside M keeps
        # its base value bit for bit. Writing with where() makes that independent of rounding corner cases.
        keep = ~self.get_mask(adapter_name)
        if self._fan_in_fan_out:
            keep = keep.t()
        w.data.copy_(torch.where(keep, w.data, new))

    def _write_delta_quantized(self, adapter_name: str, sign: float, safe_merge: bool = False) -> None:
        """Merge: dequantize, add ``s M ⊙ BA`` (outside M the dequantized value is kept bit for bit), re-quantize
        keeping the zero pattern. Unmerge (``sign < 0``): put back the quantized weight the merge replaced, exactly.

        Lossy for non-zeros, as in peft's LoRA: re-quantization rounds every value of a block again, with a new
        absmax. Zeros stay exactly zero (0 maps to the exact zero code of NF4, FP4 and int8), and no non-zero is
        rounded to zero (see :func:`sparse_peft._quant.requantize`).
        """
        base = self.get_base_layer()
        if sign < 0:
            _quant.restore(base, self._quant_merge_saved.pop())
            return
        if self.quant_kind == "4bit":
            warnings.warn(
                "Merging SparseLoRA into a 4-bit base re-quantizes the weight: non-zero values change by "
                "rounding error (zeros stay exactly zero)."
            )
        w = self._linear_weight()  # (d_out, d_in) dequantized, fresh
        delta = self.get_delta_weight(adapter_name)  # (d_out, d_in) fp32, exactly 0 outside M
        new = (w.float() + delta).to(w.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"NaNs or infs detected while merging adapter {adapter_name!r}; the model is unchanged.")
        merged = torch.where(self.get_mask(adapter_name), new, w)  # (d_out, d_in)
        self._quant_merge_saved.append(_quant.requantize(base, merged, self.module_name))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.sparse_lora_A:
                self._write_delta(name, +1.0, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.sparse_lora_A:
                self._write_delta(name, -1.0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x, *args, **kwargs)
        if self.merged:
            return self._base_forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.sparse_lora_A]
        if not active:
            return self._base_forward(x, *args, **kwargs)
        with_dropout = self.training and any(not isinstance(self.sparse_lora_dropout[a], nn.Identity) for a in active)
        if not with_dropout:  # one fused matmul with the effective weight
            return self._fused(x, self._fn_args(active))
        out = self._base_forward(x, *args, **kwargs)
        for a in active:
            out = out + MaskedLoraLinearFn.apply(self.sparse_lora_dropout[a](x), None, None, *self._fn_args([a]))
        return out

    def _fused(self, x: torch.Tensor, fn_args: list) -> torch.Tensor:
        """``x (W + Σ s M ⊙ BA)^T + b`` in one matmul. A bitsandbytes base is dequantized inside the function (in
        forward and again in backward), computing in its ``compute_dtype`` like bitsandbytes does."""
        base = self.get_base_layer()
        if self.quant_kind is None:
            return MaskedLoraLinearFn.apply(x, self._linear_weight(), base.bias, *fn_args)
        dtype = _quant.compute_dtype(base, x)
        bias = None if base.bias is None else base.bias.to(dtype)
        return MaskedLoraLinearFn.apply(x.to(dtype), self._linear_weight, bias, *fn_args).to(x.dtype)

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer alone. A bitsandbytes base is dequantized here rather than run through its own forward,
        whose CPU inference path repacks the weight in place (bitsandbytes issue 2078)."""
        if self.quant_kind is None:
            return self.base_layer(x, *args, **kwargs)
        return self._fused(x, [(), self.weight_shape, (), ()])

    def _fn_args(self, adapters: list[str]) -> list:
        ab = []
        for a in adapters:
            ab += [self.sparse_lora_A[a], self.sparse_lora_B[a]]
        return [
            tuple(self.sparse_lora_mask[a] for a in adapters),
            self.weight_shape,
            tuple(self.scaling[a] for a in adapters),
            tuple(self.exact_gradient[a] for a in adapters),
            *ab,
        ]

    def __repr__(self) -> str:
        return "sparse_lora." + super().__repr__()
