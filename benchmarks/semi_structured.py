"""2:4 semi-structured speed on a CUDA GPU (sm80+): MLP linears and SmolLM2-135M prefill / decode, sparse vs dense.

    python benchmarks/semi_structured.py                                   # fp16, every part; prints the tables
    python benchmarks/semi_structured.py --dtype bf16 --out benchmarks/results/semi_structured.json

1. MLP linears: a random 2:4 weight of each shape (SmolLM2's gate/up 1536 x 576 and down 576 x 1536, and a 7B-sized
   MLP, 11008 x 4096 and 4096 x 11008), ``F.linear(x, W)`` with ``x`` of ``--tokens`` rows (batch x tokens), dense vs
   ``torch.sparse.to_sparse_semi_structured(W)``. Goal: >= 1.3x at batch x tokens >= 2048.
2. End to end: SmolLM2-135M-Instruct magnitude-pruned to 2:4, dense-with-zeros vs
   ``sparse_peft.export.to_semi_structured``: prefill of ``--prefill-batch`` x ``--prefill-len`` tokens (last-token
   logits only), and greedy decoding of 32 new tokens for ``--decode-batch`` prompts.

Times are CUDA-event medians over ``--reps`` runs, dense and sparse interleaved round by round; the speed-up is
dense time over sparse time. Each row also reports the largest output difference between the two.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: (d_out, d_in)
    "smollm2 gate/up": (1536, 576),
    "smollm2 down": (576, 1536),
    "7B gate/up": (11008, 4096),
    "7B down": (4096, 11008),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cuda_ms(fn, reps: int) -> list[float]:
    """Milliseconds of ``fn()`` per run, timed with CUDA events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def interleaved(dense_fn, sparse_fn, reps: int, rounds: int = 5, warmup: int = 5) -> tuple[float, float]:
    """Median milliseconds of each function, measured in alternating rounds."""
    for _ in range(warmup):
        dense_fn(), sparse_fn()
    torch.cuda.synchronize()
    dense, sparse = [], []
    for _ in range(rounds):
        dense += cuda_ms(dense_fn, reps)
        sparse += cuda_ms(sparse_fn, reps)
    return statistics.median(dense), statistics.median(sparse)


@torch.no_grad()
def bench_linears(dtype: torch.dtype, tokens: list[int], reps: int) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    from sparse_peft.masks import nm_mask

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (d_out, d_in) in SHAPES.items():
        w = torch.randn(d_out, d_in, device="cuda", dtype=dtype, generator=g)
        w = w * nm_mask(w, 2, 4)  # (d_out, d_in), 2:4
        ws = to_sparse_semi_structured(w)
        for n in tokens:
            x = torch.randn(n, d_in, device="cuda", dtype=dtype, generator=g)  # (batch x tokens, d_in)
            diff = (F.linear(x, ws) - F.linear(x, w)).abs().max().item()
            dense_ms, sparse_ms = interleaved(lambda: F.linear(x, w), lambda: F.linear(x, ws), reps)
            rows.append(
                {
                    "shape": name,
                    "d_out": d_out,
                    "d_in": d_in,
                    "tokens": n,
                    "dense_ms": dense_ms,
                    "sparse_ms": sparse_ms,
                    "speedup": dense_ms / sparse_ms,
                    "max_abs_diff": diff,
                }
            )
            print(f"{name} x {n}: {dense_ms / sparse_ms:.2f}x", flush=True)
    return rows


@torch.no_grad()
def bench_smollm2(dtype: torch.dtype, args) -> list[dict]:
    from sparse_peft.embedded import load_smollm2
    from sparse_peft.export import to_semi_structured
    from sparse_peft.pruning import prune

    model, tokenizer = load_smollm2(torch.float32)
    prune(model, "magnitude", pattern="2:4", progress=False)
    dense = model.to("cuda", dtype).eval()
    sparse = copy.deepcopy(dense)
    report = to_semi_structured(sparse)
    print(report, flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    vocab = dense.config.vocab_size
    prefill = torch.randint(0, vocab, (args.prefill_batch, args.prefill_len), device="cuda", generator=g)
    logits_dense = dense(prefill, use_cache=False, logits_to_keep=1).logits
    logits_sparse = sparse(prefill, use_cache=False, logits_to_keep=1).logits
    diff = (logits_dense - logits_sparse).abs().max().item()
    dense_ms, sparse_ms = interleaved(
        lambda: dense(prefill, use_cache=False, logits_to_keep=1),
        lambda: sparse(prefill, use_cache=False, logits_to_keep=1),
        reps=args.reps // 5 or 1,
    )
    rows = [
        {
            "part": f"prefill {args.prefill_batch} x {args.prefill_len}",
            "dense_ms": dense_ms,
            "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms,
            "max_abs_diff": diff,
            "converted": len(report.converted),
            "dense_layers": len(report.dense),
        }
    ]
    prompts = torch.randint(0, vocab, (args.decode_batch, 128), device="cuda", generator=g)
    greedy = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    same = torch.equal(dense.generate(prompts, **greedy), sparse.generate(prompts, **greedy))
    timings = {"dense": [], "sparse": []}
    for _ in range(3):
        for label, m in (("dense", dense), ("sparse", sparse)):
            torch.cuda.synchronize()
            start = time.perf_counter()
            m.generate(prompts, **greedy)
            torch.cuda.synchronize()
            timings[label].append((time.perf_counter() - start) * 1e3)
    dense_ms, sparse_ms = statistics.median(timings["dense"]), statistics.median(timings["sparse"])
    rows.append(
        {
            "part": f"decode 32 tokens, batch {args.decode_batch}",
            "dense_ms": dense_ms,
            "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms,
            "same_tokens": same,
        }
    )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 4096, 8192], help="rows of x (batch x tokens)")
    p.add_argument("--reps", type=int, default=20, help="timed runs per round (5 rounds)")
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--skip-model", action="store_true", help="only the linears")
    p.add_argument("--out", default="benchmarks/results/semi_structured.json")
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        sys.exit("semi_structured.py needs a CUDA GPU with compute capability 8.0+ (sm80+); nothing was measured.")
    dtype = DTYPES[args.dtype]
    linears = bench_linears(dtype, args.tokens, args.reps)
    print(f"\n| shape (d_out x d_in) | batch x tokens | dense ms | 2:4 ms | speed-up | max abs diff ({args.dtype}) |")
    print("|---|---|---|---|---|---|")
    for r in linears:
        print(
            f"| {r['shape']} ({r['d_out']} x {r['d_in']}) | {r['tokens']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} "
            f"| {r['speedup']:.2f}x | {r['max_abs_diff']:.3g} |"
        )
    model_rows = [] if args.skip_model else bench_smollm2(dtype, args)
    if model_rows:
        print("\n| SmolLM2-135M 2:4 | dense ms | 2:4 ms | speed-up |")
        print("|---|---|---|---|")
        for r in model_rows:
            print(f"| {r['part']} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | {r['speedup']:.2f}x |")
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cusparselt": torch.backends.cusparselt.is_available(),
        "dtype": args.dtype,
        "host": platform.node(),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "linears": linears, "model": model_rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
