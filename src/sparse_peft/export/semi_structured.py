"""2:4 semi-structured inference: swap the 2:4 Linear weights of a merged model for torch's sparse tensors.

``torch.sparse.to_sparse_semi_structured`` compresses a 2:4 weight for the sparse tensor cores of NVIDIA GPUs with
compute capability 8.0 or newer (A100, H100, L40, RTX 30xx/40xx), in fp16 or bf16, through cuSPARSELt (or CUTLASS).
``nn.Linear`` then runs its matmul on the compressed weight unchanged. Weights that are not 2:4, not fp16/bf16,
whose shape the backend refuses, or that live in a ``Conv1D`` stay dense and are listed in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .._layout import linear_weight
from ..masks import is_nm
from ..pruning.report import prunable_modules

HALF_DTYPES = (torch.float16, torch.bfloat16)
# Shapes every backend of torch 2.x accepts for fp16/bf16 (CUTLASS: rows % 32, cols % 64; cuSPARSELt: 16, 16).
SAFE_MULTIPLE = (32, 64)


class SemiStructuredUnavailable(RuntimeError):
    """2:4 semi-structured kernels need a CUDA GPU with compute capability 8.0+ (sm80+); this one has none."""


@dataclass
class SemiStructuredReport:
    """Which Linear weights :func:`to_semi_structured` converted, and why the others stayed dense."""

    converted: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict, metadata={"help": "module name -> reason"})

    def __str__(self) -> str:
        lines = [f"2:4 semi-structured: {len(self.converted)} Linear weights converted, {len(self.dense)} stay dense"]
        lines += [f"  {name}: {reason}" for name, reason in self.dense.items()]
        return "\n".join(lines)


def semi_structured_plan(model: nn.Module) -> dict[str, Optional[str]]:
    """``{module name: None if its weight fits, else the reason it would stay dense}``, without a GPU.

    "Fits" means 2:4, fp16/bf16, ``nn.Linear`` layout and both dimensions multiples of ``SAFE_MULTIPLE`` (accepted
    by every torch backend); on the GPU :func:`to_semi_structured` also tries shapes outside that rule.
    """
    plan = {}
    for name, module in prunable_modules(model).items():
        reason = _reason(module)
        if reason is None:
            rows, cols = linear_weight(module).shape
            if rows % SAFE_MULTIPLE[0] or cols % SAFE_MULTIPLE[1]:
                reason = f"shape ({rows}, {cols}) is not a multiple of {SAFE_MULTIPLE} (may still fit on the GPU)"
        plan[name] = reason
    return plan


def _reason(module: nn.Module) -> Optional[str]:
    """Why this module's weight cannot be converted regardless of the GPU, or ``None``."""
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} stores its weight transposed; only nn.Linear converts"
    w = module.weight
    if w.dtype not in HALF_DTYPES:
        return f"dtype {str(w.dtype).removeprefix('torch.')} (needs float16 or bfloat16: model.half() or bfloat16())"
    if not is_nm(w, 2, 4):
        return "not 2:4 (some group of 4 consecutive inputs holds more than 2 non-zeros)"
    return None


def _require_sm80(model: nn.Module) -> None:
    if not torch.cuda.is_available():
        raise SemiStructuredUnavailable(
            "to_semi_structured needs a CUDA GPU with compute capability 8.0 or newer (sm80+: A100, H100, L40, "
            "RTX 30xx/40xx); this process sees no CUDA device. On CPU keep the merged model dense (its zeros are "
            "exact) or store it compactly with sparse_peft.export.save_sparse."
        )
    devices = {p.device for _, m in prunable_modules(model).items() for p in m.parameters(recurse=False)}
    if any(d.type != "cuda" for d in devices):
        raise SemiStructuredUnavailable(
            "to_semi_structured: the model's Linear weights are not on the GPU; move the model first, "
            "e.g. model.to('cuda', torch.float16)."
        )
    for device in devices:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            name = torch.cuda.get_device_name(device)
            raise SemiStructuredUnavailable(
                f"to_semi_structured needs compute capability 8.0 or newer (sm80+); {name} on {device} has "
                f"{major}.{minor}."
            )


def _compress(weight: torch.Tensor) -> torch.Tensor:
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight)


@torch.no_grad()
def to_semi_structured(model: nn.Module) -> SemiStructuredReport:
    """Convert, in place, every 2:4 Linear weight of a merged model to torch's 2:4 semi-structured format.

    For inference: the converted weights are frozen (``requires_grad=False``). Pruned weights whose shape or
    dtype does not fit stay dense and are listed in the report, with the reason.

    Raises:
        SemiStructuredUnavailable: no CUDA device, the weights are not on it, or its compute capability is below
            8.0 (2:4 sparse tensor cores arrived with Ampere).
    """
    _require_sm80(model)
    report = SemiStructuredReport()
    for name, module in prunable_modules(model).items():
        if isinstance(module.weight, torch.sparse.SparseSemiStructuredTensor):  # converted by an earlier call
            report.converted.append(name)
            continue
        reason = _reason(module)
        if reason is None:
            try:
                sparse = _compress(module.weight.detach().contiguous())
            except RuntimeError as exc:  # the backend refuses this shape or dtype
                reason = str(exc).strip().splitlines()[0]
            else:
                module.weight = nn.Parameter(sparse, requires_grad=False)
                report.converted.append(name)
                continue
        report.dense[name] = reason
    return report
