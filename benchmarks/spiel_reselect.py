"""SpIEL micro-benchmarks on SmolLM2-135M-shaped random weights: one drop-and-grow, and the CPU value gradient.

Part 1 (``--reselect-reps``): a random Llama with SmolLM2-135M's shapes (hidden 576, intermediate 1536, 30 layers,
9 heads / 3 kv heads of 64: q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536; 106M targeted positions),
50% of every projection zeroed at random (so SEFT mode is on), SpIEL r=16 on all seven projections. Each rep fills
every module's AG accumulator with random scores (not timed) and runs one reselection through ``spiel_step`` at
step 20 of 200 (the default schedule: 18% of each module's k regrown), optimizer-state reset included. The time is
``spiel_stats()["reselect_seconds"]``, the same clock the training-run benchmark reads.

Part 2 (``--grad-reps``): the value gradient of one 1536x576 layer (gate/up) with T tokens at k = r * (d_in + d_out):
``sparse_peft.ops.gather_weight_grad`` (what the layer calls), torch's ``sparse.sampled_addmm`` on a CSR pattern, and
a dense ``g^T x`` followed by a gather, interleaved in rotating order, medians.

    OMP_NUM_THREADS=1 python benchmarks/spiel_reselect.py --out benchmarks/results/spiel_reselect.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from datetime import date
from pathlib import Path

import torch
import transformers
from peft import get_peft_model

import sparse_peft
from sparse_peft import ops
from sparse_peft.tuners.spiel import SpielLayer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_shaped(layers: int, sparsity: float, nm: str | None, seed: int = 0) -> torch.nn.Module:
    """A random Llama with SmolLM2-135M's projection shapes (tiny vocabulary), pruned at random or N:M."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                if nm is None:
                    m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsity)
                else:
                    from sparse_peft.masks import nm_mask, parse_nm

                    m.weight.mul_(nm_mask(m.weight, *parse_nm(nm)))
    return model


def bench_reselect(args) -> dict:
    base = smollm2_shaped(args.layers, 0.5, args.nm)
    config = sparse_peft.SpielConfig(
        r=args.r, target_modules=TARGETS, total_steps=200, auto_reselection=False, task_type="CAUSAL_LM"
    )
    t0 = time.perf_counter()
    model = get_peft_model(base, config)
    setup = time.perf_counter() - t0
    tuner = model.base_model
    layers = [m for m in model.modules() if isinstance(m, SpielLayer)]
    values = [m.spiel_values["default"] for m in layers]
    opt = torch.optim.AdamW(values, lr=1e-3)
    for v in values:  # allocate AdamW state (exp_avg, exp_avg_sq) like a real run
        v.grad = torch.randn_like(v)
    opt.step()
    opt.zero_grad(set_to_none=True)
    positions = sum(m.out_features * m.in_features for m in layers)
    k = sum(m.spiel_k["default"] for m in layers)
    gen = torch.Generator().manual_seed(1)
    times, moved = [], []
    for _ in range(args.reselect_reps):
        for m in layers:  # the accumulated |grad W| of a window, in the optimizer's state (not timed)
            st = opt.state[m.spiel_values["default"]]
            st["spiel_ag"] = torch.rand(m.weight_shape, generator=gen)
            st["spiel_step"] = 19
        before, changed = tuner.spiel_stats()["reselect_seconds"], tuner.spiel_stats()["changed"]
        tuner.spiel_step(opt)
        times.append(tuner.spiel_stats()["reselect_seconds"] - before)
        moved.append(tuner.spiel_stats()["changed"] - changed)
    return {
        "modules": len(layers),
        "positions": positions,
        "k": k,
        "seft": bool(config.preserve_sparsity),
        "group": layers[0].spiel_group.get("default"),
        "setup_s": setup,
        "times_s": times,
        "median_s": statistics.median(times),
        "slots_moved": moved[-1],
    }


def _sampled_addmm(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The SDDMM through torch's CSR ``sampled_addmm``. ``g (T, d_out)``, ``x (T, d_in)``, ``idx (k,)``."""
    d_out, d_in = g.shape[1], x.shape[1]
    idx = idx.long()
    order = torch.argsort(idx)
    sidx = idx[order]
    crow = torch.zeros(d_out + 1, dtype=torch.long)
    crow[1:] = torch.bincount(sidx // d_in, minlength=d_out).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(
            crow, sidx % d_in, torch.zeros(idx.numel()), size=(d_out, d_in), check_invariants=False
        )
        vals = torch.sparse.sampled_addmm(pattern, g.t().contiguous(), x, beta=0.0).values()
    out = torch.empty_like(vals)
    out[order] = vals
    return out


def bench_value_grad(args) -> dict:
    d_out, d_in, tokens = 1536, 576, args.tokens
    k = args.r * (d_in + d_out)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(tokens, d_out, generator=gen)
    x = torch.randn(tokens, d_in, generator=gen)
    idx = torch.randperm(d_out * d_in, generator=gen)[:k].to(torch.int32)
    fns = {
        "ops.gather_weight_grad": lambda: ops.gather_weight_grad(g, x, idx),
        "sampled_addmm": lambda: _sampled_addmm(g, x, idx),
        "dense_then_gather": lambda: (g.t() @ x).view(-1)[idx.long()],
    }
    want = fns["dense_then_gather"]()
    for name, fn in fns.items():  # warm-up and a correctness check
        torch.testing.assert_close(fn(), want, atol=1e-3, rtol=1e-4)
    times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(args.grad_reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate: each runs after each other
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {
        "shape": [d_out, d_in],
        "tokens": tokens,
        "k": k,
        "median_s": {n: statistics.median(t) for n, t in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--nm", default=None, help="prune N:M (e.g. 2:4) instead of 50% at random")
    ap.add_argument("--reselect-reps", type=int, default=3, help="0 skips part 1")
    ap.add_argument("--grad-reps", type=int, default=7, help="0 skips part 2")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/spiel_reselect.json")
    args = ap.parse_args()
    result = {
        "date": str(date.today()),
        "args": vars(args),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if args.reselect_reps > 0:
        res = bench_reselect(args)
        result["reselect"] = res
        print(
            f"reselection: {res['modules']} modules, {res['positions']:,} positions, k={res['k']:,}, "
            f"SEFT={res['seft']} (group {res['group']}), {torch.get_num_threads()} threads: median "
            f"{res['median_s']:.2f} s over {args.reselect_reps} reps "
            f"({', '.join(f'{t:.2f}' for t in res['times_s'])}); {res['slots_moved']:,} slots moved"
        )
    if args.grad_reps > 0:
        res = bench_value_grad(args)
        result["value_grad"] = res
        print(
            f"value gradient {res['shape'][0]}x{res['shape'][1]}, T={res['tokens']}, k={res['k']:,} "
            f"(median of {args.grad_reps}):"
        )
        for name, t in res["median_s"].items():
            print(f"  {name:<24} {1e3 * t:8.1f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
