"""SpIEL layers: ``y = x (W + scatter(values at indices))^T + b`` with a value gradient gathered at the indices.

:class:`SpielLinearFn` builds the effective weight transiently in forward (it is not saved), rebuilds it in backward
for ``grad_x`` and computes ``grad_values`` as the SDDMM of ``grad_output`` and ``input`` at the indices
(:func:`sparse_peft.ops.gather_weight_grad`). No weight-sized tensor outlives a pass, except the |gradient|
accumulator of ``selection="ag"`` during the accumulation window before a reselection.

SEFT mode (``preserve_sparsity``): a slot on a pruned base position whose merged value is non-zero ("revived")
prunes its *partner*, an active base weight of the same group chosen by lowest sensitivity ``|θ·∇θ|`` at the last
reselection (see :mod:`.regrowth`). So every adapter, applied to any weight, keeps that weight's number of non-zeros
per group (per module, or per N:M group) exactly. Forward, backward and merge use one function to build the weight,
so what merge writes is what the model computed.

On a bitsandbytes base (``Linear4bit`` NF4/FP4, ``Linear8bitLt``) the base weight is dequantized for each forward
and again in backward (:mod:`sparse_peft._quant`); merging re-quantizes with the layer's own settings, keeping the
merged weight's zero pattern exactly, and unmerging puts the replaced quantized weight back.
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

from ... import _quant
from ... import ops as _ops
from ..._dist import full_tensor, shard_like
from ..._layout import LINEAR_TYPES, linear_shape, linear_weight
from ..._registry import BufferDict
from ...masks import parse_nm
from .._common import base_fingerprint
from . import regrowth

SUPPORTED_LAYERS = LINEAR_TYPES  # plus bitsandbytes' Linear4bit / Linear8bitLt, see sparse_peft._quant
INIT_STD = 0.1  # init_weights=False: values ~ N(0, INIT_STD^2)
_NM_GROUPS = (4, 8, 16)  # M of the N:M patterns detected on SEFT bases (N <= M/2)

# The value gradient is the SDDMM op of sparse_peft.ops on every device: the CUDA kernel where it is built, the
# reference (torch's sampled_addmm on CPU) otherwise.
_gather_weight_grad = _ops.gather_weight_grad  # (T, d_out), (T, d_in), (k,) -> (k,) fp32

_scatter_add_ = _ops.scatter_add_delta_  # in place: weight.flat[idx] += alpha * values (fp32 sum, rounded once)


def index_dtype(numel: int) -> torch.dtype:
    """int32 when every flat index of a weight with ``numel`` entries fits, else int64."""
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


def detect_group_size(weight: torch.Tensor) -> int:
    """SEFT group of a ``(d_out, d_in)`` base: M of a detected N:M pattern (N <= M/2), else the whole module."""
    d_out, d_in = weight.shape
    nonzero = weight != 0
    for m in _NM_GROUPS:
        if d_in % m == 0 and int(nonzero.reshape(d_out, d_in // m, m).sum(-1).max()) <= m // 2:
            return m
    return weight.numel()


class SpielLinearFn(torch.autograd.Function):
    """``F.linear(x, W_eff, bias)`` with ``W_eff`` built by ``layer`` from the active adapters' values.

    Saved for backward: ``x``, the values (parameters, no copy) and the SEFT kill positions (a few ints). The
    effective weight is rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, layer, adapters, *values):
        w_eff, kills = layer._build_weight(adapters, values)  # storage layout, transient
        out = F.linear(x, layer._as_linear(w_eff).to(x.dtype), None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, *values)
        ctx.layer, ctx.adapters, ctx.kills = layer, adapters, kills
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *values = ctx.saved_tensors
        layer = ctx.layer
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w_eff, _ = layer._build_weight(ctx.adapters, values, kills=ctx.kills)
            grad_x = grad_out @ layer._as_linear(w_eff).to(grad_out.dtype)  # (..., d_in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        grads = layer._value_grads(grad_out, x, ctx.adapters, values, ctx.kills, ctx.needs_input_grad[5:])
        return (grad_x, None, grad_bias, None, None, *grads)


class SpielLayer(BaseTunerLayer):
    """Adapter state of SpIEL: ``values`` (trainable), flat ``indices``, and in SEFT mode ``partners``."""

    adapter_layer_names = ("spiel_values",)
    other_param_names = (
        "spiel_indices",
        "spiel_partners",
        "spiel_fingerprint",
        "spiel_k",
        "spiel_group",
        "spiel_selection",
        "_spiel_collect",
        "_spiel_ag_step",
        "_spiel_ma_step",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.spiel_values = nn.ParameterDict({})
        # Flat indices (nn.Linear layout) of the values; unique within an adapter. Saved.
        self.spiel_indices = BufferDict({}, persistent=True)
        # SEFT only: for each slot on a pruned base position, the active base position it prunes (-1: none). Saved.
        self.spiel_partners = BufferDict({}, persistent=True)
        # SEFT only: sha256 of the base's zero pattern when the adapter was created; checked on load.
        self.spiel_fingerprint = BufferDict({}, persistent=True)
        self.spiel_k: dict[str, int] = {}
        self.spiel_group: dict[str, int] = {}  # SEFT group size (M, or numel for the whole module)
        self.spiel_selection: dict[str, str] = {}
        # Statistics of the optimizer step in progress, summed over its backward passes. SpielModel folds them into
        # the optimizer's state after the step (that state is what checkpoints hold); they are never saved.
        self._spiel_collect: dict[str, bool] = {}  # AG: form the dense gradient in this step's backward passes
        self._spiel_ag_step: dict[str, torch.Tensor] = {}  # AG: (d_out, d_in) fp32 sum of this step's g^T x
        self._spiel_ma_step: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # MA: this step's row/column sums
        self._spiel_merge_saved: list[tuple] = []  # base values overwritten by merge, for an exact unmerge
        self._quant_merge_saved: list = []  # bitsandbytes base: the quantized weights merges replaced
        self._disable_adapters = False
        self.merged_adapters = []
        self.module_name: str = kwargs.pop("module_name", "")  # for error messages only
        self.kwargs = kwargs
        base = self.get_base_layer()
        _quant.check_supported(base, self.module_name, "SpIEL")
        if _quant.quant_kind(base) == "4bit":
            base.support_avx512bf16_for_cpu = False  # bnb issue 2078: never repack this weight in place
        self.out_features, self.in_features = linear_shape(base)

    # ---- layouts ---------------------------------------------------------------------------------------------
    @property
    def _fan_in_fan_out(self) -> bool:
        return isinstance(self.get_base_layer(), Conv1D)

    @property
    def quant_kind(self) -> Optional[str]:
        """``"4bit"`` / ``"8bit"`` for a bitsandbytes base, else ``None``."""
        return _quant.quant_kind(self.get_base_layer())

    def _linear_weight(self) -> torch.Tensor:
        """The base weight in ``nn.Linear`` layout ``(d_out, d_in)`` (a transposed view for Conv1D, a fresh
        dequantized tensor for a bitsandbytes base)."""
        return linear_weight(self.get_base_layer())

    def _storage_weight(self) -> torch.Tensor:
        """The base weight, detached, in its storage layout ``_storage_shape``: the parameter itself, or for a
        bitsandbytes base a fresh dequantized ``(d_out, d_in)`` tensor."""
        base = self.get_base_layer()
        if _quant.quant_kind(base) is not None:
            return _quant.dequantize(base, self.module_name)
        return base.weight.detach()

    @property
    def _storage_shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features) if self._fan_in_fan_out else (self.out_features, self.in_features)

    def _as_linear(self, w_storage: torch.Tensor) -> torch.Tensor:
        return w_storage.t() if self._fan_in_fan_out else w_storage

    def _to_storage(self, idx: torch.Tensor) -> torch.Tensor:
        """Flat ``nn.Linear``-layout indices -> flat indices into the stored weight (they differ for Conv1D)."""
        if not self._fan_in_fan_out:
            return idx
        return (idx % self.in_features) * self.out_features + idx // self.in_features

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _seft(self, adapter: str) -> bool:
        return adapter in self.spiel_partners

    # ---- adapter creation ----------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        k: int,
        init_weights: bool,
        preserve_sparsity: bool = False,
        nm_pattern: Optional[str] = None,
        values_dtype: str = "float32",
        selection: str = "ag",
        **kwargs: Any,
    ) -> None:
        d_out, d_in = self.weight_shape
        numel = d_out * d_in
        weight = self._linear_weight().detach()  # (d_out, d_in)
        device = weight.device
        if k > numel:
            raise ValueError(
                f"SpIEL budget k={k} exceeds the {d_out}x{d_in}={numel} weights of a target layer; lower r/density/"
                "num_deltas or exclude the layer with exclude_modules."
            )
        self.spiel_k[adapter_name] = k
        self.spiel_selection[adapter_name] = selection
        dtype = getattr(torch, values_dtype)
        values = torch.zeros(k, dtype=dtype, device=device)
        if not init_weights:
            values.normal_(0.0, INIT_STD)
        self.spiel_values[adapter_name] = nn.Parameter(values)
        idt = index_dtype(numel)
        if device.type == "meta":
            self.spiel_indices[adapter_name] = torch.empty(k, dtype=idt, device=device)
        elif preserve_sparsity:
            self._init_seft(adapter_name, k, weight, nm_pattern, idt)
        else:
            idx = regrowth.grow(regrowth.random_scores(numel), k, active=torch.empty(0, dtype=torch.long))
            self.spiel_indices[adapter_name] = idx.sort().values.to(device=device, dtype=idt)
        self._spiel_collect[adapter_name] = False
        self.set_adapter(self.active_adapters)

    def _init_seft(self, adapter_name: str, k: int, weight: torch.Tensor, nm_pattern: Optional[str], idt) -> None:
        d_out, d_in = weight.shape
        nonzero = (weight != 0).reshape(-1)  # (numel,)
        nnz = int(nonzero.sum())
        if k > nnz:
            raise ValueError(
                f"SpIEL budget k={k} exceeds the {nnz} non-zeros of a {d_out}x{d_in} target layer; with "
                "preserve_sparsity a module holds at most as many deltas as it has non-zeros. Lower r/density/"
                "num_deltas, exclude the layer, or set preserve_sparsity=False."
            )
        if nm_pattern is not None:
            _, m = parse_nm(nm_pattern, field="SpielConfig.nm_pattern")
            if d_in % m:
                raise ValueError(
                    f"SpielConfig.nm_pattern={nm_pattern!r} needs d_in divisible by {m}; a target has "
                    f"d_in={d_in}. Exclude it with exclude_modules."
                )
            group = m
        else:
            group = detect_group_size(weight)
        self.spiel_group[adapter_name] = group
        # Start on the base's non-zeros only: no pruned weight is revived (and no kept weight pruned in exchange)
        # before a reselection has gradient evidence for it. Every group then holds at most its own non-zeros.
        idx = regrowth.random_subset(nonzero.cpu(), k)  # (k,) sorted
        device = weight.device
        self.spiel_indices[adapter_name] = idx.to(device=device, dtype=idt)
        self.spiel_partners[adapter_name] = torch.full((k,), regrowth.NO_PARTNER, device=device, dtype=idt)
        self.spiel_fingerprint[adapter_name] = base_fingerprint(self.get_base_layer(), weight).to(device)

    # ---- the effective weight ----------------------------------------------------------------------------------
    def _build_weight(
        self, adapters: Sequence[str], values: Sequence[torch.Tensor], kills: Optional[list[torch.Tensor]] = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``W`` plus every adapter's delta (and SEFT kills), in the weight's storage layout. Out of place.

        With ``kills=None`` the SEFT kill positions are computed (and returned); otherwise the given ones are used.
        """
        w = self._storage_weight()
        flat = w.reshape(-1) if self.quant_kind is not None else w.reshape(-1).clone()  # (numel,) transient
        out = []
        for i, a in enumerate(adapters):
            given = None if kills is None else kills[i]
            out.append(self._apply_adapter(flat, a, values[i], given))
        return flat.view(self._storage_shape), out

    def _apply_adapter(
        self,
        flat: torch.Tensor,
        adapter: str,
        values: torch.Tensor,
        kill: Optional[torch.Tensor] = None,
        saved: Optional[list] = None,
    ) -> torch.Tensor:
        """``flat[idx] += values`` in place, then zero the SEFT kills; returns the kills (storage layout).

        ``saved`` (a list) receives the values at the kill positions before they were zeroed (for unmerge). Kills
        are never the adapter's own indices, so the scatter does not touch them.
        """
        idx_s = self._to_storage(self.spiel_indices[adapter])
        if kill is not None or not self._seft(adapter):
            _scatter_add_(flat, idx_s, values.detach(), 1.0)
            kill = flat.new_empty(0, dtype=torch.long) if kill is None else kill
        else:
            old = flat[idx_s]  # (k,)
            _scatter_add_(flat, idx_s, values.detach(), 1.0)
            kill = self._seft_kills(adapter, flat, old, flat[idx_s])
        if saved is not None:
            saved.append(flat[kill].clone())
        if kill.numel():
            flat[kill] = 0
        return kill

    def _seft_kills(self, adapter: str, flat: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Positions (storage layout) to zero so that each group keeps the non-zero count it had before the adapter."""
        gained = (old == 0) & (new != 0)  # revived slots
        lost = (old != 0) & (new == 0)  # slots whose delta cancels the weight
        partners = self.spiel_partners[adapter][gained].long()  # (R,) linear layout, -1 = none
        if not bool(lost.any()) and bool((partners >= 0).all()):
            partners = self._to_storage(partners)
            if bool((flat[partners] != 0).all()):
                return partners  # the usual case: each revived slot prunes its own partner
        return self._seft_kills_general(adapter, flat, old, new)

    def _seft_kills_general(self, adapter: str, flat: torch.Tensor, old: torch.Tensor, new: torch.Tensor):
        """Kills when partners are missing or dead (stacked/fused adapters): partners first, then lowest |w|."""
        group = self.spiel_group[adapter]
        numel = flat.numel()
        n_groups = numel // group
        idx = self.spiel_indices[adapter].long()  # linear layout
        excess = torch.zeros(n_groups, dtype=torch.long, device=flat.device)
        excess.index_add_(0, idx // group, (new != 0).long() - (old != 0).long())  # (n_groups,)
        lin = self._as_linear(flat.view(self._storage_shape)).reshape(-1)  # (numel,) linear layout
        gained = (old == 0) & (new != 0)
        p = self.spiel_partners[adapter][gained].long()
        p = p[p >= 0]
        p = torch.unique(p[lin[p] != 0]) if p.numel() else p
        if p.numel():
            keep = regrowth._rank_in_group(p // group) < excess[p // group].clamp(min=0)
            p = p[keep]
            excess -= torch.bincount(p // group, minlength=n_groups)
        picks = [p]
        if bool((excess > 0).any()):
            mag = lin.abs().float()  # (numel,)
            mag[mag == 0] = math.inf
            mag[idx] = math.inf
            mag[p] = math.inf
            need = excess.clamp(min=0)
            if n_groups == 1:
                picks.append(torch.topk(mag, int(need[0]), largest=False).indices)
            else:
                order = torch.sort(mag.view(n_groups, group), dim=1, stable=True).indices  # (n_groups, G)
                take = torch.arange(group, device=flat.device)[None, :] < need[:, None]
                base = torch.arange(n_groups, device=flat.device)[:, None] * group
                picks.append((base + order)[take])
        return self._to_storage(torch.cat(picks))

    # ---- gradients and statistics ------------------------------------------------------------------------------
    def _value_grads(self, grad_out, x, adapters, values, kills, needs) -> list[Optional[torch.Tensor]]:
        """The value gradients (always the SDDMM, so a step computes the same values whatever it collects), and this
        step's growth statistics: AG's dense ``g^T x`` when armed, MA's row/column sums."""
        grads = []
        dense: list = []  # [G, stored]: this backward's dense gradient, formed once for all adapters of the layer
        for i, a in enumerate(adapters):
            if not needs[i]:
                grads.append(None)
                continue
            idx = self.spiel_indices[a]
            gv = _gather_weight_grad(grad_out, x, idx)  # (k,) fp32 SDDMM
            if self._spiel_collect.get(a) and self.spiel_selection.get(a) == "ag":
                self._accumulate_ag(a, grad_out, x, dense)
            if self.spiel_selection.get(a) == "ma":
                self._accumulate_ma(a, grad_out, x)
            later = [kl for kl in kills[i + 1 :] if kl.numel()]
            if later:  # a later adapter pruned some of this adapter's positions: no gradient there
                gv = gv.masked_fill(torch.isin(self._to_storage(idx.long()), torch.cat(later)), 0.0)
            grads.append(gv.to(values[i].dtype))
        return grads

    def _accumulate_ag(self, adapter: str, grad_out, x, dense: list) -> None:
        """AG: add this backward's dense weight gradient (signed) to the step's sum of ``adapter``."""
        if not dense:
            d_out, d_in = self.weight_shape
            g2 = grad_out.reshape(-1, d_out).float()  # (T, d_out)
            dense += [g2.t() @ x.reshape(-1, d_in).float(), False]  # (d_out, d_in) transient
        acc = self._spiel_ag_step.get(adapter)
        if acc is not None:
            acc.add_(dense[0])
        else:  # the first adapter to keep it takes the tensor itself, any other a copy
            self._spiel_ag_step[adapter] = dense[0].clone() if dense[1] else dense[0]
            dense[1] = True

    def _accumulate_ma(self, adapter: str, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        """MA: per-step sums of squared output gradients (rows) and squared inputs (columns)."""
        rows = grad_out.reshape(-1, self.out_features).float().pow(2).sum(0)  # (d_out,)
        cols = x.reshape(-1, self.in_features).float().pow(2).sum(0)  # (d_in,)
        prev = self._spiel_ma_step.get(adapter)
        self._spiel_ma_step[adapter] = (rows, cols) if prev is None else (prev[0] + rows, prev[1] + cols)

    def _take_step_statistics(self, adapter: str) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """This step's AG sum ``(d_out, d_in)`` and MA sums ``(d_out + d_in,)`` (None where not collected); cleared."""
        ag = self._spiel_ag_step.pop(adapter, None)
        ma = self._spiel_ma_step.pop(adapter, None)
        return ag, None if ma is None else torch.cat(ma)

    def growth_scores(self, adapter: str, ag: Optional[torch.Tensor], ma: Optional[torch.Tensor]):
        """Growth scores over all positions, ``(numel,)`` fp32, from AG's accumulated ``|G|`` ``(d_out, d_in)`` or
        MA's averages ``(d_out + d_in,)``; None without statistics. A fresh tensor the caller may overwrite."""
        if self.spiel_selection[adapter] == "ag":
            return None if ag is None else ag.float().reshape(-1).clone()
        if ma is None:
            return None
        rows, cols = ma.float().split([self.out_features, self.in_features])
        return torch.outer(rows, cols).reshape(-1)  # (numel,) rank-1 bound of the squared gradient

    # ---- drop and grow ---------------------------------------------------------------------------------------
    def _full_linear_weight(self) -> torch.Tensor:
        """The whole base weight, ``(d_out, d_in)`` flattened: all-gathered when FSDP2 shards it (a collective),
        dequantized for a bitsandbytes base."""
        if _quant.quant_kind(self.get_base_layer()) is not None:
            return self._linear_weight().reshape(-1)  # (numel,) fresh
        w = full_tensor(self.get_base_layer().weight.detach())
        w = w.t() if self._fan_in_fan_out else w
        return w.reshape(-1)  # (numel,) a copy only for Conv1D

    @torch.no_grad()
    def spiel_reselect(self, adapter: str, n: int, scores: Optional[torch.Tensor], sync=None) -> torch.Tensor:
        """Drop the ``n`` smallest ``|values|`` of ``adapter`` and grow ``n`` new indices where ``scores`` (``(numel,)``
        fp32, used as scratch space) are highest; returns the changed slots ``(n,)``.

        Values and indices are rewritten in place (same Parameter object, sharded or not); new values are 0. In SEFT
        mode the partners of all revived slots are re-chosen by sensitivity. Every rank computes the same decision
        from the same statistics; ``sync`` (a process-group helper) broadcasts rank 0's as a safety net.
        """
        values, indices = self.spiel_values[adapter], self.spiel_indices[adapter]
        if scores is None or n <= 0 or self.merged:
            return torch.empty(0, dtype=torch.long, device=indices.device)
        full = full_tensor(values.detach())  # (k,) all-gathered under FSDP2
        slots = regrowth.drop_slots(full, n).to(indices.device)  # (n,)
        old = indices.long()  # (k,)
        dropped = old.index_select(0, slots)  # (n,)
        kept = old[torch.ones_like(old, dtype=torch.bool).index_fill_(0, slots, False)]  # (k - n,)
        cap = group = None
        seft = self._seft(adapter)
        if seft:
            group = self.spiel_group[adapter]
            weight = self._full_linear_weight()  # (numel,)
            nonzero = weight.bool()  # (numel,) weight != 0 (a cast is much faster than the compare on CPU)
            cap = regrowth.group_capacity(nonzero, kept, group)
        scores = scores.to(indices.device)
        new = regrowth.grow(scores, n, active=kept, dropped=dropped, capacity=cap, group_size=group, scratch=True)
        indices.index_copy_(0, slots, new.to(indices.dtype))
        if seft:
            sens = torch.mul(scores, weight, out=scores).abs_()  # |θ·∇θ| estimate, in place
            partners = regrowth.assign_partners(nonzero, indices, sens, group, scratch=True)
            self.spiel_partners[adapter].copy_(partners)
        if sync is not None:
            for t in (slots, indices, *((self.spiel_partners[adapter],) if seft else ())):
                sync.broadcast(t)
        zero_slots_(values, slots)
        return slots

    # ---- peft behaviours ---------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense delta ``W_eff - W`` of one adapter in fp32, ``(d_out, d_in)`` (SEFT kills included)."""
        w = self._storage_weight().reshape(-1).float()  # (numel,)
        flat = w.clone()
        self._apply_adapter(flat, adapter_name, self.spiel_values[adapter_name])
        return self._as_linear((flat - w).view(self._storage_shape))


def slot_mask(like: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """A bool mask shaped like the 1-D ``like`` (a values vector or its optimizer state), True at ``slots``, laid out
    like ``like`` (sharded the same way under FSDP2)."""
    mask = torch.zeros(like.shape[0], dtype=torch.bool, device=slots.device)
    mask[slots.long()] = True
    return shard_like(mask, like)


@torch.no_grad()
def zero_slots_(t: torch.Tensor, slots: torch.Tensor) -> None:
    """``t[slots] = 0`` in place for a 1-D tensor, sharded (FSDP2) or not."""
    if slots.numel():
        t.data.masked_fill_(slot_mask(t, slots), 0)


class Linear(nn.Module, SpielLayer):
    """SpIEL around an ``nn.Linear`` or a transformers ``Conv1D``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        k: int,
        init_weights: bool = True,
        preserve_sparsity: bool = False,
        nm_pattern: Optional[str] = None,
        values_dtype: str = "float32",
        selection: str = "ag",
        **kwargs,
    ) -> None:
        super().__init__()
        SpielLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, k, init_weights, preserve_sparsity, nm_pattern, values_dtype, selection)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Scatter the values into ``W`` (and zero the SEFT kills). Saves the k overwritten base values."""
        if self.quant_kind is not None:
            return self._merge_quantized(safe_merge, adapter_names)
        w = self.get_base_layer().weight
        if not w.is_contiguous():
            raise RuntimeError("SpIEL merge needs a contiguous base weight.")
        flat = w.data.view(-1)
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.spiel_values:
                continue
            idx_s = self._to_storage(self.spiel_indices[name]).long()
            old = flat[idx_s].clone()
            saved: list = []
            kill = self._apply_adapter(flat, name, self.spiel_values[name], saved=saved)
            kill_old = saved[0]
            if safe_merge and not torch.isfinite(flat[idx_s]).all():
                self._restore(flat, idx_s, old, kill, kill_old)
                raise ValueError(f"NaNs or infs detected while merging adapter {name!r}; the model is unchanged.")
            self._spiel_merge_saved.append((name, idx_s, old, kill, kill_old))
            self.merged_adapters.append(name)

    def _merge_quantized(self, safe_merge: bool, adapter_names: Optional[list[str]]) -> None:
        """Dequantize, apply the adapter as forward does (values and SEFT kills), re-quantize keeping the zero
        pattern (so SEFT's non-zero count survives); the replaced quantized weight is kept for an exact unmerge."""
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.spiel_values:
                continue
            flat = self._storage_weight().reshape(-1)  # (numel,) dequantized, fresh
            self._apply_adapter(flat, name, self.spiel_values[name])
            if safe_merge and not torch.isfinite(flat).all():
                raise ValueError(f"NaNs or infs detected while merging adapter {name!r}; the model is unchanged.")
            self._quant_merge_saved.append(_quant.requantize(base, flat.view(self.weight_shape), self.module_name))
            self.merged_adapters.append(name)

    @staticmethod
    def _restore(flat, idx_s, old, kill, kill_old) -> None:
        if kill.numel():
            flat[kill] = kill_old
        flat[idx_s] = old

    def unmerge(self) -> None:
        """Write back the saved base values: exact in every dtype."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        if self.quant_kind is not None:
            while self.merged_adapters:
                self.merged_adapters.pop()
                _quant.restore(self.get_base_layer(), self._quant_merge_saved.pop())
            return
        flat = self.get_base_layer().weight.data.view(-1)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            saved_name, idx_s, old, kill, kill_old = self._spiel_merge_saved.pop()
            assert saved_name == name, "merge/unmerge bookkeeping out of order"
            self._restore(flat, idx_s, old, kill, kill_old)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x, *args, **kwargs)
        if self.merged:
            return self._base_forward(x, *args, **kwargs)
        active = tuple(a for a in self.active_adapters if a in self.spiel_values)
        if not active:
            return self._base_forward(x, *args, **kwargs)
        base = self.get_base_layer()
        values = (self.spiel_values[a] for a in active)
        if self.quant_kind is None:
            return SpielLinearFn.apply(x, base.weight, base.bias, self, active, *values)
        dtype = _quant.compute_dtype(base, x)  # as bitsandbytes computes; the weight is dequantized inside
        bias = None if base.bias is None else base.bias.to(dtype)
        return SpielLinearFn.apply(x.to(dtype), None, bias, self, active, *values).to(x.dtype)

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer alone; a bitsandbytes base through its dequantized weight (bitsandbytes issue 2078)."""
        if self.quant_kind is None:
            return self.base_layer(x, *args, **kwargs)
        return _quant.linear(self.get_base_layer(), x, self.module_name)

    def __repr__(self) -> str:
        return "spiel." + super().__repr__()
