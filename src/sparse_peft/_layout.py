"""Weight layout helpers shared by the tuners, the pruning toolkit and the report.

Everything in sparse_peft reasons about weights in ``nn.Linear`` layout ``(d_out, d_in)``. transformers' ``Conv1D``
(GPT-2) stores its weight transposed, ``(d_in, d_out)``, and a bitsandbytes layer stores it packed; these helpers hide
both (the quantized side lives in :mod:`sparse_peft._quant`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from . import _quant

LINEAR_TYPES = (nn.Linear, Conv1D)  # bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear subclasses


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in ``nn.Linear`` layout ``(d_out, d_in)``: a transposed view for ``Conv1D``, a fresh dequantized
    tensor for a bitsandbytes layer (read-only in effect: use :func:`check_writable` before writing through it)."""
    return _quant.logical_weight(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of an ``nn.Linear``, a ``Conv1D`` or a bitsandbytes layer (never the packed shape)."""
    return _quant.logical_shape(module)


def check_writable(modules: dict[str, nn.Module], what: str) -> None:
    """Refuse to write weights in place (``what``, e.g. ``"prune"``) into quantized layers, naming the first one."""
    quantized = [n for n, m in modules.items() if _quant.quant_kind(m) is not None or not m.weight.is_floating_point()]
    if quantized:
        raise TypeError(
            f"{what} writes weights in place, but {len(quantized)} layer(s) are quantized, first {quantized[0]!r} "
            f"({type(modules[quantized[0]]).__name__}). Run it on the full-precision model, save that, then load it "
            "quantized (e.g. BitsAndBytesConfig(load_in_4bit=True)); the zeros survive quantization."
        )
