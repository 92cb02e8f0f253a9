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


def test_loading_without_import_says_to_import_sparse_peft(tmp_path):
    """A fresh interpreter that never imports sparse_peft gets a clear hint, not a bare KeyError."""
    sparse_peft.SparseLoraConfig(r=2).save_pretrained(tmp_path)
    code = (
        "import sys, transformers\n"
        "from peft import PeftConfig, PeftModel\n"
        "cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1)\n"
        "for load in (lambda: PeftConfig.from_pretrained(sys.argv[1]),\n"
        "             lambda: PeftModel.from_pretrained(transformers.LlamaForCausalLM(cfg), sys.argv[1]),\n"
        "             lambda: transformers.LlamaForCausalLM(cfg).load_adapter(sys.argv[1])):\n"
        "    try:\n"
        "        load()\n"
        "    except Exception as exc:\n"
        "        print('ERR', exc)\n"
        "    else:\n"
        "        print('LOADED')\n"
        "assert 'sparse_peft' not in sys.modules\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in __import__("os").environ.items() if k != "SPARSE_PEFT_NO_BOOT"},
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith(("ERR", "LOADED"))]
    assert len(lines) == 3
    for line in lines:
        assert line.startswith("ERR") and "import sparse_peft" in line, line
