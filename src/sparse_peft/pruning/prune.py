"""``prune``: make a sparse base with magnitude, Wanda or SparseGPT, unstructured or N:M, uniform or OWL."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .._layout import check_writable
from ..masks import parse_nm
from .allocation import block_budgets, layer_budgets, outlier_ratio, owl_block_sparsities
from .calibration import CalibrationData, Device, block_modules, decoder_layers, run_sequential
from .criteria import magnitude_scores, prune_count, select_mask, wanda_scores
from .dsnot import check_objective, dsnot_layer
from .refit import refit_layer
from .report import SparsityReport, linear_weight, prunable_modules, sparsity_report
from .sparsegpt import hessian_factor, sparsegpt_prune

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl")


def _check(model, method, sparsity, pattern, allocation, calibration_data, repair, refit=False, refit_iters=30):
    """Validate the arguments; return ``(nm, sparsity)``."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r} is not one of {ALLOCATIONS}.")
    nm = parse_nm(pattern, field="pattern")
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ValueError(
                f"sparsity={sparsity} disagrees with pattern={pattern!r}, which means sparsity "
                f"{implied:g}; pass sparsity=None (or {implied:g}) with an N:M pattern."
            )
        if allocation != "uniform":
            raise ValueError(
                f"allocation={allocation!r} varies sparsity per layer, which an N:M pattern fixes; "
                "use allocation='uniform' with a pattern."
            )
        sparsity = implied
    if sparsity is None:
        raise ValueError("sparsity is required for unstructured pruning: a fraction in [0, 1), e.g. 0.5.")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity!r} must be a fraction in [0, 1) (0.5 drops half the weights).")
    modules = prunable_modules(model)
    if not modules:
        raise ValueError("the model has no nn.Linear / Conv1D layers to prune (the output head is never pruned).")
    check_writable(modules, "prune")
    if nm is not None:
        bad = {n: linear_weight(m).shape[1] for n, m in modules.items() if linear_weight(m).shape[1] % nm[1]}
        if bad:
            name, d_in = next(iter(bad.items()))
            raise ValueError(
                f"pattern={pattern!r} needs every input dimension divisible by M={nm[1]}, but "
                f"{name} has d_in={d_in} ({len(bad)} such layers); pick an M that divides it."
            )
    if isinstance(refit_iters, bool) or not isinstance(refit_iters, int) or refit_iters < 1:
        raise ValueError(
            f"refit_iters={refit_iters!r} must be a positive int (conjugate-gradient iterations; 30 is the default)."
        )
    needs_data = method != "magnitude" or allocation == "owl" or repair or refit
    if needs_data and calibration_data is None:
        raise ValueError(
            f"method={method!r} (allocation={allocation!r}, repair={repair}, refit={refit}) needs "
            "calibration_data: a (nsamples, seq_len) tensor of token ids, e.g. "
            "calibration_from_texts(tokenizer, texts)."
        )
    return nm, float(sparsity)


@torch.no_grad()
def _owl_budgets(model, calibration_data, sparsity, threshold, lam, batch_size, device, progress) -> dict[str, int]:
    """Per-layer drop counts from OWL outlier ratios, measured on the dense model, block by block."""
    ratios, sizes, names = [], [], []

    def measure(index, modules, stats):
        scores = [
            wanda_scores(linear_weight(m), stats[n].sq_sum.to(linear_weight(m).device)) for n, m in modules.items()
        ]
        ratios.append(outlier_ratio(scores, threshold))
        sizes.append(sum(linear_weight(m).numel() for m in modules.values()))
        names.append({n: linear_weight(m).numel() for n, m in modules.items()})
        return False

    run_sequential(
        model, calibration_data, measure, batch_size=batch_size, device=device, progress=progress, desc="owl ratios"
    )
    counts = block_budgets(owl_block_sparsities(ratios, sizes, sparsity, lam), sizes, sparsity)
    budgets = {}
    for block_count, numels in zip(counts, names):
        budgets.update(zip(numels, layer_budgets(block_count, list(numels.values()))))
    outside = {
        n: prune_count(linear_weight(m).numel(), sparsity)
        for n, m in prunable_modules(model).items()
        if n not in budgets
    }  # prunable layers outside the decoder blocks keep the uniform rate
    return {**budgets, **outside}


@torch.no_grad()
def prune(
    model: nn.Module,
    method: str,
    sparsity: Optional[float] = None,
    pattern: Optional[str] = None,
    calibration_data: Optional[CalibrationData] = None,
    *,
    allocation: str = "uniform",
    owl_threshold: float = 5.0,
    owl_lambda: float = 0.08,
    blocksize: int = 128,
    percdamp: float = 0.01,
    repair: bool = False,
    repair_cycles: int = 50,
    repair_objective: str = "mse",
    refit: bool = False,
    refit_iters: int = 30,
    true_sequential: bool = True,
    batch_size: int = 8,
    device: Device = None,
    progress: bool = True,
) -> SparsityReport:
    """Prune ``model`` in place and return its :func:`sparsity_report`.

    Args:
        model: a decoder-only causal LM (Llama, Qwen2/3, Mistral, GPT-2 ...), fp32 or bf16, on CPU or GPU. Every
            ``nn.Linear`` / ``Conv1D`` except the output head is pruned.
        method: ``"magnitude"`` (``|W|`` per layer), ``"wanda"`` (``|W| * ||X||`` per output row) or
            ``"sparsegpt"`` (OBS weight update with the damped inverse Hessian).
        sparsity: fraction of weights to drop, in ``[0, 1)``. With a ``pattern`` it may be left ``None``.
        pattern: ``None`` (unstructured) or ``"N:M"``: keep N of every M consecutive inputs, e.g. ``"2:4"``.
        calibration_data: ``(nsamples, seq_len)`` token ids or an iterable of such batches; needed by Wanda,
            SparseGPT, OWL and ``repair``. See :func:`calibration_from_texts`.
        allocation: ``"uniform"`` or ``"owl"`` (outlier-weighted per-block sparsity; global count exact).
        owl_threshold: OWL's outlier threshold M (times the mean score).
        owl_lambda: OWL's sparsity spread lambda.
        blocksize: SparseGPT's lazy-update block width (columns).
        percdamp: SparseGPT's Hessian damping, as a fraction of the mean diagonal (also the refit's).
        repair: also run DSnoT (:func:`repair`) on each layer right after pruning it, in the same pass and from the
            same statistics (SparseGPT's Hessian, plus the input mean), so the model is walked once, not twice.
        repair_cycles: DSnoT's ``max_cycles`` (see :func:`repair`).
        repair_objective: DSnoT's ``objective`` (see :func:`repair`).
        refit: after pruning (and DSnoT), set each layer's kept weights to the least-squares fit of the dense
            layer's output on the calibration inputs, for the final mask (:func:`refit_layer`; same statistics,
            same pass). The mask, the sparsity per row and any N:M pattern are unchanged. With Wanda or magnitude
            it also collects the Hessian, as SparseGPT does.
        refit_iters: conjugate-gradient iterations of the refit, at most (one ``d_out x d_in x d_in`` matmul each).
        true_sequential: ``True`` (default): prune a block's layers one after another in call order, each from
            inputs that already went through the pruned layers before it (q/k/v, then o, then gate/up, then down),
            in one forward per block. ``False``: prune all of a block's layers from the statistics of the
            unpruned block, then run the block again for the next one's inputs (two forwards per block; the
            SparseGPT and Wanda papers' protocol).
        batch_size: calibration sequences per forward.
        device: run each block on this device (e.g. ``"cuda"`` for a CPU-resident model); default: the model's.
        progress: show a tqdm bar per block.

    Calibration is sequential: each block's statistics come from the outputs of the already-pruned blocks
    before it, and only one block's activations are kept at a time. No thread started here outlives the call, and
    the caller's torch thread count is restored (SparseGPT's sweep runs on one CPU thread).
    """
    nm, sparsity = _check(model, method, sparsity, pattern, allocation, calibration_data, repair, refit, refit_iters)
    check_objective(repair_objective)
    if allocation == "owl":
        budgets = _owl_budgets(
            model, calibration_data, sparsity, owl_threshold, owl_lambda, batch_size, device, progress
        )
    else:
        budgets = {n: prune_count(linear_weight(m).numel(), sparsity) for n, m in prunable_modules(model).items()}

    def prune_module(name, module, stats):
        w = linear_weight(module)  # (d_out, d_in), a view for Conv1D
        dense = w.detach().float().clone() if repair or refit else None
        if method == "sparsegpt":
            new = sparsegpt_prune(w, stats.hessian.to(w.device), budgets[name], nm, blocksize, percdamp)
        else:
            scores = magnitude_scores(w) if method == "magnitude" else wanda_scores(w, stats.sq_sum.to(w.device))
            new = w.float() * select_mask(scores, budgets[name], nm, per_row=method == "wanda")
        if repair:
            new = dsnot_layer(dense, new, stats, nm, repair_cycles, objective=repair_objective)
        if refit:
            new = refit_layer(dense, new, stats.hessian, percdamp, refit_iters)
        w.copy_(new.to(w.dtype))

    factors: dict[int, tuple] = {}  # id(stats) -> SparseGPT's inverse-Hessian factor, shared by sibling layers

    def prune_group(group, stats):
        ws = [linear_weight(m) for m in group.values()]  # (d_out_i, d_in) each
        stacked = torch.cat([w.detach().float() for w in ws])  # (sum d_out_i, d_in)
        rows = [w.shape[0] for w in ws]
        if id(stats) not in factors:
            factors.clear()  # siblings come one after another: only the current input's factor is needed
            factors[id(stats)] = (stats, hessian_factor(stats.hessian.to(stacked.device), percdamp))
        new = sparsegpt_prune(
            stacked,
            stats.hessian,
            [budgets[n] for n in group],
            nm,
            blocksize,
            percdamp,
            rows=rows,
            factor=factors[id(stats)][1],
        )
        if repair:
            new = torch.cat(
                [
                    dsnot_layer(w.detach().float(), part, stats, nm, repair_cycles, objective=repair_objective)
                    for w, part in zip(ws, new.split(rows))
                ]
            )
        if refit:  # rows are independent: the stacked layers refit together, one matmul per iteration
            new = refit_layer(stacked, new, stats.hessian, percdamp, refit_iters)
        for w, part in zip(ws, new.split(rows)):
            w.copy_(part.to(w.dtype))

    if method == "magnitude" and not repair and not refit:
        for name, module in prunable_modules(model).items():
            prune_module(name, module, None)
        return sparsity_report(model, nm_pattern=pattern)

    decoder_layers(model)  # clear error before any work when the blocks cannot be found
    outside = [
        n
        for n in prunable_modules(model)
        if n not in set().union(*(block_modules(model, b) for b in decoder_layers(model)))
    ]
    if outside:
        raise ValueError(
            f"{outside[:3]} are prunable but outside the decoder blocks, which sequential "
            "calibration cannot reach; prune them separately (e.g. method='magnitude')."
        )

    def process(index, modules, stats):
        if method != "sparsegpt":
            for name, module in modules.items():
                prune_module(name, module, stats.get(name))
            return
        groups: dict[int, list[str]] = {}
        for name in modules:  # layers fed the same input (q/k/v, gate/up) share a Hessian: solve them together
            groups.setdefault(id(stats[name]), []).append(name)
        for names in groups.values():
            prune_group({n: modules[n] for n in names}, stats[names[0]])

    run_sequential(
        model,
        calibration_data,
        process,
        want_hessian=method == "sparsegpt" or refit or (repair and repair_objective == "mse"),
        want_sum=repair,
        per_layer=true_sequential,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc=method,
    )
    return sparsity_report(model, nm_pattern=pattern)
