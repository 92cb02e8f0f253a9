"""Pruning toolkit: make the sparse base that the tuners fine-tune, and report its sparsity.

- :func:`prune`: magnitude, Wanda or SparseGPT; unstructured or N:M; uniform or OWL per-layer allocation.
- :func:`repair`: DSnoT, a training-free swap of pruned and kept weights per row.
- :func:`refit_layer`: least-squares refit of a pruned layer's kept weights (``prune(..., refit=True)``).
- :func:`get_masks` / :func:`apply_masks` / :func:`save_masks` / :func:`load_masks`: masks as data.
- :func:`calibration_from_texts` / :func:`calibration_from_dataset`: calibration token ids.
"""

from .calibration import calibration_from_dataset, calibration_from_texts, decoder_layers
from .dsnot import dense_snapshot, reconstruction_error, repair
from .masks_io import apply_masks, get_masks, load_masks, save_masks
from .prune import prune
from .refit import refit_layer
from .report import ModuleSparsity, SparsityReport, sparsity_report

__all__ = [
    "ModuleSparsity",
    "SparsityReport",
    "apply_masks",
    "calibration_from_dataset",
    "calibration_from_texts",
    "decoder_layers",
    "dense_snapshot",
    "get_masks",
    "load_masks",
    "prune",
    "reconstruction_error",
    "refit_layer",
    "repair",
    "save_masks",
    "sparsity_report",
]
