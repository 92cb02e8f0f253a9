"""The one-command offline demo: prune SmolLM2-135M, recover it with LoRA* and each sparse tuner, merge, verify, evaluate.

Every method starts from the same pruned weights and trains for the same number of optimizer steps on the same
batches in the same order. What a user needs to continue is saved in ``--out``: the pruned base, and for each method
its adapter and its merged model (see ``sparse-peft demo --help``).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import pipeline
from .evaluation import perplexity
from .pruning import calibration_from_texts, prune, sparsity_report

NAMES = {
    "lora": "LoRA* r={r} (merged, re-pruned)",
    "sparse_lora": "SparseLoRA r={r} (merged)",
    "spiel": "SpIEL r={r} (merged)",
    "s2ft": "S²FT (merged)",
}


class Progress:
    """Numbered stages ``[i/N]`` that only count up; ``N`` is known from the start."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def __call__(self, message: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {message}", flush=True)


class BatchDigest:
    """Hashes the token ids of every training forward of a model, to show that methods saw the same batches.

    A forward pre-hook on the model's input embedding, removed by :meth:`close`; evaluation forwards are skipped.
    """

    def __init__(self, model: torch.nn.Module):
        self.sha = hashlib.sha1()
        self.batches = 0
        embedding = model.get_input_embeddings()
        self.handle = embedding.register_forward_pre_hook(self._record)

    def _record(self, module, inputs):
        if module.training and inputs:
            self.sha.update(inputs[0].detach().cpu().numpy().tobytes())  # (B, T) token ids
            self.batches += 1

    def close(self) -> str:
        self.handle.remove()
        return self.sha.hexdigest()


@dataclass
class Base:
    """The pruned model every method starts from, and what each run shares."""

    model: torch.nn.Module
    tokenizer: object
    zeros: dict
    blocks: torch.Tensor  # (n_blocks, seq_len) held-out token ids
    train: object  # datasets.Dataset of steps * batch_size blocks
    rows: list = field(default_factory=list)


def _row(name, ppl, sparsity, trainable=0, steps=0, seconds=0.0, zeros="-", **extra) -> dict:
    return {
        "model": name,
        "perplexity": ppl,
        "sparsity": sparsity,
        "trainable": trainable,
        "steps": steps,
        "train_seconds": seconds,
        "zeros": zeros,
        **extra,
    }


def _prepare(args, work: Path, stage: Progress) -> Base:
    cache = (
        " (the embedded SmolLM2 is converted once and cached in ~/.cache/sparse_peft)"
        if args.model == "smollm2"
        else ""
    )
    stage(f"loading {args.model}{cache}")
    model, tok = pipeline.load_model(args.model)
    train_texts, eval_texts = pipeline.load_texts("wiki")
    blocks = pipeline.eval_blocks(tok, eval_texts, args.seq_len, args.eval_blocks)  # (N, T)
    stage(f"evaluating the dense model on {len(blocks)} held-out blocks of {args.seq_len} tokens")
    dense = _row("dense", perplexity(model, blocks), sparsity_report(model).sparsity)
    what = _what(args)
    stage(f"pruning {what} with {args.prune_method} ({args.nsamples} calibration sequences)")
    calib = calibration_from_texts(tok, train_texts[:4000], nsamples=args.nsamples, seq_len=args.seq_len)
    calib = None if args.prune_method == "magnitude" else calib
    report = prune(model, args.prune_method, args.sparsity, args.pattern, calib)
    stage(f"evaluating the pruned model and saving it to {args.out}/pruned")
    pruned = _row(f"pruned ({args.prune_method} {what})", perplexity(model, blocks), report.sparsity, path="pruned")
    model.save_pretrained(work / "pruned")
    tok.save_pretrained(work / "pruned")
    train, _ = pipeline.training_datasets("wiki", tok, args.seq_len)
    train = train.shuffle(seed=0).select(range(min(len(train), args.steps * args.batch_size)))
    return Base(model, tok, pipeline.zero_masks(model), blocks, train, rows=[dense, pruned])


def _what(args) -> str:
    return args.pattern or f"{args.sparsity:.0%}"


def _config(method: str, r: int, steps: int):
    if method == "lora":
        return pipeline.lora_config(r)
    return pipeline.peft_config(method, r=r, total_steps=steps)


def _recover(method: str, args, base: Base, work: Path, stage: Progress) -> dict:
    name = NAMES[method].format(r=args.r)
    stage(f"training {name} for {args.steps} steps of {args.batch_size} x {args.seq_len} tokens")
    model = copy.deepcopy(base.model)
    digest = BatchDigest(model)
    start, cpu = time.perf_counter(), time.process_time()
    trainer = pipeline.finetune(
        model,
        base.tokenizer,
        _config(method, args.r, args.steps),
        base.train,
        out_dir=str(work / method),
        max_steps=args.steps,
        lr=pipeline.DEFAULT_LR[method],
        batch_size=args.batch_size,
        logging_steps=max(1, args.steps // 4),
    )
    seconds, cpu, batches = time.perf_counter() - start, time.process_time() - cpu, digest.close()
    peft_model = trainer.model
    trainable, _ = peft_model.get_nb_trainable_parameters()
    peft_model.save_pretrained(work / method / "adapter")
    stage(f"merging the {method} adapter and verifying every zero")
    merged = peft_model.merge_and_unload()
    if method == "lora":
        pipeline.reprune(merged, base.zeros)
    check = pipeline.verify(merged, base.zeros, args.pattern)
    if not check.ok:
        raise RuntimeError(f"{method}: merging broke the base's sparsity: {check}")
    stage(f"evaluating the merged {method} model and saving it to {args.out}/{method}/merged")
    row = _row(
        name,
        perplexity(merged, base.blocks),
        sparsity_report(merged).sparsity,
        trainable,
        trainer.state.global_step,
        seconds,
        _zeros_text(method, check),
        method=method,
        train_cpu_seconds=cpu,
        batches_sha1=batches,
        path=f"{method}/merged",
        adapter=f"{method}/adapter",
    )
    merged.save_pretrained(work / method / "merged")
    base.tokenizer.save_pretrained(work / method / "merged")
    del trainer, peft_model, merged, model
    gc.collect()
    return row


def _zeros_text(method: str, check: pipeline.Verification) -> str:
    if method == "lora":
        return "re-pruned to the mask"
    return "all kept" if check.revived == 0 else f"nnz exact, {check.revived:,} moved"


def format_table(rows: list[dict]) -> str:
    """The demo's table as text: columns sized to their contents, counts with thousands separators."""
    header = ["model", "perplexity", "sparsity", "trainable", "steps", "train s", "zeros"]
    lines = [header]
    for r in rows:
        trained = bool(r["steps"])
        lines.append(
            [
                r["model"],
                f"{r['perplexity']:.2f}",
                f"{r['sparsity']:.2%}",
                f"{r['trainable']:,}" if r["trainable"] else "-",
                str(r["steps"]) if trained else "-",
                f"{r['train_seconds']:.0f}" if trained else "-",
                r["zeros"],
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for line in lines:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:-1], widths[1:-1])] + [line[-1]]
        text.append("  ".join(cells))
    return "\n".join(text)


def run_demo(args) -> dict:
    """Run the demo described in the README; returns the results and writes them to ``<out>/results.json``.

    ``args`` is the validated namespace of ``sparse-peft demo`` (see ``sparse_peft_cli``).
    """
    out = Path(args.out).expanduser()
    stage = Progress(4 + 3 * len(args.methods) + 1)
    start, cpu = time.perf_counter(), time.process_time()
    print(f"sparse-peft demo: {', '.join(args.methods)} for {args.steps} steps each; results go to {out}", flush=True)
    torch.manual_seed(0)
    with pipeline.staged_folder(out, args.overwrite) as work:
        base = _prepare(args, work, stage)
        rows = base.rows + [_recover(method, args, base, work, stage) for method in args.methods]
        results = {
            "rows": rows,
            "methods": list(args.methods),
            "quick": args.quick,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "eval_blocks": len(base.blocks),
            "pruning": f"{args.prune_method} {_what(args)}",
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu,
        }
        (work / "results.json").write_text(json.dumps(results, indent=2))
    stage(
        f"{args.model}, {args.prune_method} {_what(args)}, {args.steps} steps per method; perplexity on "
        f"{len(base.blocks)} held-out blocks of {args.seq_len} tokens; {results['seconds'] / 60:.1f} min in all"
    )
    print(format_table(rows))
    print(f"\nsaved in {out}/: results.json, pruned/ (the pruned base), and <method>/adapter, <method>/merged")
    print(f"continue with e.g.: sparse-peft eval --model {out}/{args.methods[-1]}/merged")
    return results
