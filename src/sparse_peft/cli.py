"""``sparse-peft``: prune, fine-tune, evaluate, merge and report, plus the one-command offline demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

EPILOGS = {
    "prune": """examples:
  sparse-peft prune --method wanda --sparsity 0.5 --out runs/wanda50
  sparse-peft prune --model runs/my-model --method sparsegpt --pattern 2:4 --repair --out runs/sgpt24""",
    "finetune": """examples:
  sparse-peft finetune --model runs/wanda50 --method sparse_lora --max-seconds 300 --out runs/wanda50-lora
  sparse-peft finetune --model runs/wanda50 --method spiel --data chats.jsonl --max-steps 500 --out runs/spiel""",
    "eval": """examples:
  sparse-peft eval                                   # the embedded SmolLM2, dense
  sparse-peft eval --model runs/wanda50 --adapter runs/wanda50-lora --blocks 64""",
    "merge": """examples:
  sparse-peft merge --model runs/wanda50 --adapter runs/wanda50-lora --out runs/wanda50-merged""",
    "report": """examples:
  sparse-peft report --model runs/wanda50-merged
  sparse-peft report --model runs/sgpt24 --nm-pattern 2:4 --json""",
    "export": """examples:
  sparse-peft export --model runs/wanda50-merged --dtype bf16 --out runs/wanda50-sparse
  sparse-peft export --model runs/sgpt24-merged --dtype fp16 --format semi-structured --out runs/sgpt24-24
  sparse-peft export --model runs/wanda50-sparse --format dense --out runs/wanda50-dense""",
    "demo": """examples:
  sparse-peft demo                    # ~10-15 min on 2 CPU cores
  sparse-peft demo --quick            # a couple of minutes: few blocks, few steps
  sparse-peft demo --methods sparse_lora --budget-seconds 600""",
}


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _add_model(p, default="smollm2"):
    p.add_argument(
        "--model",
        default=default,
        help="a local model folder, or 'smollm2' for the embedded SmolLM2-135M-Instruct (default: %(default)s)",
    )
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])


def _add_data(p):
    p.add_argument(
        "--data",
        default="wiki",
        help="a local .txt/.json/.jsonl file (records with 'text', or chat "
        "'messages' for finetune), or 'wiki' for the embedded Wikipedia summaries (default)",
    )
    p.add_argument("--seq-len", type=int, default=256)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparse-peft", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    def cmd(name, help_):
        return sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=EPILOGS[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = cmd("prune", "Prune a model (magnitude, Wanda, SparseGPT; unstructured or N:M) and save it.")
    _add_model(p)
    _add_data(p)
    p.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument(
        "--sparsity", type=float, default=None, help="fraction in [0, 1); default 0.5 (implied by --pattern)"
    )
    p.add_argument("--pattern", default=None, help="N:M pattern such as 2:4")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "owl"])
    p.add_argument("--repair", action="store_true", help="run DSnoT on each layer right after pruning it (same pass)")
    p.add_argument(
        "--refit",
        action="store_true",
        help="refit each layer's kept weights by least squares for its final mask (same pass)",
    )
    p.add_argument("--nsamples", type=int, default=64, help="calibration sequences")
    p.add_argument("--out", required=True)

    p = cmd("finetune", "Fine-tune with a sparse tuner through TRL's SFTTrainer and save the adapter.")
    _add_model(p)
    _add_data(p)
    p.add_argument("--method", default="sparse_lora", help="sparse_lora, spiel or s2ft")
    p.add_argument("--r", type=int, default=16, help="rank / budget (SparseLoRA r; SpIEL k = r(d_in+d_out))")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this much wall time")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default per method)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--eval-steps", type=int, default=None, help="evaluate on held-out text every N steps")
    p.add_argument("--save-steps", type=int, default=None, help="write a resumable checkpoint every N steps")
    p.add_argument("--resume", default=None, help="resume from a checkpoint folder (or 'last')")
    p.add_argument("--out", required=True)

    p = cmd("eval", "Perplexity on held-out text.")
    _add_model(p)
    _add_data(p)
    p.add_argument("--adapter", default=None, help="a saved sparse_peft adapter folder to apply")
    p.add_argument("--blocks", type=int, default=32, help="held-out blocks of --seq-len tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", action="store_true")

    p = cmd("merge", "Merge an adapter into its sparse base, verify every zero, and save the merged model.")
    _add_model(p)
    p.add_argument("--adapter", required=True)
    p.add_argument("--nm-pattern", default=None, help="also check this N:M pattern, e.g. 2:4")
    p.add_argument("--out", required=True)

    p = cmd("report", "Print the sparsity of every prunable module.")
    _add_model(p)
    p.add_argument("--nm-pattern", default=None)
    p.add_argument("--json", action="store_true")

    p = cmd(
        "export", "Export a model: compact sparse checkpoint, dense save_pretrained folder, or 2:4 semi-structured."
    )
    p.add_argument("--model", default="smollm2", help="a model folder (save_pretrained or sparse), or 'smollm2'")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="default: as stored")
    p.add_argument("--format", default="sparse", choices=["sparse", "dense", "semi-structured"])
    p.add_argument("--max-shard-size", default="2GB", help="largest shard file, e.g. 500MB (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (atomically)")
    p.add_argument("--out", required=True)

    p = cmd("demo", "Prune SmolLM2-135M, recover it with the sparse tuners, merge, verify and evaluate: offline.")
    p.add_argument("--quick", action="store_true", help="few eval blocks, calibration samples and steps")
    p.add_argument("--methods", default="sparse_lora,spiel,s2ft")
    p.add_argument("--model", default="smollm2", help="a local model folder or 'smollm2' (default)")
    p.add_argument("--prune-method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default=None, help="N:M pattern such as 2:4 instead of --sparsity")
    p.add_argument("--budget-seconds", type=float, default=150.0, help="fine-tuning wall time per method")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--eval-blocks", type=int, default=32)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default="sparse_peft_demo")
    return ap


# ---- commands -------------------------------------------------------------------------------------------------
def _prune(args):
    from . import pipeline
    from .pruning import calibration_from_texts, prune

    model, tok = pipeline.load_model(args.model, _dtype(args.dtype))
    calib = None
    if args.method != "magnitude" or args.repair or args.refit or args.allocation == "owl":
        train, _ = pipeline.load_texts(args.data)
        calib = calibration_from_texts(tok, train[:4000], nsamples=args.nsamples, seq_len=args.seq_len)
    sparsity = args.sparsity if args.sparsity is not None or args.pattern else 0.5
    report = prune(
        model,
        args.method,
        sparsity,
        args.pattern,
        calib,
        allocation=args.allocation,
        repair=args.repair,
        refit=args.refit,
    )
    pipeline.save_model(model, tok, args.out)
    print(report)
    print(f"saved the pruned model to {args.out}")


def _finetune(args):
    from . import pipeline

    model, tok = pipeline.load_model(args.model, _dtype(args.dtype))
    dataset, eval_ds = pipeline.training_datasets(args.data, tok, args.seq_len)
    config = pipeline.peft_config(args.method, r=args.r, total_steps=args.max_steps)
    resume = True if args.resume == "last" else args.resume
    trainer = pipeline.finetune(
        model,
        tok,
        config,
        dataset,
        out_dir=args.out,
        max_steps=args.max_steps,
        max_seconds=args.max_seconds,
        lr=args.lr or pipeline.DEFAULT_LR.get(args.method, 1e-3),
        batch_size=args.batch_size,
        gradient_checkpointing=args.gradient_checkpointing,
        eval_dataset=eval_ds if args.eval_steps else None,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        resume_from_checkpoint=resume,
        check_sparsity_every=50,
    )
    trainer.save_model(args.out)
    print(f"saved the {args.method} adapter to {args.out}")


def _load_with_adapter(args):
    from . import pipeline

    model, tok = pipeline.load_model(args.model, _dtype(args.dtype))
    if getattr(args, "adapter", None):
        from peft import PeftModel

        if not (Path(args.adapter) / "adapter_config.json").exists():
            raise pipeline.UserError(f"--adapter {args.adapter!r} is not an adapter folder (no adapter_config.json).")
        model = PeftModel.from_pretrained(model, args.adapter)
    return model, tok


def _eval(args):
    from . import pipeline
    from .evaluation import perplexity

    model, tok = _load_with_adapter(args)
    _, eval_texts = pipeline.load_texts(args.data)
    blocks = pipeline.eval_blocks(tok, eval_texts, args.seq_len, args.blocks)
    ppl = perplexity(model, blocks, batch_size=args.batch_size)
    print(
        json.dumps({"perplexity": ppl, "blocks": len(blocks), "seq_len": args.seq_len})
        if args.json
        else f"perplexity {ppl:.3f} on {len(blocks)} held-out blocks of {args.seq_len} tokens"
    )


def _merge(args):
    from . import pipeline

    from .export import verify
    from .pruning import get_masks

    model, tok = _load_with_adapter(args)
    masks = get_masks(model)  # the base's keep masks, before merging
    moves = any(c.peft_type == "SPIEL" for c in model.peft_config.values())  # SpIEL (SEFT) keeps nnz, not positions
    merged = model.merge_and_unload(progressbar=True)
    check = verify(merged, masks, nm_pattern=args.nm_pattern, allow_moves=moves)  # raises before anything is saved
    pipeline.save_model(merged, tok, args.out)
    print(f"merged and {check}")
    print(f"saved the merged model to {args.out}")


def _report(args):
    from . import pipeline
    from .pruning.report import sparsity_report

    model, _ = pipeline.load_model(args.model, _dtype(args.dtype))
    report = sparsity_report(model, args.nm_pattern)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)


def _export(args):
    from .export.command import run_export

    run_export(args)


def _demo(args):
    from .demo import run_demo

    run_demo(args)


COMMANDS = {
    "prune": _prune,
    "finetune": _finetune,
    "eval": _eval,
    "merge": _merge,
    "report": _report,
    "export": _export,
    "demo": _demo,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .pipeline import UserError

    start = time.perf_counter()
    try:
        COMMANDS[args.command](args)
    except (UserError, ValueError, ImportError, FileNotFoundError) as exc:
        if args.verbose:
            raise
        print(f"sparse-peft {args.command}: error: {exc}\n(run with -v for the full traceback)", file=sys.stderr)
        return 2
    if args.verbose:
        print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
