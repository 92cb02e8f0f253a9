"""Per-layer sparsity allocation: how many weights each layer drops, summing to an exact global budget.

- ``uniform``: every layer drops ``round(sparsity * numel)``.
- ``owl`` (Outlier Weighed Layerwise sparsity, Yin et al., 2024): blocks with more activation outliers keep more
  weights. A block's outlier ratio ``D`` is the fraction of its Wanda scores ``|W_ij| * ||X_j||`` above
  ``threshold`` times the layer mean. Ratios are rescaled to ``[0, 2 * lam]`` and centred, so block densities are
  ``(1 - sparsity) + r_b - mean(r)`` (parameter-weighted mean). Integer budgets are then rounded with the largest
  remainder method so that the total number of dropped weights is exactly ``round(sparsity * total)``.
"""

from __future__ import annotations

import math

import torch

from .criteria import prune_count, split_evenly


def outlier_ratio(scores: list[torch.Tensor], threshold: float = 5.0) -> float:
    """Fraction of entries above ``threshold`` times their own layer's mean score, over a block's layers."""
    above = sum(int((s > threshold * s.mean()).sum()) for s in scores)
    total = sum(s.numel() for s in scores)
    return above / total if total else 0.0


def _largest_remainder(targets: list[float], total: int, caps: list[int]) -> list[int]:
    """Integers close to ``targets`` (each within ``[0, cap]``) that sum to ``total`` exactly."""
    base = [min(max(int(math.floor(t)), 0), c) for t, c in zip(targets, caps)]
    left = total - sum(base)
    order = sorted(range(len(targets)), key=lambda i: targets[i] - math.floor(targets[i]), reverse=True)
    while left != 0:
        moved = False
        for i in order:
            if left > 0 and base[i] < caps[i]:
                base[i] += 1
                left -= 1
                moved = True
            elif left < 0 and base[i] > 0:
                base[i] -= 1
                left += 1
                moved = True
            if left == 0:
                break
        if not moved:
            raise ValueError("cannot place the pruning budget within the layers' sizes.")
    return base


def owl_block_sparsities(ratios: list[float], sizes: list[int], sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL block sparsities: mean (weighted by ``sizes``) exactly ``sparsity``, spread ``2 * lam``, in ``[0, 1)``."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    spread = (r.max() - r.min()).item()
    r = (r - r.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(r)
    density = (1 - sparsity) + r - (r * w).sum() / w.sum()  # more outliers -> denser
    return (1 - density).clamp(0.0, 0.999).tolist()


def block_budgets(block_sparsities: list[float], sizes: list[int], sparsity: float) -> list[int]:
    """Integer drop counts per block from per-block sparsities, summing to ``round(sparsity * sum(sizes))``."""
    targets = [s * n for s, n in zip(block_sparsities, sizes)]
    return _largest_remainder(targets, prune_count(sum(sizes), sparsity), [int(n * 0.999) for n in sizes])


def layer_budgets(block_budget: int, numels: list[int]) -> list[int]:
    """Split a block's drop count over its layers in proportion to their sizes (sums exactly)."""
    return split_evenly(block_budget, numels)
