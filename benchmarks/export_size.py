"""Export size: SmolLM2-135M pruned by magnitude, ``save_sparse`` next to ``save_pretrained``, in bf16.

    python benchmarks/export_size.py                                   # 50%, 2:4 and 70%; prints the table
    python benchmarks/export_size.py --out benchmarks/results/export_size.json

For each pattern the dense bf16 SmolLM2-135M-Instruct (offline, ``sparse_peft.embedded``) is pruned with
``sparse_peft.pruning.prune(model, "magnitude", ...)``, saved with ``save_pretrained`` and with
``sparse_peft.export.save_sparse``, and loaded back with ``load_sparse``, which must return every tensor bit for bit.

- whole model: every file of the sparse checkpoint's weights (shards + manifest) over ``model.safetensors``;
  SmolLM2's tied 49152 x 576 embedding (21% of its weights) stays dense.
- pruned Linears: bytes of the bitmask-encoded Linear weights (mask + values + zero signs) over their dense bytes.
- zero signs: the part of that spent on ``-0.0``. Pruning by multiplying with a 0/1 mask leaves ``-0.0`` where a
  negative weight was pruned; the checkpoint keeps those bits (one per zero) so the round trip stays bit-exact.

Save and load times are wall seconds on whatever machine runs this (noisy when it is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from sparse_peft.embedded import load_smollm2
from sparse_peft.export import load_sparse, read_manifest, save_sparse
from sparse_peft.pruning import prune

PATTERNS = {"50%": dict(sparsity=0.5), "2:4": dict(pattern="2:4"), "70%": dict(sparsity=0.7)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bit_identical(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for k in sa:
        x, y = sa[k].contiguous(), sb[k].contiguous()
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.view(ints[x.element_size()]), y.view(ints[y.element_size()])):
            return False
    return True


def measure(label: str, dtype: torch.dtype, tmp: Path) -> dict:
    model, tokenizer = load_smollm2(dtype)
    report = prune(model, "magnitude", progress=False, **PATTERNS[label])
    model.save_pretrained(tmp / "dense")
    dense_bytes = (tmp / "dense" / "model.safetensors").stat().st_size
    start = time.perf_counter()
    summary = save_sparse(model, tmp / "sparse")
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = load_sparse(tmp / "sparse")
    load_s = time.perf_counter() - start
    records = read_manifest(tmp / "sparse")["tensors"].values()
    sign_bytes = sum(-(-(r["shape"][0] * r["shape"][1] - r["nnz"]) // 8) for r in records if r.get("signs"))
    return {
        "pattern": label,
        "sparsity": report.sparsity,
        "dense_mb": dense_bytes / 1e6,
        "sparse_mb": summary.bytes_on_disk / 1e6,
        "whole_ratio": summary.bytes_on_disk / dense_bytes,
        "linear_ratio": summary.linear_ratio,
        "sign_ratio": sign_bytes / summary.linear_dense_bytes,
        "bitmask_tensors": summary.bitmask_tensors,
        "tensors": summary.tensors,
        "save_s": save_s,
        "load_s": load_s,
        "bit_exact": bit_identical(model, loaded),
    }


def table(rows: list[dict], dtype: str) -> str:
    lines = [
        f"| pattern ({dtype}) | save_pretrained | save_sparse | whole model | pruned Linears | of which zero signs "
        "| save / load | bit-exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pattern']} | {r['dense_mb']:.1f} MB | {r['sparse_mb']:.1f} MB | {r['whole_ratio']:.3f}x "
            f"| {r['linear_ratio']:.3f}x | {r['sign_ratio']:.3f}x | {r['save_s']:.1f} s / {r['load_s']:.1f} s "
            f"| {'yes' if r['bit_exact'] else 'NO'} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--out", default="benchmarks/results/export_size.json")
    args = p.parse_args()
    rows = []
    for label in args.patterns:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(label, DTYPES[args.dtype], Path(tmp)))
        print(f"{label}: done", flush=True)
    print(table(rows, args.dtype))
    meta = {"model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "torch": torch.__version__, "host": platform.node()}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
