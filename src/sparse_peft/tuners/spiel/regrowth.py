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
# Grow and partner selection need the best few percent of a weight-sized score vector. A full ``topk``/``sort`` over
# it is the expensive part of a reselection on CPU, so both first estimate a threshold from a strided sample, take the
# positions beyond it with one compare (the candidates, a few percent of the weight), and rank only those. The result
# is the set a full ranking gives (candidates are a prefix of the full order, ties at the threshold included; exact
# ties at the cut are broken arbitrarily, as by a full ``topk``); when the estimate falls short they retry with a
# wider margin, and fall back to the full ranking.
_SAMPLE = 1 << 14  # entries in the strided sample that sets a candidate threshold
_RETRIES = 3  # candidate rounds (each 4x wider) before the full ranking


def drop_slots(values: torch.Tensor, n: int) -> torch.Tensor:
    """Slots (positions in ``values``) of the ``n`` smallest ``|values|``; ties go to the lower slot.

    In no guaranteed order. A selection (``topk`` without sorting) over the ``k`` values; ties at the cut are
    resolved by slot only when the selection split them.
    """
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    mag = values.detach().abs().float()  # (k,)
    if n < mag.numel():
        low = torch.topk(mag, n, largest=False, sorted=False)  # n smallest, ties at the cut split arbitrarily
        cut = low.values.max()
        if int((low.values == cut).sum()) == int((mag == cut).sum()):  # every tie of the cut is in: unambiguous
            return low.indices
        below = mag < cut  # (k,) fewer than n
        ties = (mag == cut).nonzero().squeeze(1)  # (t,) ascending: the lower slots win
        below.index_fill_(0, ties[: n - int(below.sum())], True)
        slots = below.nonzero().squeeze(1)  # (n,) unless NaNs make the cut meaningless
        if slots.numel() == n:
            return slots
    return torch.sort(mag, stable=True).indices[:n]


def _flat_nonzero(mask: torch.Tensor, expected: int) -> torch.Tensor:
    """``mask.nonzero()`` of a 1-D bool mask with about ``expected`` True entries, as ``(C,)`` int64.

    ``nonzero`` pays per element scanned, so a sparse contiguous mask is scanned 8 bytes at a time (viewed as int64)
    and only the words holding a True are expanded.
    """
    numel = mask.numel()
    if 64 * expected > numel or numel % 8 or mask.storage_offset() % 8 or not mask.is_contiguous():
        return mask.nonzero().squeeze(1)
    words = mask.view(torch.int64).nonzero().squeeze(1)  # (W,) words holding at least one True
    inner = mask.view(-1, 8).index_select(0, words).reshape(-1).nonzero().squeeze(1)  # (C,) into the (W, 8) bytes
    return words.index_select(0, inner // 8) * 8 + inner % 8


def group_capacity(base_nonzero: torch.Tensor, indices: torch.Tensor, group_size: int) -> torch.Tensor:
    """Free slots per group: ``nnz_g(base) - |indices ∩ g|``, shape ``(numel // group_size,)``."""
    numel = base_nonzero.numel()
    n_groups = numel // group_size
    acc = torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64  # (a bool sum in int64 is slow)
    nnz = base_nonzero.reshape(n_groups, group_size).view(torch.uint8).sum(-1, dtype=acc)  # (n_groups,)
    if n_groups == 1:  # the whole module: every index is in the group
        return nnz.long() - indices.numel()
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


def _sample(flat: torch.Tensor) -> torch.Tensor:
    """About ``_SAMPLE`` entries of ``flat`` at a fixed stride (a view). The stride avoids the factors 2, 3, 5 and 7,
    so on a weight whose row length is made of them the sample visits every column."""
    stride = max(1, flat.numel() // _SAMPLE)
    while stride > 1 and math.gcd(stride, 210) != 1:
        stride += 1
    return flat[::stride]


def _threshold(sample: torch.Tensor, count: int, numel: int, largest: bool) -> Optional[float]:
    """A value with, by the sample's estimate, somewhat more than ``count`` of ``numel`` entries at or beyond it
    (``>=`` when ``largest``, else ``<=``). None when that would be a large part of the tensor (no gain)."""
    m = sample.numel()
    expect = count * m / numel  # sample entries expected beyond the exact cut
    j = int(1.25 * expect + 4.0 * math.sqrt(expect) + 8)  # margin: 25% plus 4 sigma of the sampling noise
    if j >= m // 8:
        return None
    return float(torch.kthvalue(sample, m - j + 1 if largest else j).values)


def _accept(cand: torch.Tensor, n: int, capacity: Optional[torch.Tensor], group_size: Optional[int]) -> torch.Tensor:
    """The first ``n`` of ``cand`` (positions in priority order) that fit ``capacity`` (free slots per group)."""
    if capacity is None:
        return cand[:n]
    if capacity.numel() == 1:  # the whole module is one group
        return cand[: max(0, min(n, int(capacity[0])))]
    groups = cand // group_size
    return cand[_rank_in_group(groups) < capacity[groups]][:n]


def _grow_candidates(
    s: torch.Tensor, n: int, capacity: Optional[torch.Tensor], group_size: Optional[int]
) -> Optional[torch.Tensor]:
    """:func:`grow` on candidates above a sampled threshold; ``s`` already holds -inf/-1 at active/dropped
    positions. None when the candidates do not suffice (the caller ranks everything)."""
    sample = _sample(s)
    grouped = capacity is not None and capacity.numel() > 1
    if not grouped and capacity is not None and int(capacity[0]) < n:
        return None  # the full ranking raises the error
    count = n
    for _ in range(_RETRIES):
        thr = _threshold(sample, count, s.numel(), largest=True)
        if thr is None or not thr > 0:  # (also NaN) zero scores tie: only the full ranking breaks them as before
            return None
        cand = _flat_nonzero(s >= thr, count)  # (C,) ascending; active and dropped lie below thr
        if cand.numel() >= n:
            if not grouped:  # the n best, in no particular order
                return cand.index_select(0, torch.topk(s.index_select(0, cand), n, sorted=False).indices)
            order = torch.topk(s.index_select(0, cand), cand.numel(), sorted=True).indices  # (C,) best first
            chosen = _accept(cand.index_select(0, order), n, capacity, group_size)
            if chosen.numel() == n:
                return chosen
        count *= 4
    return None


def _grow_full(
    s: torch.Tensor,
    n: int,
    active: torch.Tensor,
    dropped: Optional[torch.Tensor],
    capacity: Optional[torch.Tensor],
    group_size: Optional[int],
) -> torch.Tensor:
    """:func:`grow` by ranking every position, best first. ``s`` is a scratch copy of the scores."""
    s.clamp_(min=0.0)
    if dropped is not None:
        s[dropped] = -1.0  # allowed, but after every other candidate
    s[active] = -math.inf
    available = int(torch.isfinite(s).sum())
    if available < n:
        raise ValueError(f"cannot grow {n} positions: only {available} free positions in the weight")
    if capacity is None:
        return torch.topk(s, n, sorted=True).indices
    take = min(available, 4 * n + 64)
    while True:
        cand = torch.topk(s, take, sorted=True).indices  # (take,) best first
        chosen = _accept(cand[torch.isfinite(s[cand])], n, capacity, group_size)
        if chosen.numel() == n or take == available:
            break
        take = min(available, take * 4)
    if chosen.numel() < n:
        raise ValueError(f"cannot grow {n} positions within the SEFT group capacity (found {chosen.numel()})")
    return chosen


def grow(
    scores: torch.Tensor,
    n: int,
    active: torch.Tensor,
    dropped: Optional[torch.Tensor] = None,
    capacity: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
    scratch: bool = False,
) -> torch.Tensor:
    """The ``n`` best-scoring flat positions that are not ``active``, at most ``capacity[g]`` per group.

    Negative scores count as 0. Ties between equal scores are broken arbitrarily (as by ``torch.topk``).

    Args:
        scores: ``(numel,)`` scores (higher grows first). Unchanged on return.
        n: how many positions to grow.
        active: flat positions that hold a slot now (never grown).
        dropped: positions dropped at this reselection; grown only if nothing else is left.
        capacity: optional ``(numel // group_size,)`` free slots per group (SEFT); ``None`` means unlimited.
        group_size: group size for ``capacity``.
        scratch: use a contiguous fp32 ``scores`` as scratch space instead of a weight-sized copy; the ``k``
            entries written are restored before returning.
    Returns:
        ``(n,)`` int64 positions, unique and disjoint from ``active``, in no guaranteed order.
    """
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    s = scores.detach().reshape(-1)
    owned = not (scratch and s.dtype == torch.float32 and s.is_contiguous())
    if owned:
        s = s.float().clone()  # (numel,) transient
    active = active.long()
    dropped = dropped.long() if dropped is not None and dropped.numel() else None
    keep_active = s.index_select(0, active)  # (k - n,) to restore
    keep_dropped = None if dropped is None else s.index_select(0, dropped)  # (n,)
    try:
        if dropped is not None:
            s.index_fill_(0, dropped, -1.0)
        s.index_fill_(0, active, -math.inf)
        chosen = _grow_candidates(s, n, capacity, group_size)
    finally:
        s.index_copy_(0, active, keep_active)
        if dropped is not None:
            s.index_copy_(0, dropped, keep_dropped)
    if chosen is None:
        chosen = _grow_full(s if owned else s.clone(), n, active, dropped, capacity, group_size)
    return chosen


def _lowest_eligible(cand: torch.Tensor, eligible: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` positions with the lowest ``cand`` among ``eligible`` ones, in no particular order (``cand`` is
    +inf at positions that must not be picked). Candidates below a sampled threshold first, else a full ``topk``."""
    sample = _sample(cand)
    sample = torch.where(_sample(eligible), sample, math.inf)  # (m,) small
    count = r
    for _ in range(_RETRIES):
        thr = _threshold(sample, count, cand.numel(), largest=False)
        if thr is None or not math.isfinite(thr):
            break
        mask = cand <= thr  # (numel,) bool
        mask &= eligible
        low = _flat_nonzero(mask, count)  # (C,)
        del mask
        if low.numel() >= r:
            return low.index_select(0, torch.topk(cand.index_select(0, low), r, largest=False, sorted=False).indices)
        count *= 4
    full = cand.masked_fill(~eligible, math.inf)  # (numel,) transient
    return torch.topk(full, r, largest=False, sorted=False).indices


def assign_partners(
    base_nonzero: torch.Tensor,
    indices: torch.Tensor,
    sensitivity: torch.Tensor,
    group_size: int,
    scratch: bool = False,
) -> torch.Tensor:
    """SEFT partners: for each slot on a pruned base position, a distinct active base position of its group.

    Partners are the lowest-``sensitivity`` active positions of the group that hold no slot. Slots on active base
    positions get ``NO_PARTNER``. Needs the capacity rule (``|indices ∩ g| <= nnz_g``), which makes enough
    candidates exist. With ``scratch`` a contiguous fp32 ``sensitivity`` is used as scratch space instead of a copy
    (the ``k`` entries written are restored). Returns ``(k,)`` int64.
    """
    idx = indices.long()
    partners = torch.full_like(idx, NO_PARTNER)
    nonzero = base_nonzero.reshape(-1)
    revived = ~nonzero.index_select(0, idx)  # (k,)
    if not bool(revived.any()):
        return partners
    n_groups = nonzero.numel() // group_size
    cand = sensitivity.detach().reshape(-1)
    if not (scratch and cand.dtype == torch.float32 and cand.is_contiguous()):
        cand = cand.float().clone()  # (numel,) transient
    slots = revived.nonzero().squeeze(1)  # (R,)
    keep = cand.index_select(0, idx)  # (k,) to restore
    try:
        cand.index_fill_(0, idx, math.inf)  # slots are never partners
        if n_groups == 1:  # whole module: any of the R lowest positions will do for any revived slot
            picked = _lowest_eligible(cand, nonzero, int(slots.numel()))  # (R,)
            value = cand.index_select(0, picked).masked_fill_(~nonzero.index_select(0, picked), math.inf)
        else:  # sort only the groups that hold a revived slot
            groups = idx.index_select(0, slots) // group_size  # (R,)
            rank = _rank_in_group(groups)  # (R,)
            rows, inv = torch.unique(groups, return_inverse=True)  # (U,), (R,)
            block = cand.view(n_groups, group_size)[rows]  # (U, G) copy
            block.masked_fill_(~nonzero.view(n_groups, group_size)[rows], math.inf)
            order = torch.sort(block, dim=1, stable=True).indices  # (U, G)
            col = order[inv, rank]  # (R,)
            picked = groups * group_size + col
            value = block[inv, col]
    finally:
        cand.index_copy_(0, idx, keep)
    if not bool(torch.isfinite(value).all()):
        raise RuntimeError("SEFT capacity rule violated: a revived slot has no active partner in its group")
    return partners.index_copy_(0, slots, picked)


def random_subset(eligible: torch.Tensor, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``k`` distinct positions drawn uniformly among the True entries of the 1-D bool ``eligible``, sorted, int64."""
    pool = eligible.reshape(-1).nonzero().squeeze(1)  # (P,)
    if k > pool.numel():
        raise ValueError(f"cannot draw {k} positions from {pool.numel()} eligible ones")
    pick = torch.randperm(pool.numel(), generator=generator, device=pool.device)[:k]  # (k,)
    return pool.index_select(0, pick).sort().values


def random_scores(numel: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Uniform random scores, for the initial indices."""
    return torch.rand(numel, generator=generator).to(device)
