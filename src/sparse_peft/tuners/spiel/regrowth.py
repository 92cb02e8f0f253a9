"""Pure index maths of SpIEL's drop-and-grow: schedule, drop, capped growth and SEFT partners.

Everything here works on flat indices in ``nn.Linear`` layout (``k = i * d_in + j`` of a ``(d_out, d_in)`` weight)
and knows nothing about modules, optimizers or processes, so it can be tested on plain tensors.

SEFT groups: with ``group_size = G``, flat position ``p`` belongs to group ``p // G``. ``G = M`` gives the groups of
an N:M pattern (M consecutive inputs of one row, ``d_in % M == 0``); ``G = numel`` makes the whole module one group.
The SEFT capacity rule is: a group never holds more delta slots than the base has non-zeros in it. It guarantees
that every slot on a pruned position (a "revived" weight) can be paired with a distinct active base weight of its
group, not itself a slot, which is pruned in exchange (its *partner*), so the count per group stays exact.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

NO_PARTNER = -1


# ----------------------------------------------------------------------------------------------------------- schedule
def is_reselection_step(step: int, reselection_steps: int) -> bool:
    """True when drop-and-grow runs after optimizer step ``step`` (1-based)."""
    return step > 0 and step % reselection_steps == 0


def in_accumulation_window(step: int, reselection_steps: int, accumulation_steps: int) -> bool:
    """True when optimizer step ``step`` (1-based) is one of the ``accumulation_steps`` before a reselection."""
    phase = step % reselection_steps  # 0 on a reselection step
    return phase == 0 or phase > reselection_steps - accumulation_steps


def regrow_fraction_at(step: int, fraction: float, schedule: str, total_steps: Optional[int]) -> float:
    """The regrow fraction after optimizer step ``step``: ``fraction`` decayed linearly or by a cosine to 0."""
    if total_steps is None:
        return float(fraction)
    t = min(max(step / total_steps, 0.0), 1.0)
    decay = 1.0 - t if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return float(fraction) * decay


def regrow_count(k: int, step: int, fraction: float, schedule: str, total_steps: Optional[int]) -> int:
    """How many of ``k`` slots are dropped and regrown at ``step`` (0 when the schedule has decayed)."""
    return min(k, int(round(k * regrow_fraction_at(step, fraction, schedule, total_steps))))


# --------------------------------------------------------------------------------------------------------- selection
def drop_slots(values: torch.Tensor, n: int) -> torch.Tensor:
    """Slots (positions in ``values``) of the ``n`` smallest ``|values|``; ties go to the lower slot."""
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    order = torch.sort(values.detach().abs().float(), stable=True).indices  # (k,)
    return order[:n]


def group_capacity(base_nonzero: torch.Tensor, indices: torch.Tensor, group_size: int) -> torch.Tensor:
    """Free slots per group: ``nnz_g(base) - |indices ∩ g|``, shape ``(numel // group_size,)``."""
    n_groups = base_nonzero.numel() // group_size
    nnz = base_nonzero.reshape(n_groups, group_size).sum(-1)  # (n_groups,)
    used = torch.bincount(indices.long() // group_size, minlength=n_groups)  # (n_groups,)
    return nnz - used


def _rank_in_group(groups: torch.Tensor) -> torch.Tensor:
    """For a sequence of group ids (already in priority order), each entry's rank among its group's entries."""
    order = torch.sort(groups, stable=True).indices  # groups contiguous, priority order kept inside a group
    sorted_groups = groups[order]
    start = torch.ones_like(sorted_groups, dtype=torch.bool)
    start[1:] = sorted_groups[1:] != sorted_groups[:-1]
    pos = torch.arange(groups.numel(), device=groups.device)
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values  # start of each run
    rank = torch.empty_like(pos)
    rank[order] = pos - first
    return rank


def grow(
    scores: torch.Tensor,
    n: int,
    active: torch.Tensor,
    dropped: Optional[torch.Tensor] = None,
    capacity: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
) -> torch.Tensor:
    """The ``n`` best-scoring flat positions that are not ``active``, at most ``capacity[g]`` per group.

    Args:
        scores: ``(numel,)`` non-negative scores (higher grows first). Not modified.
        n: how many positions to grow.
        active: flat positions that hold a slot now (never grown).
        dropped: positions dropped at this reselection; grown only if nothing else is left.
        capacity: optional ``(numel // group_size,)`` free slots per group (SEFT); ``None`` means unlimited.
        group_size: group size for ``capacity``.
    Returns:
        ``(n,)`` int64 positions, unique and disjoint from ``active``.
    """
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    s = scores.detach().float().clone().reshape(-1)  # (numel,) transient
    s.clamp_(min=0.0)
    if dropped is not None and dropped.numel():
        s[dropped.long()] = -1.0  # allowed, but after every other candidate
    s[active.long()] = -math.inf
    available = int(torch.isfinite(s).sum())
    if available < n:
        raise ValueError(f"cannot grow {n} positions: only {available} free positions in the weight")
    if capacity is None:
        return torch.topk(s, n, sorted=True).indices
    take = min(available, 4 * n + 64)
    while True:
        cand = torch.topk(s, take, sorted=True).indices  # (take,) best first
        groups = cand // group_size
        ok = _rank_in_group(groups) < capacity[groups]
        ok &= torch.isfinite(s[cand])
        chosen = cand[ok][:n]
        if chosen.numel() == n or take == available:
            break
        take = min(available, take * 4)
    if chosen.numel() < n:
        raise ValueError(f"cannot grow {n} positions within the SEFT group capacity (found {chosen.numel()})")
    return chosen


def assign_partners(
    base_nonzero: torch.Tensor,
    indices: torch.Tensor,
    sensitivity: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """SEFT partners: for each slot on a pruned base position, a distinct active base position of its group.

    Partners are the lowest-``sensitivity`` active positions of the group that hold no slot. Slots on active base
    positions get ``NO_PARTNER``. Needs the capacity rule (``|indices ∩ g| <= nnz_g``), which makes enough
    candidates exist. Returns ``(k,)`` int64.
    """
    idx = indices.long()
    partners = torch.full_like(idx, NO_PARTNER)
    revived = ~base_nonzero[idx]  # (k,)
    if not bool(revived.any()):
        return partners
    n_groups = base_nonzero.numel() // group_size
    cand = sensitivity.detach().float().clone().reshape(-1)  # (numel,) transient
    cand[~base_nonzero] = math.inf
    cand[idx] = math.inf
    slots = revived.nonzero().squeeze(1)  # (R,)
    groups = idx[slots] // group_size  # (R,)
    rank = _rank_in_group(groups)  # (R,)
    if n_groups == 1:  # whole module: the R lowest overall
        low = torch.topk(cand, int(slots.numel()), largest=False, sorted=True).indices  # (R,)
        picked = low[rank]
    else:
        order = torch.sort(cand.reshape(n_groups, group_size), dim=1, stable=True).indices  # (n_groups, G)
        picked = groups * group_size + order[groups, rank]
    if not bool(torch.isfinite(cand[picked]).all()):
        raise RuntimeError("SEFT capacity rule violated: a revived slot has no active partner in its group")
    partners[slots] = picked
    return partners


def random_scores(numel: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Uniform random scores, for the initial indices."""
    return torch.rand(numel, generator=generator).to(device)
