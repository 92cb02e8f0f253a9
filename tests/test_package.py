"""Package-level behaviour: registration, a light import, and the sparsity report."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import sparse_peft
from conftest import make_model, make_sparse


def test_registered_like_a_builtin_peft_type(tmp_path):
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SPARSE_LORA"] is sparse_peft.SparseLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SPARSE_LORA"] is sparse_peft.SparseLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["SPARSE_LORA"] == "sparse_lora_"
    sparse_peft.SparseLoraConfig(r=3).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SPARSE_LORA"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, sparse_peft.SparseLoraConfig) and loaded.r == 3


def test_import_is_light():
    code = (
        "import sys, torch, sparse_peft; "
        "assert not torch.cuda.is_initialized(); "
        "assert 'torch.utils.cpp_extension' not in sys.modules, 'import compiled or loaded native code'; "
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_sparsity_report_table_and_data():
    model = make_model("llama")
    make_sparse(model, nm=(2, 4))
    report = sparse_peft.sparsity_report(model, nm_pattern="2:4")
    assert report.nm_valid is True
    assert abs(report.sparsity - 0.5) < 1e-9
    assert len(report.modules) == 2 * 7  # seven projections per layer; the lm_head is not reported
    data = report.to_dict()
    assert data["zeros"] == report.zeros and data["modules"][0]["sparsity"] == 0.5
    text = str(report)
    assert "model.layers.0.self_attn.q_proj" in text and "overall" in text and "50.00%" in text
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(1.0)
    report = sparse_peft.sparsity_report(model, nm_pattern="2:4")
    assert report.nm_valid is False
    assert [m.name for m in report.modules if not m.nm_valid] == ["model.layers.0.mlp.up_proj"]
    assert sparse_peft.sparsity_report(model).nm_valid is None
