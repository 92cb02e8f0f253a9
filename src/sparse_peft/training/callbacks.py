"""Trainer callbacks a user may want next to sparse fine-tuning. None is required: the tuners work without them."""

from __future__ import annotations

import logging
import time
import warnings

import torch
import torch.nn as nn
from transformers import TrainerCallback

from ..masks import pack_mask, unpack_mask
from ..pruning.report import linear_weight

logger = logging.getLogger(__name__)


class TimeBudgetCallback(TrainerCallback):
    """Stop training once ``max_seconds`` of wall time have passed since ``on_train_begin``.

    Useful for fixed-budget comparisons (the demo recovers every method for the same time).
    """

    def __init__(self, max_seconds: float):
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds!r}.")
        self.max_seconds = float(max_seconds)
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None and time.perf_counter() - self.start >= self.max_seconds:
            control.should_training_stop = True
        return control


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight"):
            yield name, module


def effective_weight(layer) -> torch.Tensor:
    """Base weight plus the active, unmerged adapters' deltas, in ``nn.Linear`` layout ``(d_out, d_in)``."""
    w = linear_weight(layer.get_base_layer()).detach().float()
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return w
    for adapter in layer.active_adapters:
        try:
            delta = layer.get_delta_weight(adapter)
        except KeyError:  # adapter not on this layer
            continue
        delta = delta.detach().float()
        if delta.shape != w.shape:
            delta = delta.t()
        w = w + delta
    return w


class SpielCallback(TrainerCallback):
    """Hand SpIEL's drop-and-grow the Trainer's optimizer and the run's length at the start of ``train()``.

    Not needed for drop-and-grow to run: without it a SpIEL adapter finds its optimizer by itself at the first step.
    With it, the adapters bind to the Trainer's optimizer before the first step, and the regrow fraction decays over
    ``state.max_steps`` (unless ``SpielConfig.total_steps`` is set); without it and without ``total_steps`` the
    fraction stays constant. Works the same under DDP and FSDP2, and after ``resume_from_checkpoint`` (the schedule
    continues from the step stored in the optimizer's state).

    Example:
        ```python
        # trainer = SFTTrainer(..., peft_config=SpielConfig(r=16), callbacks=[SpielCallback()])
        ```
    """

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from ..tuners.spiel.model import spiel_models

        if model is None or optimizer is None:
            return control
        for tuner in spiel_models(model):
            tuner.attach_optimizer(optimizer, total_steps=state.max_steps, start_step=state.global_step)
        return control


class SparsityCallback(TrainerCallback):
    """Check every ``check_every`` optimizer steps that fine-tuning keeps the base's sparsity.

    At the start of training it records the zero pattern of every adapted layer's base weight (packed to bits; a
    bitsandbytes base is read through its dequantized weight).
    Each check builds the effective weight (base + active adapters) and counts

    - ``revived``: base zeros that are non-zero in the effective weight, and
    - ``excess``: non-zeros beyond the base's count (SpIEL's SEFT mode may move zeros but never adds non-zeros).

    Both are logged as ``sparsity/revived`` and ``sparsity/excess_nnz``. ``excess > 0`` always warns; ``revived > 0``
    warns unless ``allow_moves`` (set it for tuners that move zeros, e.g. SpIEL with ``preserve_sparsity``).
    """

    def __init__(self, check_every: int = 50, allow_moves: bool = False, raise_on_violation: bool = False):
        self.check_every = check_every
        self.allow_moves = allow_moves
        self.raise_on_violation = raise_on_violation
        self._zeros: dict[str, tuple[torch.Tensor, tuple[int, int], int]] = {}
        self.last: dict[str, int] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._zeros = {}
        for name, layer in _tuner_layers(model):
            w = linear_weight(layer.get_base_layer()).detach()
            self._zeros[name] = (pack_mask(w == 0), tuple(w.shape), int((w != 0).sum()))

    @torch.no_grad()
    def check(self, model: nn.Module) -> dict[str, int]:
        revived = excess = 0
        for name, layer in _tuner_layers(model):
            if name not in self._zeros:
                continue
            packed, shape, base_nnz = self._zeros[name]
            nonzero = effective_weight(layer) != 0
            revived += int((nonzero & unpack_mask(packed, shape).to(nonzero.device)).sum())
            excess += max(0, int(nonzero.sum()) - base_nnz)
        self.last = {"sparsity/revived": revived, "sparsity/excess_nnz": excess}
        return self.last

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.check_every <= 0 or state.global_step % self.check_every:
            return control
        stats = self.check(model)
        bad = stats["sparsity/excess_nnz"] > 0 or (stats["sparsity/revived"] > 0 and not self.allow_moves)
        if bad:
            msg = (
                f"step {state.global_step}: fine-tuning broke the base's sparsity ({stats['sparsity/revived']} "
                f"pruned weights came back, {stats['sparsity/excess_nnz']} non-zeros beyond the base's count)"
            )
            if self.raise_on_violation:
                raise RuntimeError(msg)
            warnings.warn(msg)
        if state.log_history is not None:
            state.log_history.append({**stats, "step": state.global_step})
        return control
