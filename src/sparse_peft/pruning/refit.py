"""Least-squares refit of a pruned layer's kept weights, for its final mask.

Given the dense weight ``W`` ``(d_out, d_in)``, the calibration Hessian ``H = sum_t x_t x_t^T`` and a mask ``M``
(the pruned weight's non-zeros), each row's kept weights are set to the minimiser of the layer's output error on
the calibration inputs,

    z_i = argmin_{z: z = 0 outside M_i} (w_i - z)^T (H + damp I) (w_i - z),

i.e. ``z_i[S] = (H + damp I)[S, S]^-1 ((H + damp I) w_i)[S]`` with ``S`` the row's kept inputs. SparseGPT's OBS
sweep approaches this one column at a time (each pruned weight's error goes only to the columns after it) and
Wanda / magnitude / DSnoT never update the kept weights at all, so the refit lowers the layer error of each of them
without touching the mask: the sparsity per row and any N:M pattern stay exactly as they were. The damping is
SparseGPT's (``percdamp`` of the mean diagonal); it also pulls the kept weights toward their dense values.

Every row has its own ``S``, so instead of ``d_out`` separate factorisations this runs conjugate gradients on all
rows at once, warm-started from the pruned weight and preconditioned by ``diag(H)``: one ``(d_out, d_in) @ (d_in,
d_in)`` matmul per iteration. It stops when every row's residual is below ``tol`` relative to its right-hand side,
or after ``max_iters`` iterations (the figures in ``docs/benchmarks.md`` use the default 30).
"""

from __future__ import annotations

import torch


def _damped(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    H = hessian.detach().float().clone()  # (d_in, d_in)
    dead = H.diagonal() == 0  # inputs never active in calibration: any weight there is as good as another
    H[dead, dead] = 1
    H.diagonal().add_(percdamp * H.diagonal().mean().clamp_min(1e-8))
    return H


@torch.no_grad()
def refit_layer(
    dense: torch.Tensor,
    pruned: torch.Tensor,
    hessian: torch.Tensor,
    percdamp: float = 0.01,
    max_iters: int = 30,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Return ``pruned`` (fp32, ``(d_out, d_in)``) with its non-zeros refit by least squares; inputs unchanged.

    Args:
        dense: the layer's weight before pruning, ``(d_out, d_in)``.
        pruned: the pruned weight; its non-zeros are the weights to refit (zeros stay zero).
        hessian: ``(d_in, d_in)``, ``sum_t x_t x_t^T`` over calibration tokens (any positive scale).
        percdamp: damping as a fraction of the mean Hessian diagonal (SparseGPT's).
        max_iters: conjugate-gradient iterations at most.
        tol: stop once every row's preconditioned squared residual is below ``tol`` times that of its right-hand
            side ``((H + damp I) w_i)[S]`` (so an already converged ``pruned`` comes back unchanged).
    """
    if max_iters < 0:
        raise ValueError(f"max_iters={max_iters} must be >= 0.")
    W = dense.detach().float()  # (d_out, d_in)
    Z = pruned.detach().float().clone()  # (d_out, d_in)
    if max_iters == 0:
        return Z
    keep = (Z != 0).to(Z.dtype)  # (d_out, d_in) 0/1
    H = _damped(hessian.to(Z.device), percdamp)  # (d_in, d_in)
    diag = H.diagonal().clone()  # (d_in,) Jacobi preconditioner
    B = (W @ H).mul_(keep)  # (d_out, d_in): right-hand side of each row's normal equations
    R = B - (Z @ H).mul_(keep)  # (d_out, d_in): the residual, minus the gradient on the kept weights
    stop = (B * B / diag).sum(1) * tol  # (d_out,)
    del B
    Y = R / diag
    P = Y.clone()
    rz = (R * Y).sum(1)  # (d_out,)
    for _ in range(max_iters):
        active = rz > stop
        if not bool(active.any()):
            break
        AP = (P @ H).mul_(keep)  # (d_out, d_in)
        curvature = (P * AP).sum(1)  # (d_out,), > 0 on active rows (H is positive definite)
        alpha = torch.where(active & (curvature > 0), rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        Z.addcmul_(alpha[:, None], P)
        R.addcmul_(alpha[:, None], AP, value=-1)
        torch.div(R, diag, out=Y)
        rz_new = (R * Y).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        P.mul_(beta[:, None]).add_(Y)
        rz = rz_new
    return Z.mul_(keep)  # exact zeros where the mask is 0 (P and R are zero there; this guards -0 and rounding)
