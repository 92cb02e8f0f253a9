"""Pruning criteria: which weights to drop, given scores and a per-layer budget.

Masks here are *keep* masks (``True`` = the weight stays), shaped like ``nn.Linear`` stores the weight,
``(d_out, d_in)``, the same convention as :mod:`sparse_peft.masks`. Lower score = pruned first.

- magnitude: score ``|W|``, compared over the whole layer.
- Wanda: score ``|W_ij| * ||X_j||_2``, compared within each output row (Sun et al., 2023).
- N:M: keep the ``N`` best of every ``M`` consecutive inputs of a row (:func:`sparse_peft.masks.nm_mask`).
"""

from __future__ import annotations

import torch

from ..masks import nm_mask


def split_evenly(total: int, sizes: list[int]) -> list[int]:
    """Split the integer ``total`` over parts proportional to ``sizes``; the parts sum to ``total`` exactly.

    Part ``i`` gets ``floor(total * C_i / S) - floor(total * C_{i-1} / S)`` with ``C`` the cumulative sizes, so the
    parts differ from the exact proportion by less than one.
    """
    out, cum, whole, prev = [], 0, sum(sizes), 0
    for size in sizes:
        cum += size
        cur = total * cum // whole if whole else 0
        out.append(cur - prev)
        prev = cur
    return out


def prune_count(numel: int, sparsity: float) -> int:
    """Number of weights a layer of ``numel`` weights drops at ``sparsity`` (rounded to the nearest integer)."""
    return int(round(numel * sparsity))


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` in fp32, ``(d_out, d_in)``."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda's ``|W_ij| * ||X_j||_2``; ``input_sq_sum`` is ``sum_t x_tj^2`` over calibration tokens, ``(d_in,)``."""
    return weight.detach().float().abs() * input_sq_sum.float().clamp_min(0).sqrt().reshape(1, -1)  # (d_out, d_in)


def _drop_lowest(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Drop mask ``(rows, n)`` marking the ``counts[r]`` lowest scores of each row; ties: lower index first.

    A k-th value threshold per distinct count (one selection pass, no sort): everything below the threshold goes,
    then the first tied entries fill the count exactly, the same choice a stable sort would make.
    """
    thresholds = torch.full(counts.shape, -torch.inf, dtype=scores.dtype, device=scores.device)  # (rows,)
    for k in torch.unique(counts).tolist():
        if k > 0:
            kth = scores.kthvalue(min(k, scores.shape[1]), dim=1).values  # (rows,)
            thresholds = torch.where(counts == k, kth, thresholds)
    thr = thresholds.unsqueeze(1)  # (rows, 1)
    below = scores < thr
    tied = scores == thr
    need = (counts - below.sum(1)).unsqueeze(1)  # (rows, 1): tied entries still to drop
    return below | (tied & (tied.cumsum(1) <= need))


def layer_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep mask dropping exactly the ``count`` lowest scores of the whole layer (ties: lower flat index first)."""
    flat = scores.reshape(1, -1)  # (1, numel)
    counts = torch.tensor([min(max(count, 0), flat.shape[1])], device=scores.device)
    return ~_drop_lowest(flat, counts).reshape(scores.shape)


def row_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep mask dropping ``count`` weights in total, spread evenly over rows, the lowest scores of each row.

    Every row drops ``count // d_out`` or one more, so per-row sparsity is exact whenever ``count`` is a
    multiple of ``d_out`` (e.g. 50% of an even ``d_in``).
    """
    d_out, d_in = scores.shape
    per_row = torch.tensor(split_evenly(count, [1] * d_out), device=scores.device).clamp(0, d_in)  # (d_out,)
    return ~_drop_lowest(scores, per_row)


def select_mask(scores: torch.Tensor, count: int, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """Keep mask from ``scores``: N:M when ``nm`` is set, else ``count`` drops per row or per layer."""
    if nm is not None:
        return nm_mask(scores, nm[0], nm[1], scores=scores)
    return row_mask(scores, count) if per_row else layer_mask(scores, count)
