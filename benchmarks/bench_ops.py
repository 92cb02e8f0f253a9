"""Benchmark sparse_peft.ops: achieved bandwidth / FLOP rate next to the device's limit, and the issue-5 goals.

    python benchmarks/bench_ops.py                 # GPU section if CUDA is available, CPU reference section always
    python benchmarks/bench_ops.py --cpu-only      # only the CPU reference timings (small shapes)
    python benchmarks/bench_ops.py --json out.json

Goals (GPU): an effective weight ``W + scatter(values)`` built as SpIEL does (a copy of W, then scatter_add_delta_)
>= 80% of HBM bandwidth; gather_weight_grad at 1% density >= 3x faster than a dense gradient followed by a gather; partial_weight_grad at 1% of columns >= 5x faster than the full weight gradient.
Every comparison is measured in one process, interleaved, and reported as a median.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch

from sparse_peft import ops
from sparse_peft.ops import _extension, reference

# name fragment -> (HBM bytes/s, dense bf16 tensor FLOP/s); used when the driver does not report memory clocks.
_KNOWN = {
    "H200": (4.8e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H100 NVL": (3.9e12, 835e12),
    "H100": (3.35e12, 989e12),
    "A100-SXM4-80GB": (2.04e12, 312e12),
    "A100 80GB PCIe": (1.94e12, 312e12),
    "A100": (1.555e12, 312e12),
    "L40S": (0.864e12, 362e12),
    "A10": (0.6e12, 125e12),
}


def device_limits() -> dict:
    props = torch.cuda.get_device_properties(0)
    bw, flops = next((v for k, v in _KNOWN.items() if k in props.name), (float("nan"), float("nan")))
    clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock and bus:  # kHz, bits; DDR -> x2
        bw = 2.0 * clock * 1e3 * bus / 8
    return {"name": props.name, "hbm_bytes_per_s": bw, "bf16_flops": flops, "sms": props.multi_processor_count}


def cuda_time(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn`` with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], timer, rounds: int = 5) -> dict[str, float]:
    """Median time per function, measured in alternating rounds."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].append(timer(fn))
    return {k: statistics.median(v) for k, v in out.items()}


def cpu_time(fn: Callable[[], object], reps: int = 3) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def row(rows: list, **kw) -> None:
    rows.append(kw)
    bits = [f"{kw['case']:<44}", f"{kw['time_ms']:9.3f} ms"]
    if "rate" in kw:
        bits.append(f"{kw['rate']:>22}")
    if "pct_of_limit" in kw:
        bits.append(f"{kw['pct_of_limit']:6.1f}% of limit")
    if "speedup" in kw:
        bits.append(f"x{kw['speedup']:.2f} vs {kw['baseline']}")
    if "goal" in kw:
        bits.append(f"[goal {kw['goal']}: {'MET' if kw['met'] else 'NOT met'}]")
    print("  ".join(bits))


# ------------------------------------------------------------------------------------------------------------ GPU
def bench_gpu(rows: list, quick: bool) -> None:
    lim = device_limits()
    print(
        f"\nGPU: {lim['name']} ({lim['sms']} SMs); HBM limit {lim['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"dense bf16 {lim['bf16_flops'] / 1e12:.0f} TFLOP/s; extension: {_extension.load() and 'native'} "
        f"{_extension.status()}"
    )
    dev, gen = "cuda", torch.Generator(device="cuda").manual_seed(0)
    n = 4096 if quick else 8192

    # W + scatter(values) at 1% density, built as SpIEL does: a copy of W, then scatter_add_delta_ into it
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(n, n, device=dev, generator=gen).to(dtype)
        k = w.numel() // 100
        idx = torch.randperm(w.numel(), device=dev, generator=gen)[:k]
        vals = torch.randn(k, device=dev, generator=gen)
        es = w.element_size()
        moved = 2 * w.numel() * es + k * (8 + 4 + 2 * es)  # read W, write out, indices, values, RMW
        t = interleaved(
            {
                "op": lambda: ops.scatter_add_delta_(w.clone(), idx, vals),
                "clone": lambda: w.clone(),
                "reference": lambda: reference.scatter_add_delta_(w.clone(), idx, vals),
            },
            cuda_time,
        )
        bw = moved / t["op"]
        row(
            rows,
            case=f"clone + scatter_add_delta_ {dtype} {n}x{n} 1%",
            time_ms=t["op"] * 1e3,
            rate=f"{bw / 1e9:.0f} GB/s",
            pct_of_limit=100 * bw / lim["hbm_bytes_per_s"],
            goal=">=80% HBM",
            met=bw >= 0.8 * lim["hbm_bytes_per_s"],
        )
        row(
            rows,
            case=f"  torch clone (copy ceiling) {dtype}",
            time_ms=t["clone"] * 1e3,
            rate=f"{2 * w.numel() * es / t['clone'] / 1e9:.0f} GB/s",
            pct_of_limit=100 * 2 * w.numel() * es / t["clone"] / lim["hbm_bytes_per_s"],
        )
        row(
            rows,
            case=f"  reference on GPU {dtype}",
            time_ms=t["reference"] * 1e3,
            speedup=t["reference"] / t["op"],
            baseline="op (op is faster by)",
        )
        ti = cuda_time(lambda: ops.scatter_add_delta_(w, idx, vals, alpha=0.0))
        row(
            rows,
            case=f"scatter_add_delta_ (in place) {dtype} 1%",
            time_ms=ti * 1e3,
            rate=f"{k * (8 + 4 + 2 * es) / ti / 1e9:.0f} GB/s (sparse part)",
        )
        del w, idx, vals

    # gather_weight_grad (SDDMM) vs dense gradient + gather, bf16, 1% density
    d_out, d_in, T = 4096, 4096, (2048 if quick else 4096)
    for density in (0.01, 0.001, 0.05):
        g = torch.randn(T, d_out, device=dev, generator=gen, dtype=torch.bfloat16)
        x = torch.randn(T, d_in, device=dev, generator=gen, dtype=torch.bfloat16)
        k = int(d_out * d_in * density)
        idx = torch.randperm(d_out * d_in, device=dev, generator=gen)[:k]
        t = interleaved(
            {
                "op": lambda: ops.gather_weight_grad(g, x, idx),
                "dense16": lambda: (g.t() @ x).view(-1)[idx],
                "dense32": lambda: torch.mm(g.t(), x, out_dtype=torch.float32).view(-1)[idx],
            },
            cuda_time,
        )
        flops = 2.0 * T * k
        row(
            rows,
            case=f"gather_weight_grad bf16 T={T} {d_out}x{d_in} {density:.1%}",
            time_ms=t["op"] * 1e3,
            rate=f"{flops / t['op'] / 1e12:.1f} TFLOP/s useful",
            speedup=t["dense16"] / t["op"],
            baseline="bf16 dense grad + gather",
            **({"goal": ">=3x at 1%", "met": t["dense16"] / t["op"] >= 3.0} if density == 0.01 else {}),
        )
        row(
            rows,
            case="  dense bf16 grad + gather",
            time_ms=t["dense16"] * 1e3,
            rate=f"{2.0 * T * d_out * d_in / t['dense16'] / 1e12:.0f} TFLOP/s",
            pct_of_limit=100 * 2.0 * T * d_out * d_in / t["dense16"] / lim["bf16_flops"],
        )
        row(
            rows,
            case="  dense grad (fp32 out) + gather",
            time_ms=t["dense32"] * 1e3,
            speedup=t["dense32"] / t["op"],
            baseline="fp32-out dense grad + gather",
        )

    # partial_weight_grad (S2FT) at 1% of input columns vs the full weight gradient
    d_out, d_in = 4096, 11008
    g = torch.randn(T, d_out, device=dev, generator=gen, dtype=torch.bfloat16)
    x = torch.randn(T, d_in, device=dev, generator=gen, dtype=torch.bfloat16)
    cols = torch.randperm(d_in, device=dev, generator=gen)[: d_in // 100]
    rows_sel = torch.randperm(d_out, device=dev, generator=gen)[: d_out // 100]
    t = interleaved(
        {
            "cols": lambda: ops.partial_weight_grad(g, x, cols=cols),
            "rows": lambda: ops.partial_weight_grad(g, x, rows=rows_sel),
            "full": lambda: g.t() @ x,
            "full32": lambda: torch.mm(g.t(), x, out_dtype=torch.float32),
        },
        cuda_time,
    )
    for what in ("cols", "rows"):
        row(
            rows,
            case=f"partial_weight_grad bf16 T={T} {d_out}x{d_in} 1% {what}",
            time_ms=t[what] * 1e3,
            speedup=t["full"] / t[what],
            baseline="full bf16 weight grad",
            goal=">=5x",
            met=t["full"] / t[what] >= 5,
        )
    row(
        rows,
        case="  full bf16 weight grad",
        time_ms=t["full"] * 1e3,
        rate=f"{2.0 * T * d_out * d_in / t['full'] / 1e12:.0f} TFLOP/s",
        pct_of_limit=100 * 2.0 * T * d_out * d_in / t["full"] / lim["bf16_flops"],
    )


# ------------------------------------------------------------------------------------------------------------ CPU
def bench_cpu(rows: list) -> None:
    print(
        f"\nCPU reference ops ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); "
        "small shapes, interleaved medians; absolute times are noisy, read the ratios"
    )
    gen = torch.Generator().manual_seed(0)
    n = 1024
    w = torch.randn(n, n, generator=gen)
    k = w.numel() // 100
    idx = torch.randperm(w.numel(), generator=gen)[:k]
    vals = torch.randn(k, generator=gen)
    t = interleaved(
        {"op": lambda: ops.scatter_add_delta_(w.clone(), idx, vals), "clone": lambda: w.clone()}, cpu_time, 3
    )
    row(
        rows,
        case=f"cpu clone + scatter_add_delta_ fp32 {n}x{n} 1%",
        time_ms=t["op"] * 1e3,
        rate=f"{(2 * w.numel() * 4 + k * 16) / t['op'] / 1e9:.1f} GB/s",
        speedup=t["clone"] / t["op"],
        baseline="clone (ratio <1: slower)",
    )
    T, d = 512, 1024
    g, x = torch.randn(T, d, generator=gen), torch.randn(T, d, generator=gen)
    for density in (0.01, 0.001):
        k = int(d * d * density)
        idx = torch.randperm(d * d, generator=gen)[:k]
        t = interleaved(
            {"op": lambda: ops.gather_weight_grad(g, x, idx), "dense": lambda: (g.t() @ x).view(-1)[idx]}, cpu_time, 3
        )
        row(
            rows,
            case=f"cpu gather_weight_grad fp32 T={T} {d}x{d} {density:.1%}",
            time_ms=t["op"] * 1e3,
            speedup=t["dense"] / t["op"],
            baseline="dense grad + gather",
        )
    cols = torch.randperm(d, generator=gen)[: d // 100]
    t = interleaved({"op": lambda: ops.partial_weight_grad(g, x, cols=cols), "full": lambda: g.t() @ x}, cpu_time, 3)
    row(
        rows,
        case=f"cpu partial_weight_grad fp32 T={T} {d}x{d} 1% cols",
        time_ms=t["op"] * 1e3,
        speedup=t["full"] / t["op"],
        baseline="full weight grad",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smaller GPU shapes")
    ap.add_argument("--json", default="bench_ops.json")
    args = ap.parse_args()
    rows: list = []
    meta = {"torch": torch.__version__, "cuda": torch.cuda.is_available() and not args.cpu_only}
    if meta["cuda"]:
        meta["device"] = device_limits()
        bench_gpu(rows, args.quick)
    bench_cpu(rows)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
