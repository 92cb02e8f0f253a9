"""S²FT specifics: partial-backprop exactness and saved bytes, GQA-aware selection, strategies, fusion, sparse bases."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

import sparse_peft
from conftest import inputs, make_model, make_sparse, zero_masks
from sparse_peft.masks import is_nm
from sparse_peft.pruning.report import linear_weight
from sparse_peft.tuners.s2ft import S2FTLayer, S2FTLinearFn
from sparse_peft.tuners.s2ft.selection import slice_indices

ALL_ROLES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _layers(model) -> dict[str, S2FTLayer]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, S2FTLayer)}


def _reference(x, w, bias, specs, deltas):
    """Full autograd through the dense effective weight ``W`` with each slice replaced by ``slice + M ⊙ D``."""
    w_eff = w
    for (axis, idx, mask), d in zip(specs, deltas):
        d_eff = d if mask is None else d * mask.float()
        w_eff = w_eff.index_add(0 if axis == "rows" else 1, idx, d_eff)
    return F.linear(x, w_eff, bias)


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def _new_bytes(saved, resident):
    """Bytes of saved tensors that are not resident state (parameters/buffers), deduplicated by storage."""
    seen, total = set(resident), 0
    for t in saved:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


# ---------------------------------------------------------------------------------------------- partial backprop
@pytest.mark.parametrize("axes", [("cols",), ("rows",), ("cols", "rows"), ("cols", "cols")])
@pytest.mark.parametrize("masked", [False, True])
def test_partial_backprop_equals_full_autograd_on_the_slice(axes, masked):
    torch.manual_seed(0)
    d_out, d_in = 12, 16
    x = torch.randn(2, 5, d_in, requires_grad=True)  # 3-D input
    w = torch.randn(d_out, d_in)
    w[torch.rand(d_out, d_in) < 0.4] = 0
    bias = torch.randn(d_out, requires_grad=True)
    specs, deltas = [], []
    for i, axis in enumerate(axes):
        n = d_out if axis == "rows" else d_in
        idx = torch.randperm(n)[: 3 + i].sort().values
        shape = (idx.numel(), d_in) if axis == "rows" else (d_out, idx.numel())
        keep = (w.index_select(0 if axis == "rows" else 1, idx) != 0) if masked else None
        specs.append((axis, idx, keep))
        deltas.append(torch.randn(shape, requires_grad=True))
    out = S2FTLinearFn.apply(x, w, bias, tuple(specs), *deltas)
    ref = _reference(x, w, bias, specs, deltas)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, bias, *deltas], g)
    want = torch.autograd.grad(ref, [x, bias, *deltas], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # grad_input is the full one, grad_D the slice's


def test_column_layer_saves_only_the_input_slice():
    """The activation a column-trained layer keeps for backward is x[:, cols] (T, k) and nothing else."""
    base = make_model("llama")
    model = get_peft_model(base, sparse_peft.S2FTConfig(heads_ratio=0.25, channels_ratio=0.1, init_weights=False))
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        layer = _layers(model)[name]
        x = torch.randn(3, 7, layer.in_features, requires_grad=True)
        out, saved = _saved(lambda: layer(x))
        resident = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
        k = layer.s2ft_index["default"].numel()
        assert 0 < k < layer.in_features
        assert _new_bytes(saved, resident) == 3 * 7 * k * x.element_size(), name
        out.sum().backward()
        assert layer.s2ft_delta["default"].grad is not None and x.grad is not None


def test_saved_bytes_guard_dense_formulation_saves_full_input():
    """Guard for the test above: an autograd-through-W_eff layer keeps all of x, so the check can fail."""
    x = torch.randn(3, 7, 16, requires_grad=True)
    w, d = torch.randn(8, 16), torch.randn(8, 4, requires_grad=True)
    idx = torch.tensor([1, 5, 6, 9])
    _, saved = _saved(lambda: _reference(x, w, None, [("cols", idx, None)], [d]))
    assert _new_bytes(saved, {w.untyped_storage().data_ptr(), d.untyped_storage().data_ptr()}) >= x.numel() * 4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_delta_grads_equal_full_weight_grads_on_slice(family):
    torch.manual_seed(0)
    targets = ["c_proj", "c_attn", "c_fc"] if family == "gpt2" else ALL_ROLES
    cfg = sparse_peft.S2FTConfig(heads_ratio=0.5, channels_ratio=0.2, init_weights=False, target_modules=targets)
    base = make_model(family)
    make_sparse(base)
    model = get_peft_model(base, cfg).eval()  # eval: no dropout (GPT-2 has some); gradients flow all the same
    model(**inputs(family)).loss.backward()
    layers = {
        n: (
            m.s2ft_axis["default"],
            m.s2ft_index["default"].clone(),
            m.s2ft_delta["default"].grad.clone(),
            m.get_delta_weight("default") != 0,
        )
        for n, m in _layers(model).items()
    }
    merged = model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    mods = dict(merged.named_modules())
    for n in layers:
        mods[n].weight.requires_grad_(True)
    merged(**inputs(family)).loss.backward()
    for n, (axis, idx, grad, _) in layers.items():
        gw = mods[n].weight.grad
        gw = gw.t() if family == "gpt2" else gw  # (d_out, d_in)
        dim = 0 if axis == "rows" else 1
        want = gw.index_select(dim, idx) * (linear_weight(mods[n]).detach().index_select(dim, idx) != 0)
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-4, msg=n)


def test_gradient_accumulation_and_checkpointing_give_the_same_grads():
    def grads(checkpointing=False, micro=1):
        torch.manual_seed(0)
        base = make_model("llama")
        model = get_peft_model(base, sparse_peft.S2FTConfig(heads_ratio=0.25, channels_ratio=0.1, init_weights=False))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        batch = inputs("llama", batch=4)
        for i in range(micro):
            part = {k: v[i * 4 // micro : (i + 1) * 4 // micro] for k, v in batch.items()}
            (model(**part).loss / micro).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref = grads()
    for other in (grads(checkpointing=True), grads(micro=2)):
        assert other.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(other[n], ref[n], atol=1e-5, rtol=1e-4, msg=n)


# ----------------------------------------------------------------------------------------------- selection / GQA
@pytest.mark.parametrize("family,head_dim", [("llama", 8), ("qwen2", 8), ("qwen3", 16), ("mistral", 8)])
def test_gqa_selection_counts_and_mapping(family, head_dim):
    base = make_model(family)
    cfg = sparse_peft.S2FTConfig(heads_ratio=0.5, channels_ratio=0.1, target_modules=ALL_ROLES, seed=3)
    model = get_peft_model(base, cfg)
    sel = model.peft_config["default"].selection
    assert set(sel) == {"model.layers.0", "model.layers.1"}
    layers = _layers(model)
    for block, entry in sel.items():
        heads, channels = entry["heads"], entry["channels"]
        assert len(heads) == 2 and len(channels) == round(0.1 * 64)  # 4 heads, 64 FFN channels
        span = lambda hs: [h * head_dim + i for h in hs for i in range(head_dim)]  # noqa: E731
        kv = sorted({h // 2 for h in heads})  # 4 query heads share 2 kv heads: group of 2
        want = {
            "self_attn.o_proj": ("cols", span(heads)),
            "self_attn.q_proj": ("rows", span(heads)),
            "self_attn.k_proj": ("rows", span(kv)),
            "self_attn.v_proj": ("rows", span(kv)),
            "mlp.down_proj": ("cols", channels),
            "mlp.up_proj": ("rows", channels),
            "mlp.gate_proj": ("rows", channels),
        }
        for suffix, (axis, idx) in want.items():
            layer = layers[f"{block}.{suffix}"]
            assert layer.s2ft_axis["default"] == axis
            assert layer.s2ft_index["default"].tolist() == idx, suffix
    o_proj = layers["model.layers.0.self_attn.o_proj"]
    assert o_proj.in_features == 4 * head_dim  # qwen3: 64 != hidden_size 32
    assert o_proj.s2ft_delta["default"].shape == (32, 2 * head_dim)
    model(**inputs(family)).loss.backward()  # runs end to end


def test_gqa_kv_head_shared_by_two_selected_query_heads_is_trained_once():
    base = make_model("qwen3")
    cfg = sparse_peft.S2FTConfig(
        selection={f"model.layers.{i}": {"heads": [2, 3], "channels": [0]} for i in range(2)},
        target_modules=["o_proj", "v_proj", "down_proj"],
    )
    layer = _layers(get_peft_model(base, cfg))["model.layers.0.self_attn.v_proj"]
    assert layer.s2ft_index["default"].tolist() == list(range(16, 32))  # kv head 1 only


def test_gpt2_conv1d_fused_qkv_rows():
    base = make_model("gpt2")  # n_embd 32, 4 heads of 8
    cfg = sparse_peft.S2FTConfig(
        selection={f"transformer.h.{i}": {"heads": [1], "channels": [3, 7]} for i in range(2)},
        target_modules=["c_attn", "c_proj", "c_fc"],
        init_weights=False,
    )
    model = get_peft_model(base, cfg)
    layers = _layers(model)
    span = list(range(8, 16))
    assert layers["transformer.h.0.attn.c_attn"].s2ft_index["default"].tolist() == span + [32 + i for i in span] + [
        64 + i for i in span
    ]
    assert layers["transformer.h.0.attn.c_proj"].s2ft_index["default"].tolist() == span
    assert layers["transformer.h.0.mlp.c_proj"].s2ft_index["default"].tolist() == [3, 7]
    assert layers["transformer.h.0.mlp.c_fc"].s2ft_index["default"].tolist() == [3, 7]
    assert layers["transformer.h.0.attn.c_proj"].s2ft_axis["default"] == "cols"


def test_only_selected_slices_change_after_training_and_merge():
    base = make_model("qwen3")
    make_sparse(base)
    before = {n: linear_weight(m).detach().clone() for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    others = {n: p.detach().clone() for n, p in base.named_parameters() if not n.endswith("proj.weight")}
    model = get_peft_model(base, sparse_peft.S2FTConfig(heads_ratio=0.25, channels_ratio=0.1, target_modules=ALL_ROLES))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(**inputs("qwen3")).loss.backward()
        opt.step()
        opt.zero_grad()
    slices = {n: (m.s2ft_axis["default"], m.s2ft_index["default"].clone()) for n, m in _layers(model).items()}
    merged = model.merge_and_unload()
    for n, m in merged.named_modules():
        if n not in before:
            continue
        diff = linear_weight(m).detach() != before[n]
        if n not in slices:
            assert not diff.any(), f"{n} is not trained but changed"
            continue
        axis, idx = slices[n]
        inside = torch.zeros_like(diff)
        inside.index_fill_(0 if axis == "rows" else 1, idx, True)
        assert diff.any() and not (diff & ~inside).any(), f"{n} changed outside its slice (or not at all)"
        assert (linear_weight(m)[before[n] == 0] == 0).all(), f"{n}: a pruned weight came back"
    for n, p in merged.named_parameters():
        if n in others:
            assert torch.equal(p, others[n]), n


def _scaled_model():
    """Llama where head 2 of o_proj and channel 5 of down_proj dominate weights and activations."""
    base = make_model("llama", layers=1)
    with torch.no_grad():
        base.model.layers[0].self_attn.o_proj.weight[:, 16:24] *= 50
        base.model.layers[0].mlp.down_proj.weight[:, 5] *= 50
        base.model.layers[0].self_attn.v_proj.weight[8:16] *= 50  # kv head 1 feeds query heads 2, 3
        base.model.layers[0].mlp.up_proj.weight[5] *= 50
    return base


@pytest.mark.parametrize("strategy", ["weight", "activation", "sensitivity", "gradient"])
def test_data_strategies_pick_the_dominant_slices(strategy):
    base = _scaled_model()
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    cfg = sparse_peft.S2FTConfig(heads_ratio=0.25, channels_ratio=1 / 64, strategy=strategy)
    cfg = sparse_peft.s2ft_select(base, cfg, inputs("llama", batch=4, seq=16))
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert all(p.grad is None for p in base.parameters())
    entry = cfg.selection["model.layers.0"]
    assert entry["channels"] == [5]
    if strategy != "activation":  # the o_proj input is attention output: head 2 or 3 (same kv head) dominates it
        assert entry["heads"] == [2]
    else:
        assert entry["heads"][0] in (2, 3)
    json.dumps(cfg.to_dict(), default=list)  # plain JSON data
    get_peft_model(base, cfg)


def test_data_strategy_without_calibration_names_the_fix():
    with pytest.raises(ValueError, match="s2ft_select"):
        get_peft_model(make_model("llama"), sparse_peft.S2FTConfig(strategy="activation"))
    with pytest.raises(ValueError, match="labels"):
        sparse_peft.s2ft_select(
            make_model("llama"),
            sparse_peft.S2FTConfig(strategy="gradient"),
            {"input_ids": inputs("llama")["input_ids"]},
        )


def test_random_selection_is_seeded_and_saved(tmp_path):
    a = get_peft_model(make_model("llama"), sparse_peft.S2FTConfig(seed=1, heads_ratio=0.5))
    b = get_peft_model(make_model("llama"), sparse_peft.S2FTConfig(seed=1, heads_ratio=0.5))
    c = get_peft_model(make_model("llama"), sparse_peft.S2FTConfig(seed=2, heads_ratio=0.5, channels_ratio=0.3))
    assert a.peft_config["default"].selection == b.peft_config["default"].selection
    assert a.peft_config["default"].selection != c.peft_config["default"].selection
    a.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "adapter_config.json"))
    assert saved["selection"] == a.peft_config["default"].selection
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert size < 0.25 * sum(p.numel() * 4 for p in make_model("llama").parameters())  # small: slices only


# ------------------------------------------------------------------------------------------ adapters and fusion
def _two_disjoint(family="qwen2", targets=("o_proj", "v_proj", "down_proj", "up_proj")):
    base = make_model(family)
    make_sparse(base)
    blocks = [f"model.layers.{i}" for i in range(2)]
    cfg_a = sparse_peft.S2FTConfig(
        selection={b: {"heads": [0], "channels": [1, 2]} for b in blocks},
        target_modules=list(targets),
        init_weights=False,
    )
    cfg_b = sparse_peft.S2FTConfig(
        selection={b: {"heads": [3], "channels": [7]} for b in blocks},  # kv head 1
        target_modules=list(targets),
        init_weights=False,
    )
    model = get_peft_model(base, cfg_a, adapter_name="a")
    model.add_adapter("b", cfg_b)
    return model


def _logits(model, family="qwen2"):
    with torch.no_grad():
        return model(input_ids=inputs(family)["input_ids"]).logits


def test_several_active_adapters_equal_merging_them():
    model = _two_disjoint()
    model.base_model.set_adapter(["a", "b"])
    both = _logits(model)
    model.merge_adapter(["a", "b"])
    torch.testing.assert_close(_logits(model), both, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()


def test_fusion_of_disjoint_adapters_equals_applying_both(tmp_path):
    model = _two_disjoint()
    model.base_model.set_adapter(["a", "b"])
    both = _logits(model)
    sparse_peft.s2ft_fuse_adapters(model, ["a", "b"], "ab")
    model.set_adapter("ab")
    torch.testing.assert_close(_logits(model), both, atol=1e-6, rtol=1e-6)
    assert model.peft_config["ab"].selection["model.layers.0"] == {"heads": [0, 3], "channels": [1, 2, 7]}
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    fresh = make_model("qwen2")
    make_sparse(fresh)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "ab" if (tmp_path / "ab").exists() else tmp_path)
    torch.testing.assert_close(_logits(loaded), both, atol=1e-6, rtol=1e-6)


def test_fusion_refuses_overlap_and_names_the_slices():
    model = _two_disjoint()
    model.add_adapter(
        "c",
        sparse_peft.S2FTConfig(
            selection={
                f"model.layers.{i}": {"heads": [1], "channels": [9]} for i in range(2)
            },  # head 1 shares kv head 0
            target_modules=["o_proj", "v_proj", "down_proj", "up_proj"],
        ),
    )
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.v_proj: 'a' and 'c' both train rows \[0, 1"):
        sparse_peft.s2ft_fuse_adapters(model, ["a", "c"], "ac")


def test_no_permanent_permutation_after_merge_cycles():
    model = _two_disjoint("llama")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for _ in range(3):
        model.merge_adapter(["a", "b"])
        model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n]), f"{n} not restored bit for bit"


# ----------------------------------------------------------------------------------------------- sparse bases
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_base_zeros_and_nm_kept(dtype):
    base = make_model("llama", dtype)
    make_sparse(base, nm=(2, 4))
    zeros = zero_masks(base)
    model = get_peft_model(
        base, sparse_peft.S2FTConfig(heads_ratio=0.5, channels_ratio=0.5, target_modules=ALL_ROLES, init_weights=False)
    )
    merged = model.merge_and_unload()
    for n, m in merged.named_modules():
        if n in zeros:
            w = linear_weight(m)
            assert (w[zeros[n]] == 0).all() and is_nm(w, 2, 4), n


def test_preserve_sparsity_false_trains_pruned_entries_of_the_slice():
    base = make_model("llama")
    make_sparse(base)
    model = get_peft_model(base, sparse_peft.S2FTConfig(heads_ratio=0.5, preserve_sparsity=False, init_weights=False))
    layer = _layers(model)["model.layers.0.self_attn.o_proj"]
    assert "default" not in layer.s2ft_mask
    was_zero = layer.base_layer.weight == 0
    merged = model.merge_and_unload()
    assert (merged.model.layers[0].self_attn.o_proj.weight[was_zero] != 0).any()


# ------------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(heads_ratio=1.5), "heads_ratio must be a fraction"),
        (dict(channels_ratio=-0.1), "channels_ratio must be a fraction"),
        (dict(heads_ratio=0, channels_ratio=0), "nothing would be trained"),
        (dict(strategy="magic"), "strategy must be one of"),
        (dict(selection={"model.layers.0": {"heads": [-1]}}), r"selection\['model.layers.0'\]\['heads'\]"),
        (dict(selection={"model.layers.0": {"rows": [1]}}), "keys 'heads' and/or 'channels'"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparse_peft.S2FTConfig(**kwargs)


def test_unknown_role_and_foreign_selection_name_the_module():
    with pytest.raises(ValueError, match="lm_head"):
        get_peft_model(make_model("llama"), sparse_peft.S2FTConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="no entry for block 'model.layers.1'"):
        get_peft_model(make_model("llama"), sparse_peft.S2FTConfig(selection={"model.layers.0": {"heads": [0]}}))
    with pytest.raises(ValueError, match="reaches col"):
        get_peft_model(
            make_model("llama"),
            sparse_peft.S2FTConfig(
                selection={f"model.layers.{i}": {"heads": [0], "channels": [500]} for i in range(2)}
            ),
        )
