"""One SmolLM2-135M training step under torch's default OpenMP wait policy and under ``OMP_WAIT_POLICY=PASSIVE``.

The policy is read once, when OpenMP starts, so each measurement runs in a fresh subprocess; settings are interleaved
over rounds. ``--busy N`` starts N single-threaded busy loops (another job on the machine) for the whole run.

    python benchmarks/omp_wait_policy.py --rounds 2 --steps 3 --busy 0
    python benchmarks/omp_wait_policy.py --rounds 2 --steps 3 --busy 1

Each step: SparseLoRA r=16 on all seven projections, batch 4 x 256 tokens, AdamW, no activation checkpointing, torch's
default thread count. Prints a table (median step time per setting) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"default": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "1 thread": {"OMP_NUM_THREADS": "1"}}

CHILD = r"""
import json, sys, time
import torch
import sparse_peft
from peft import get_peft_model
from sparse_peft.embedded import load_smollm2

steps = int(sys.argv[1])
torch.manual_seed(0)
model, _ = load_smollm2()
with torch.no_grad():  # a 50% magnitude mask per row, as the demo's base would have
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            cut = p.abs().kthvalue(p.shape[1] // 2, dim=1, keepdim=True).values  # (d_out, 1)
            p.mul_((p.abs() > cut).to(p.dtype))
model = get_peft_model(model, sparse_peft.SparseLoraConfig(r=16, lora_alpha=32)).train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
batch = torch.randint(0, 49152, (4, 256))  # (B, T)
times = []
for step in range(steps + 1):  # the first step warms up and is not counted
    start = time.perf_counter()
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - start)
print("RESULT " + json.dumps({"step_s": times[1:], "threads": torch.get_num_threads()}))
"""


def _child_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    return {**env, "TOKENIZERS_PARALLELISM": "false", **extra}


def _measure(setting: str, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(steps)],
        env=_child_env(SETTINGS[setting]),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{setting}: the child failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the settings")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up step)")
    ap.add_argument("--busy", type=int, default=0, help="single-threaded busy loops running alongside")
    ap.add_argument("--settings", default="default,PASSIVE", help=f"comma-separated, from {','.join(SETTINGS)}")
    ap.add_argument("--out", default="benchmarks/results/omp_wait_policy.json")
    args = ap.parse_args()
    settings = args.settings.split(",")
    times: dict[str, list[float]] = {s: [] for s in settings}
    load_before = os.getloadavg()
    hogs = _busy(args.busy)
    try:
        for round_ in range(args.rounds):
            for setting in settings:
                result = _measure(setting, args.steps)
                times[setting] += result["step_s"]
                print(f"round {round_ + 1} {setting:>9}: " + ", ".join(f"{t:.1f} s" for t in result["step_s"]))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    report = {
        "busy_loops": args.busy,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "step_seconds": times,
        "median_s": {s: statistics.median(t) for s, t in times.items()},
    }
    print(f"\nbusy loops alongside: {args.busy}; load average before {load_before[0]:.2f}")
    print(f"{'setting':>9}  {'median step':>11}  range")
    for s, t in times.items():
        print(f"{s:>9}  {statistics.median(t):>9.1f} s  {min(t):.1f}-{max(t):.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
