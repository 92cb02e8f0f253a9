"""The one real-model end-to-end test of the default run: ``sparse-peft demo --quick`` on the embedded SmolLM2-135M.

It runs the console script's code in a fresh interpreter, as the README's command does (with the CLI's own OpenMP
wait policy). Everything else about the CLI and the demo is tested on a tiny model in ``test_cli.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys


def test_demo_quick_on_smollm2(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    try:
        run = subprocess.run(
            [sys.executable, "-m", "sparse_peft_cli", "demo", "--quick", "--out", str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        rows = {r.get("method", r["model"].split(" ")[0]): r for r in results["rows"]}
        assert results["methods"] == ["lora", "sparse_lora", "spiel", "s2ft"]
        assert rows["dense"]["sparsity"] < 0.01 and abs(rows["pruned"]["sparsity"] - 0.5) < 1e-3
        trained = [rows[m] for m in results["methods"]]
        assert all(r["sparsity"] == rows["pruned"]["sparsity"] for r in trained)  # every merged nnz exact
        assert {r["steps"] for r in trained} == {results["steps"]} and all(r["trainable"] > 0 for r in trained)
        assert len({r["batches_sha1"] for r in trained}) == 1
        for path in ["pruned", *(f"{m}/merged" for m in results["methods"])]:
            assert (out / path / "model.safetensors").is_file() and (out / path / "tokenizer.json").is_file()
        assert all((out / m / "adapter" / "adapter_config.json").is_file() for m in results["methods"])
        assert "LoRA* r=16 (merged, re-pruned)" in run.stdout and "perplexity" in run.stdout
    finally:
        shutil.rmtree(out, ignore_errors=True)  # about 2.7 GB of model folders
