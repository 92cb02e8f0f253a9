"""Pruning benchmark: perplexity and wall time of magnitude / Wanda / SparseGPT, without and with DSnoT and refit.

SmolLM2-135M-Instruct (offline, see ``sparse_peft.embedded``), calibration windows from the train split of the
Wikipedia summaries, perplexity on the first ``--eval-blocks`` held-out blocks; the same blocks for every row,
dense included, and every row also shows its ratio to dense.

    python benchmarks/pruning.py --methods sparsegpt --patterns 50%     # the headline: SparseGPT + DSnoT at 50%
    python benchmarks/pruning.py --out benchmarks/results/pruning.json  # every method, 50% and 2:4

Each row starts from the dense weights. "+dsnot" is ``prune(..., repair=True)``: DSnoT runs on each layer right
after SparseGPT (or Wanda, magnitude) pruned it, in the same calibration pass. Its ``prune_s`` is the time outside
DSnoT and ``repair_s`` the time inside it, measured around each DSnoT call; ``seconds`` is the total.
"+refit" is ``prune(..., refit=True)``: each layer's kept weights are then refit by least squares for its final
mask (after DSnoT when both run), timed as ``refit_s``; ``--refit both`` gives every row with and without it.
``--separate-repair`` instead runs :func:`sparse_peft.pruning.repair` afterwards (its own calibration pass; with
``--refit`` the refit then comes before DSnoT).

    python benchmarks/pruning.py --methods sparsegpt --patterns 50% --refit both   # what the refit adds
Wall times depend on the machine's load, so the JSON records the load average before and after each row and the
process CPU time; perplexity does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch

from sparse_peft.embedded import load_smollm2, token_blocks, wiki_split
from sparse_peft.evaluation import perplexity
from sparse_peft.pruning import calibration_from_texts, dense_snapshot, prune, repair
from sparse_peft.pruning.report import linear_weight, prunable_modules

PATTERNS = {"50%": (0.5, None), "2:4": (None, "2:4")}


class _Companion:
    """Reference-counted companion thread: the first user starts it, the last one to leave stops it."""

    lock = threading.Lock()
    users = 0
    stop: Optional[threading.Event] = None
    thread: Optional[threading.Thread] = None


@contextmanager
def openmp_companion() -> Iterator[None]:
    """Keep one idle OpenMP master thread alive for the duration; nests freely, and works as a decorator.

    A benchmark-only aid for steadier wall times (the library never starts it): this script wraps its whole run in it.

    GNU OpenMP (torch's CPU backend) lets its threads spin-wait at every barrier for a long time while the process
    has no more OpenMP threads than cores, and only briefly (then sleep) when it has more. On a shared CPU whose
    cores other processes keep busy, the long spins steal the core from the thread doing the work: the small ops of a
    block's forward ran up to 10x slower on the main thread of our 2-core machine, and a whole block-at-a-time
    pruning pass about 2x slower, than with this companion thread alive. When the cores were otherwise free, the same
    ops took about the same time with and without it. Several users (nested or in other threads) share one companion,
    which stops when the last of them leaves.
    """
    if torch.get_num_threads() < 2:
        yield
        return

    def companion(started: threading.Event, stop: threading.Event) -> None:
        torch.ones(1 << 17).mul_(2).sum()  # large enough to open a parallel region: this thread gets a team
        started.set()
        stop.wait()

    with _Companion.lock:
        _Companion.users += 1
        if _Companion.users == 1:
            started, _Companion.stop = threading.Event(), threading.Event()
            _Companion.thread = threading.Thread(
                target=companion, args=(started, _Companion.stop), daemon=True, name="sparse_peft-openmp-companion"
            )
            _Companion.thread.start()
            started.wait()
    try:
        yield
    finally:
        with _Companion.lock:
            _Companion.users -= 1
            if _Companion.users == 0:
                _Companion.stop.set()
                _Companion.thread.join()
                _Companion.stop = _Companion.thread = None


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """The calibration / evaluation protocol's options, shared with ``compare_llmcompressor.py``."""
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    p.add_argument(
        "--calib-texts",
        type=int,
        default=3000,
        help="draw calibration windows from the first N train articles (0: all of them)",
    )
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="which random calibration windows to draw")
    p.add_argument("--eval-blocks", type=int, default=128, help="held-out blocks of --seq-len tokens")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def protocol(args):
    """``(model, tokenizer, calib_texts, calib, eval_ids)``: SmolLM2 in fp32, calibration windows, held-out blocks."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(torch.float32)
    train_texts, eval_texts = wiki_split(eval_fraction=0.1, seed=0)
    calib_texts = train_texts[: args.calib_texts] if args.calib_texts else train_texts
    calib = calibration_from_texts(tokenizer, calib_texts, args.nsamples, args.seq_len, seed=args.seed)
    eval_ids = token_blocks(tokenizer, eval_texts, args.seq_len, max_blocks=args.eval_blocks)
    return model, tokenizer, calib_texts, calib, eval_ids


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    add_protocol_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT's Hessian damping")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT's lazy-update block width")
    p.add_argument(
        "--allocation",
        default="uniform",
        choices=["uniform", "owl"],
        help="per-layer sparsity (owl only applies to the 50%% pattern)",
    )
    p.add_argument(
        "--per-block",
        action="store_true",
        help="true_sequential=False: each block's layers from the unpruned block's statistics",
    )
    p.add_argument("--no-repair", action="store_true", help="skip the +dsnot rows")
    p.add_argument("--repair-only", action="store_true", help="skip the rows without DSnoT")
    p.add_argument(
        "--refit",
        default="off",
        choices=["off", "on", "both"],
        help="least-squares refit of the kept weights after pruning (and DSnoT): rows without it, "
        "with it (labelled +refit), or both",
    )
    p.add_argument(
        "--separate-repair",
        action="store_true",
        help="+dsnot = prune, then repair() in its own pass (instead of prune(..., repair=True))",
    )
    p.add_argument("--out", default="benchmarks/results/pruning.json")
    return p.parse_args()


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def restore(model, dense):
    """Copy the dense weights back (pruning and repair only ever change prunable weights)."""
    with torch.no_grad():
        for name, module in prunable_modules(model).items():
            linear_weight(module).copy_(dense[name])


@contextmanager
def timed(function: str):
    """Accumulate the wall time spent inside ``prune``'s per-layer calls of ``function`` (DSnoT, the refit)."""
    prune_module = sys.modules["sparse_peft.pruning.prune"]  # the package exports the function under that name
    original, spent = getattr(prune_module, function), [0.0]

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    setattr(prune_module, function, wrapper)
    try:
        yield spent
    finally:
        setattr(prune_module, function, original)


def main():
    args = parse_args()
    model, tokenizer, calib_texts, calib, eval_ids = protocol(args)
    dense = dense_snapshot(model)
    options = dict(
        blocksize=args.blocksize, percdamp=args.percdamp, true_sequential=not args.per_block, batch_size=args.batch_size
    )
    rows = []
    meta = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "seed": args.seed,
        "nsamples": args.nsamples,
        "seq_len": args.seq_len,
        "calib_texts": len(calib_texts),
        "eval_blocks": int(eval_ids.shape[0]),
        "allocation": args.allocation,
        **options,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_start": load_average(),
        "note": "seconds = prune_s + repair_s + refit_s (wall); cpu_s = process CPU time; load = 1/5/15-min "
        "load average before and after the row",
    }

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)

    def record(label, pattern, prune_s, repair_s, cpu_s, sparsity, load_before, refit_s=0.0):
        ppl = perplexity(model, eval_ids, progress=False)
        ratio = ppl / rows[0]["ppl"] if rows else 1.0
        total = prune_s + repair_s + refit_s
        rows.append(
            {
                "method": label,
                "pattern": pattern,
                "ppl": ppl,
                "ratio_to_dense": ratio,
                "prune_s": prune_s,
                "repair_s": repair_s,
                "refit_s": refit_s,
                "seconds": total,
                "cpu_s": cpu_s,
                "sparsity": sparsity,
                "load_before": load_before,
                "load_after": load_average(),
            }
        )
        print(
            f"{label:<24} {pattern:>5}  ppl {ppl:8.2f}  {ratio:5.2f}x dense  prune {prune_s:6.1f} s  "
            f"repair {repair_s:6.1f} s  refit {refit_s:6.1f} s  total {total:6.1f} s  (cpu {cpu_s:6.1f} s, "
            f"load {load_before[0]:.1f})  sparsity {sparsity:.2%}",
            flush=True,
        )
        save()  # partial results survive an interrupted run

    record("dense", "-", 0.0, 0.0, 0.0, 0.0, load_average())
    for pattern in args.patterns:
        sparsity, nm = PATTERNS[pattern]
        allocation = args.allocation if nm is None else "uniform"
        for method in args.methods:
            repairs = ([] if args.repair_only else [False]) + ([] if args.no_repair else [True])
            refits = {"off": [False], "on": [True], "both": [False, True]}[args.refit]
            for with_repair, with_refit in [(rp, rf) for rp in repairs for rf in refits]:
                restore(model, dense)
                load_before, cpu0, start = load_average(), time.process_time(), time.perf_counter()
                inline = with_repair and not args.separate_repair
                with timed("dsnot_layer") as dsnot_s, timed("refit_layer") as refit_s:
                    report = prune(
                        model,
                        method,
                        sparsity,
                        nm,
                        calib,
                        allocation=allocation,
                        repair=inline,
                        refit=with_refit,
                        **options,
                    )
                total = time.perf_counter() - start
                prune_s, repair_s = total - dsnot_s[0] - refit_s[0], dsnot_s[0]
                if with_repair and args.separate_repair:
                    start = time.perf_counter()
                    report = repair(model, calib, dense, nm, batch_size=args.batch_size)
                    repair_s = time.perf_counter() - start
                assert nm is None or report.nm_valid
                label = method + ("+dsnot" if with_repair else "") + ("+refit" if with_refit else "")
                record(
                    label,
                    pattern,
                    prune_s,
                    repair_s,
                    time.process_time() - cpu0,
                    report.sparsity,
                    load_before,
                    refit_s[0],
                )

    print(
        "\n| method | pattern | perplexity | × dense | prune (s) | repair (s) | refit (s) | total (s) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['method']} | {r['pattern']} | {r['ppl']:.2f} | {r['ratio_to_dense']:.2f} | {r['prune_s']:.0f} | "
            f"{r['repair_s']:.0f} | {r['refit_s']:.0f} | {r['seconds']:.0f} |"
        )
    meta["load_average_end"] = load_average()
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    with openmp_companion():  # perplexity too: see its docstring (a busy shared CPU)
        main()
