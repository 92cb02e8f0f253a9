"""SparseLoRA layers: ``y = x (W + Σ_a s_a M_a ⊙ (B_a A_a))^T + b`` with an exact, memory-lean gradient.

The naive implementation builds the dense ``M ⊙ BA`` per layer and lets autograd keep it (and the mask) alive until
backward. :class:`MaskedLoraLinearFn` instead saves only ``x``, ``A`` and ``B`` and recomputes the masked delta in
backward. Unlike LoRS it keeps the mask in the gradient, so ``grad_A`` and ``grad_B`` equal autograd's through the
dense formulation.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from transformers.pytorch_utils import Conv1D

from ..._registry import BufferDict
from ...masks import nm_mask, pack_mask, parse_nm, unpack_mask, zero_fingerprint

SUPPORTED_LAYERS = (nn.Linear, Conv1D)


def _masked_delta(
    packed_masks: Sequence[torch.Tensor],
    shape: tuple[int, int],
    scalings: Sequence[float],
    ab: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Σ_a s_a · M_a ⊙ (B_a @ A_a), in fp32 (fp64 for fp64 adapters), shape ``(d_out, d_in)``."""
    delta = None
    for i, (packed, s) in enumerate(zip(packed_masks, scalings)):
        a, b = ab[2 * i], ab[2 * i + 1]  # (r, d_in), (d_out, r)
        ct = _compute_dtype(a)
        d = (b.to(ct) @ a.to(ct)).mul_(s)  # (d_out, d_in)
        d.masked_fill_(~unpack_mask(packed, shape), 0.0)
        delta = d if delta is None else delta.add_(d)
    return delta


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class MaskedLoraLinearFn(torch.autograd.Function):
    """``F.linear(x, W + Σ_a s_a M_a ⊙ (B_a A_a), bias)``; ``weight=None`` means the delta alone.

    Saved for backward: ``x``, the (frozen) weight, and the adapters' ``A``/``B``. The dense delta, the effective
    weight and the masks are rebuilt in backward; no ``(d_out, d_in)`` tensor outlives the forward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, packed_masks, shape, scalings, *ab):
        delta = _masked_delta(packed_masks, shape, scalings, ab)  # (d_out, d_in) fp32
        w_eff = delta.to(x.dtype) if weight is None else weight + delta.to(weight.dtype)
        out = F.linear(x, w_eff.to(x.dtype), bias)  # (..., d_out)
        ctx.save_for_backward(x, weight, *ab)
        ctx.packed_masks, ctx.shape, ctx.scalings = packed_masks, shape, scalings
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *ab = ctx.saved_tensors
        d_out, d_in = ctx.shape
        g = grad_out.reshape(-1, d_out)  # (T, d_out)
        x2 = x.reshape(-1, d_in)  # (T, d_in)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            scaled = _masked_delta(ctx.packed_masks, ctx.shape, ctx.scalings, ab)
            w_eff = scaled.to(x.dtype) if weight is None else weight + scaled.to(weight.dtype)
            grad_x = (g @ w_eff.to(g.dtype)).reshape(x.shape)  # (..., d_in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        grad_ab = []
        if any(ctx.needs_input_grad[6:]):
            ct = _compute_dtype(ab[0])
            grad_w = (g.t() @ x2).to(ct)  # (d_out, d_in): the dense weight gradient, transient
            for i, (packed, s) in enumerate(zip(ctx.packed_masks, ctx.scalings)):
                a, b = ab[2 * i], ab[2 * i + 1]
                gm = grad_w.masked_fill(~unpack_mask(packed, ctx.shape), 0.0).mul_(s)  # (d_out, d_in)
                grad_ab.append((b.to(ct).t() @ gm).to(a.dtype))  # (r, d_in)
                grad_ab.append((gm @ a.to(ct).t()).to(b.dtype))  # (d_out, r)
        else:
            grad_ab = [None] * len(ab)
        return (grad_x, None, grad_bias, None, None, None, *grad_ab)


class SparseLoraLayer(BaseTunerLayer):
    """Adapter state of SparseLoRA, shared by the layer classes."""

    adapter_layer_names = ("sparse_lora_A", "sparse_lora_B")
    other_param_names = ("sparse_lora_mask", "sparse_lora_fingerprint", "sparse_lora_dropout", "r", "lora_alpha", "scaling")

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
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if isinstance(base, Conv1D):
            d_in, d_out = base.weight.shape
        elif isinstance(base, nn.Linear):
            d_out, d_in = base.weight.shape
        else:  # guarded by the model, kept for direct use
            raise TypeError(f"SparseLoRA supports nn.Linear and transformers Conv1D, got {type(base).__name__}.")
        self.in_features, self.out_features = d_in, d_out

    # ---- weight views ---------------------------------------------------------------------------------------
    @property
    def _fan_in_fan_out(self) -> bool:
        return isinstance(self.get_base_layer(), Conv1D)

    def _linear_weight(self) -> torch.Tensor:
        """The base weight as ``nn.Linear`` stores it, ``(d_out, d_in)`` (a view for Conv1D)."""
        w = self.get_base_layer().weight
        return w.t() if self._fan_in_fan_out else w

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    # ---- adapter creation -----------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, init_weights: bool,
                     mask_type: str = "base", nm_pattern: Optional[str] = None, **kwargs: Any) -> None:
        d_out, d_in = self.weight_shape
        if r > min(d_in, d_out):
            warnings.warn(f"SparseLoRA r={r} exceeds min(d_in, d_out)={min(d_in, d_out)} of a layer; the update "
                          "cannot have higher rank than that.")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.sparse_lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        weight = self._linear_weight().detach()
        self.sparse_lora_A[adapter_name] = nn.Parameter(torch.empty(r, d_in, device=weight.device, dtype=torch.float32))
        self.sparse_lora_B[adapter_name] = nn.Parameter(torch.empty(d_out, r, device=weight.device, dtype=torch.float32))
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
        fp = zero_fingerprint(weight) if weight.device.type != "meta" else torch.zeros(2, dtype=torch.int64)
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
            raise RuntimeError(f"cannot change the mask{where} while adapters are merged; call unmerge_adapter() first.")
        device = self.sparse_lora_mask[adapter_name].device
        self.sparse_lora_mask[adapter_name] = pack_mask(mask.to(device=device).bool())

    def get_mask(self, adapter_name: str) -> torch.Tensor:
        """M of ``adapter_name`` as a boolean ``(d_out, d_in)`` tensor."""
        return unpack_mask(self.sparse_lora_mask[adapter_name], self.weight_shape)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s · M ⊙ (B A)`` in fp32, ``(d_out, d_in)``."""
        return _masked_delta(
            [self.sparse_lora_mask[adapter_name]], self.weight_shape, [self.scaling[adapter_name]],
            [self.sparse_lora_A[adapter_name], self.sparse_lora_B[adapter_name]],
        )


class Linear(nn.Module, SparseLoraLayer):
    """SparseLoRA around an ``nn.Linear`` or a transformers ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_weights: bool = True, mask_type: str = "base",
                 nm_pattern: Optional[str] = None, **kwargs) -> None:
        super().__init__()
        SparseLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_weights, mask_type, nm_pattern)

    def _write_delta(self, adapter_name: str, sign: float, safe_merge: bool = False) -> None:
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
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.sparse_lora_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        weight, bias = self._linear_weight(), base.bias
        with_dropout = self.training and any(not isinstance(self.sparse_lora_dropout[a], nn.Identity) for a in active)
        if not with_dropout:  # one fused matmul with the effective weight
            return MaskedLoraLinearFn.apply(x, weight, bias, *self._fn_args(active))
        out = self.base_layer(x, *args, **kwargs)
        for a in active:
            out = out + MaskedLoraLinearFn.apply(self.sparse_lora_dropout[a](x), None, None, *self._fn_args([a]))
        return out

    def _fn_args(self, adapters: list[str]) -> list:
        ab = []
        for a in adapters:
            ab += [self.sparse_lora_A[a], self.sparse_lora_B[a]]
        return [tuple(self.sparse_lora_mask[a] for a in adapters), self.weight_shape,
                tuple(self.scaling[a] for a in adapters), *ab]

    def __repr__(self) -> str:
        return "sparse_lora." + super().__repr__()
