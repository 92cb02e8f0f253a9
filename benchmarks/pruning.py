"""Pruning benchmark: perplexity and wall time of magnitude / Wanda / SparseGPT, each followed by DSnoT.

SmolLM2-135M-Instruct (offline, see ``sparse_peft.embedded``), calibration windows from the train split of the
Wikipedia summaries, perplexity on held-out articles; the same eval blocks for every method.

    python benchmarks/pruning.py --out benchmarks/results/pruning.json
    python benchmarks/pruning.py --nsamples 32 --eval-blocks 32 --patterns 50% --methods sparsegpt

Each pruning run starts from the dense weights. "+dsnot" is :func:`sparse_peft.pruning.repair` applied to the
pruned model just measured (its own calibration pass); its time is the repair alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from sparse_peft.embedded import load_smollm2, token_blocks, wiki_split
from sparse_peft.evaluation import perplexity
from sparse_peft.pruning import calibration_from_texts, dense_snapshot, prune, repair

PATTERNS = {"50%": (0.5, None), "2:4": (None, "2:4")}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks of --seq-len tokens")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--no-repair", action="store_true", help="skip the DSnoT rows")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks/results/pruning.json")
    return p.parse_args()


def restore(model, dense):
    """Copy the dense weights back (pruning and repair only ever change prunable weights)."""
    from sparse_peft.pruning.report import linear_weight, prunable_modules

    with torch.no_grad():
        for name, module in prunable_modules(model).items():
            linear_weight(module).copy_(dense[name])


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(torch.float32)
    train_texts, eval_texts = wiki_split(eval_fraction=0.1, seed=0)
    calib = calibration_from_texts(tokenizer, train_texts[:3000], args.nsamples, args.seq_len, seed=0)
    eval_ids = token_blocks(tokenizer, eval_texts, args.seq_len, max_blocks=args.eval_blocks)
    dense = dense_snapshot(model)
    rows = []

    meta = {"model": "SmolLM2-135M-Instruct (fp32)", "nsamples": args.nsamples, "seq_len": args.seq_len,
            "eval_blocks": int(eval_ids.shape[0]), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "platform": platform.platform(),
            "note": "+dsnot seconds = prune + repair; repair_seconds = repair alone"}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)

    def record(label, pattern, ppl, seconds, sparsity, **extra):
        rows.append({"method": label, "pattern": pattern, "ppl": ppl, "seconds": seconds, "sparsity": sparsity,
                     **extra})
        print(f"{label:<18} {pattern:>5}  ppl {ppl:8.2f}  time {seconds:7.1f} s  sparsity {sparsity:.2%}", flush=True)
        save()  # partial results survive an interrupted run

    record("dense", "-", perplexity(model, eval_ids, progress=False), 0.0, 0.0)
    for pattern in args.patterns:
        sparsity, nm = PATTERNS[pattern]
        for method in args.methods:
            restore(model, dense)
            start = time.perf_counter()
            report = prune(model, method, sparsity, nm, calib, batch_size=args.batch_size)
            pruned_s = time.perf_counter() - start
            record(method, pattern, perplexity(model, eval_ids, progress=False), pruned_s, report.sparsity)
            if args.no_repair:
                continue
            start = time.perf_counter()
            report = repair(model, calib, dense, nm, batch_size=args.batch_size)
            repair_s = time.perf_counter() - start
            assert nm is None or report.nm_valid
            record(f"{method}+dsnot", pattern, perplexity(model, eval_ids, progress=False), pruned_s + repair_s,
                   report.sparsity, repair_seconds=repair_s)

    print("\n| method | pattern | perplexity | wall time (s) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['pattern']} | {r['ppl']:.2f} | {r['seconds']:.0f} |")
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
