"""S2FTModel: selects heads/channels, injects S²FT layers, and fuses adapters with disjoint selections."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from ... import _quant
from ..._dist import WrappingGuard
from ..._registry import SparsePeftType
from .._common import check_zero_fingerprints
from .config import DATA_STRATEGIES, S2FTConfig
from .layer import Linear, S2FTLayer
from .selection import DEFAULT_TARGET_MODULES, block_of, model_geometries, plan, slice_indices


class S2FTModel(WrappingGuard, BaseTuner):
    """Structured sparse fine-tuning (peft type ``S2FT``). Created by ``peft.get_peft_model``.

    Example:
        ```python
        import sparse_peft, transformers
        from peft import get_peft_model

        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2)
        base = transformers.LlamaForCausalLM(cfg)
        model = get_peft_model(base, sparse_peft.S2FTConfig(heads_ratio=0.25, channels_ratio=0.1))
        o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
        assert o_proj.s2ft_delta["default"].shape == (32, 8)  # one head of head_dim 8: 8 input columns
        ```
    """

    guard_name = "S2FT"
    prefix: str = SparsePeftType.S2FT.prefix
    tuner_layer_cls = S2FTLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            targets = DEFAULT_TARGET_MODULES.get(model_config.get("model_type") or "")
            if targets is None:
                raise ValueError(
                    f"S2FTConfig.target_modules is not set and sparse_peft has no S2FT default for model_type="
                    f"{model_config.get('model_type')!r}. Pass target_modules=[...] naming the attention-output and "
                    "FFN-output projections (e.g. ['o_proj', 'down_proj'])."
                )
            peft_config.target_modules = set(targets)
        return peft_config

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        """Guard every ``Linear4bit`` of the model against bitsandbytes issue 2078 (:func:`_quant.guard_repacking`)."""
        super()._prepare_model(peft_config, model)
        _quant.guard_repacking(model)

    def _ensure_selection(self, config: S2FTConfig) -> None:
        """Fill ``config.selection`` (random/weight strategies) the first time an adapter is injected."""
        if config.selection is not None:
            return
        if config.strategy in DATA_STRATEGIES:
            raise ValueError(
                f"S2FTConfig.strategy={config.strategy!r} needs a calibration batch: call "
                "`config = sparse_peft.s2ft_select(model, config, batch)` before get_peft_model; it stores the chosen "
                "heads and channels in config.selection."
            )
        config.selection = plan(self.model, config)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        self._guard_forward()
        self._ensure_selection(config)
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        _quant.check_supported(base, current_key, "S2FT")
        if not hasattr(self, "_s2ft_geometries"):
            self._s2ft_geometries = model_geometries(self.model)
        block = block_of(current_key)
        entry = config.selection.get(block)
        if entry is None:
            raise ValueError(
                f"S2FTConfig.selection has no entry for block {block!r} (module {current_key!r}); the selection was "
                "made for another model. Drop it (selection=None) or re-run sparse_peft.s2ft_select on this model."
            )
        axis, index = slice_indices(current_key, base, entry, self._s2ft_geometries.get(block))
        if index.numel() == 0:  # e.g. heads_ratio=0 with o_proj targeted: nothing to train here
            return
        layer_kwargs = dict(
            axis=axis, index=index, init_weights=config.init_weights, preserve_sparsity=config.preserve_sparsity
        )
        if isinstance(target, Linear):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        new_module = Linear(target, adapter_name, module_name=current_key, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_zero_fingerprints(model, state_dict, adapter_name, "s2ft_fingerprint")
        return state_dict

    def fuse_adapters(self, adapter_names: Sequence[str], new_name: str) -> str:
        """See :func:`s2ft_fuse_adapters`."""
        return s2ft_fuse_adapters(self, adapter_names, new_name)


def _s2ft_layers(model: nn.Module) -> dict[str, S2FTLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, S2FTLayer)}


def _peft_configs(model: nn.Module) -> dict:
    configs = getattr(model, "peft_config", None)
    if configs is None:
        raise TypeError("s2ft_fuse_adapters needs a PeftModel (or S2FTModel) holding S2FT adapters.")
    return configs


def check_disjoint(model: nn.Module, adapter_names: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming every module where two of ``adapter_names`` train a common row/column."""
    overlaps = []
    for name, layer in _s2ft_layers(model).items():
        present = [a for a in adapter_names if a in layer.s2ft_index]
        for i, a in enumerate(present):
            for b in present[i + 1 :]:
                if layer.s2ft_axis[a] != layer.s2ft_axis[b]:
                    overlaps.append(f"{name}: {a!r} trains {layer.s2ft_axis[a]} but {b!r} trains {layer.s2ft_axis[b]}")
                    continue
                common = sorted(set(layer.s2ft_index[a].tolist()) & set(layer.s2ft_index[b].tolist()))
                if common:
                    shown = ", ".join(map(str, common[:8])) + (", ..." if len(common) > 8 else "")
                    overlaps.append(f"{name}: {a!r} and {b!r} both train {layer.s2ft_axis[a]} [{shown}]")
    if overlaps:
        more = f" (and {len(overlaps) - 5} more)" if len(overlaps) > 5 else ""
        raise ValueError(
            "S2FT adapters can only be fused when their slices are disjoint, but they overlap in "
            f"{len(overlaps)} module(s): " + "; ".join(overlaps[:5]) + more + ". With GQA two different query heads "
            "of one group share their kv head, so v_proj/k_proj rows overlap; choose heads from different groups, "
            "or merge the adapters one after the other instead of fusing."
        )


def s2ft_fuse_adapters(model: nn.Module, adapter_names: Sequence[str], new_name: str) -> str:
    """Add adapter ``new_name`` that equals applying all of ``adapter_names`` at once. Returns ``new_name``.

    The selections must be disjoint in every module (same heads or channels, or GQA query heads sharing a kv head
    whose rows are trained, are refused with an error naming the modules and indices). The fused adapter trains the
    union of the selections; its delta holds each source's slice values at the source's indices, so the result is
    exact. The sources are left in place: ``model.set_adapter(new_name)`` switches to the fusion and
    ``model.delete_adapter(name)`` drops a source.

    Example:
        ```python
        # fused = sparse_peft.s2ft_fuse_adapters(peft_model, ["task_a", "task_b"], "a_plus_b")
        # peft_model.set_adapter(fused)
        ```
    """
    configs = _peft_configs(model)
    names = list(adapter_names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"s2ft_fuse_adapters needs at least two distinct adapter names, got {names!r}.")
    missing = [a for a in names if a not in configs]
    if missing:
        raise KeyError(f"no adapter named {missing[0]!r}; this model has {sorted(configs)!r}.")
    if new_name in configs:
        raise ValueError(f"an adapter named {new_name!r} already exists; pick another new_name.")
    cfgs = [configs[a] for a in names]
    if not all(isinstance(c, S2FTConfig) for c in cfgs):
        raise TypeError("s2ft_fuse_adapters only fuses S2FT adapters; got " + ", ".join(type(c).__name__ for c in cfgs))
    if len({c.preserve_sparsity for c in cfgs}) > 1:
        raise ValueError("cannot fuse S2FT adapters with different preserve_sparsity settings.")
    layers = _s2ft_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("unmerge the adapters (model.unmerge_adapter()) before fusing them.")
    check_disjoint(model, names)

    fused = copy.deepcopy(cfgs[0])
    targets: set = set()
    for c in cfgs:
        if isinstance(c.target_modules, str):
            raise ValueError(
                "s2ft_fuse_adapters needs target_modules lists, not a regex; got " + repr(c.target_modules)
            )
        targets |= set(c.target_modules)
    fused.target_modules = targets
    selection: dict[str, dict[str, list[int]]] = {}
    for c in cfgs:
        for block, entry in c.selection.items():
            acc = selection.setdefault(block, {"heads": [], "channels": []})
            for key in ("heads", "channels"):
                acc[key] = sorted(set(acc[key]) | set(entry.get(key, [])))
    fused.selection = selection
    fused.init_weights = True
    fused.inference_mode = False
    if isinstance(model, BaseTuner):
        model.peft_config[new_name] = fused
        model.inject_adapter(model.model, new_name)
    else:
        model.add_adapter(new_name, fused)

    with torch.no_grad():
        for name, layer in _s2ft_layers(model).items():
            if new_name not in layer.s2ft_index:
                continue
            target = layer.s2ft_delta[new_name]
            target.zero_()
            dim = 0 if layer.s2ft_axis[new_name] == "rows" else 1
            new_idx = layer.s2ft_index[new_name]
            for a in names:
                if a not in layer.s2ft_index:
                    continue
                pos = torch.searchsorted(new_idx, layer.s2ft_index[a])  # both sorted; sources ⊆ union
                target.index_copy_(dim, pos, layer.s2ft_delta[a].detach().to(target.dtype))
    return new_name
