"""SparseLoraModel: injects SparseLoRA layers and checks zero patterns on load."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from ... import _quant
from ..._dist import WrappingGuard
from ..._registry import SparsePeftType
from .._common import DEFAULT_TARGET_MODULES, check_zero_fingerprints, default_target_modules
from .layer import Linear, SparseLoraLayer


class SparseLoraModel(WrappingGuard, BaseTuner):
    """Sparsity-preserving LoRA (peft type ``SPARSE_LORA``). Created by ``peft.get_peft_model``.

    Example:
        ```python
        import torch
        import sparse_peft
        from peft import get_peft_model

        base = torch.nn.Sequential(torch.nn.Linear(16, 16))
        with torch.no_grad():
            base[0].weight[:, ::2] = 0  # a "pruned" base
        model = get_peft_model(base, sparse_peft.SparseLoraConfig(r=4, target_modules=["0"]))
        merged = model.merge_and_unload()
        assert (merged[0].weight[:, ::2] == 0).all()
        ```
    """

    guard_name = "SparseLoRA"
    prefix: str = SparsePeftType.SPARSE_LORA.prefix
    tuner_layer_cls = SparseLoraLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(model_config.get("model_type"), "SparseLoraConfig")
        return peft_config

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        """Guard every ``Linear4bit`` of the model against bitsandbytes issue 2078 (:func:`_quant.guard_repacking`)."""
        super()._prepare_model(peft_config, model)
        _quant.guard_repacking(model)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        self._guard_forward()
        layer_kwargs = dict(
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            init_weights=config.init_weights,
            mask_type=config.mask_type,
            nm_pattern=config.nm_pattern,
            exact_gradient=config.exact_gradient,
        )
        if isinstance(target, Linear):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        _quant.check_supported(base, current_key, "SparseLoRA")
        new_module = Linear(target, adapter_name, module_name=current_key, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_zero_fingerprints(model, state_dict, adapter_name, "sparse_lora_fingerprint")
        return state_dict

    def set_masks(self, masks: dict[str, torch.Tensor], adapter_name: Optional[str] = None) -> None:
        """Set M explicitly for some modules. See :func:`set_sparse_lora_masks`."""
        set_sparse_lora_masks(self.model, masks, adapter_name or self.active_adapters[0])


def set_sparse_lora_masks(model: nn.Module, masks: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Set the mask ``M`` of SparseLoRA adapter ``adapter_name`` for the named modules.

    Args:
        model: a ``PeftModel`` (or any module) holding SparseLoRA layers.
        masks: maps module names of the base model (e.g. ``"model.layers.0.self_attn.q_proj"``; any unique suffix
            works) to boolean ``(d_out, d_in)`` masks in ``nn.Linear`` layout.
        adapter_name: which adapter's mask to replace.

    The masks are saved with the adapter. Use this with ``SparseLoraConfig(mask_type="custom")``.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SparseLoraLayer)}
    for key, mask in masks.items():
        hits = [n for n in layers if n == key or n.endswith("." + key)]
        if len(hits) != 1:
            examples = ", ".join(list(layers)[:3])
            what = "matches no" if not hits else f"matches {len(hits)}"
            raise KeyError(f"mask key {key!r} {what} SparseLoRA module; module names look like: {examples}")
        layers[hits[0]].set_mask(adapter_name, mask, module_name=hits[0])
