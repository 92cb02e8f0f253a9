"""Pruning toolkit: make the sparse base that the tuners fine-tune, and report its sparsity."""

from .report import ModuleSparsity, SparsityReport, sparsity_report

__all__ = ["ModuleSparsity", "SparsityReport", "sparsity_report"]
