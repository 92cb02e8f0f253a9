"""One training step on SmolLM2-135M: S²FT vs peft LoRA at an equal trainable count vs full fine-tuning.

Same base, batch and accounting as ``benchmarks/train_step.py`` (whose helpers it reuses): a 50% magnitude mask,
memory = trainable params + grads + AdamW state + tensors saved for backward (``saved_tensors_hooks``, distinct
storages, parameters/buffers excluded), step time = median over interleaved rounds of each method's time divided by
LoRA's time in the same round. S²FT keeps the base's zeros (``preserve_sparsity``), so it pays for its masks.

SmolLM2-135M has 9 heads of 64 (3 kv heads) and 1536 FFN channels per layer. One head of ``o_proj`` is 576 x 64
= 36,864 values (0.82% of the model over 30 layers), a ``down_proj`` channel 576, so the variants are:

- ``s2ft_heads``: 1 head per layer (heads_ratio=1/9), o_proj columns only;
- ``s2ft_channels``: 62 channels per layer (channels_ratio=0.04), down_proj columns only;
- ``s2ft_mixed``: 1 head + 16 channels per layer (o_proj and down_proj columns; 1.05%).

LoRA r=4 on all seven projections has 1,221,120 trainable values (0.91%): the closest rank to 0.8%.

    python benchmarks/train_step_s2ft.py --rounds 5 --out benchmarks/results/train_step_s2ft.json
    python benchmarks/train_step_s2ft.py --rounds 3 --clock cpu   # one thread, CPU time: robust on a shared machine
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import sys
from datetime import date
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import (
    add_clock_arg,
    build,
    magnitude_prune_,
    saved_bytes,
    state_bytes,
    timed_step,  # noqa: E402
    use_clock,
)

import sparse_peft  # noqa: E402
from peft import get_peft_model  # noqa: E402
from sparse_peft.embedded import load_smollm2, token_blocks, wiki_split  # noqa: E402

S2FT_VARIANTS = {
    "s2ft_heads": dict(heads_ratio=1 / 9, channels_ratio=0.0),
    "s2ft_channels": dict(heads_ratio=0.0, channels_ratio=0.04),
    "s2ft_mixed": dict(heads_ratio=1 / 9, channels_ratio=16 / 1536),
}


def build_any(method: str, base: nn.Module, r: int, grad_ckpt: bool = False) -> nn.Module:
    if method not in S2FT_VARIANTS:
        return build(method, base, r, grad_ckpt)
    model = get_peft_model(copy.deepcopy(base), sparse_peft.S2FTConfig(**S2FT_VARIANTS[method]))
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    return model


def cuda_peak_bytes(model: nn.Module, opt, batch: torch.Tensor) -> int:
    """``torch.cuda.max_memory_allocated`` over one step after warm-up (GPU only)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    timed_step(model, opt, batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lora,full_ft,s2ft_heads,s2ft_channels,s2ft_mixed")
    ap.add_argument("--r", type=int, default=4, help="LoRA rank (4 ≈ the S²FT trainable count)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (after one warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--out", default="benchmarks/results/train_step_s2ft.json")
    add_clock_arg(ap)
    args = ap.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        ap.error("--clock cpu measures CPU work; use it with --device cpu")
    use_clock(args.clock)

    torch.manual_seed(0)
    base, tok = load_smollm2(torch.float32)
    magnitude_prune_(base, 0.5)
    base = base.to(args.device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    train, _ = wiki_split()
    batch = token_blocks(tok, train[:200], seq_len=args.seq_len, max_blocks=args.batch).to(args.device)  # (B, T)
    methods = args.methods.split(",")
    assert methods[0] == "lora", "LoRA comes first: every ratio is taken against it"
    models = {m: build_any(m, base, args.r) for m in methods}
    opts = {
        m: torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=1e-4) for m, mod in models.items()
    }
    mem = {m: state_bytes(mod) + saved_bytes(mod, batch) for m, mod in models.items()}
    for m in methods:  # warm-up (allocates optimizer state)
        timed_step(models[m], opts[m], batch)
    cuda_peak = {m: cuda_peak_bytes(models[m], opts[m], batch) for m in methods} if args.device == "cuda" else {}
    ratios = {m: [] for m in methods}
    times = {m: [] for m in methods}
    for _ in range(args.rounds):
        t = {m: timed_step(models[m], opts[m], batch) for m in methods}
        if args.device == "cuda":
            torch.cuda.synchronize()
        for m in methods:
            times[m].append(t[m])
            ratios[m].append(t[m] / t["lora"])
    total = sum(p.numel() for p in base.parameters())
    results = []
    for m in methods:
        trainable = sum(p.numel() for p in models[m].parameters() if p.requires_grad)
        row = {
            "method": m,
            "trainable": trainable,
            "trainable_pct": 100 * trainable / total,
            "memory_bytes": mem[m],
            "memory_ratio_lora": mem[m] / mem["lora"],
            "memory_ratio_full_ft": mem[m] / mem["full_ft"] if "full_ft" in mem else None,
            "median_step_s": statistics.median(times[m]),
            "time_ratio_median": statistics.median(ratios[m]),
            "time_ratio_range": [min(ratios[m]), max(ratios[m])],
        }
        if cuda_peak:
            row["cuda_peak_bytes"] = cuda_peak[m]
            row["cuda_peak_ratio_lora"] = cuda_peak[m] / cuda_peak["lora"]
        results.append(row)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    where = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    print(
        f"SmolLM2-135M ({total:,} params), 50% magnitude mask, {args.dtype}, seq {args.seq_len}, batch {args.batch}, "
        f"LoRA r={args.r}, {args.rounds} interleaved rounds, {where}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock"
    )
    print(
        f"{'method':<14} {'trainable':>11} {'%':>6} {'memory MB':>10} {'mem/LoRA':>9} {'mem/full':>9} "
        f"{'step s':>7} {'time/LoRA':>10} {'range':>13}" + (f" {'cuda peak MB':>13} {'/LoRA':>6}" if cuda_peak else "")
    )
    for r in results:
        lo, hi = r["time_ratio_range"]
        full = f"{r['memory_ratio_full_ft']:>8.2f}x" if r["memory_ratio_full_ft"] is not None else f"{'-':>9}"
        line = (
            f"{r['method']:<14} {r['trainable']:>11,} {r['trainable_pct']:>5.2f}% {r['memory_bytes'] / 2**20:>10.1f} "
            f"{r['memory_ratio_lora']:>8.2f}x {full} {r['median_step_s']:>7.3f} {r['time_ratio_median']:>9.2f}x "
            f"{lo:>6.2f}-{hi:.2f}x"
        )
        if cuda_peak:
            line += f" {r['cuda_peak_bytes'] / 2**20:>13.1f} {r['cuda_peak_ratio_lora']:>5.2f}x"
        print(line)
    print(f"peak RSS of the whole run: {peak_rss_mb:.0f} MB (secondary: all models live in one process)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"date": str(date.today()), "args": vars(args), "peak_rss_mb": peak_rss_mb, "results": results}, indent=2
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
