"""``sparse-peft export``: what the CLI command does, kept here so the CLI stays a thin parser."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import _atomic_folder, is_sparse_checkpoint, load_sparse, save_sparse
from .semi_structured import HALF_DTYPES, semi_structured_plan

FORMATS = ("sparse", "dense", "semi-structured")
_DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def run_export(args) -> None:
    """Load ``args.model`` and write it to ``args.out`` in ``args.format``; print progress and one size line."""
    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format!r} is not one of {', '.join(FORMATS)}.")
    out = Path(args.out)
    if out.exists() and not getattr(args, "overwrite", False) and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not empty; pass --overwrite to replace it.")
    model, tokenizer = _load(args.model, args.dtype)
    if args.format == "dense":
        print(_save_dense(model, tokenizer, out))
        return
    if args.format == "semi-structured":
        fits = _check_semi_structured(model)
    summary = save_sparse(
        model, out, tokenizer=tokenizer, max_shard_size=args.max_shard_size, overwrite=True, progress=True
    )
    print(f"sparse checkpoint {summary}")
    if args.format == "semi-structured":
        print(
            f"{fits[0]} of {fits[1]} 2:4 Linear weights fit torch's semi-structured layout; on a CUDA sm80+ GPU: "
            f"sparse_peft.export.to_semi_structured(sparse_peft.export.load_sparse({str(out)!r}, device='cuda'))"
        )


def _load(spec: str, dtype: str):
    """``(model, tokenizer)`` from a sparse checkpoint, a save_pretrained folder or ``"smollm2"``."""
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(_DTYPES)}.")
    if is_sparse_checkpoint(spec):
        model, tokenizer = load_sparse(spec, return_tokenizer=True, progress=True)
        return (model if dtype == "auto" else model.to(getattr(torch, _DTYPES[dtype]))), tokenizer
    from .. import pipeline

    return pipeline.load_model(spec, _DTYPES[dtype] if dtype == "auto" else getattr(torch, _DTYPES[dtype]))


def _save_dense(model, tokenizer, out: Path) -> str:
    print(f"saving {type(model).__name__} with save_pretrained ...", flush=True)
    with _atomic_folder(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    return f"dense checkpoint {out}: {size / 1e6:.1f} MB of safetensors (save_pretrained)"


def _check_semi_structured(model) -> tuple[int, int]:
    """Refuse a model whose pruned Linear weights are not all 2:4 in fp16/bf16; ``(fit, total)`` otherwise."""
    plan = semi_structured_plan(model)
    wrong_dtype = [n for n, r in plan.items() if r and r.startswith("dtype")]
    if wrong_dtype:
        dtype = next(p.dtype for p in model.parameters() if p.dtype not in HALF_DTYPES)
        raise ValueError(
            f"--format semi-structured needs fp16 or bf16 weights; {len(wrong_dtype)} Linear weights are {dtype} "
            f"(e.g. {wrong_dtype[0]}). Pass --dtype bf16 or --dtype fp16."
        )
    not_24 = [n for n, r in plan.items() if r and r.startswith("not 2:4")]
    if not_24:
        raise ValueError(
            f"--format semi-structured needs every pruned Linear weight in 2:4; {len(not_24)} of {len(plan)} are not "
            f"(e.g. {not_24[0]}). Prune with --pattern 2:4, or export with --format sparse."
        )
    return sum(r is None for r in plan.values()), len(plan)
