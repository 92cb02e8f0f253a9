"""Exact resume from a Trainer checkpoint for every tuner, and saves that die midway.

A run resumed from a checkpoint must end where the uninterrupted run ends: every adapter tensor and every entry of
the optimizer state (SpIEL's drop-and-grow state included) bit-identical on CPU.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model, get_peft_model_state_dict

import sparse_peft
from conftest import inputs, make_model, make_sparse
from sparse_peft.training import SpielCallback

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _data(n=24):
    data = [inputs("llama", batch=1, seed=s) for s in range(n)]
    return [{k: v[0] for k, v in d.items()} for d in data]


def _run(make_config, out_dir, max_steps, save_steps, resume=None, callbacks=None):
    """A transformers.Trainer run on a sparse tiny Llama (2 examples per step), checkpointing every ``save_steps``."""
    base = make_model("llama")
    make_sparse(base)
    torch.manual_seed(0)
    model = get_peft_model(base, make_config())
    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_steps=save_steps,
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _optimizer_state(trainer) -> dict:
    """The optimizer's per-parameter state, keyed by parameter name (tensors and SpIEL's counters)."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    return {names[id(p)]: dict(st) for p, st in opt.state.items()}


def _assert_same(want_trainer, got_trainer) -> None:
    want = get_peft_model_state_dict(want_trainer.model)
    got = get_peft_model_state_dict(got_trainer.model)
    assert want.keys() == got.keys() and want
    for key in want:
        assert torch.equal(want[key], got[key]), f"adapter tensor {key} differs from the uninterrupted run"
    want_opt, got_opt = _optimizer_state(want_trainer), _optimizer_state(got_trainer)
    assert want_opt.keys() == got_opt.keys() and want_opt
    for name in want_opt:
        assert want_opt[name].keys() == got_opt[name].keys(), f"{name}: optimizer state entries differ"
        for key, value in want_opt[name].items():
            other = got_opt[name][key]
            same = torch.equal(value, other) if torch.is_tensor(value) else value == other
            assert same, f"optimizer state {key!r} of {name} differs from the uninterrupted run"


def _spiel_ag():
    # windows are steps 3-4 and 7-8; a checkpoint at step 7 holds an open window
    return sparse_peft.SpielConfig(
        r=2, target_modules=TARGETS, reselection_steps=4, accumulation_steps=2, regrow_fraction=0.5
    )


def _spiel_ma():
    return sparse_peft.SpielConfig(
        r=2, target_modules=TARGETS, selection="ma", reselection_steps=3, accumulation_steps=1, regrow_fraction=0.5
    )


def test_spiel_ag_resume_inside_a_window_is_exact(tmp_path):
    full = _run(_spiel_ag, tmp_path / "full", max_steps=10, save_steps=7)
    checkpoint = tmp_path / "full" / "checkpoint-7"
    resumed = _run(_spiel_ag, tmp_path / "resumed", max_steps=10, save_steps=7, resume=str(checkpoint))
    stats = resumed.model.base_model.spiel_stats()
    assert stats["step"] == resumed.state.global_step == 10 and stats["reselections"] == 2
    _assert_same(full, resumed)
    # the adapter a user shares holds no training statistics
    saved = json.loads((checkpoint / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SPIEL"
    from safetensors import safe_open

    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "_ag" in k or "_ma" in k or "spiel_step" in k]


def test_spiel_ma_resume_with_the_callback_is_exact(tmp_path):
    full = _run(_spiel_ma, tmp_path / "full", max_steps=8, save_steps=4, callbacks=[SpielCallback()])
    resumed = _run(
        _spiel_ma,
        tmp_path / "resumed",
        max_steps=8,
        save_steps=4,
        resume=str(tmp_path / "full" / "checkpoint-4"),
        callbacks=[SpielCallback()],
    )
    assert resumed.model.base_model.spiel_stats()["total_steps"] == 8
    _assert_same(full, resumed)


@pytest.mark.parametrize("tuner", ["sparse_lora", "s2ft"])
def test_sparse_lora_and_s2ft_resume_is_exact(tuner, tmp_path):
    def make():
        if tuner == "sparse_lora":
            return sparse_peft.SparseLoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.0)
        return sparse_peft.S2FTConfig(heads_ratio=0.25, channels_ratio=0.1)

    full = _run(make, tmp_path / "full", max_steps=4, save_steps=2)
    resumed = _run(
        make, tmp_path / "resumed", max_steps=4, save_steps=2, resume=str(tmp_path / "full" / "checkpoint-2")
    )
    _assert_same(full, resumed)


# ------------------------------------------------------------------------------------------ saves that die midway
def _lora(alpha: int, seed: int):
    base = make_model("llama")
    make_sparse(base)
    torch.manual_seed(seed)
    config = sparse_peft.SparseLoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS, init_weights=False)
    return get_peft_model(base, config).eval()


def _fresh_base():
    base = make_model("llama")
    make_sparse(base)
    return base


def _logits(model):
    with torch.no_grad():
        return model.eval()(**inputs("llama", seed=7)).logits


def test_a_save_killed_midway_leaves_only_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    import peft.peft_model

    from sparse_peft.tuners import _common

    previous, current = tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"
    a = _lora(alpha=8, seed=0)
    a.save_pretrained(previous)
    a.save_pretrained(current)
    b = _lora(alpha=16, seed=1)  # the next save: other weights, another scaling
    real_save = peft.peft_model.safe_save_file

    def die_halfway(tensors, filename, metadata=None):  # the process is killed while the weights are written
        real_save(tensors, filename, metadata=metadata)
        data = open(filename, "rb").read()
        open(filename, "wb").write(data[: len(data) // 2])
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", die_halfway)
    with pytest.raises(KeyboardInterrupt):
        b.save_pretrained(current)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="did not finish"):
        PeftModel.from_pretrained(_fresh_base(), str(current))

    def die_before_rename(src, dst):  # killed after all weights are written, before the config is committed
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(_common.os, "replace", die_before_rename)
    with pytest.raises(KeyboardInterrupt):
        b.save_pretrained(current)
    monkeypatch.undo()
    assert not [p for p in current.iterdir() if p.name.startswith(".adapter_config-")], "a temporary file was left"
    with pytest.raises(ValueError, match="did not finish"):  # B's weights are complete, but the config is A's
        PeftModel.from_pretrained(_fresh_base(), str(current))

    fresh = tmp_path / "checkpoint-3"  # a new checkpoint folder killed midway holds no config at all
    monkeypatch.setattr(peft.peft_model, "safe_save_file", die_halfway)
    with pytest.raises(KeyboardInterrupt):
        b.save_pretrained(fresh)
    monkeypatch.undo()
    assert not (fresh / "adapter_config.json").exists()

    loaded = PeftModel.from_pretrained(_fresh_base(), str(previous))
    torch.testing.assert_close(_logits(loaded), _logits(a), rtol=0, atol=0)
    b.save_pretrained(current)  # a save that finishes is loadable again, as B
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(_fresh_base(), str(current))), _logits(b))
