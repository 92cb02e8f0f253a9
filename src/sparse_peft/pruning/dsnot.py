"""DSnoT (Zhang et al., ICLR 2024): training-free repair of a pruned layer by swapping weights per output row.

For output row ``r`` with residual ``D_r = W_dense_r - W_r`` the *expected reconstruction error* is
``eps_r = D_r . E[x]``. One swap revives a pruned weight ``j`` (back to its dense value; ``eps`` moves by
``-W_dense_rj E[x_j]``) and drops a kept weight ``k`` (``eps`` moves by ``+W_rk E[x_k]``), so the row keeps its count:

- grow: the pruned ``j`` with ``sign(eps) W_dense_rj E[x_j] > 0`` and the largest such value over ``Var[x_j]``;
- drop: the kept ``k`` with ``sign(eps) W_rk E[x_k] < 0`` and the smallest Wanda score ``|W_rk| ||x_k||``;
- with an N:M pattern, ``j`` and ``k`` come from the same group of M inputs (one swap per group), so the pattern
  stays exact;
- a row stops once ``eps`` changes sign, or after ``max_cycles`` swaps.

Candidates are ranked once, so the swap sequence of every row is known in advance and all rows run at once. Where
to stop along it: ``objective="mean"`` stops where ``|eps|`` is smallest (the paper's rule); ``objective="mse"``
(default) stops where the row's actual reconstruction error on the calibration inputs, ``D_r H D_r^T``, is
smallest, so it never increases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import torch
import torch.nn as nn

from .._layout import check_writable
from ..masks import parse_nm
from .calibration import CalibrationData, Device, InputStats, run_sequential
from .report import SparsityReport, linear_weight, prunable_modules, sparsity_report
from .sparsegpt import _cpu_threads

_OBJECTIVES = ("mse", "mean")


def reconstruction_error(w_dense: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sum_t ||W_dense x_t - W x_t||^2`` on the calibration inputs, from ``H = sum_t x_t x_t^T``."""
    delta = w_dense.float() - weight.float()  # (d_out, d_in)
    return float(((delta @ hessian.float()) * delta).sum())


def _candidates(grow: torch.Tensor, drop: torch.Tensor, nm: Optional[tuple[int, int]], k: int):
    """Indices ``(d_out, K)`` of the first K grow and drop candidates per row, and which pairs are valid."""
    if nm is None:
        k = min(k, grow.shape[1])
        gval, g = torch.topk(grow, k, dim=1)  # descending, -inf = not a candidate
        pval, p = torch.topk(drop, k, dim=1, largest=False)  # ascending, +inf = not a candidate
        return g, p, torch.isfinite(gval) & torch.isfinite(pval)
    d_out, d_in = grow.shape
    m = nm[1]
    gval, gpos = grow.reshape(d_out, d_in // m, m).max(-1)  # (d_out, G): best grow in each group
    pval, ppos = drop.reshape(d_out, d_in // m, m).min(-1)  # (d_out, G): best drop in each group
    score = torch.where(torch.isfinite(gval) & torch.isfinite(pval), gval, torch.full_like(gval, -torch.inf))
    k = min(k, score.shape[1])
    sval, groups = torch.topk(score, k, dim=1)  # (d_out, K)
    g = groups * m + gpos.gather(1, groups)
    p = groups * m + ppos.gather(1, groups)
    return g, p, torch.isfinite(sval)


@torch.no_grad()
def dsnot_layer(
    w_dense: torch.Tensor,
    weight: torch.Tensor,
    stats: InputStats,
    nm: Optional[tuple[int, int]] = None,
    max_cycles: int = 50,
    var_power: float = 1.0,
    objective: str = "mse",
) -> torch.Tensor:
    """Return the repaired weight (fp32, ``(d_out, d_in)``); zeros of ``weight`` are its pruned entries.

    On CPU it runs on one intra-op thread, like SparseGPT's sweep: its tensors are small, and on our shared 2-core
    machine two threads were no faster (load 2) and much slower when other processes kept both cores busy.
    """
    with _cpu_threads(weight.device):
        return _dsnot_layer(w_dense, weight, stats, nm, max_cycles, var_power, objective)


def _dsnot_layer(w_dense, weight, stats, nm, max_cycles, var_power, objective) -> torch.Tensor:
    wd = w_dense.detach().float()  # (d_out, d_in)
    w = weight.detach().float()  # (d_out, d_in)
    keep = w != 0
    mean = stats.mean.to(w.device)  # (d_in,)
    var = stats.var.to(w.device)
    var = var.clamp_min(1e-6 * float(var.mean()) + 1e-12)
    norm = stats.sq_sum.to(w.device).sqrt()  # (d_in,)
    eps = ((wd - w) * mean).sum(1, keepdim=True)  # (d_out, 1) expected reconstruction error
    sign = torch.sign(eps)
    c_grow = wd * mean  # eps moves by -c_grow on revival
    c_drop = w * mean  # eps moves by +c_drop on removal
    inf = torch.tensor(torch.inf, device=w.device)
    grow = torch.where(~keep & (sign * c_grow > 0), sign * c_grow / var.pow(var_power), -inf)  # (d_out, d_in)
    drop = torch.where(keep & (sign * c_drop < 0), w.abs() * norm, inf)
    g, p, valid = _candidates(grow, drop, nm, max_cycles)  # (d_out, K) each
    K = g.shape[1]
    if K == 0:
        return w.clone()
    step = (c_drop.gather(1, p) - c_grow.gather(1, g)) * valid  # (d_out, K) change of eps per swap
    eps_t = torch.cat([eps, eps + step.cumsum(1)], 1)  # (d_out, K+1) eps after t swaps
    ok = valid & (sign * eps_t[:, :-1] > 0)  # a swap is allowed while eps has not changed sign
    allowed = torch.cat([torch.ones_like(eps, dtype=torch.bool), ok.cumprod(1).bool()], 1)  # (d_out, K+1)
    K = int(allowed.sum(1).max()) - 1  # no row may go past K swaps: cost only those prefixes
    if K == 0:
        return w.clone()
    g, p, valid, allowed, eps_t = g[:, :K], p[:, :K], valid[:, :K], allowed[:, : K + 1], eps_t[:, : K + 1]
    if objective == "mean" or stats.hessian is None:
        cost = eps_t.abs()
    else:
        cost = _prefix_mse(
            wd - w,
            stats.hessian.to(w.device) / max(stats.count, 1),
            g,
            p,
            -wd.gather(1, g) * valid,
            w.gather(1, p) * valid,
        )
    cost = torch.where(allowed, cost, inf)
    t_best = cost.argmin(1, keepdim=True)  # (d_out, 1); ties -> fewest swaps
    active = torch.arange(K, device=w.device).unsqueeze(0) < t_best  # (d_out, K)
    revive = torch.zeros_like(keep).scatter_(1, g, active)  # g (and p) are distinct within a row
    drop_now = torch.zeros_like(keep).scatter_(1, p, active)
    return torch.where(revive, wd, torch.where(drop_now, torch.zeros_like(w), w))


def _prefix_mse(delta, h, g, p, coef_g, coef_p) -> torch.Tensor:
    """``(D + first t swaps) H (D + first t swaps)^T`` per row for t = 0..K, shape ``(d_out, K+1)``.

    The 2K changes are taken in swap order (grow, drop, grow, ...); the quadratic term of a prefix is a running
    sum of each change with itself and with the changes before it, so no ``(K+1)``-fold product is needed.
    """
    d_out, K = g.shape
    idx = torch.stack([g, p], 2).reshape(d_out, 2 * K)  # (d_out, 2K) in swap order
    coef = torch.stack([coef_g, coef_p], 2).reshape(d_out, 2 * K)  # change of D at idx
    dh = delta @ h  # (d_out, d_in)
    base = (dh * delta).sum(1, keepdim=True)  # (d_out, 1)
    lin = 2 * coef * dh.gather(1, idx)  # (d_out, 2K)
    c = coef.unsqueeze(2) * h[idx.unsqueeze(2), idx.unsqueeze(1)] * coef.unsqueeze(1)  # (d_out, 2K, 2K)
    quad = 2 * c.tril(-1).sum(2) + c.diagonal(dim1=1, dim2=2)  # (d_out, 2K): new cross terms + self term
    run = (lin + quad).cumsum(1)[:, 1::2]  # (d_out, K): after each full swap
    return torch.cat([base, base + run], 1)


def check_objective(objective: str) -> None:
    if objective not in _OBJECTIVES:
        raise ValueError(
            f"objective={objective!r} is not one of {_OBJECTIVES}: 'mse' stops each row where the "
            "calibration reconstruction error is lowest, 'mean' where the expected error is."
        )


def dense_snapshot(model: nn.Module, device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Copies of every prunable weight (``nn.Linear`` layout) by module name: the ``dense`` for :func:`repair`."""
    return {name: linear_weight(m).detach().to(device, copy=True) for name, m in prunable_modules(model).items()}


@torch.no_grad()
def repair(
    model: nn.Module,
    calibration_data: CalibrationData,
    dense: Union[nn.Module, Mapping[str, torch.Tensor]],
    pattern: Optional[str] = None,
    *,
    max_cycles: int = 50,
    var_power: float = 1.0,
    objective: str = "mse",
    batch_size: int = 8,
    device: Device = None,
    progress: bool = True,
) -> SparsityReport:
    """DSnoT repair of a pruned ``model`` in place, block by block on ``calibration_data``. Training-free.

    Args:
        model: the pruned model; its zeros are the pruned weights.
        calibration_data: ``(nsamples, seq_len)`` token ids or an iterable of such batches.
        dense: the dense weights that revived entries return to: the unpruned model (same architecture) or a
            :func:`dense_snapshot` taken before pruning.
        pattern: the model's N:M pattern (e.g. ``"2:4"``) so swaps stay inside groups; ``None`` = unstructured.
        max_cycles: the most swaps per output row (per layer).
        var_power: growth divides by ``Var[x_j] ** var_power`` (0 disables).
        objective: ``"mse"`` (default) or ``"mean"``; see the module docs.

    Returns:
        The :func:`sparsity_report` of the repaired model; each row keeps its number of zeros exactly.
    """
    nm = parse_nm(pattern, field="pattern")
    check_objective(objective)
    if max_cycles < 0:
        raise ValueError(f"max_cycles={max_cycles} must be >= 0.")
    check_writable(prunable_modules(model), "repair")
    ref = dense_snapshot(dense) if isinstance(dense, nn.Module) else dict(dense)
    missing = [n for n in prunable_modules(model) if n not in ref]
    if missing:
        raise ValueError(
            f"dense has no weight for {missing[:3]}...; pass the unpruned model or "
            "dense_snapshot(model) taken before pruning."
        )

    def process(index, modules, stats):
        for name, module in modules.items():
            w = linear_weight(module)
            new = dsnot_layer(ref[name].to(w.device), w, stats[name], nm, max_cycles, var_power, objective)
            w.copy_(new.to(w.dtype))

    run_sequential(
        model,
        calibration_data,
        process,
        want_hessian=objective == "mse",
        want_sum=True,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="dsnot",
    )
    return sparsity_report(model, nm_pattern=pattern)
