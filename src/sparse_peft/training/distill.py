"""SquareHead distillation from the dense teacher: an optional loss for recovering a pruned model.

SquareHead (Kurtic et al., 2023) adds, to the task loss, the per-layer *normalised* MSE between the student's and
the teacher's hidden states:

    L = L_task + w · mean_l  ‖h_s^l − h_t^l‖² / ‖h_t^l‖²

The normalisation by the teacher's own energy puts every layer on the same scale, so deep layers with large
activations do not dominate. Padding positions are left out.
"""

from __future__ import annotations

import contextlib

from typing import Optional, Sequence

import torch
import torch.nn as nn
from trl import SFTTrainer


def squarehead_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    attention_mask: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mean over layers of ``‖h_s − h_t‖² / ‖h_t‖²``.

    Args:
        student_hidden: one ``(B, T, d)`` tensor per transformer block (the block outputs) of the student.
        teacher_hidden: the same for the teacher.
        attention_mask: ``(B, T)``; zeros mark padding that does not count.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"student has {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}: "
            "distillation needs the same architecture (the dense model the student was pruned from)."
        )
    w = None if attention_mask is None else attention_mask.unsqueeze(-1).float()  # (B, T, 1)
    losses = []
    for s, t in zip(student_hidden, teacher_hidden):
        t = t.detach().float()
        err = (s.float() - t).pow(2)  # (B, T, d)
        energy = t.pow(2)
        if w is not None:
            err, energy = err * w, energy * w
        losses.append(err.sum() / energy.sum().clamp_min(eps))
    return torch.stack(losses).mean()


@contextlib.contextmanager
def _block_outputs(model: nn.Module):
    """Collect the output hidden state of every transformer block during one forward (hooks removed on exit).

    Hooks instead of ``output_hidden_states`` leave TRL's fused loss path untouched (no extra forward for logits).
    """
    from ..pruning.calibration import decoder_layers

    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class SquareHeadSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss adds SquareHead distillation from a frozen dense ``teacher_model``.

    Example:
        ```python
        # trainer = SquareHeadSFTTrainer(model=pruned, teacher_model=dense, distill_weight=1.0,
        #                                args=SFTConfig(...), train_dataset=ds, peft_config=SparseLoraConfig(r=16))
        ```
    The teacher runs under ``no_grad`` in eval mode on the student's device; it must share the student's
    architecture (e.g. the dense model before pruning).
    """

    def __init__(self, *args, teacher_model: nn.Module, distill_weight: float = 1.0, **kwargs):
        if distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {distill_weight!r}.")
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model.eval().requires_grad_(False)
        self.distill_weight = float(distill_weight)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with _block_outputs(model) as student_hidden:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        teacher_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        device = next(self.teacher_model.parameters()).device
        with torch.no_grad(), _block_outputs(self.teacher_model) as teacher_hidden:
            self.teacher_model(**{k: v.to(device) for k, v in teacher_inputs.items()}, use_cache=False)
        teacher_hidden = [h.to(student_hidden[0].device) for h in teacher_hidden]
        distill = squarehead_loss(student_hidden, teacher_hidden, inputs.get("attention_mask"))
        self._distill_log = float(distill.detach())
        loss = loss + self.distill_weight * distill.to(loss.dtype)
        return (loss, result[1]) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if getattr(self, "_distill_log", None) is not None and "loss" in logs:
            logs["squarehead"] = self._distill_log
        super().log(logs, *args, **kwargs)
