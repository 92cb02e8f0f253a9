"""``sparsity_report``: per-module and overall sparsity, and N:M validity, as a table and as data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .._layout import LINEAR_TYPES, linear_weight
from ..masks import is_nm, parse_nm


@dataclass
class ModuleSparsity:
    """One row of a :class:`SparsityReport`."""

    name: str
    shape: tuple[int, int]
    numel: int
    zeros: int
    nm_valid: Optional[bool] = None

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    """Sparsity of every prunable module of a model. ``str(report)`` is a printable table."""

    modules: list[ModuleSparsity] = field(default_factory=list)
    nm_pattern: Optional[str] = None

    @property
    def numel(self) -> int:
        return sum(m.numel for m in self.modules)

    @property
    def zeros(self) -> int:
        return sum(m.zeros for m in self.modules)

    @property
    def sparsity(self) -> float:
        """Overall fraction of zeros over all reported modules."""
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def nm_valid(self) -> Optional[bool]:
        """Whether every module follows ``nm_pattern`` (``None`` when no pattern was checked)."""
        if self.nm_pattern is None:
            return None
        return all(m.nm_valid for m in self.modules)

    def to_dict(self) -> dict:
        return {
            "nm_pattern": self.nm_pattern,
            "numel": self.numel,
            "zeros": self.zeros,
            "sparsity": self.sparsity,
            "nm_valid": self.nm_valid,
            "modules": [dict(asdict(m), sparsity=m.sparsity) for m in self.modules],
        }

    def __str__(self) -> str:
        width = max([len("module")] + [len(m.name) for m in self.modules])
        nm_head = f"  {self.nm_pattern + ' ok':>8}" if self.nm_pattern else ""
        lines = [f"{'module':<{width}}  {'shape':>13}  {'sparsity':>8}{nm_head}"]
        for m in self.modules:
            nm = f"  {('yes' if m.nm_valid else 'NO'):>8}" if self.nm_pattern else ""
            shape = f"{m.shape[0]}x{m.shape[1]}"
            lines.append(f"{m.name:<{width}}  {shape:>13}  {m.sparsity:>8.2%}{nm}")
        nm = f"  {('yes' if self.nm_valid else 'NO'):>8}" if self.nm_pattern else ""
        lines.append(
            f"{'overall (' + str(len(self.modules)) + ' modules)':<{width}}  {self.numel:>13,}  {self.sparsity:>8.2%}{nm}"
        )
        return "\n".join(lines)


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``nn.Linear`` / ``Conv1D`` modules that pruning targets: every one except the output head.

    bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers are ``nn.Linear`` subclasses and are included: the report
    reads their dequantized weight (:func:`linear_weight`), never the packed storage. Inside a peft model the wrapped
    ``base_layer`` is reported under the adapted module's own name, and the adapters' own Linear modules (LoRA's
    ``lora_A`` / ``lora_B``) are not reported.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tuner_layers = {name for name, module in model.named_modules() if hasattr(module, "base_layer")}
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, LINEAR_TYPES) or module is head or ".modules_to_save." in name:
            continue
        if tuner_layers and _inside_adapter(name, tuner_layers):
            continue
        if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2:
            found[_base_name(name)] = module
    return found


def _inside_adapter(name: str, tuner_layers: set[str]) -> bool:
    """True for a module inside a peft tuner layer other than its ``base_layer`` (e.g. ``...up_proj.lora_A.default``)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in tuner_layers:
            return parts[i] != "base_layer"
    return False


def _base_name(name: str) -> str:
    """The name a module has in the plain base model (peft wraps it under ``base_model.model`` and ``base_layer``)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "").replace(".original_module", "")


@torch.no_grad()
def sparsity_report(model: nn.Module, nm_pattern: Optional[str] = None) -> SparsityReport:
    """Report the zeros of every prunable module of ``model`` (a plain or a peft model).

    Args:
        model: the model to inspect; adapters are not merged for you, so call it on a merged model to check
            merged weights.
        nm_pattern: e.g. ``"2:4"``: also check that every group of M consecutive inputs has at most N non-zeros.

    Returns:
        A :class:`SparsityReport`; ``print(report)`` shows a table, ``report.to_dict()`` gives JSON-ready data.
    """
    nm = parse_nm(nm_pattern, field="nm_pattern")
    rows = []
    for name, module in prunable_modules(model).items():
        w = linear_weight(module)
        zeros = int((w == 0).sum())
        valid = is_nm(w, *nm) if nm else None
        rows.append(ModuleSparsity(name, tuple(w.shape), w.numel(), zeros, valid))
    return SparsityReport(rows, nm_pattern)
