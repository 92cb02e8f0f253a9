"""Package-level behaviour: registration, nothing at interpreter start, the model card, a light import, the report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import sparse_peft
from conftest import inputs, make_model, make_sparse
from sparse_peft._registry import _TABLES, CARD_PLACEHOLDER


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


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter of this environment (site-packages and its .pth files processed)."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_registration_after_peft_is_imported_and_twice(tmp_path):
    """``import sparse_peft`` after peft writes into peft's own tables: every module that imported them sees it."""
    code = """
import sys
import peft, peft.mapping, peft.peft_model, peft.utils.save_and_load, transformers
folder, names = sys.argv[1], sys.argv[2:]
tables = {n: getattr(peft.mapping, n) for n in names}
holders = [(m, n) for m in list(sys.modules.values()) for n in names if getattr(m, n, None) is tables[n]]
import sparse_peft
from sparse_peft._registry import SparsePeftType, register
register(SparsePeftType.SPARSE_LORA, sparse_peft.SparseLoraConfig, sparse_peft.SparseLoraModel)  # a second time
assert all(getattr(peft.mapping, n) is t and type(t) is dict for n, t in tables.items()), "a table was replaced"
assert all(getattr(m, n) is tables[n] for m, n in holders), "a module that imported a table lost it"
assert len(holders) > len(names), holders  # peft modules other than peft.mapping hold the tables too
assert all(set(SparsePeftType) <= set(t) for t in tables.values())
cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1)
model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), sparse_peft.SparseLoraConfig(r=2))
model.save_pretrained(folder)
peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM(cfg), folder)
print("ok")
"""
    assert "ok" in _run(code, str(tmp_path), *_TABLES).stdout


def _card(path: Path) -> tuple[dict, str]:
    from huggingface_hub import ModelCard

    card = ModelCard.load(path / "README.md")
    return card.data.to_dict(), card.text


def test_model_card_names_sparse_peft_and_loads_with_its_snippet(tmp_path):
    """The README.md that ``save_pretrained`` writes says how to load the adapter, and its snippet does load it."""
    base = make_model("llama")
    base.save_pretrained(tmp_path / "base")
    base = type(base).from_pretrained(tmp_path / "base")  # a base_model_name_or_path the snippet can load
    model = get_peft_model(base, sparse_peft.SparseLoraConfig(r=2, init_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "adapter")  # a second save updates the card, it does not repeat the section
    data, text = _card(tmp_path / "adapter")
    assert data["library_name"] == "sparse_peft" and {"peft", "sparse_peft"} <= set(data["tags"])
    assert text.count("## How to load this adapter") == 1
    snippet = re.search(r"```python\n(.*?)```", text, flags=re.DOTALL).group(1)
    assert len(snippet.strip().splitlines()) == 2 and snippet.startswith("import peft, sparse_peft")
    code = snippet.replace(CARD_PLACEHOLDER, str(tmp_path / "adapter")) + (
        "import sys, torch\n"
        "ids = torch.tensor(eval(sys.argv[1]))\n"
        "print(repr(model(input_ids=ids).logits.flatten()[:8].tolist()))\n"
    )
    ids = inputs("llama")["input_ids"]
    loaded = eval(_run(code, repr(ids.tolist())).stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(loaded), model(input_ids=ids).logits.flatten()[:8].detach())


def test_model_card_of_other_peft_types_is_peft_own(tmp_path):
    model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    data, text = _card(tmp_path)
    assert data["library_name"] == "peft" and "sparse_peft" not in text


def test_without_import_nothing_runs_and_loading_fails_with_the_fix_in_the_card(tmp_path):
    """Installing sparse_peft changes nothing in a process that does not import it: no .pth hook, no import finder,
    peft's tables stay plain dicts, so loading a sparse adapter raises peft's own KeyError. The adapter's model card
    names the fix."""
    for pth in Path(sysconfig.get_paths()["purelib"]).glob("*.pth"):
        imports = [line for line in pth.read_text().splitlines() if line.startswith("import")]
        assert not any("sparse_peft" in line for line in imports), f"{pth} runs {imports} at every start"
    get_peft_model(make_model("llama"), sparse_peft.SparseLoraConfig(r=2)).save_pretrained(tmp_path)
    code = """
import json, sys
finders = [type(f).__module__ for f in sys.meta_path]
import transformers
from peft import PeftConfig, PeftModel, mapping
cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1)
errors = []
for load in (lambda: PeftConfig.from_pretrained(sys.argv[1]),
             lambda: PeftModel.from_pretrained(transformers.LlamaForCausalLM(cfg), sys.argv[1]),
             lambda: transformers.LlamaForCausalLM(cfg).load_adapter(sys.argv[1])):
    try:
        load()
    except KeyError as exc:
        errors.append(f"KeyError {exc}")
print(json.dumps({"modules": sorted(m for m in sys.modules if "sparse_peft" in m), "finders": finders,
                  "tables": sorted({type(getattr(mapping, n)).__name__ for n in sys.argv[2:]}), "errors": errors}))
"""
    seen = json.loads(_run(code, str(tmp_path), *_TABLES).stdout.splitlines()[-1])
    assert seen["modules"] == [] and not any("sparse_peft" in f for f in seen["finders"]), seen
    assert seen["tables"] == ["dict"], seen
    assert seen["errors"] == ["KeyError 'SPARSE_LORA'"] * 3, seen
    _, text = _card(tmp_path)
    assert "KeyError: 'SPARSE_LORA'" in text and "import peft, sparse_peft" in text
