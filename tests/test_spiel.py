"""SpIEL specifics: exact gradients, drop-and-grow, optimizer reset, SEFT counts, trainers and bad input (DDP, FSDP2
and resume: test_distributed.py, test_resume.py)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn as nn
from peft import get_peft_model
from transformers.pytorch_utils import Conv1D

import sparse_peft
from conftest import inputs, make_model, make_sparse, prunable
from sparse_peft import ops
from sparse_peft.masks import is_nm
from sparse_peft.pruning.report import linear_weight
from sparse_peft.tuners.spiel import SpielLayer, regrowth

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _layers(model, adapter="default"):
    return {n: m for n, m in model.named_modules() if isinstance(m, SpielLayer) and adapter in m.spiel_values}


def _snapshot(model):
    return {
        n: (m.spiel_indices["default"].clone(), m.spiel_values["default"].detach().clone())
        for n, m in _layers(model).items()
    }


def _loop(model, family="llama", steps=4, lr=1e-2, opt=None, after_step=None, seed=1):
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for s in range(steps):
        model(**inputs(family, seed=seed + s)).loss.backward()
        opt.step()
        if after_step is not None:
            after_step(s + 1, opt)
        opt.zero_grad()
    model.eval()
    return opt


def _spiel(**kw):
    kw.setdefault("target_modules", TARGETS)
    kw.setdefault("r", 2)
    return sparse_peft.SpielConfig(task_type="CAUSAL_LM", **kw)


# ----------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("n_adapters", [1, 2])
def test_gradient_equals_dense_autograd(conv, n_adapters):
    torch.manual_seed(0)
    lin = Conv1D(12, 16) if conv else nn.Linear(16, 12)
    model = get_peft_model(
        nn.Sequential(lin).double(),
        sparse_peft.SpielConfig(
            r=2, target_modules=["0"], init_weights=False, values_dtype="float64", preserve_sparsity=False
        ),
    )
    if n_adapters == 2:
        model.add_adapter(
            "b",
            sparse_peft.SpielConfig(
                r=2, target_modules=["0"], init_weights=False, values_dtype="float64", preserve_sparsity=False
            ),
        )
        model.base_model.set_adapter(["default", "b"])
    layer = model.base_model.model[0]
    names = ["default", "b"][:n_adapters]
    for a in names:
        layer.spiel_values[a].requires_grad_(True)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    out = model(x)
    w = layer._linear_weight().detach().reshape(-1)
    leaves = [layer.spiel_values[a].detach().clone().requires_grad_(True) for a in names]
    for a, v in zip(names, leaves):  # W + Σ scatter(values), through autograd
        w = w.index_add(0, layer.spiel_indices[a].long(), v)
    ref = nn.functional.linear(x, w.view(12, 16), lin.bias)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, *(layer.spiel_values[a] for a in names)], g)
    want = torch.autograd.grad(ref, [x, *leaves], g)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)  # value gradient is an fp32 SDDMM


def test_cpu_value_gradient_paths_equal_the_definition():
    """The layer's value gradient is ops.gather_weight_grad; its CPU paths (sampled_addmm, and the blocked dense
    fallback) equal the definition (the gather-dot), duplicates and int32 indices included."""
    from sparse_peft.ops import reference
    from sparse_peft.tuners.spiel import layer as layer_mod

    assert layer_mod._gather_weight_grad is ops.gather_weight_grad
    g, x = torch.randn(2, 7, 40), torch.randn(2, 7, 24)
    idx = torch.cat([torch.randperm(40 * 24)[:100], torch.tensor([5, 5])]).int()
    want = reference._gather_dot(g, x, idx.long())
    torch.testing.assert_close(ops.gather_weight_grad(g, x, idx), want)
    order = torch.argsort(idx.long())
    got = torch.empty_like(want)
    got[order] = reference._gather_blocked(g.reshape(-1, 40), x.reshape(-1, 24), idx.long()[order], block_elems=3 * 24)
    torch.testing.assert_close(got, want)


def test_no_weight_sized_tensor_saved_for_backward():
    base = make_model("llama")
    model = get_peft_model(base, _spiel(r=2))
    sizes = {m.weight_shape for m in _layers(model).values()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(**inputs("llama")).loss
    params = {p.data_ptr() for p in model.parameters()}
    big = [t for t in saved if tuple(t.shape) in sizes and t.data_ptr() not in params]
    assert not big, "a (d_out, d_in) tensor other than a parameter is saved for backward"
    loss.backward()


# ------------------------------------------------------------------------------------------------ drop and grow
def test_regrowth_maths():
    assert [regrowth.in_accumulation_window(s, 10, 3) for s in range(1, 11)] == [False] * 7 + [True] * 3
    assert regrowth.regrow_count(100, 0, 0.2, "linear", 100) == 20
    assert regrowth.regrow_count(100, 50, 0.2, "cosine", 100) == 10
    assert regrowth.regrow_count(100, 100, 0.2, "linear", 100) == 0
    assert regrowth.regrow_count(100, 999, 0.2, "linear", None) == 20
    scores = torch.arange(16.0)
    grown = regrowth.grow(scores, 3, active=torch.tensor([15, 14]))
    assert grown.tolist() == [13, 12, 11]
    nonzero = torch.tensor([1, 1, 0, 0] * 4, dtype=torch.bool)  # 2:4 base, 4 groups
    cap = regrowth.group_capacity(nonzero, torch.tensor([0]), 4)
    assert cap.tolist() == [1, 2, 2, 2]
    grown = regrowth.grow(scores, 4, active=torch.tensor([0]), capacity=cap, group_size=4)
    assert torch.bincount(grown // 4, minlength=4).tolist() == [0, 0, 2, 2]  # top scores, at most 2 per group
    idx = torch.tensor([2, 3, 6])  # groups 0 (two revived) and 1 (one revived)
    partners = regrowth.assign_partners(nonzero, idx, torch.tensor([5.0, 1.0, 0, 0, 9.0, 3.0] + [0.0] * 10), 4)
    assert sorted(partners[:2].tolist()) == [0, 1] and partners[2].item() == 5


@pytest.mark.parametrize("group", [None, "module", 4])
def test_candidate_selection_equals_full_ranking(group):
    """grow and assign_partners rank only the candidates beyond a sampled threshold: same result as ranking all."""
    g = torch.Generator().manual_seed(0)
    numel, k, n = 96 * 128, 1200, 300
    if group == 4:  # a 2:4 base
        nonzero = torch.rand(numel // 4, 4, generator=g).argsort(1).argsort(1).reshape(-1) < 2
    else:
        nonzero = torch.rand(numel, generator=g) >= 0.5
    size = None if group is None else (numel if group == "module" else 4)
    cap = None if size is None else regrowth.group_capacity(nonzero, torch.empty(0, dtype=torch.long), size)
    idx = regrowth.grow(torch.rand(numel, generator=g), k, active=torch.empty(0), capacity=cap, group_size=size)
    slots = regrowth.drop_slots(torch.randn(k, generator=g), n)
    keep = torch.ones(k, dtype=torch.bool)
    keep[slots] = False
    cap = None if size is None else regrowth.group_capacity(nonzero, idx[keep], size)
    scores = torch.rand(numel, generator=g)
    before = scores.clone()
    fast = regrowth._grow_candidates(
        scores.clone().index_fill_(0, idx, -1.0).index_fill_(0, idx[keep], -math.inf), n, cap, size
    )
    assert fast is not None, "the candidate path was not taken"
    grown = regrowth.grow(scores, n, active=idx[keep], dropped=idx[slots], capacity=cap, group_size=size, scratch=True)
    assert torch.equal(scores, before), "grow(scratch=True) did not restore the scores"
    full = regrowth._grow_full(scores.clone(), n, idx[keep], idx[slots], cap, size)
    assert set(grown.tolist()) == set(fast.tolist()) == set(full.tolist())
    if size is None:
        return
    new = idx.clone()
    new[slots] = grown
    sens = torch.rand(numel, generator=g)
    before = sens.clone()
    partners = regrowth.assign_partners(nonzero, new, sens, size, scratch=True)
    assert torch.equal(sens, before), "assign_partners(scratch=True) did not restore the sensitivity"
    assert not torch.isin(partners[partners >= 0], new).any()
    revived = ~nonzero[new]
    assert ((partners >= 0) == revived).all() and nonzero[partners[revived]].all()
    assert torch.equal(partners[revived] // size, new[revived] // size), "a partner outside its slot's group"
    ref = sens.masked_fill(~nonzero, math.inf).index_fill_(0, new, math.inf)  # the old rule, ranking everything
    if size == numel:
        assert set(partners[revived].tolist()) == set(ref.topk(int(revived.sum()), largest=False).indices.tolist())
    else:
        order = torch.sort(ref.view(-1, size), dim=1, stable=True).indices
        for p, i in zip(partners[revived].tolist(), new[revived].tolist()):
            rank = int((new[revived] // size == i // size).sum())  # revived slots in the group take its lowest
            assert p % size in order[i // size, :rank].tolist()


def test_drop_ties_go_to_the_lower_slot_and_flat_nonzero():
    values = torch.tensor([0.5, 0.0, 0.3, 0.0, -0.0, 0.0, 0.1])
    assert sorted(regrowth.drop_slots(values, 3).tolist()) == [1, 3, 4]
    assert sorted(regrowth.drop_slots(values, 5).tolist()) == [1, 3, 4, 5, 6]
    g = torch.Generator().manual_seed(0)
    for numel, density in [(4096, 0.005), (4096, 0.3), (4099, 0.01), (64, 0.1)]:
        mask = torch.rand(numel, generator=g) < density
        assert torch.equal(regrowth._flat_nonzero(mask, int(density * numel)), mask.nonzero().squeeze(1))


def test_drop_and_grow_changes_indices_keeps_count_and_resets_optimizer():
    base = make_model("llama")
    model = get_peft_model(base, _spiel(reselection_steps=2, accumulation_steps=1, regrow_fraction=0.5))
    layers = _layers(model)
    k = {n: m.spiel_k["default"] for n, m in layers.items()}
    before = {}

    def check(step, opt):
        if step % 2:  # the step before a reselection: remember what is there
            before.update(_snapshot(model))
            return
        for n, m in layers.items():
            idx, v = m.spiel_indices["default"], m.spiel_values["default"]
            assert idx.numel() == k[n] == v.numel() and torch.unique(idx).numel() == k[n], "budget not exact"
            assert idx.dtype == torch.int32 and v.dtype == torch.float32
            old_idx, _ = before[n]
            changed = (idx != old_idx).nonzero().squeeze(1)
            assert changed.numel() > 0, f"{n}: no index changed at a reselection"
            assert not torch.isin(idx[changed], old_idx).any(), "grew an index that was active"
            assert (v.detach()[changed] == 0).all(), "values at regrown slots survived"
            state = opt.state[v]
            for key in ("exp_avg", "exp_avg_sq"):
                assert (state[key][changed] == 0).all(), f"optimizer {key} not reset at regrown slots"
                kept = torch.ones_like(idx, dtype=torch.bool)
                kept[changed] = False
                assert (state[key][kept] != 0).any(), f"optimizer {key} wiped at kept slots"

    _loop(model, steps=4, after_step=check)
    stats = model.base_model.spiel_stats()
    assert stats["step"] == 4 and stats["reselections"] == 2 and stats["changed"] > 0


def test_dropped_slots_are_the_smallest_values():
    model = get_peft_model(
        make_model("llama"),
        _spiel(
            reselection_steps=1, accumulation_steps=1, regrow_fraction=0.25, init_weights=False, auto_reselection=False
        ),
    )
    layer = next(iter(_layers(model).values()))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)  # values unchanged by steps
    before = layer.spiel_values["default"].detach().clone()
    _loop(model, steps=1, opt=opt, after_step=lambda s, o: sparse_peft.spiel_step(model, o))
    changed = (layer.spiel_values["default"].detach() != before).nonzero().squeeze(1)
    assert changed.numel() == round(0.25 * before.numel())
    smallest = torch.sort(before.abs(), stable=True).indices[: changed.numel()]
    assert set(changed.tolist()) == set(smallest.tolist())


@pytest.mark.parametrize("selection", ["ag", "ma"])
def test_explicit_api_for_custom_loops(selection):
    model = get_peft_model(
        make_model("llama"),
        _spiel(selection=selection, reselection_steps=2, accumulation_steps=1, auto_reselection=False),
    )
    first = _snapshot(model)
    _loop(model, steps=2)  # without spiel_step nothing is counted
    assert model.base_model.spiel_stats()["step"] == 0
    _loop(model, steps=2, after_step=lambda s, opt: sparse_peft.spiel_step(model, opt))
    assert model.base_model.spiel_stats()["reselections"] == 1
    assert any(not torch.equal(first[n][0], idx) for n, (idx, _) in _snapshot(model).items())


def test_spiel_step_refuses_double_counting():
    model = get_peft_model(make_model("llama"), _spiel())
    with pytest.raises(RuntimeError, match="auto_reselection"):
        sparse_peft.spiel_step(model, None)


def test_ag_buffer_only_in_window():
    model = get_peft_model(make_model("llama"), _spiel(reselection_steps=4, accumulation_steps=2))
    layer = next(iter(_layers(model).values()))
    seen = []

    def look(step, opt):
        state = opt.state[layer.spiel_values["default"]]
        assert not layer._spiel_ag_step, "a step's dense gradient outlived its optimizer step"
        seen.append(("spiel_ag" in state, layer._spiel_collect["default"]))

    _loop(model, steps=4, after_step=look)
    # the window is steps 3 and 4: armed after step 2, filled by step 3's backward (kept in the optimizer's state,
    # where checkpoints find it), freed by the reselection
    assert seen == [(False, False), (False, True), (True, True), (False, False)]


# ------------------------------------------------------------------------------------------------------- SEFT mode
@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seft_counts_exact_after_every_step_and_merge(nm, dtype, caplog):
    base = make_model("llama", dtype)
    make_sparse(base, nm=nm)
    nnz = {n: int((linear_weight(m) != 0).sum()) for n, m in prunable(base).items()}
    with caplog.at_level(logging.WARNING, logger="sparse_peft.spiel"):
        model = get_peft_model(
            base, _spiel(r=2, reselection_steps=2, accumulation_steps=1, regrow_fraction=0.5, init_weights=False)
        )
    assert "preserve_sparsity=True" in caplog.text
    assert model.peft_config["default"].preserve_sparsity is True
    if nm:
        assert all(m.spiel_group["default"] == 4 for m in _layers(model).values())
    revived = []

    def check(step, opt):
        model.merge_adapter()
        for n, m in prunable(model).items():
            w = linear_weight(m)
            assert int((w != 0).sum()) == nnz[n], f"{n}: nnz changed after step {step}"
            if nm:
                assert is_nm(w, *nm), f"{n}: N:M broken after step {step}"
        model.unmerge_adapter()
        for m in _layers(model).values():
            w = m._linear_weight().reshape(-1)
            revived.append(int((w[m.spiel_indices["default"].long()] == 0).sum()))

    _loop(model, steps=4, after_step=check)
    assert max(revived) > 0, "no delta on a pruned position: SEFT was not exercised"
    assert model.base_model.spiel_stats()["reselections"] == 2
    merged = model.merge_and_unload()
    for n, m in prunable(merged).items():
        assert int((linear_weight(m) != 0).sum()) == nnz[n]
    if nm:
        assert sparse_peft.sparsity_report(merged, nm_pattern="2:4").nm_valid


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_seft_starts_on_the_base_non_zeros_and_revives_only_by_growth(nm):
    """No pruned weight comes back (and no kept weight is pruned for it) before a reselection grows one."""
    base = make_model("llama")
    make_sparse(base, nm=nm)
    zero = {n: linear_weight(m) == 0 for n, m in prunable(base).items()}
    model = get_peft_model(
        base, _spiel(r=2, reselection_steps=3, accumulation_steps=1, regrow_fraction=0.5, init_weights=False)
    )
    for m in _layers(model).values():
        w = m._linear_weight().reshape(-1)
        assert (w[m.spiel_indices["default"].long()] != 0).all(), "an initial slot sits on a pruned weight"
        assert (m.spiel_partners["default"] == regrowth.NO_PARTNER).all()

    def same_zeros(step, opt):
        if step >= 3:
            return
        model.merge_adapter()
        for n, m in prunable(model).items():
            assert torch.equal(linear_weight(m) == 0, zero[n]), f"{n}: zero pattern changed at step {step}"
        model.unmerge_adapter()

    _loop(model, steps=3, after_step=same_zeros)
    revived = sum(
        int((m._linear_weight().reshape(-1)[m.spiel_indices["default"].long()] == 0).sum())
        for m in _layers(model).values()
    )
    assert revived > 0, "the reselection grew no pruned position"


def test_unmerge_restores_weights_exactly_in_bf16():
    base = make_model("llama", torch.bfloat16)
    make_sparse(base)
    model = get_peft_model(base, _spiel(init_weights=False))
    before = {n: linear_weight(m).clone() for n, m in prunable(model).items()}
    for _ in range(2):
        model.merge_adapter()
        assert any(not torch.equal(linear_weight(m), before[n]) for n, m in prunable(model).items())
        model.unmerge_adapter()
        for n, m in prunable(model).items():
            assert torch.equal(linear_weight(m), before[n]), f"{n} not restored bit for bit"


def test_dense_base_is_not_seft_and_checkpoint_holds_values_and_indices(tmp_path):
    model = get_peft_model(make_model("llama", torch.bfloat16), _spiel())
    assert model.peft_config["default"].preserve_sparsity is False
    for m in _layers(model).values():
        assert m.spiel_values["default"].dtype == torch.float32  # fp32 values on a bf16 base
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = {k.rsplit(".", 1)[-1] for k in load_file(tmp_path / "adapter_model.safetensors")}
    assert keys == {"spiel_values", "spiel_indices"}


# --------------------------------------------------------------------------------------------- serving and fusion
def test_fusion_sums_overlaps_and_switching_is_a_scatter():
    torch.manual_seed(0)
    base = make_model("llama")
    model = get_peft_model(base, _spiel(init_weights=False, r=8))
    model.add_adapter("b", _spiel(init_weights=False, r=8))
    layer = next(iter(_layers(model).values()))
    overlap = torch.isin(layer.spiel_indices["default"], layer.spiel_indices["b"]).sum()
    assert overlap > 0, "test needs overlapping indices"
    sparse_peft.fuse_spiel_adapters(model, ["default", "b"], "fused", weights=[1.0, 0.5])
    for m in _layers(model, "fused").values():
        want = m.get_delta_weight("default") + 0.5 * m.get_delta_weight("b")
        torch.testing.assert_close(m.get_delta_weight("fused"), want)
        assert not m.spiel_values["fused"].requires_grad
    tuner = model.base_model
    outs = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        outs[name] = model(**inputs("llama")).logits
    before = {n: linear_weight(m).clone() for n, m in prunable(model).items()}
    for name in ("default", "b", "default"):
        tuner.merge_only(name)
        torch.testing.assert_close(model(**inputs("llama")).logits, outs[name], atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert all(torch.equal(linear_weight(m), before[n]) for n, m in prunable(model).items())


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(regrow_fraction=-0.1), "regrow_fraction"),
        (dict(regrow_fraction=1.5), "regrow_fraction"),
        (dict(density=-0.01), "density"),
        (dict(r=0), "SpielConfig.r"),
        (dict(r=4, density=0.1), "only one budget"),
        (dict(num_deltas=-5), "num_deltas"),
        (dict(reselection_steps=0), "reselection_steps"),
        (dict(accumulation_steps=30), "accumulation_steps"),
        (dict(selection="xx"), "selection"),
        (dict(regrow_schedule="step"), "regrow_schedule"),
        (dict(total_steps=-1), "total_steps"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        sparse_peft.SpielConfig(**kw)


def test_budget_larger_than_layer():
    with pytest.raises(ValueError, match="exceeds"):
        get_peft_model(make_model("llama"), _spiel(r=64))  # 64 * (32 + 32) > 32 * 32
    sparse = make_model("llama")
    make_sparse(sparse, 0.9)
    with pytest.raises(ValueError, match="non-zeros"):
        get_peft_model(sparse, _spiel(r=4))  # fits the layer, not its non-zeros


def test_ma_needs_an_optimizer_it_can_read():
    model = get_peft_model(make_model("llama"), _spiel(selection="ma"))
    with pytest.raises(ValueError, match="Adam-family"):
        _loop(model, steps=1, opt=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))


def test_density_and_num_deltas_budgets():
    model = get_peft_model(make_model("llama"), _spiel(r=None, density=0.1))
    assert all(m.spiel_k["default"] == round(0.1 * m.in_features * m.out_features) for m in _layers(model).values())
    model = get_peft_model(make_model("llama"), _spiel(r=None, num_deltas=1000))
    total = sum(m.spiel_k["default"] for m in _layers(model).values())
    assert abs(total - 1000) <= len(_layers(model))


# ------------------------------------------------------------------------------------------------------ trainers
def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


@pytest.mark.parametrize("callback", [False, True])
def test_sft_trainer_with_only_peft_config_reselects(tmp_path, callback, caplog):
    """No callback needed for drop-and-grow; SpielCallback adds the run's length for the regrow decay."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from sparse_peft.training import SpielCallback

    torch.manual_seed(0)
    base = make_model("llama")
    make_sparse(base)
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (12,), generator=g)) for _ in range(16)]
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=16,
        dataset_num_proc=None,
        gradient_checkpointing=True,
    )
    config = sparse_peft.SpielConfig(r=2, target_modules=TARGETS, reselection_steps=2, accumulation_steps=1)
    trainer = SFTTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=_word_tokenizer(),
        peft_config=config,
        callbacks=[SpielCallback()] if callback else None,
    )
    model = trainer.model
    nnz = {n: int((linear_weight(m) != 0).sum()) for n, m in prunable(model).items()}
    first = _snapshot(model)
    with caplog.at_level(logging.INFO, logger="sparse_peft.spiel"):
        trainer.train()
    stats = model.base_model.spiel_stats()
    assert stats["step"] == trainer.state.global_step == 6  # one count per optimizer step, not per micro-batch
    assert stats["reselections"] == 3
    unknown = [r for r in caplog.records if "length is unknown" in r.getMessage()]
    if callback:
        assert stats["total_steps"] == 6 and not unknown
    else:  # the horizon-free schedule: a constant regrow fraction, said once
        assert stats["total_steps"] is None and len(unknown) == 1
    now = _snapshot(model)
    assert any(not torch.equal(first[n][0], now[n][0]) for n in first), "indices did not change in SFTTrainer"
    assert all(now[n][0].numel() == first[n][0].numel() for n in first)
    merged = model.merge_and_unload()
    assert all(int((linear_weight(m) != 0).sum()) == nnz[n] for n, m in prunable(merged).items())
