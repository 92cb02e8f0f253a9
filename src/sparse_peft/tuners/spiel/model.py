"""SpielModel: injects SpIEL layers and runs drop-and-grow after optimizer steps.

**Where drop-and-grow runs.** Drop-and-grow follows the optimizer steps of the values, so it hangs off the optimizer
that steps them, through torch's per-optimizer hook ``optimizer.register_step_post_hook``. An adapter learns its
optimizer in one of three ways:

- ``sparse_peft.training.SpielCallback`` in a ``transformers.Trainer`` / TRL ``SFTTrainer``: it binds the adapters at
  ``on_train_begin`` and hands the schedule the run's length (``state.max_steps``);
- ``spiel_step(model, optimizer)`` after every ``optimizer.step()`` of a custom loop (``auto_reselection=False``);
- by itself (``auto_reselection=True``, the default, nothing passed): a training forward of an adapter that has no
  optimizer yet registers a torch optimizer pre-step hook. At the first ``step()`` of an optimizer whose param
  groups hold the adapter's values (compared by identity), the adapter binds to that optimizer; the pre-step hook is
  removed right after that step. From then on only the optimizer's own hook is involved.

**Where its state lives.** The step counter, AG's accumulated ``|G|`` of an open window and MA's row/column averages
are entries of ``optimizer.state[values]`` (keys ``spiel_*``), for every SpIEL layer. Whatever saves and restores the
optimizer saves and restores drop-and-grow with it: a Trainer checkpoint (``optimizer.pt``, or FSDP's sharded
optimizer files), ``accelerate``'s ``save_state``, or ``torch.save(optimizer.state_dict())`` in a custom loop. The
adapter written by ``save_pretrained`` holds none of it. Statistics are summed over ranks after every step, so the
state is the same on every rank and one rank's optimizer file holds all of it.
"""

from __future__ import annotations

import copy
import logging
import time
import weakref
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from ... import _quant
from ..._layout import linear_shape, linear_weight
from ..._dist import WrappingGuard, check_wrapping, dist_sync, is_dtensor
from ..._registry import SparsePeftType
from .._common import DEFAULT_TARGET_MODULES, check_zero_fingerprints, default_target_modules
from . import regrowth
from .layer import SUPPORTED_LAYERS, Linear, SpielLayer, slot_mask

logger = logging.getLogger("sparse_peft.spiel")

SPARSE_BASE_ZERO_FRACTION = 0.01  # a target with at least this fraction of exact zeros makes the base "sparse"

# Entries of optimizer.state[values] (checkpoint state). Counters are Python ints: torch's load_state_dict casts
# floating and integer tensors alike to the values' dtype, but leaves plain numbers alone.
STEP = "spiel_step"  # optimizer steps counted
RESELECTIONS = "spiel_reselections"
CHANGED = "spiel_changed"  # slots moved, in total
AG = "spiel_ag"  # (d_out, d_in) fp32: accumulated |G| of the open AG window
MA = "spiel_ma"  # (d_out + d_in,) fp32: MA's row and column averages
STATE_KEYS = (STEP, RESELECTIONS, CHANGED, AG, MA)


def _torch_optimizer(optimizer):
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer`` (itself an Optimizer)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _holds(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    return any(p is param for group in optimizer.param_groups for p in group["params"])


def _adam_beta2(optimizer, param: nn.Parameter) -> float:
    """beta2 of the param group holding ``param``; selection='ma' decays its row/column averages with it."""
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
    ``max_exp_avg_sq``, SGD ``momentum_buffer``, ...), sharded (FSDP2) or not. Scalars such as ``step`` and SpIEL's
    own ``spiel_*`` entries are left alone."""
    opt = _torch_optimizer(optimizer)
    state = getattr(opt, "state", {}).get(param)
    if not state or not slots.numel():
        return
    for key, t in state.items():
        if isinstance(key, str) and key.startswith("spiel_"):
            continue
        if torch.is_tensor(t) and t.shape == param.shape:
            t.masked_fill_(slot_mask(t, slots), 0)
        elif torch.is_tensor(t) and t.dim() > 0 and (type(opt), key) not in _WARNED_STATE:
            _WARNED_STATE.add((type(opt), key))
            logger.warning(
                "SpIEL cannot reset optimizer state %r of %s (shape %s != values %s); regrown slots keep stale state.",
                key,
                type(opt).__name__,
                tuple(t.shape),
                tuple(param.shape),
            )


def _pre_step_hook(model_ref: "weakref.ref[SpielModel]"):
    def hook(optimizer, args, kwargs) -> None:
        model = model_ref()
        if model is not None:
            model._discover(optimizer)

    return hook


def _post_step_hook(model_ref: "weakref.ref[SpielModel]"):
    def hook(optimizer, args, kwargs) -> None:
        model = model_ref()
        if model is not None:
            model._after_step(optimizer)

    return hook


class SpielModel(WrappingGuard, BaseTuner):
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

    guard_name = "SpIEL"
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
        layer._spiel_collect[adapter_name] = self._collect_unbound(config)
        self._guard_forward()

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

    def _before_forward(self) -> None:
        if self.training and torch.is_grad_enabled():
            self._prepare_training_step()
        else:
            check_wrapping(self.model, "SpIEL")

    # ---- binding to the optimizer --------------------------------------------------------------------------------
    def _layers(self, adapter_name: str) -> list[SpielLayer]:
        return [m for m in self.model.modules() if isinstance(m, SpielLayer) and adapter_name in m.spiel_values]

    def _trained_adapters(self) -> list[str]:
        """Active SpIEL adapters whose values train (these run drop-and-grow)."""
        names = []
        for name in self.active_adapters:
            layers = self._layers(name) if isinstance(self.peft_config.get(name), _cfg_cls()) else []
            if layers and layers[0].spiel_values[name].requires_grad:
                names.append(name)
        return names

    def _bound(self, name: str) -> Optional[torch.optim.Optimizer]:
        ref = self.__dict__.setdefault("_spiel_bound", {}).get(name)
        return None if ref is None else ref()

    def _prepare_training_step(self) -> None:
        """Before a training forward: refuse wrappers drop-and-grow cannot work under, and let adapters that have no
        optimizer yet find theirs at its first step."""
        names = self._trained_adapters()
        edited = [layer.spiel_values[n] for n in names for layer in self._layers(n)]
        check_wrapping(self.model, "SpIEL", drop_and_grow=bool(names), edited=edited)
        if not names:
            return
        self._retire_discovery()
        waiting = [n for n in names if self.peft_config[n].auto_reselection and self._bound(n) is None]
        if waiting and self.__dict__.get("_spiel_discovery") is None:
            self.__dict__["_spiel_discovery"] = register_optimizer_step_pre_hook(_pre_step_hook(weakref.ref(self)))

    def _discover(self, optimizer) -> None:
        """The pre-step hook: bind waiting adapters to ``optimizer`` if it steps their values."""
        waiting = [
            n for n in self._trained_adapters() if self.peft_config[n].auto_reselection and self._bound(n) is None
        ]
        for name in waiting:
            if _holds(optimizer, self._layers(name)[0].spiel_values[name]):
                self._bind(name, optimizer)
        if all(self._bound(n) is not None for n in waiting):
            self.__dict__["_spiel_discovery_done"] = True  # removed after this step (not while torch iterates it)

    def _retire_discovery(self) -> None:
        handle = self.__dict__.get("_spiel_discovery")
        if handle is not None and self.__dict__.get("_spiel_discovery_done"):
            handle.remove()
            self.__dict__["_spiel_discovery"] = None
            self.__dict__["_spiel_discovery_done"] = False

    def _bind(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Run ``name``'s drop-and-grow after every step of ``optimizer`` (its own post-step hook, once per optimizer)."""
        hooks = self.__dict__.setdefault("_spiel_hooks", [])
        hooks[:] = [(ref, h) for ref, h in hooks if ref() is not None]
        if not any(ref() is optimizer for ref, _ in hooks):
            handle = optimizer.register_step_post_hook(_post_step_hook(weakref.ref(self)))
            hooks.append((weakref.ref(optimizer), handle))
        self.__dict__.setdefault("_spiel_bound", {})[name] = weakref.ref(optimizer)

    def _after_step(self, optimizer) -> None:
        """The post-step hook of a bound optimizer."""
        self._retire_discovery()
        for name in self._trained_adapters():
            if self.peft_config[name].auto_reselection and self._bound(name) is optimizer:
                self._advance(name, optimizer)

    def attach_optimizer(self, optimizer, total_steps: Optional[int] = None, start_step: Optional[int] = None) -> None:
        """Bind the trained SpIEL adapters (``auto_reselection=True``) to ``optimizer`` now, before its first step.

        ``sparse_peft.training.SpielCallback`` calls this at the start of ``Trainer.train()``. ``total_steps`` is the
        run's length for the regrow decay (``SpielConfig.total_steps`` wins when set). ``start_step`` seeds the step
        counter when the optimizer carries no SpIEL state (a run resumed without optimizer state).
        """
        opt = _torch_optimizer(optimizer)
        for name in self._trained_adapters():
            config = self.peft_config[name]
            layers = self._layers(name)
            if not config.auto_reselection or not _holds(opt, layers[0].spiel_values[name]):
                continue
            self._bind(name, opt)
            run = self._run(name)
            run["total_steps"] = total_steps if total_steps and total_steps > 0 else None
            states = self._states(name, opt, layers, write=False)
            step = self._steps_done(name, states[0], opt.state.get(layers[0].spiel_values[name], {}), in_step=False)
            if not step and start_step:
                logger.warning(
                    "SpIEL adapter %r: the optimizer holds no state at step %d (resumed without optimizer state?); "
                    "the schedule continues from step %d with empty statistics.",
                    name,
                    start_step,
                    start_step,
                )
                run["seed_step"] = step = int(start_step)  # (nothing is written into the optimizer before its step)
            self._sync_run(name, states)
            self._arm(name, config, layers, step)

    # ---- drop-and-grow ---------------------------------------------------------------------------------------
    def _run(self, name: str) -> dict:
        """Per-process bookkeeping of an adapter (the checkpoint state is in the optimizer)."""
        runs = self.__dict__.setdefault("_spiel_runs", {})
        return runs.setdefault(
            name,
            dict(step=0, reselections=0, changed=0, reselect_seconds=0.0, total_steps=None, horizon_logged=False),
        )

    def _states(self, name: str, opt, layers: list[SpielLayer], write: bool = True) -> list[dict]:
        """Where each layer's drop-and-grow state lives: ``opt.state[values]``, so that it is checkpointed with the
        optimizer. Under FSDP2 (DTensor values) a process-local dict instead: torch.distributed.checkpoint restores
        only the entries a fresh optimizer already has, and would drop them (sharded) or restore them on rank 0 alone
        (full state dict, broadcast from rank 0); the step counter then comes back from AdamW's own ``step``."""
        if not is_dtensor(layers[0].spiel_values[name]):  # (a read must not add entries the optimizer has not made)
            values = [layer.spiel_values[name] for layer in layers]
            return [opt.state[v] for v in values] if write else [opt.state.get(v, {}) for v in values]
        local = self.__dict__.setdefault("_spiel_local_state", weakref.WeakKeyDictionary())
        return [local.setdefault(layer, {}).setdefault(name, {}) for layer in layers]

    def _steps_done(self, name: str, state: dict, opt_state: dict, in_step: bool) -> int:
        """Optimizer steps counted before the current one: SpIEL's counter, else AdamW's ``step`` of the values
        (restored by every checkpoint format), else a step given by SpielCallback. ``in_step``: called from the
        post-step hook, where AdamW's count already includes the step in progress."""
        if STEP in state:
            return int(state[STEP])
        adam = opt_state.get("step")
        done = max(0, int(adam) - int(in_step)) if adam is not None else 0
        return max(done, self._run(name).get("seed_step", 0))

    def _sync_run(self, name: str, states: list[dict]) -> None:
        state = states[0]
        run = self._run(name)
        for key, field_ in ((STEP, "step"), (RESELECTIONS, "reselections"), (CHANGED, "changed")):
            run[field_] = int(state.get(key, 0))

    def _total_steps(self, name: str, config) -> Optional[int]:
        run = self._run(name)
        total = config.total_steps or run["total_steps"]
        if total is None and config.regrow_fraction > 0 and not run["horizon_logged"]:
            run["horizon_logged"] = True
            logger.info(
                "SpIEL adapter %r: the run's length is unknown (no SpielConfig.total_steps, no SpielCallback), so "
                "regrow_fraction stays constant at %g.",
                name,
                config.regrow_fraction,
            )
        return total

    @staticmethod
    def _collects(config, step: int, total_steps: Optional[int]) -> bool:
        """AG: form the dense gradient during optimizer step ``step`` (1-based)?"""
        if config.selection != "ag" or config.regrow_fraction <= 0:
            return False
        if not regrowth.in_accumulation_window(step, config.reselection_steps, config.accumulation_steps):
            return False
        nxt = _next_reselection(step, config.reselection_steps)
        return total_steps is None or (
            regrowth.regrow_fraction_at(nxt, config.regrow_fraction, config.regrow_schedule, total_steps) > 0
        )

    @staticmethod
    def _collect_unbound(config) -> bool:
        """Before an adapter knows its step (no optimizer yet), AG collects: the step may lie in a window."""
        return config.selection == "ag" and config.regrow_fraction > 0

    def spiel_step(self, optimizer=None, adapter_names: Optional[Sequence[str]] = None) -> dict:
        """Count one optimizer step for ``adapter_names`` (default: the active SpIEL adapters) and drop-and-grow
        when it is due. For custom loops with ``auto_reselection=False``; call it after ``optimizer.step()``.

        The adapter's step counter and statistics live in ``optimizer``'s state (so they are checkpointed with it),
        and regrown slots have their optimizer state reset. Returns :meth:`spiel_stats` of the first adapter.
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
        if optimizer is None:
            raise ValueError(
                "spiel_step(model, optimizer) needs the optimizer that steps the SpIEL values: drop-and-grow keeps its "
                "step counter and statistics in that optimizer's state and resets it at regrown slots."
            )
        opt = _torch_optimizer(optimizer)
        for name in names:
            self._advance(name, opt)
        return self.spiel_stats(names[0]) if names else {}

    def _advance(self, name: str, opt: torch.optim.Optimizer) -> None:
        """One optimizer step of adapter ``name``: fold its statistics, drop-and-grow when due, arm the next step."""
        config = self.peft_config[name]
        layers = self._layers(name)
        if not layers:
            return
        states = self._states(name, opt, layers)
        step = self._steps_done(name, states[0], opt.state[layers[0].spiel_values[name]], in_step=True) + 1
        sync = dist_sync()
        total = self._total_steps(name, config)
        if config.selection == "ag":
            self._fold_ag(name, layers, states, self._collects(config, step, total), sync)
        else:
            self._fold_ma(name, layers, states, _adam_beta2(opt, layers[0].spiel_values[name]), sync)
        if regrowth.is_reselection_step(step, config.reselection_steps):
            self._reselect(name, config, layers, states, opt, step, total, sync)
        for state in states:
            state[STEP] = step
        self._sync_run(name, states)
        self._arm(name, config, layers, step)

    @staticmethod
    def _fold_ag(name: str, layers: list[SpielLayer], states: list[dict], window: bool, sync) -> None:
        """AG: add ``|G|`` of this step (``G`` summed over its backward passes and over ranks) to the window's sum."""
        for layer, state in zip(layers, states):
            g, _ = layer._take_step_statistics(name)
            if not window:
                continue
            if g is None:  # no backward reached this layer here (a collective needs every rank's part anyway)
                g = torch.zeros(layer.weight_shape, device=layer.spiel_indices[name].device)
            if sync is not None:
                sync.all_reduce(g)
            acc = state.get(AG)
            state[AG] = g.abs_() if acc is None else acc.float().add_(g.abs_())  # (d_out, d_in) fp32

    @staticmethod
    def _fold_ma(name: str, layers: list[SpielLayer], states: list[dict], beta2: float, sync) -> None:
        """MA: fold this step's row/column sums (summed over ranks in one collective) into the averages."""
        sums = []
        for layer in layers:
            _, ma = layer._take_step_statistics(name)
            size = layer.out_features + layer.in_features
            sums.append(ma if ma is not None else torch.zeros(size, device=layer.spiel_indices[name].device))
        flat = torch.cat(sums)  # (Σ d_out + d_in,)
        if sync is not None:
            sync.all_reduce(flat)
        for state, part in zip(states, flat.split([s.numel() for s in sums])):
            ema = state.get(MA)
            state[MA] = (1 - beta2) * part if ema is None else ema.float().mul_(beta2).add_(part, alpha=1 - beta2)

    def _reselect(self, name, config, layers, states, opt, step: int, total: Optional[int], sync) -> None:
        t0 = time.perf_counter()
        changed = 0
        for layer, state in zip(layers, states):
            n = regrowth.regrow_count(layer.spiel_k[name], step, config.regrow_fraction, config.regrow_schedule, total)
            ag = state.pop(AG, None)  # the window ends here, whatever grows
            scores = layer.growth_scores(name, ag, state.get(MA))
            slots = layer.spiel_reselect(name, n, scores, sync)
            reset_optimizer_slots(opt, layer.spiel_values[name], slots)
            changed += int(slots.numel())
        states[0][RESELECTIONS] = int(states[0].get(RESELECTIONS, 0)) + 1
        states[0][CHANGED] = int(states[0].get(CHANGED, 0)) + changed
        self._run(name)["reselect_seconds"] += time.perf_counter() - t0

    def _arm(self, name: str, config, layers: list[SpielLayer], step: int) -> None:
        """AG: switch dense-gradient collection on or off for the next optimizer step (``step + 1``)."""
        collect = self._collects(config, step + 1, config.total_steps or self._run(name)["total_steps"])
        for layer in layers:
            layer._spiel_collect[name] = collect

    def spiel_stats(self, adapter_name: str = "default") -> dict:
        """Counters of drop-and-grow: optimizer ``step``, ``reselections``, ``changed`` slots (total; these three come
        back with the optimizer state of a checkpoint), ``reselect_seconds`` spent in drop-and-grow by this process,
        and ``total_steps``, the run length the schedule uses (None: constant regrow fraction)."""
        run = self._run(adapter_name)
        config = self.peft_config.get(adapter_name)
        total = getattr(config, "total_steps", None) or run["total_steps"]
        return {
            "step": run["step"],
            "reselections": run["reselections"],
            "changed": run["changed"],
            "reselect_seconds": run["reselect_seconds"],
            "total_steps": total,
        }

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


def spiel_models(model: nn.Module) -> list[SpielModel]:
    """The SpIEL tuners inside ``model`` (a PeftModel, or one wrapped by DDP, FSDP2 or accelerate)."""
    return [m for m in model.modules() if isinstance(m, SpielModel)]


def _spiel_model(model: nn.Module) -> SpielModel:
    found = spiel_models(model)
    if not found:
        raise TypeError(f"expected a PeftModel with SpIEL adapters, got {type(model).__name__}")
    return found[0]


__all__ = ["SpielModel", "fuse_spiel_adapters", "reset_optimizer_slots", "spiel_models", "spiel_step"]
