"""Weight layout helpers shared by the tuners, the pruning toolkit and the report.

Everything in sparse_peft reasons about weights in ``nn.Linear`` layout ``(d_out, d_in)``. transformers' ``Conv1D``
(GPT-2) stores its weight transposed, ``(d_in, d_out)``; these helpers hide that.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in ``nn.Linear`` layout ``(d_out, d_in)``; a transposed view for ``Conv1D``."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of an ``nn.Linear`` or a ``Conv1D``."""
    d0, d1 = module.weight.shape
    return (d1, d0) if isinstance(module, Conv1D) else (d0, d1)
