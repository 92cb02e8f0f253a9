"""``benchmarks/recovery.py --quick`` on a tiny random Llama: the protocol's invariants, not its numbers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recovery.py"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("recovery_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("recovery")
    res = module.main(["--quick", "--patterns", "50%,2:4", "--out-dir", str(out)])
    return module, res, out


def test_every_row_is_checked_and_exact(result):
    _, res, _ = result
    rows = [r for r in res["rows"] if r["pattern"] != "dense"]
    assert {r["pattern"] for r in rows} == {"50%", "2:4"}
    for r in rows:
        check = r["check"]
        assert check["exact"], f"{r['pattern']} {r['method']}: merged sparsity not exact: {check}"
        if r["pattern"] == "2:4":
            assert check["nm_valid"] is True
        if r.get("keeps") == "count":  # SEFT: the count is kept exactly, revivals included
            assert check["nnz_after"] == check["nnz_before"]
        elif r["method"] != "pruned":
            assert check["revived"] == 0, f"{r['method']} revived pruned weights"


def test_rows_share_batches_steps_and_report_their_cost(result):
    _, res, _ = result
    trained = [r for r in res["rows"] if "losses" in r]
    assert {r["batches"] for r in trained} == {res["batches"]}
    assert {len(r["losses"]) for r in trained} == {res["settings"]["steps"]}
    assert all(r["trainable"] > 0 and r["memory_bytes"] > 0 and r["seconds"] > 0 for r in trained)
    names = {(r["pattern"], r["method"]) for r in res["rows"]}
    assert ("dense", "dense") in names and ("dense", "dense_lora") in names
    for pattern in ("50%", "2:4"):
        assert (pattern, "pruned") in names and (pattern, "lora_star") in names


def test_lora_star_and_peft_baselines_are_re_pruned_and_counts_match(result):
    module, res, _ = result
    by = {(r["pattern"], r["method"]): r for r in res["rows"]}
    for pattern in ("50%", "2:4"):
        for name in ("lora_star", "spiel_ag_star", "supertuning", "shira"):
            assert by[(pattern, name)]["reprune"] is True
        lora = by[(pattern, "lora_star")]["trainable"]
        for name in ("sparse_lora", "spiel_ag", "spiel_ma", "shira", "s2ft_r16"):
            assert abs(by[(pattern, name)]["trainable"] - lora) <= 0.05 * lora, name
        assert abs(by[(pattern, "supertuning")]["trainable"] - lora) <= 0.01 * lora


def test_learning_rates_come_from_a_grid_on_the_validation_slice(result):
    _, res, _ = result
    for g in res["grid"]:
        scores = {float(k): v for k, v in g["grid"].items()}
        assert len(scores) >= 3
        assert g["lr"] == min(scores, key=scores.get)
        assert res["lrs"][g["method"]] == g["lr"]
    assert {g["method"] for g in res["grid"]} >= {"lora_star", "sparse_lora", "spiel_ag", "masked_ft"}


def test_recovery_goals_and_outputs(result):
    _, res, out = result
    dense_ft = next(r for r in res["rows"] if r["method"] == "dense_lora")["ppl_wiki"]
    for r in res["rows"]:
        if r["pattern"] in ("50%", "2:4") and r["method"] != "pruned":
            pruned = next(p for p in res["rows"] if p["pattern"] == r["pattern"] and p["method"] == "pruned")
            want = (pruned["ppl_wiki"] - r["ppl_wiki"]) / (pruned["ppl_wiki"] - dense_ft)
            assert r["recovery"] == pytest.approx(want)
    assert any(g["goal"] == "merged sparsity exact in every row" and g["met"] for g in res["goals"])
    assert json.loads((out / "recovery.json").read_text())["batches"] == res["batches"]
    md = (out / "recovery.md").read_text()
    assert "LoRA* (merged, re-pruned)" in md and "Learning-rate grid" in md
    assert (out / "recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_reuses_every_finished_row(result):
    module, res, out = result
    again = module.main(["--quick", "--patterns", "50%,2:4", "--out-dir", str(out), "--resume"])
    assert [(r["pattern"], r["method"], r.get("seconds")) for r in again["rows"]] == [
        (r["pattern"], r["method"], r.get("seconds")) for r in res["rows"]
    ]
    with pytest.raises(SystemExit, match="other settings"):
        module.main(["--quick", "--patterns", "50%", "--out-dir", str(out), "--resume"])
