"""Trainer glue: optional callbacks (time budget, live sparsity checks). The tuners need no glue to train."""

from .callbacks import SparsityCallback, TimeBudgetCallback, effective_weight

__all__ = ["SparsityCallback", "TimeBudgetCallback", "effective_weight"]
