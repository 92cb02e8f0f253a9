"""One training step on SmolLM2-135M in NF4 (QLoRA-style): each sparse_peft tuner next to peft LoRA on the same
4-bit base (QLoRA) at an equal trainable count, side by side in one process.

The base: SmolLM2-135M (``sparse_peft.embedded.load_smollm2``), a 50% per-row magnitude mask (as in
``train_step.py``), then every ``nn.Linear`` except the tied ``lm_head`` replaced by a bitsandbytes ``Linear4bit``
(NF4, double quantization, block size 64: what ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`` builds). Every method gets its own copy of that base.

Methods (4,884,480 trainable values for QLoRA, SparseLoRA and SpIEL; S²FT within 0.2% of it):

- ``qlora``: peft LoRA r=16, alpha 32, on all seven projections;
- ``sparse_lora``: SparseLoRA r=16 on the same projections (exact masked gradient);
- ``spiel``: SpIEL r=16 (k = r·(d_in + d_out) per projection), SEFT mode on this sparse base, a step outside an
  accumulation window;
- ``s2ft``: S²FT with 2 of 9 heads (o_proj columns) and 155 of 1536 FFN channels (down_proj columns) per layer.

Memory is counted deterministically, in bytes: trainable parameters + their gradients + AdamW's two fp32 moments,
tensors saved for backward (``saved_tensors_hooks``, distinct storages, parameters and buffers excluded), the
quantized base (packed 4-bit weights, their quantization statistics, embeddings and norms) and the adapter's own
buffers (masks, indices, fingerprints). Step time is the median over interleaved rounds of each method's time
divided by QLoRA's in the same round. On a GPU, ``torch.cuda.max_memory_allocated`` over one step, above what was
allocated before it (all models stay resident), is added.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step_4bit.py --rounds 5 --clock cpu \\
        --out benchmarks/results/train_step_4bit.json

``--clock cpu`` times each step as this process's CPU time on one thread, which other jobs on a shared machine
barely disturb; ``OMP_WAIT_POLICY=PASSIVE`` keeps idle OpenMP workers from spinning into that time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
from datetime import date
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import TARGETS, add_clock_arg, magnitude_prune_, state_bytes, timed_step, use_clock  # noqa: E402
from train_step_spiel import saved_bytes  # noqa: E402

import sparse_peft  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from sparse_peft.embedded import load_smollm2, token_blocks, wiki_split  # noqa: E402

ADAPTER_BUFFERS = ("sparse_lora_", "spiel_", "s2ft_")
GOALS = {"sparse_lora": 1.05, "spiel": 1.05, "s2ft": 0.9}  # memory / QLoRA


def quantize_nf4_(model: nn.Module, compute_dtype: torch.dtype, device: str) -> nn.Module:
    """Replace every ``nn.Linear`` but the output head by an NF4 ``Linear4bit`` with double quantization, in place."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child is head:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
            )
            q.load_state_dict(child.state_dict())
            setattr(parent, name, q.to(device))  # bitsandbytes quantizes on the move
    return model.to(device)


def build(method: str, base: nn.Module, r: int) -> nn.Module:
    model = copy.deepcopy(base)
    if method == "qlora":
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    elif method == "sparse_lora":
        model = get_peft_model(model, sparse_peft.SparseLoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    elif method == "spiel":
        model = get_peft_model(model, sparse_peft.SpielConfig(r=r, target_modules=TARGETS))
    elif method == "s2ft":  # 2 heads x 64 x 576 + 155 channels x 576 per layer ~ LoRA r=16's 162,816
        model = get_peft_model(model, sparse_peft.S2FTConfig(heads_ratio=2 / 9, channels_ratio=155 / 1536))
    else:
        raise ValueError(method)
    model.config.use_cache = False
    model.train()
    return model


def resident_bytes(model: nn.Module) -> tuple[int, int]:
    """``(quantized base, adapter buffers)`` in bytes: frozen parameters, buffers and 4-bit quantization statistics,
    each storage counted once."""
    import bitsandbytes as bnb

    seen: set[int] = set()

    def size(t: torch.Tensor) -> int:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return t.untyped_storage().nbytes()

    base = adapter = 0
    for p in model.parameters():
        if not p.requires_grad:
            base += size(p)
    for name, b in model.named_buffers():
        if any(f".{prefix}" in name for prefix in ADAPTER_BUFFERS):
            adapter += size(b)
        else:
            base += size(b)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            stats = [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
            base += sum(size(t) for t in stats if isinstance(t, torch.Tensor))
    return base, adapter


def cuda_step_peak(model: nn.Module, opt, batch: torch.Tensor) -> int:
    """Bytes ``torch.cuda.max_memory_allocated`` rises above the allocation before one step (GPU only)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    timed_step(model, opt, batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="qlora,sparse_lora,spiel,s2ft")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (after one warm-up)")
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/train_step_4bit.json")
    add_clock_arg(ap)
    args = ap.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        ap.error("--clock cpu measures CPU work; use it with --device cpu")
    use_clock(args.clock)
    load_start = os.getloadavg()

    torch.manual_seed(0)
    base, tok = load_smollm2(torch.float32)
    magnitude_prune_(base, 0.5)
    base = quantize_nf4_(base, getattr(torch, args.compute_dtype), args.device)
    train, _ = wiki_split()
    batch = token_blocks(tok, train[:200], seq_len=args.seq_len, max_blocks=args.batch).to(args.device)  # (B, T)
    methods = args.methods.split(",")
    assert methods[0] == "qlora", "QLoRA comes first: every ratio is taken against it"
    models = {m: build(m, base, args.r) for m in methods}
    del base
    opts = {
        m: torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=1e-4) for m, mod in models.items()
    }
    parts = {}
    for m, mod in models.items():
        quantized, buffers = resident_bytes(mod)
        parts[m] = {"state": state_bytes(mod), "saved": saved_bytes(mod, batch), "base": quantized, "buffers": buffers}
    total = {m: sum(p.values()) for m, p in parts.items()}
    for m in methods:  # warm-up (allocates optimizer state)
        timed_step(models[m], opts[m], batch)
    cuda_peak = {m: cuda_step_peak(models[m], opts[m], batch) for m in methods} if args.device == "cuda" else {}
    times = {m: [] for m in methods}
    ratios = {m: [] for m in methods}
    for _ in range(args.rounds):
        t = {m: timed_step(models[m], opts[m], batch) for m in methods}
        for m in methods:
            times[m].append(t[m])
            ratios[m].append(t[m] / t["qlora"])
    load_end = os.getloadavg()

    results = []
    for m in methods:
        row = {
            "method": m,
            "trainable": sum(p.numel() for p in models[m].parameters() if p.requires_grad),
            **{f"{k}_bytes": v for k, v in parts[m].items()},
            "memory_bytes": total[m],
            "memory_ratio": total[m] / total["qlora"],
            "memory_goal": GOALS.get(m),
            "median_step_s": statistics.median(times[m]),
            "time_ratio_median": statistics.median(ratios[m]),
            "time_ratio_range": [min(ratios[m]), max(ratios[m])],
        }
        if cuda_peak:
            row["cuda_peak_bytes"] = cuda_peak[m]
            row["cuda_peak_ratio"] = cuda_peak[m] / cuda_peak["qlora"]
        results.append(row)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    where = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    print(
        f"SmolLM2-135M in NF4 (double quant, compute {args.compute_dtype}), 50% magnitude mask, seq {args.seq_len}, "
        f"batch {args.batch}, r={args.r}, {args.rounds} interleaved rounds, {where}, {torch.get_num_threads()} "
        f"threads, {args.clock} clock, load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end"
    )
    mb = 2**20
    print(
        f"{'method':<12} {'trainable':>10} {'state MB':>9} {'saved MB':>9} {'base MB':>8} {'buffers MB':>10} "
        f"{'total MB':>9} {'mem/QLoRA':>10} {'goal':>6} {'step s':>7} {'time/QLoRA':>11} {'range':>12}"
        + (f" {'cuda step peak MB':>17} {'/QLoRA':>7}" if cuda_peak else "")
    )
    for r in results:
        lo, hi = r["time_ratio_range"]
        goal = f"<={r['memory_goal']:.2f}" if r["memory_goal"] else "-"
        line = (
            f"{r['method']:<12} {r['trainable']:>10,} {r['state_bytes'] / mb:>9.1f} {r['saved_bytes'] / mb:>9.1f} "
            f"{r['base_bytes'] / mb:>8.1f} {r['buffers_bytes'] / mb:>10.1f} {r['memory_bytes'] / mb:>9.1f} "
            f"{r['memory_ratio']:>9.3f}x {goal:>6} {r['median_step_s']:>7.2f} {r['time_ratio_median']:>10.2f}x "
            f"{lo:>5.2f}-{hi:.2f}x"
        )
        if cuda_peak:
            line += f" {r['cuda_peak_bytes'] / mb:>17.1f} {r['cuda_peak_ratio']:>6.2f}x"
        print(line)
    print(f"peak RSS of the whole run: {peak_rss_mb:.0f} MB (secondary: all models live in one process)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": str(date.today()),
                "args": vars(args),
                "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "load_average_start": load_start,
                "load_average_end": load_end,
                "peak_rss_mb": peak_rss_mb,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
