"""The one-command offline demo: prune SmolLM2-135M, recover it with each sparse tuner, merge, verify, evaluate."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from . import pipeline
from .evaluation import perplexity
from .pruning import calibration_from_texts, prune, sparsity_report

QUICK = dict(eval_blocks=4, nsamples=8, seq_len=128, max_steps=3, budget_seconds=60.0)


def _row(name, ppl, sparsity, trainable, seconds, nnz_check="-"):
    return {
        "model": name,
        "perplexity": ppl,
        "sparsity": sparsity,
        "trainable": trainable,
        "seconds": seconds,
        "zeros_kept": nnz_check,
    }


def _print_table(rows: list[dict], title: str) -> None:
    print("\n" + title)
    print(f"{'model':<28} {'perplexity':>10} {'sparsity':>9} {'trainable':>11} {'time s':>7} {'zeros kept':>11}")
    for r in rows:
        trainable = f"{r['trainable']:,}" if r["trainable"] else "-"
        print(
            f"{r['model']:<28} {r['perplexity']:>10.2f} {r['sparsity']:>9.2%} {trainable:>11} "
            f"{r['seconds']:>7.0f} {str(r['zeros_kept']):>11}"
        )


def _available_methods(requested: str) -> list[str]:
    import sparse_peft

    names = {"sparse_lora": "SparseLoraConfig", "spiel": "SpielConfig", "s2ft": "S2FTConfig"}
    methods = [m.strip() for m in requested.split(",") if m.strip()]
    for m in methods:
        if m not in names:
            raise pipeline.UserError(f"--methods: {m!r} is not one of {sorted(names)}.")
    return [m for m in methods if hasattr(sparse_peft, names[m])]


def run_demo(args) -> dict:
    """Run the demo described in the README; returns the table as data and writes ``<out>/results.json``."""
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    methods = _available_methods(args.methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows: list[dict] = []

    t = time.perf_counter()
    print("[1/10] loading the model (the embedded SmolLM2 is converted once and cached)")
    model, tok = pipeline.load_model(args.model)
    train_texts, eval_texts = pipeline.load_texts("wiki")
    blocks = pipeline.eval_blocks(tok, eval_texts, args.seq_len, args.eval_blocks)  # (N, T)
    print(f"[2/10] evaluating the dense model on {len(blocks)} held-out blocks of {args.seq_len} tokens")
    rows.append(_row("dense", perplexity(model, blocks), sparsity_report(model).sparsity, 0, time.perf_counter() - t))

    t = time.perf_counter()
    what = args.pattern or f"{args.sparsity:.0%}"
    print(f"[3/10] pruning {what} with {args.prune_method} ({args.nsamples} calibration sequences)")
    calib = calibration_from_texts(tok, train_texts[:4000], nsamples=args.nsamples, seq_len=args.seq_len)
    report = prune(
        model,
        args.prune_method,
        None if args.pattern else args.sparsity,
        args.pattern,
        None if args.prune_method == "magnitude" else calib,
    )
    print("[4/10] evaluating the pruned model")
    rows.append(
        _row(
            f"pruned ({args.prune_method} {what})",
            perplexity(model, blocks),
            report.sparsity,
            0,
            time.perf_counter() - t,
        )
    )
    zeros = pipeline.zero_masks(model)
    train_ds, _ = pipeline.training_datasets("wiki", tok, args.seq_len)
    saved_merged = None
    for i, method in enumerate(methods):
        t = time.perf_counter()
        print(
            f"[5/10] recovering with {method} for up to {args.budget_seconds:.0f} s / {args.max_steps} steps "
            f"({i + 1}/{len(methods)})"
        )
        config = pipeline.peft_config(method, r=16, total_steps=args.max_steps)
        trainer = pipeline.finetune(
            copy.deepcopy(model),
            tok,
            config,
            train_ds,
            out_dir=str(out / method),
            max_steps=args.max_steps,
            max_seconds=args.budget_seconds,
            lr=pipeline.DEFAULT_LR[method],
            batch_size=4,
            logging_steps=10,
        )
        peft_model = trainer.model
        trainable, _ = peft_model.get_nb_trainable_parameters()
        peft_model.save_pretrained(out / method / "adapter")
        print(f"[6/10] merging the {method} adapter")
        merged = peft_model.merge_and_unload()
        print("[7/10] verifying every zero")
        check = pipeline.verify(merged, zeros, args.pattern)
        if not check.ok:
            raise RuntimeError(f"{method}: merging broke the base's sparsity: {check}")
        print("[8/10] evaluating the merged model")
        ppl = perplexity(merged, blocks)
        kept = "yes" if check.revived == 0 else f"nnz exact ({check.revived} moved)"
        rows.append(
            _row(
                f"recovered: {method} (merged)",
                ppl,
                sparsity_report(merged).sparsity,
                trainable,
                time.perf_counter() - t,
                kept,
            )
        )
        if saved_merged is None:
            print(f"[9/10] saving the merged {method} model")
            saved_merged = pipeline.save_model(merged, tok, out / f"{method}-merged")
        del trainer, peft_model, merged
    results = {
        "rows": rows,
        "methods": methods,
        "quick": args.quick,
        "budget_seconds": args.budget_seconds,
        "eval_blocks": len(blocks),
        "seq_len": args.seq_len,
        "merged_model": str(saved_merged),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _print_table(
        rows,
        f"[10/10] SmolLM2-135M, {args.prune_method} {what}, recovery budget "
        f"{args.budget_seconds:.0f} s per method, perplexity on {len(blocks)} held-out blocks",
    )
    print(f"\nadapters, the merged model and results.json are in {out}/")
    return results
