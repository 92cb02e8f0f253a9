"""SparseLoRA's backward with and without ``masked_lora_grad``: does the row-blocked op bound the backward's memory?

SparseLoRA's ``MaskedLoraLinearFn`` computes ``grad_A``, ``grad_B`` from the dense masked weight gradient
``M ⊙ gᵀx`` (``(d_out, d_in)``, transient). ``masked_lora_grad`` (an op that ``sparse_peft.ops`` had, reproduced
here as :func:`masked_lora_grad_blocked`) builds that gradient one block of output rows at a time. This script runs
one layer's backward, on the same tensors, side by side:

- ``layer``: ``MaskedLoraLinearFn`` as the tuner uses it (exact gradient, ``grad_x``, ``grad_A``, ``grad_B``);
- ``grad_x only``: the same function with the adapter frozen: what the backward costs without any adapter gradient;
- ``layer+blocked``: the layer with ``grad_A``, ``grad_B`` from the blocked op instead: its ``grad_x`` part and then
  the blocked op (from the packed mask, unpacked to bool), one after the other. Its peak is the larger of the two.

It reports the peak of the memory each allocates above what is alive before it, and the median time.

    python benchmarks/sparse_lora_backward.py                # SmolLM2 and 7B-sized layers, CPU (and GPU if present)
    python benchmarks/sparse_lora_backward.py --quick        # a small layer only
    python benchmarks/sparse_lora_backward.py --json out.json

Peaks come from the allocator: ``torch.cuda.max_memory_allocated`` on a GPU, torch.profiler's memory timeline on the
CPU (deterministic for a given shape). The blocked op's gradients are checked against the layer's before timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

from sparse_peft.masks import pack_mask, unpack_mask
from sparse_peft.tuners.sparse_lora import MaskedLoraLinearFn

SHAPES = {"smollm2 down_proj": (576, 1536), "7B q_proj": (4096, 4096), "7B down_proj": (4096, 11008)}
QUICK = {"small": (256, 512)}
SCALING = 2.0


def masked_lora_grad_blocked(g, x, a, b, mask, scaling, block_bytes=64 << 20):
    """``(grad_A, grad_B)`` of ``y = x (s · M ⊙ (B A))^T``, the masked gradient built one row block at a time.

    ``g`` ``(T, d_out)``, ``x`` ``(T, d_in)``, ``a`` ``(r, d_in)``, ``b`` ``(d_out, r)``, ``mask`` ``(d_out, d_in)`` bool.
    """
    d_out, d_in = g.shape[1], x.shape[1]
    grad_a = torch.zeros(a.shape, dtype=torch.float32, device=g.device)  # (r, d_in)
    grad_b = torch.empty(b.shape, dtype=torch.float32, device=g.device)  # (d_out, r)
    step = max(1, block_bytes // (4 * d_in))
    for s in range(0, d_out, step):
        gm = g[:, s : s + step].t().float() @ x.float()  # (R, d_in)
        gm.masked_fill_(~mask[s : s + step], 0.0).mul_(scaling)
        grad_b[s : s + step] = gm @ a.float().t()  # (R, r)
        grad_a.addmm_(b[s : s + step].float().t(), gm)  # (r, d_in)
    return grad_a, grad_b


def make_case(d_out, d_in, tokens, r, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen)
    mask = torch.rand(d_out, d_in, generator=gen) > 0.5
    w = (w * mask).to(device)
    x = torch.randn(tokens, d_in, generator=gen).to(device).requires_grad_()
    a = (0.1 * torch.randn(r, d_in, generator=gen)).to(device).requires_grad_()
    b = (0.1 * torch.randn(d_out, r, generator=gen)).to(device).requires_grad_()
    up = torch.randn(tokens, d_out, generator=gen).to(device)
    return dict(x=x, w=w, packed=pack_mask(mask.to(device)), a=a, b=b, up=up, shape=(d_out, d_in))


def layer_backward(c, train_adapter: bool):
    """Forward through ``MaskedLoraLinearFn`` (not measured); return a callable that runs its backward."""
    a, b = (c["a"], c["b"]) if train_adapter else (c["a"].detach(), c["b"].detach())
    y = MaskedLoraLinearFn.apply(c["x"], c["w"], None, (c["packed"],), c["shape"], (SCALING,), None, a, b)
    wrt = [c["x"], c["a"], c["b"]] if train_adapter else [c["x"]]
    return lambda: torch.autograd.grad((y * c["up"]).sum(), wrt)


def blocked_grads(c):
    """A callable that runs the blocked op on the layer's inputs and the incoming gradient."""
    return lambda: masked_lora_grad_blocked(
        c["up"], c["x"].detach(), c["a"].detach(), c["b"].detach(), unpack_mask(c["packed"], c["shape"]), SCALING
    )


def cpu_peak(step) -> int:
    """Peak bytes the callable allocates above what is alive when it starts, from torch.profiler's memory timeline."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        out = step()
    del out
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0] if totals else 0


def cuda_peak(step) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def measure(name, d_out, d_in, tokens, r, device, rounds):
    c = make_case(d_out, d_in, tokens, r, device)
    steps = {
        "layer": lambda: layer_backward(c, True),
        "grad_x only": lambda: layer_backward(c, False),
        "blocked op": lambda: blocked_grads(c),
    }
    _, want_a, want_b = steps["layer"]()()
    got_a, got_b = steps["blocked op"]()()
    torch.testing.assert_close(got_a, want_a, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got_b, want_b, rtol=1e-4, atol=1e-3)
    peak = cuda_peak if device == "cuda" else cpu_peak
    peaks = {w: peak(make()) for w, make in steps.items()}
    times = {w: [] for w in steps}
    for _ in range(rounds):  # interleaved
        for w, make in steps.items():
            step = make()
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[w].append(time.perf_counter() - t0)
    median = {w: statistics.median(t) for w, t in times.items()}
    peaks["layer+blocked"] = max(peaks["grad_x only"], peaks["blocked op"])  # the two run one after the other
    median["layer+blocked"] = median["grad_x only"] + median["blocked op"]
    dense = d_out * d_in * 4
    return [
        {
            "case": name,
            "device": device,
            "shape": [d_out, d_in],
            "tokens": tokens,
            "r": r,
            "way": w,
            "peak_bytes": peaks[w],
            "peak_in_dense_fp32": peaks[w] / dense,
            "median_s": median[w],
        }
        for w in ("layer", "layer+blocked", "grad_x only", "blocked op")
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small layer")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for name, (d_out, d_in) in (QUICK if args.quick else SHAPES).items():
            rows += measure(name, d_out, d_in, args.tokens, args.r, device, args.rounds)
    print(
        f"\nT={args.tokens} tokens, r={args.r}, fp32; peak = memory the backward allocates above what is alive before it"
    )
    print(
        "| device | layer | way | peak (MB) | peak / dense fp32 weight | median time (s) |\n|---|---|---|---|---|---|"
    )
    for row in rows:
        print(
            f"| {row['device']} | {row['case']} {row['shape'][0]}x{row['shape'][1]} | {row['way']} | "
            f"{row['peak_bytes'] / 2**20:.1f} | {row['peak_in_dense_fp32']:.2f} | {row['median_s']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "r": args.r, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
