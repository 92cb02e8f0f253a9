"""Trainer glue: optional callbacks (time budget, live sparsity checks) and SquareHead distillation.

The tuners need none of this to train under ``Trainer`` / ``SFTTrainer``.
"""

from .callbacks import SparsityCallback, TimeBudgetCallback, effective_weight
from .distill import SquareHeadSFTTrainer, squarehead_loss

__all__ = ["SparsityCallback", "SquareHeadSFTTrainer", "TimeBudgetCallback", "effective_weight", "squarehead_loss"]
