"""One training step on SmolLM2-135M: SparseLoRA vs peft LoRA vs naive masked LoRA, side by side.

``--methods lora,sparse_lora,naive_masked_lora,lora_dense_grad`` adds the exact gradient's floor: peft LoRA whose
targeted base weights also get their dense gradient ``gᵀx`` computed (and dropped at once, never applied), i.e. LoRA
plus exactly the matmul that any exact masked-LoRA gradient needs.

Memory is counted deterministically: trainable parameters + gradients + AdamW state (bytes), plus the tensors saved
for backward during the forward pass (``saved_tensors_hooks``, deduplicated by storage, parameters excluded since
they are resident anyway). Peak RSS is reported as a secondary figure. Step time is the median, over interleaved
rounds, of each method's time divided by LoRA's time in the same round.

    python benchmarks/train_step.py --rounds 5 --out benchmarks/results/train_step.json
    python benchmarks/train_step.py --rounds 3 --clock cpu   # one thread, CPU time: robust on a shared machine
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import sparse_peft
from sparse_peft.embedded import load_smollm2, token_blocks, wiki_split
from sparse_peft.pruning.report import linear_weight, prunable_modules

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class NaiveMaskedLora(nn.Module):
    """The naive masked LoRA: autograd through ``F.linear(x, W + s * M * (B @ A))`` (keeps M and W+ΔW alive)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        d_out, d_in = base.weight.shape
        self.register_buffer("mask", base.weight != 0)
        self.lora_A = nn.Parameter(torch.randn(r, d_in) / d_in**0.5)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))
        self.scaling = alpha / r

    def forward(self, x):
        delta = self.scaling * self.mask * (self.lora_B @ self.lora_A)  # (d_out, d_in), saved by autograd
        return F.linear(x, self.base.weight + delta, self.base.bias)


def naive_masked_lora(model: nn.Module, r: int, alpha: float) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in TARGETS:
                setattr(module, child_name, NaiveMaskedLora(child, r, alpha))
    return model


def magnitude_prune_(model: nn.Module, sparsity: float) -> None:
    """A 50% per-row magnitude mask is enough for a speed/memory benchmark (quality is measured elsewhere)."""
    with torch.no_grad():
        for module in prunable_modules(model).values():
            w = linear_weight(module)
            k = int(w.shape[1] * sparsity)
            idx = w.abs().argsort(dim=1)[:, :k]  # (d_out, k) smallest per row
            w.scatter_(1, idx, 0.0)


def _discard_grad(param: torch.Tensor) -> None:
    param.grad = None  # freed as soon as it exists, like SparseLoRA's transient gradient


def build(method: str, base: nn.Module, r: int, grad_ckpt: bool) -> nn.Module:
    model = copy.deepcopy(base)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    elif method == "sparse_lora":
        model = get_peft_model(model, sparse_peft.SparseLoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    elif method == "naive_masked_lora":
        model = naive_masked_lora(model, r, 2 * r)
    elif method == "lora_dense_grad":
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
        for name, param in model.named_parameters():
            if name.endswith("base_layer.weight"):
                param.requires_grad_(True)  # autograd now computes gᵀx for it...
                param._grad_discarded = True  # ...which no optimizer and no memory count sees
                param.register_post_accumulate_grad_hook(_discard_grad)
    elif method == "full_ft":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        raise ValueError(method)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    return model


def state_bytes(model: nn.Module) -> int:
    """Trainable params + their grads + AdamW's two fp32 moments."""
    total = 0
    for p in model.parameters():
        if p.requires_grad and not getattr(p, "_grad_discarded", False):
            total += p.numel() * p.element_size() * 2 + p.numel() * 4 * 2
    return total


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad and not getattr(p, "_grad_discarded", False)]


def saved_bytes(model: nn.Module, batch: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward, excluding parameters and buffers."""
    resident = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in resident:
                storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def use_clock(name: str) -> None:
    """Time steps by wall clock (default) or by this process's CPU time on one intra-op thread.

    ``cpu`` is what to use on a shared machine: one thread's CPU time barely moves when other jobs load the cores,
    while wall-clock ratios there swing by ±50%. It measures work, not parallel speed-up.
    """
    global _clock
    _clock = CLOCKS[name]
    if name == "cpu":
        torch.set_num_threads(1)  # idle OpenMP workers spin, which would count as CPU time


def add_clock_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: wall-clock time on all threads; cpu: process CPU time on one thread, robust to other "
        "load on the machine",
    )


def timed_step(model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    if batch.is_cuda:
        torch.cuda.synchronize()
    start = _clock()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if batch.is_cuda:
        torch.cuda.synchronize()  # CUDA work is asynchronous: time it to completion
    return _clock() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lora,sparse_lora,naive_masked_lora")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (after one warm-up)")
    ap.add_argument("--no-grad-ckpt-variant", action="store_true", help="skip the gradient-checkpointing runs")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    add_clock_arg(ap)
    args = ap.parse_args()
    use_clock(args.clock)

    torch.manual_seed(0)
    base, tok = load_smollm2(torch.float32)
    magnitude_prune_(base, 0.5)
    train, _ = wiki_split()
    batch = token_blocks(tok, train[:200], seq_len=args.seq_len, max_blocks=args.batch)  # (B, T)
    methods = args.methods.split(",")
    assert methods[0] == "lora", "LoRA comes first: every ratio is taken against it"
    results = []
    for grad_ckpt in [False] + ([] if args.no_grad_ckpt_variant else [True]):
        models = {m: build(m, base, args.r, grad_ckpt) for m in methods}
        opts = {m: torch.optim.AdamW(trainable_params(mod), lr=1e-4) for m, mod in models.items()}
        mem = {m: state_bytes(mod) + saved_bytes(mod, batch) for m, mod in models.items()}
        for m in methods:  # warm-up (allocates optimizer state)
            timed_step(models[m], opts[m], batch)
        ratios = {m: [] for m in methods}
        times = {m: [] for m in methods}
        for _ in range(args.rounds):
            t = {m: timed_step(models[m], opts[m], batch) for m in methods}
            for m in methods:
                times[m].append(t[m])
                ratios[m].append(t[m] / t["lora"])
        for m in methods:
            results.append(
                {
                    "method": m,
                    "grad_ckpt": grad_ckpt,
                    "trainable": sum(p.numel() for p in trainable_params(models[m])),
                    "memory_bytes": mem[m],
                    "memory_ratio": mem[m] / mem["lora"],
                    "median_step_s": statistics.median(times[m]),
                    "time_ratio_median": statistics.median(ratios[m]),
                    "time_ratio_range": [min(ratios[m]), max(ratios[m])],
                }
            )
        del models, opts
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"SmolLM2-135M, 50% magnitude mask, seq {args.seq_len}, batch {args.batch}, r={args.r}, "
        f"{args.rounds} interleaved rounds, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock"
    )
    print(
        f"{'method':<20} {'grad ckpt':>9} {'trainable':>11} {'memory MB':>10} {'mem/LoRA':>9} "
        f"{'step s':>7} {'time/LoRA':>10} {'range':>13}"
    )
    for r in results:
        lo, hi = r["time_ratio_range"]
        print(
            f"{r['method']:<20} {str(r['grad_ckpt']):>9} {r['trainable']:>11,} {r['memory_bytes'] / 2**20:>10.1f} "
            f"{r['memory_ratio']:>8.2f}x {r['median_step_s']:>7.2f} {r['time_ratio_median']:>9.2f}x "
            f"{lo:>6.2f}-{hi:.2f}x"
        )
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
