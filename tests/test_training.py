"""TRL SFTTrainer and HF Trainer with nothing but peft_config, for every tuner; callbacks; SquareHead."""

from __future__ import annotations

import copy
import warnings

import datasets
import pytest
import torch
import transformers
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

import sparse_peft
from conftest import make_model, make_sparse, make_tokenizer, word_texts, zero_masks
from sparse_peft.pipeline import verify
from sparse_peft.training import SparsityCallback, SquareHeadSFTTrainer, TimeBudgetCallback, squarehead_loss
from test_matrix import TUNERS


def _chat_dataset(n=24):
    texts = word_texts(n)
    return datasets.Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": t[:40]}, {"role": "assistant", "content": t[40:100]}]}
            for t in texts
        ]
    )


def _sft_args(out, **kw):
    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        bf16=False,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    base.update(kw)
    return SFTConfig(**base)


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_sft_trainer_with_only_peft_config(tuner, tmp_path):
    """Default gradient checkpointing, chat-template data, evaluation, save_model and resume all work."""
    model = make_model("llama")
    make_sparse(model)
    zeros = zero_masks(model)
    config = TUNERS[tuner]["make"]("llama")
    args = _sft_args(tmp_path / "run", eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2)
    assert args.gradient_checkpointing, "TRL's default is on; the test must exercise it"
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=_chat_dataset(),
        eval_dataset=_chat_dataset(8),
        processing_class=make_tokenizer(),
        peft_config=config,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    assert any("eval_loss" in h for h in trainer.state.log_history)
    trainer.save_model(str(tmp_path / "final"))
    check = verify(copy.deepcopy(trainer.model).merge_and_unload(), zeros)
    assert check.ok and (TUNERS[tuner]["invariant"] == "count" or check.revived == 0)

    # resume from the step-2 checkpoint and finish
    resumed = SFTTrainer(
        model=make_sparse_model(),
        args=_sft_args(tmp_path / "run", max_steps=4),
        train_dataset=_chat_dataset(),
        processing_class=make_tokenizer(),
        peft_config=TUNERS[tuner]["make"]("llama"),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 4

    loaded = PeftModel.from_pretrained(make_sparse_model(), str(tmp_path / "final"))
    batch = torch.randint(3, 128, (2, 12))
    trainer.model.eval()
    torch.testing.assert_close(
        loaded(input_ids=batch).logits, trainer.model(input_ids=batch).logits, atol=1e-5, rtol=1e-5
    )


def make_sparse_model():
    model = make_model("llama")
    make_sparse(model)
    return model


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_hf_trainer_with_peft_model(tuner, tmp_path):
    from peft import get_peft_model

    tok = make_tokenizer()
    blocks = tok(word_texts(16, length=12))["input_ids"]
    ds = datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    model = get_peft_model(make_sparse_model(), TUNERS[tuner]["make"]("llama"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    transformers.Trainer(model=model, args=args, train_dataset=ds).train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_sparsity_callback_warns_when_a_zero_comes_back(tmp_path):
    model = make_sparse_model()
    from peft import get_peft_model

    peft_model = get_peft_model(model, sparse_peft.SparseLoraConfig(r=2, mask_type="custom", init_weights=False))
    cb = SparsityCallback(check_every=1)
    cb.on_train_begin(None, None, None, model=peft_model)
    assert cb.check(peft_model) == {"sparsity/revived": 0, "sparsity/excess_nnz": 0}
    # a custom mask that covers pruned positions lets the update revive zeros: the callback must notice
    sparse_peft.set_sparse_lora_masks(peft_model, {"model.layers.0.mlp.up_proj": torch.ones(64, 32, dtype=torch.bool)})
    stats = cb.check(peft_model)
    assert stats["sparsity/revived"] > 0 and stats["sparsity/excess_nnz"] > 0
    state = transformers.TrainerState()
    state.global_step = 1
    with pytest.warns(UserWarning, match="pruned weights came back"):
        cb.on_step_end(None, state, transformers.TrainerControl(), model=peft_model)


def test_time_budget_stops_training(tmp_path):
    trainer = SFTTrainer(
        model=make_sparse_model(),
        args=_sft_args(tmp_path, max_steps=1000),
        train_dataset=_chat_dataset(),
        processing_class=make_tokenizer(),
        peft_config=sparse_peft.SparseLoraConfig(r=2),
        callbacks=[TimeBudgetCallback(1e-9)],
    )
    trainer.train()
    assert trainer.state.global_step == 1
    with pytest.raises(ValueError, match="max_seconds"):
        TimeBudgetCallback(0)


def test_squarehead_loss_properties():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 5, 8) for _ in range(3)]
    assert squarehead_loss(teacher, teacher).item() == 0.0
    student = [t + 0.1 * torch.randn_like(t) for t in teacher]
    loss = squarehead_loss(student, teacher)
    assert loss > 0
    # scale invariance per layer: scaling a layer's teacher and student together leaves the loss unchanged
    scaled_s = [student[0]] + [10 * s for s in student[1:]]
    scaled_t = [teacher[0]] + [10 * t for t in teacher[1:]]
    torch.testing.assert_close(squarehead_loss(scaled_s, scaled_t), loss)
    assert squarehead_loss(student[:1], teacher[:1]) < squarehead_loss(student[:1], [3 * teacher[0]])
    # padding does not count
    mask = torch.ones(2, 5)
    mask[:, -1] = 0
    noisy = [s.clone() for s in student]
    for s in noisy:
        s[:, -1] += 100.0
    torch.testing.assert_close(squarehead_loss(noisy, teacher, mask), squarehead_loss(student, teacher, mask))
    with pytest.raises(ValueError, match="same architecture"):
        squarehead_loss(student[:2], teacher)


def test_squarehead_trainer_runs_and_logs(tmp_path):
    dense = make_model("llama")
    student = copy.deepcopy(dense)
    make_sparse(student)
    trainer = SquareHeadSFTTrainer(
        model=student,
        teacher_model=dense,
        distill_weight=1.0,
        args=_sft_args(tmp_path, max_steps=2),
        train_dataset=_chat_dataset(),
        processing_class=make_tokenizer(),
        peft_config=sparse_peft.SparseLoraConfig(r=2),
    )
    trainer.train()
    logged = [h["squarehead"] for h in trainer.state.log_history if "squarehead" in h]
    assert logged and all(v > 0 for v in logged)
    assert all(not p.requires_grad for p in dense.parameters())
