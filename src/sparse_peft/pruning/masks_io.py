"""Masks as data: read a model's keep masks, re-apply them, save and load them as safetensors.

A mask is a ``bool`` tensor in ``nn.Linear`` layout ``(d_out, d_in)``, ``True`` where the weight is kept. On disk
each mask is bit-packed (:func:`sparse_peft.masks.pack_mask`, 1/32 of an fp32 weight) with its shape alongside.
Typical use, the LoRA* baseline: ``masks = get_masks(pruned)``; train dense LoRA; merge; ``apply_masks(merged, masks)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional, Union

import torch
import torch.nn as nn

from .._layout import check_writable
from ..masks import pack_mask, unpack_mask
from .report import SparsityReport, linear_weight, prunable_modules, sparsity_report


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep masks (``weight != 0``) of every prunable module, keyed by module name, on CPU."""
    return {name: (linear_weight(m) != 0).cpu() for name, m in prunable_modules(model).items()}


@torch.no_grad()
def apply_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor], strict: bool = True, nm_pattern: Optional[str] = None
) -> SparsityReport:
    """Zero every weight where ``masks`` is ``False``, in place; return the :func:`sparsity_report`.

    With ``strict`` every prunable module needs a mask and every mask a module, shapes included.
    """
    modules = prunable_modules(model)
    check_writable({n: modules[n] for n in masks if n in modules}, "apply_masks")
    if strict:
        missing = sorted(set(modules) - set(masks))
        unknown = sorted(set(masks) - set(modules))
        if missing or unknown:
            raise ValueError(
                f"masks do not match the model: missing {missing[:3]}, unknown {unknown[:3]}; "
                "pass strict=False to apply only the masks that match."
            )
    for name, mask in masks.items():
        if name not in modules:
            continue
        w = linear_weight(modules[name])
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(mask.shape)}, the weight (d_out, d_in) is {tuple(w.shape)}."
            )
        w.mul_(mask.to(device=w.device, dtype=torch.bool).to(w.dtype))
    return sparsity_report(model, nm_pattern=nm_pattern)


def save_masks(masks: Mapping[str, torch.Tensor], path: Union[str, os.PathLike]) -> None:
    """Save masks to a safetensors file, bit-packed (``<name>.packed``) with their shape (``<name>.shape``)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, mask in masks.items():
        tensors[f"{name}.packed"] = pack_mask(mask.bool().cpu()).contiguous()
        tensors[f"{name}.shape"] = torch.tensor(list(mask.shape), dtype=torch.int64)
    save_file(tensors, str(path), metadata={"format": "sparse_peft.masks", "version": "1"})


def load_masks(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Load masks written by :func:`save_masks`."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    names = [k[: -len(".packed")] for k in tensors if k.endswith(".packed")]
    return {n: unpack_mask(tensors[f"{n}.packed"], tuple(tensors[f"{n}.shape"].tolist())) for n in names}
