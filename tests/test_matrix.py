"""The generic peft checks, for every tuner x model family x dtype (DESIGN.md rule 7).

A tuner joins by adding one entry to ``TUNERS``: a function ``(family, **overrides) -> PeftConfig`` that builds a
config with non-zero initial adapters (``init_weights=False``), and the sparsity invariant it promises:
``"positions"`` (every base zero stays zero) or ``"count"`` (the number of non-zeros per module stays exact).
"""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model

import sparse_peft
from conftest import FAMILIES, inputs, make_model, make_sparse, prunable, task_type, zero_masks
from sparse_peft.pruning.report import linear_weight


def _sparse_lora(family, **kw):
    return sparse_peft.SparseLoraConfig(r=4, lora_alpha=8, init_weights=False, task_type=task_type(family), **kw)


def _s2ft(family, **kw):
    return sparse_peft.S2FTConfig(
        heads_ratio=0.25, channels_ratio=0.1, init_weights=False, task_type=task_type(family), **kw
    )


def _spiel(family, **kw):
    return sparse_peft.SpielConfig(r=4, init_weights=False, task_type=task_type(family), **kw)


TUNERS = {
    "sparse_lora": dict(make=_sparse_lora, invariant="positions"),
    "s2ft": dict(make=_s2ft, invariant="positions"),
    "spiel": dict(make=_spiel, invariant="count"),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [(t, f, d) for t in TUNERS for f in FAMILIES for d in DTYPES]
IDS = [f"{t}-{f}-{d}" for t, f, d in CASES]


def _tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def _build(tuner, family, dtype, nm=None, **kw):
    base = make_model(family, DTYPES[dtype] if isinstance(dtype, str) else dtype)
    make_sparse(base, nm=nm)
    zeros = zero_masks(base)
    base_out = _logits(base, family)
    model = get_peft_model(base, TUNERS[tuner]["make"](family, **kw))
    return model, zeros, base_out


def _logits(model, family, **kw):
    with torch.no_grad():
        batch = {k: v for k, v in inputs(family).items() if k != "labels"}
        return model(**batch, **kw).logits.float()


def _assert_sparsity(tuner, model, zeros, nm=None):
    """The invariant of ``tuner`` holds for the weights currently stored in ``model``'s prunable modules."""
    mods = prunable(model)
    for name, was_zero in zeros.items():
        w = linear_weight(mods[name])
        if TUNERS[tuner]["invariant"] == "positions":
            assert (w[was_zero] == 0).all(), f"{name}: a pruned weight came back"
        else:
            assert int((w != 0).sum()) == int((~was_zero).sum()), f"{name}: nnz changed"
        if nm is not None:
            assert sparse_peft.masks.is_nm(w, *nm), f"{name}: N:M pattern broken"


def _train_steps(model, family, steps=2, lr=1e-2, check=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**inputs(family)).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if check is not None:
            check()
    model.eval()


@pytest.mark.parametrize("tuner,family,dtype", CASES, ids=IDS)
def test_base_frozen_adapters_train_zeros_kept(tuner, family, dtype):
    model, zeros, _ = _build(tuner, family, dtype)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_before, "nothing is trainable"
    assert all(
        TUNERS[tuner]["make"](family).peft_type.value.lower() in n or "classifier" in n or "score" in n
        for n in adapter_before
    ), "a non-adapter parameter is trainable"

    def merged_check():  # zeros kept in the effective weights after every optimizer step
        model.merge_adapter()
        _assert_sparsity(tuner, model, zeros)
        model.unmerge_adapter()

    _train_steps(model, family)
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"frozen base parameter {n} changed"
    changed = [n for n, p in model.named_parameters() if n in adapter_before and not torch.equal(p, adapter_before[n])]
    assert changed, "no adapter parameter changed in training"
    _train_steps(model, family, check=merged_check)


@pytest.mark.parametrize("tuner,family,dtype", CASES, ids=IDS)
def test_merge_unmerge_and_merge_and_unload(tuner, family, dtype):
    model, zeros, _ = _build(tuner, family, dtype)
    tol = _tol(DTYPES[dtype])
    weights = {n: linear_weight(m).detach().clone() for n, m in prunable(model).items()}
    out = _logits(model, family)
    for _ in range(3):  # any number of cycles keeps the zeros
        model.merge_adapter()
        _assert_sparsity(tuner, model, zeros)
        torch.testing.assert_close(_logits(model, family), out, **tol)
        model.unmerge_adapter()
        _assert_sparsity(tuner, model, zeros)
    for n, m in prunable(model).items():
        torch.testing.assert_close(linear_weight(m), weights[n], **tol)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, sparse_peft.tuners.sparse_lora.SparseLoraLayer) for m in merged.modules())
    _assert_sparsity(tuner, merged, zeros)
    torch.testing.assert_close(_logits(merged, family), out, **tol)


@pytest.mark.parametrize("tuner", list(TUNERS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_nm_base_stays_nm_after_merge(tuner, dtype):
    model, zeros, _ = _build(tuner, "llama", dtype, nm=(2, 4))
    _train_steps(model, "llama")
    merged = model.merge_and_unload()
    _assert_sparsity(tuner, merged, zeros, nm=(2, 4))
    assert sparse_peft.sparsity_report(merged, nm_pattern="2:4").nm_valid


@pytest.mark.parametrize("tuner,family,dtype", CASES, ids=IDS)
def test_save_load_round_trip(tuner, family, dtype, tmp_path):
    model, zeros, _ = _build(tuner, family, dtype)
    _train_steps(model, family, steps=1)
    out = _logits(model, family)
    model.save_pretrained(tmp_path / "adapter")
    files = os.listdir(tmp_path / "adapter")
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    prefix = TUNERS[tuner]["make"](family).peft_type.prefix
    assert saved and all(prefix in k or "classifier" in k for k in saved), "non-adapter state was saved"

    fresh = make_model(family, DTYPES[dtype])
    make_sparse(fresh)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded, family), out, **_tol(DTYPES[dtype]))
    assert type(PeftConfig.from_pretrained(tmp_path / "adapter")) is type(model.peft_config["default"])
    merged = loaded.merge_and_unload()
    _assert_sparsity(tuner, merged, zeros)


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_autopeft_and_transformers_load_adapter(tuner, tmp_path):
    base = make_model("llama")
    make_sparse(base)
    base.save_pretrained(tmp_path / "base")
    base = type(base).from_pretrained(tmp_path / "base")  # records name_or_path, as users load models
    model = get_peft_model(base, TUNERS[tuner]["make"]("llama"))
    _train_steps(model, "llama", steps=1)
    out = _logits(model, "llama")
    model.save_pretrained(tmp_path / "adapter")

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(_logits(auto, "llama"), out, atol=1e-5, rtol=1e-5)

    plain = make_model("llama")
    make_sparse(plain)
    plain.load_adapter(str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(plain, "llama"), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tuner,family,dtype", CASES, ids=IDS)
def test_disable_adapter_and_unload(tuner, family, dtype):
    model, _, base_out = _build(tuner, family, dtype)
    tol = _tol(DTYPES[dtype])
    # init_weights=False must change outputs; tiny models have tiny logits, so compare with a fixed small bound
    assert (_logits(model, family) - base_out).abs().max() > 1e-4, "init_weights=False should change outputs"
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, family), base_out, **tol)
    unloaded = model.unload()
    torch.testing.assert_close(_logits(unloaded, family), base_out, **tol)


@pytest.mark.parametrize("tuner", list(TUNERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_multiple_adapters(tuner, family):
    model, zeros, base_out = _build(tuner, family, "fp32")
    out_a = _logits(model, family)
    model.add_adapter("other", TUNERS[tuner]["make"](family))
    model.set_adapter("other")
    out_b = _logits(model, family)
    assert not torch.allclose(out_a, out_b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n or "classifier" in n for n in trainable)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, family), out_a)
    model.merge_adapter(["default", "other"])
    _assert_sparsity(tuner, model, zeros)
    model.unmerge_adapter()
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    torch.testing.assert_close(_logits(model, family), out_a)


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_print_trainable_parameters(tuner):
    model, _, _ = _build(tuner, "llama", "fp32")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert 0 < trainable < total
    assert f"{trainable:,}" in buf.getvalue()
