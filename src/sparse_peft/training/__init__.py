"""Trainer glue: optional callbacks (time budget, live sparsity checks) and SquareHead distillation.

The tuners need none of this to train under ``Trainer`` / ``SFTTrainer``; ``SpielCallback`` gives SpIEL's regrow decay
the run's length.
"""

from .callbacks import SparsityCallback, SpielCallback, TimeBudgetCallback, effective_weight
from .distill import SquareHeadSFTTrainer, squarehead_loss

__all__ = [
    "SparsityCallback",
    "SpielCallback",
    "SquareHeadSFTTrainer",
    "TimeBudgetCallback",
    "effective_weight",
    "squarehead_loss",
]
