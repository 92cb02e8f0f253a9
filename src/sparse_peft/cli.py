"""The work behind ``sparse-peft``'s commands: prune, fine-tune, evaluate, merge, report, and the offline demo.

The command line itself (parsing, and every argument check that needs no model) is the stdlib-only module
``sparse_peft_cli``, so that ``--help`` and bad arguments never wait for torch. Each function here takes the parsed,
validated ``argparse.Namespace``.
"""

from __future__ import annotations

import json


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _prune(args):
    from . import pipeline
    from .pruning import calibration_from_texts, prune

    model, tok = pipeline.load_model(args.model, _dtype(args.dtype))
    calib = None
    if args.method != "magnitude" or args.repair or args.refit or args.allocation == "owl":
        train, _ = pipeline.load_texts(args.data)
        calib = calibration_from_texts(tok, train[:4000], nsamples=args.nsamples, seq_len=args.seq_len)
    report = prune(
        model,
        args.method,
        args.sparsity,
        args.pattern,
        calib,
        allocation=args.allocation,
        repair=args.repair,
        refit=args.refit,
    )
    pipeline.save_model(model, tok, args.out, overwrite=args.overwrite)
    print(report)
    print(f"saved the pruned model to {args.out}")


def _finetune(args):
    from . import pipeline

    model, tok = pipeline.load_model(args.model, _dtype(args.dtype))
    dataset, eval_ds = pipeline.training_datasets(args.data, tok, args.seq_len)
    config = pipeline.peft_config(args.method, r=args.r, total_steps=args.max_steps)
    resume = True if args.resume == "last" else args.resume
    with pipeline.training_folder(args.out, overwrite=args.overwrite, resume=args.resume == "last") as out:
        trainer = pipeline.finetune(
            model,
            tok,
            config,
            dataset,
            out_dir=str(out),
            max_steps=args.max_steps,
            max_seconds=args.max_seconds,
            lr=args.lr or pipeline.DEFAULT_LR[args.method],
            batch_size=args.batch_size,
            gradient_checkpointing=args.activation_checkpointing,
            eval_dataset=eval_ds if args.eval_steps else None,
            eval_steps=args.eval_steps,
            save_steps=args.save_steps,
            resume_from_checkpoint=resume,
            check_sparsity_every=50,
        )
        trainer.save_model(str(out))
    print(f"saved the {args.method} adapter to {args.out}")


def _load_with_adapter(args):
    from . import pipeline

    model, tok = pipeline.load_model(args.model, _dtype(args.dtype))
    if getattr(args, "adapter", None):
        from peft import PeftModel

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
    moves = any(c.peft_type == "SPIEL" for c in model.peft_config.values())  # SEFT keeps nnz, not positions
    merged = model.merge_and_unload(progressbar=True)
    check = verify(merged, masks, nm_pattern=args.nm_pattern, allow_moves=moves)  # raises before anything is saved
    pipeline.save_model(merged, tok, args.out, overwrite=args.overwrite)
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
    """Same as ``sparse_peft_cli.main``: parse, check, run; returns the exit status."""
    import sparse_peft_cli

    return sparse_peft_cli.main(argv)
