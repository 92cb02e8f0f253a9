"""SpielModel: injects SpIEL layers and runs drop-and-grow after optimizer steps.

Drop-and-grow is triggered by a global torch optimizer step post-hook (``register_optimizer_step_post_hook``),
installed once per process when a SpIEL adapter with ``auto_reselection=True`` is created. After every ``step()`` of
any ``torch.optim.Optimizer`` the hook checks whether the optimizer steps a SpIEL adapter's values; if so the adapter's
step counter advances and, every ``reselection_steps`` steps, its indices are reselected. Accelerate's optimizer
wrapper, gradient accumulation (the inner step runs once per update) and skipped fp16 steps (no inner step) all
count correctly, because the hook sits on the inner torch optimizer. Under a ``transformers.Trainer`` the counter
follows ``state.global_step`` (set at the first training forward of each ``train()`` call), so a run resumed from a
checkpoint continues the schedule from the checkpoint's step. Custom loops can switch the hook off
(``auto_reselection=False``) and call :func:`spiel_step` after ``optimizer.step()``.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
import warnings
import weakref
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from ... import _quant
from ..._layout import linear_shape, linear_weight
from ..._registry import SparsePeftType
from .._common import DEFAULT_TARGET_MODULES, check_zero_fingerprints, default_target_modules
from . import regrowth
from .layer import SUPPORTED_LAYERS, Linear, SpielLayer

logger = logging.getLogger("sparse_peft.spiel")

SPARSE_BASE_ZERO_FRACTION = 0.01  # a target with at least this fraction of exact zeros makes the base "sparse"

_MODELS: "weakref.WeakSet[SpielModel]" = weakref.WeakSet()
_HOOK_HANDLE = None


def _global_step_hook(optimizer, args, kwargs) -> None:
    for model in list(_MODELS):
        model._on_optimizer_step(optimizer)


def _ensure_step_hook(model: "SpielModel") -> None:
    global _HOOK_HANDLE
    _MODELS.add(model)
    if _HOOK_HANDLE is None:
        _HOOK_HANDLE = register_optimizer_step_post_hook(_global_step_hook)


class _DistSync:
    """Collectives of the default process group: sum statistics, broadcast rank 0's indices."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist

    def all_reduce(self, t: torch.Tensor) -> None:
        self.dist.all_reduce(t)

    def broadcast(self, t: torch.Tensor) -> None:
        self.dist.broadcast(t, src=0)


def _dist_sync() -> Optional[_DistSync]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _DistSync()
    return None


def _trainer_state():
    """The ``TrainerState`` of the ``transformers.Trainer`` whose training loop is on the call stack, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        state = getattr(obj, "state", None)
        if isinstance(getattr(state, "global_step", None), int) and hasattr(obj, "create_optimizer"):
            return state
        frame = frame.f_back
    return None


def _torch_optimizer(optimizer):
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _adam_beta2(optimizer, param: nn.Parameter) -> float:
    """beta2 of the param group holding ``param``; selection='ma' decays its row/column accumulators with it."""
    opt = _torch_optimizer(optimizer)
    for group in getattr(opt, "param_groups", []):
        if any(p is param for p in group["params"]):
            betas = group.get("betas")
            if betas is None or len(betas) < 2:
                break
            return float(betas[1])
    raise ValueError(
        f"SpielConfig(selection='ma') needs an Adam-family optimizer (a param group with 'betas', e.g. AdamW) to "
        f"read beta2 for its momentum approximation; got {type(opt).__name__}. Use selection='ag' with this "
        "optimizer, or switch to torch.optim.AdamW."
    )


_WARNED_STATE: set = set()


def reset_optimizer_slots(optimizer, param: nn.Parameter, slots: torch.Tensor) -> None:
    """Zero the optimizer's per-element state of ``param`` at ``slots`` (AdamW ``exp_avg``/``exp_avg_sq``,
    ``max_exp_avg_sq``, SGD ``momentum_buffer``, ...). Scalars such as ``step`` are left alone."""
    opt = _torch_optimizer(optimizer)
    state = getattr(opt, "state", {}).get(param)
    if not state:
        return
    for key, t in state.items():
        if torch.is_tensor(t) and t.shape == param.shape:
            t[slots.to(t.device)] = 0
        elif torch.is_tensor(t) and t.dim() > 0 and (type(opt), key) not in _WARNED_STATE:
            _WARNED_STATE.add((type(opt), key))
            warnings.warn(
                f"SpIEL cannot reset optimizer state {key!r} of {type(opt).__name__} (shape "
                f"{tuple(t.shape)} != values {tuple(param.shape)}); regrown slots keep stale state."
            )


class SpielModel(BaseTuner):
    """SpIEL sparse fine-tuning (peft type ``SPIEL``). Created by ``peft.get_peft_model``.

    Example:
        ```python
        import torch
        import sparse_peft
        from peft import get_peft_model

        base = torch.nn.Sequential(torch.nn.Linear(16, 16))
        config = sparse_peft.SpielConfig(r=2, target_modules=["0"], reselection_steps=2, accumulation_steps=1)
        model = get_peft_model(base, config)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(4):
            model(torch.randn(8, 16)).pow(2).mean().backward()
            opt.step()  # drop-and-grow runs after steps 2 and 4, by itself
            opt.zero_grad()
        assert model.base_model.spiel_stats()["reselections"] == 2
        ```
    """

    prefix: str = SparsePeftType.SPIEL.prefix
    tuner_layer_cls = SpielLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    # ---- injection -----------------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(model_config.get("model_type"), "SpielConfig")
        return peft_config

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        """Guard every ``Linear4bit`` of the model against bitsandbytes issue 2078 (:func:`_quant.guard_repacking`)."""
        super()._prepare_model(peft_config, model)
        _quant.guard_repacking(model)

    def _targets(self, config) -> list[nn.Module]:
        """The base layers that ``config`` targets (inside existing SpIEL layers too)."""
        found = []
        for key, module in self.model.named_modules():
            if not self._check_target_module_exists(config, key):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(base, SUPPORTED_LAYERS) and _quant.is_supported(base):
                found.append(base)
        return found

    def _resolve(self, config, adapter_name: str) -> None:
        """Once per adapter, before its first layer: total size (num_deltas) and SEFT auto-detection."""
        resolved = self.__dict__.setdefault("_spiel_resolved", {})
        if adapter_name in resolved:
            return
        targets = self._targets(config)
        numel = sum(d_out * d_in for d_out, d_in in map(linear_shape, targets)) or 1
        if config.preserve_sparsity is None:  # logical weights: a bitsandbytes base is dequantized
            fractions = [
                float((linear_weight(m) == 0).float().mean()) for m in targets if m.weight.device.type != "meta"
            ]
            sparse = bool(fractions) and max(fractions) >= SPARSE_BASE_ZERO_FRACTION
            config.preserve_sparsity = sparse
            if sparse:
                logger.warning(
                    "SpIEL adapter %r: the base is sparse (up to %.0f%% zeros in a target), so preserve_sparsity=True "
                    "(SEFT mode): merged weights keep exactly the base's number of non-zeros per module (and its N:M "
                    "pattern). Pass preserve_sparsity=False to turn this off.",
                    adapter_name,
                    100 * max(fractions),
                )
        resolved[adapter_name] = numel

    def _budget(self, config, adapter_name: str, d_out: int, d_in: int) -> int:
        if config.r is not None:
            return config.r * (d_in + d_out)
        if config.density is not None:
            return max(1, int(round(config.density * d_in * d_out)))
        total = self.__dict__["_spiel_resolved"][adapter_name]
        return max(1, int(round(config.num_deltas * d_in * d_out / total)))

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        self._resolve(config, adapter_name)
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        _quant.check_supported(base, current_key, "SpIEL")
        d_out, d_in = linear_shape(base)
        layer_kwargs = dict(
            k=self._budget(config, adapter_name, d_out, d_in),
            init_weights=config.init_weights,
            preserve_sparsity=bool(config.preserve_sparsity),
            nm_pattern=config.nm_pattern,
            values_dtype=config.values_dtype,
            selection=config.selection,
        )
        if isinstance(target, Linear):
            target.update_layer(adapter_name, **layer_kwargs)
            layer = target
        else:
            layer = Linear(target, adapter_name, module_name=current_key, **layer_kwargs)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, target)
        layer._spiel_collect[adapter_name] = self._collect_next(config, 0)
        if config.auto_reselection:
            _ensure_step_hook(self)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        dtype = getattr(torch, self.peft_config[adapter_name].values_dtype)
        for layer in self._layers(adapter_name):  # keep the configured values dtype (peft upcasts 16-bit to fp32)
            v = layer.spiel_values[adapter_name]
            if v.dtype != dtype:
                layer.spiel_values[adapter_name] = nn.Parameter(v.data.to(dtype), requires_grad=v.requires_grad)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        suffix = f".spiel_values.{adapter_name}"
        modules = dict(model.named_modules())
        for key, t in state_dict.items():  # fused adapters (and num_deltas rounding) may hold another k
            layer = modules.get(key[: -len(suffix)]) if key.endswith(suffix) else None
            if isinstance(layer, SpielLayer) and layer.spiel_values[adapter_name].numel() != t.numel():
                _resize(layer, adapter_name, t.numel())
        check_zero_fingerprints(model, state_dict, adapter_name, "spiel_fingerprint")
        return state_dict

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            self._follow_trainer()  # before this step's backward, which may have to collect AG statistics
        return super().forward(*args, **kwargs)

    # ---- drop-and-grow ---------------------------------------------------------------------------------------
    def _layers(self, adapter_name: str) -> list[SpielLayer]:
        return [m for m in self.model.modules() if isinstance(m, SpielLayer) and adapter_name in m.spiel_values]

    def _state(self, adapter_name: str) -> dict:
        states = self.__dict__.setdefault("_spiel_states", {})
        return states.setdefault(
            adapter_name,
            dict(step=0, total_steps=None, resolved=False, reselections=0, reselect_seconds=0.0, changed=0),
        )

    def _follow_trainer(self, names: Optional[Sequence[str]] = None) -> None:
        """Align the step counters of SpIEL adapters with a ``transformers.Trainer`` run that just started.

        The first time a training step runs under a new ``Trainer.train()`` call (a new ``TrainerState``), the
        counter is set to ``state.global_step``: 0 for a fresh run, the checkpoint's step after
        ``resume_from_checkpoint``. So the reselection schedule, the AG accumulation windows and the regrow decay
        continue where the checkpoint left off. ``total_steps`` is read again from the new run (``state.max_steps``).
        """
        state = None
        for name in names if names is not None else self.active_adapters:
            config = self.peft_config.get(name)
            if not isinstance(config, _cfg_cls()):
                continue
            st = self._state(name)
            seen = st.get("trainer_state")
            if state is None:
                state = _trainer_state()
                if state is None:
                    return
            if seen is not None and seen() is state:
                continue
            st["trainer_state"] = weakref.ref(state)
            st["step"] = int(state.global_step)
            max_steps = getattr(state, "max_steps", None)
            st["total_steps"] = config.total_steps or (
                max_steps if isinstance(max_steps, int) and max_steps > 0 else None
            )
            st["resolved"] = True
            if st["step"]:
                logger.info(
                    "SpIEL adapter %r: the Trainer resumes at step %d; drop-and-grow continues from there.",
                    name,
                    st["step"],
                )
            self._arm_collection(name, config, st, self._layers(name))

    @staticmethod
    def _collect_next(config, step: int) -> bool:
        """AG: accumulate |grad W| during optimizer step ``step + 1``?"""
        if config.selection != "ag" or config.regrow_fraction <= 0:
            return False
        nxt = step + 1
        return regrowth.in_accumulation_window(nxt, config.reselection_steps, config.accumulation_steps)

    def _on_optimizer_step(self, optimizer) -> None:
        """Called by the global hook after every torch optimizer step in the process."""
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, config in list(self.peft_config.items()):
            if not getattr(config, "auto_reselection", False):
                continue
            layers = self._layers(name)
            if layers and id(layers[0].spiel_values[name]) in ids:
                self._advance(name, optimizer, layers)

    def spiel_step(self, optimizer=None, adapter_names: Optional[Sequence[str]] = None) -> dict:
        """Count one optimizer step for ``adapter_names`` (default: the active SpIEL adapters) and drop-and-grow
        when it is due. For custom loops with ``auto_reselection=False``; call it after ``optimizer.step()``.

        ``optimizer`` is needed to reset the state of regrown slots (and by ``selection="ma"`` to read beta2).
        Returns :meth:`spiel_stats` of the first adapter.
        """
        names = list(
            adapter_names or [a for a in self.active_adapters if isinstance(self.peft_config.get(a), _cfg_cls())]
        )
        for name in names:
            if self.peft_config[name].auto_reselection:
                raise RuntimeError(
                    f"SpIEL adapter {name!r} has auto_reselection=True: drop-and-grow already runs after every "
                    "optimizer.step(). Calling spiel_step as well would count steps twice; create the adapter with "
                    "SpielConfig(auto_reselection=False) to drive it yourself."
                )
            self._advance(name, optimizer, self._layers(name))
        return self.spiel_stats(names[0]) if names else {}

    def _advance(self, name: str, optimizer, layers: list[SpielLayer]) -> None:
        config = self.peft_config[name]
        if not layers:
            return
        if config.auto_reselection:  # the hook runs before the Trainer counts the step
            self._follow_trainer([name])  # in case this run's forward did not pass through this model
        st = self._state(name)
        st["step"] += 1
        step = st["step"]
        if config.selection == "ma":
            if optimizer is None:
                raise ValueError("SpielConfig(selection='ma') needs the optimizer: spiel_step(model, optimizer).")
            beta2 = _adam_beta2(optimizer, layers[0].spiel_values[name])
            for layer in layers:
                layer._ma_update(name, beta2)
        if not st["resolved"]:
            st["total_steps"] = config.total_steps
            st["resolved"] = True
            if st["total_steps"] is None and config.regrow_fraction > 0:
                logger.info(
                    "SpIEL adapter %r: no total_steps and no Trainer found; regrow_fraction stays constant.", name
                )
        if regrowth.is_reselection_step(step, config.reselection_steps):
            t0 = time.perf_counter()
            sync = _dist_sync()
            changed = 0
            for layer in layers:
                n = regrowth.regrow_count(
                    layer.spiel_k[name], step, config.regrow_fraction, config.regrow_schedule, st["total_steps"]
                )
                slots = layer.spiel_reselect(name, n, sync)
                if slots.numel() and optimizer is not None:
                    reset_optimizer_slots(optimizer, layer.spiel_values[name], slots)
                changed += int(slots.numel())
            st["reselections"] += 1
            st["changed"] += changed
            st["reselect_seconds"] += time.perf_counter() - t0
        self._arm_collection(name, config, st, layers)

    def _arm_collection(self, name: str, config, st: dict, layers: list[SpielLayer]) -> None:
        """AG: switch |grad W| accumulation on or off for the next optimizer step (``st["step"] + 1``)."""
        step = st["step"]
        collect = self._collect_next(config, step) and (
            st["total_steps"] is None
            or regrowth.regrow_fraction_at(
                _next_reselection(step + 1, config.reselection_steps),
                config.regrow_fraction,
                config.regrow_schedule,
                st["total_steps"],
            )
            > 0
        )
        for layer in layers:
            layer._spiel_collect[name] = collect
            if not collect:
                layer._spiel_ag.pop(name, None)

    def spiel_stats(self, adapter_name: str = "default") -> dict:
        """Counters of drop-and-grow: optimizer ``step``, ``reselections``, ``changed`` slots (total),
        ``reselect_seconds`` spent in drop-and-grow, and the ``total_steps`` used by the schedule."""
        st = self._state(adapter_name)
        return {k: st[k] for k in ("step", "reselections", "changed", "reselect_seconds", "total_steps")}

    # ---- serving -------------------------------------------------------------------------------------------
    def merge_only(self, adapter_name: str) -> None:
        """Serve ``adapter_name`` merged: unmerge whatever is merged (restores k base values each) and merge this
        adapter (a scatter of its k values). Switching adapters costs O(k) per module, no reload."""
        self.unmerge_adapter()
        self.set_adapter(adapter_name)
        self.merge_adapter([adapter_name])

    def fuse_adapters(self, adapter_names: Sequence[str], new_name: str, weights: Optional[Sequence[float]] = None):
        """See :func:`fuse_spiel_adapters`."""
        if len(adapter_names) < 1:
            raise ValueError("fuse_adapters needs at least one adapter name.")
        weights = [1.0] * len(adapter_names) if weights is None else list(weights)
        if len(weights) != len(adapter_names):
            raise ValueError(f"fuse_adapters: {len(adapter_names)} adapters but {len(weights)} weights.")
        for a in adapter_names:
            if not isinstance(self.peft_config.get(a), _cfg_cls()):
                raise ValueError(f"fuse_adapters: {a!r} is not a SpIEL adapter of this model.")
        config = copy.deepcopy(self.peft_config[adapter_names[0]])
        config.auto_reselection = False
        config.init_weights = True
        config.preserve_sparsity = any(self.peft_config[a].preserve_sparsity for a in adapter_names)
        self.peft_config[new_name] = config
        self.inject_adapter(self.model, new_name)
        for layer in self._layers(new_name):
            _fuse_layer(layer, adapter_names, weights, new_name)


def _next_reselection(step: int, every: int) -> int:
    return -(-step // every) * every


def _cfg_cls():
    from .config import SpielConfig

    return SpielConfig


def _resize(layer: SpielLayer, adapter: str, k: int) -> None:
    """Give ``adapter`` in ``layer`` room for ``k`` values (before a state dict with another k is loaded)."""
    v = layer.spiel_values[adapter]
    layer.spiel_values[adapter] = nn.Parameter(v.new_zeros(k), requires_grad=v.requires_grad)
    idx = layer.spiel_indices[adapter]
    layer.spiel_indices[adapter] = idx.new_zeros(k)
    if adapter in layer.spiel_partners:
        layer.spiel_partners[adapter] = idx.new_full((k,), regrowth.NO_PARTNER)
    layer.spiel_k[adapter] = k


@torch.no_grad()
def _fuse_layer(layer: SpielLayer, sources: Sequence[str], weights: Sequence[float], new: str) -> None:
    present = [(a, w) for a, w in zip(sources, weights) if a in layer.spiel_values]
    idx = torch.cat([layer.spiel_indices[a].long() for a, _ in present])  # (Σk,)
    vals = torch.cat([w * layer.spiel_values[a].detach().float() for a, w in present])  # (Σk,)
    uniq, inv = torch.unique(idx, return_inverse=True)
    summed = torch.zeros(uniq.numel(), dtype=torch.float32, device=vals.device).index_add_(0, inv, vals)
    dtype = layer.spiel_values[new].dtype
    _resize(layer, new, uniq.numel())
    layer.spiel_values[new].data.copy_(summed.to(dtype))
    layer.spiel_indices[new].copy_(uniq.to(layer.spiel_indices[new].dtype))
    if new in layer.spiel_partners:
        group = layer.spiel_group[new]
        nonzero = (layer._linear_weight() != 0).reshape(-1)
        if int(regrowth.group_capacity(nonzero, uniq, group).min()) >= 0:
            sens = layer._linear_weight().abs().float().reshape(-1)
            layer.spiel_partners[new].copy_(regrowth.assign_partners(nonzero, uniq, sens, group))
        # else: partners stay -1 and the general rule (lowest |w| of the group) picks the pruned weights


def spiel_step(model: nn.Module, optimizer=None, adapter_names: Optional[Sequence[str]] = None) -> dict:
    """Run SpIEL's per-step bookkeeping (and drop-and-grow when due) in a custom training loop.

    Only for adapters created with ``SpielConfig(auto_reselection=False)``; call it once after every
    ``optimizer.step()``. With the default ``auto_reselection=True`` nothing needs calling.

    Example:
        ```python
        # loss.backward(); optimizer.step()
        # sparse_peft.spiel_step(model, optimizer)
        # optimizer.zero_grad()
        ```
    """
    return _spiel_model(model).spiel_step(optimizer, adapter_names)


def fuse_spiel_adapters(
    model: nn.Module, adapter_names: Sequence[str], new_name: str, weights: Optional[Sequence[float]] = None
) -> None:
    """Add adapter ``new_name`` = ``Σ_a weights[a] · delta_a`` of SpIEL adapters on the same base.

    Indices are the union of the sources' indices; values at indices that several adapters share are summed
    (weighted). The fused adapter is frozen and does not drop-and-grow. In SEFT mode its revived positions are paired
    with pruned partners again (lowest ``|W|``), so it keeps the base's non-zero counts like any SpIEL adapter.
    """
    _spiel_model(model).fuse_adapters(adapter_names, new_name, weights)


def _spiel_model(model: nn.Module) -> SpielModel:
    inner = getattr(model, "module", model)  # DDP
    tuner = getattr(inner, "base_model", inner)
    if not isinstance(tuner, SpielModel):
        raise TypeError(f"expected a PeftModel with SpIEL adapters, got {type(model).__name__}")
    return tuner


__all__ = ["SpielModel", "fuse_spiel_adapters", "reset_optimizer_slots", "spiel_step"]
