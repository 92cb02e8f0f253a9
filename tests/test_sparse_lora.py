"""SparseLoRA specifics: exact gradients, what backward keeps alive, masks, fingerprints and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from peft import PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

import sparse_peft
from conftest import inputs, make_model, make_sparse
from sparse_peft.masks import is_nm
from sparse_peft.pruning.report import linear_weight
from sparse_peft.tuners.sparse_lora import MaskedLoraLinearFn


def _naive(x, w, bias, masks, scalings, ab):
    """Autograd through the dense formulation W + Σ s M ⊙ (B A)."""
    w_eff = w
    for i, (m, s) in enumerate(zip(masks, scalings)):
        w_eff = w_eff + s * m * (ab[2 * i + 1] @ ab[2 * i])
    return torch.nn.functional.linear(x, w_eff, bias)


@pytest.mark.parametrize("n_adapters", [1, 2])
@pytest.mark.parametrize("with_weight", [True, False])
def test_gradient_equals_naive_dense_autograd(n_adapters, with_weight):
    torch.manual_seed(0)
    d_out, d_in, r = 12, 16, 3
    x = torch.randn(2, 5, d_in, dtype=torch.float64, requires_grad=True)  # 3-D input
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    bias = torch.randn(d_out, dtype=torch.float64, requires_grad=True) if with_weight else None
    masks = [torch.rand(d_out, d_in) > 0.5 for _ in range(n_adapters)]
    scalings = [0.5 + i for i in range(n_adapters)]
    ab = []
    for _ in range(n_adapters):
        ab += [
            torch.randn(r, d_in, dtype=torch.float64, requires_grad=True),
            torch.randn(d_out, r, dtype=torch.float64, requires_grad=True),
        ]
    packed = tuple(sparse_peft.masks.pack_mask(m) for m in masks)
    out = MaskedLoraLinearFn.apply(
        x, w if with_weight else None, bias, packed, (d_out, d_in), tuple(scalings), None, *ab
    )
    ref = _naive(x, w if with_weight else torch.zeros_like(w), bias, masks, scalings, ab)
    torch.testing.assert_close(out.double(), ref)
    grad = torch.randn_like(ref)
    leaves = [x, *ab] + ([bias] if bias is not None else [])
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, leaves, grad)
    for g, h in zip(got, want):
        torch.testing.assert_close(g.double(), h, atol=1e-5, rtol=1e-5)


def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_unmasked_gradient_option_is_the_lors_gradient():
    """exact=False: forward is still masked; A and B get s·Bᵀ(gᵀx) and s·(gᵀx)Aᵀ without the mask (straight-through
    the mask), next to an exact adapter in the same call."""
    torch.manual_seed(0)
    d_out, d_in, r = 12, 16, 3
    x = torch.randn(2, 5, d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    masks = [torch.rand(d_out, d_in) > 0.5 for _ in range(2)]
    scalings = (0.5, 1.5)
    ab = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in [(r, d_in), (d_out, r)] * 2]
    packed = tuple(sparse_peft.masks.pack_mask(m) for m in masks)
    out = MaskedLoraLinearFn.apply(x, w, None, packed, (d_out, d_in), scalings, (True, False), *ab)
    torch.testing.assert_close(out, _naive(x, w, None, masks, scalings, ab))  # the forward stays masked
    ba = ab[3] @ ab[2]  # (d_out, d_in) of the inexact adapter
    w_ref = w + scalings[0] * masks[0] * (ab[1] @ ab[0]) + scalings[1] * (masks[1] * ba.detach() + ba - ba.detach())
    ref = torch.nn.functional.linear(x, w_ref)  # same values, gradient of adapter 2 straight through its mask
    grad = torch.randn_like(ref)
    leaves = [x, *ab]
    got = torch.autograd.grad(out, leaves, grad)
    for g, h in zip(got, torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(g, h)
    exact_b = torch.autograd.grad(_naive(x, w, None, masks, scalings, ab), ab[3], grad)[0]
    assert not torch.allclose(got[4], exact_b), "the mask was not dropped"


def test_unmasked_gradient_option_trains_and_keeps_zeros():
    base = make_model("llama")
    make_sparse(base)
    before = {n: linear_weight(m).clone() for n, m in base.named_modules() if n.endswith("proj")}
    model = get_peft_model(
        base, sparse_peft.SparseLoraConfig(r=4, lora_alpha=8, exact_gradient=False, task_type="CAUSAL_LM")
    )
    layer = next(m for m in model.modules() if isinstance(m, sparse_peft.tuners.sparse_lora.SparseLoraLayer))
    assert layer.exact_gradient["default"] is False
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for seed in range(3):
        model(**inputs("llama", seed=seed)).loss.backward()
        opt.step()
        opt.zero_grad()
    merged = model.merge_and_unload()
    changed = 0
    for n, m in merged.named_modules():
        if n in before:
            w, zero = linear_weight(m), before[n] == 0
            assert (w[zero] == 0).all(), f"{n}: a zero came back"
            changed += int((w != before[n]).sum())
    assert changed > 0, "training moved no weight"


def test_backward_keeps_no_dense_delta():
    """Only x, the frozen weight (already resident) and A, B are saved: no new (d_out, d_in) tensor per layer."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48))
    make_sparse(base)
    model = get_peft_model(base, sparse_peft.SparseLoraConfig(r=4, target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    x = torch.randn(3, 7, 64, requires_grad=True)
    out, saved = _saved_tensors(lambda: model(x))
    resident = {
        layer.base_layer.weight.untyped_storage().data_ptr(),
        x.untyped_storage().data_ptr(),
        layer.sparse_lora_A["default"].untyped_storage().data_ptr(),
        layer.sparse_lora_B["default"].untyped_storage().data_ptr(),
    }
    for t in saved:
        assert t.untyped_storage().data_ptr() in resident, f"backward keeps a new tensor of shape {tuple(t.shape)}"
    out.sum().backward()
    assert layer.sparse_lora_A["default"].grad is not None


def test_naive_masked_lora_would_save_dense_tensors():
    """Guard for the test above: the naive formulation does save (d_out, d_in) tensors, so the check can fail."""
    x = torch.randn(3, 64, requires_grad=True)
    w, m = torch.randn(48, 64), torch.rand(48, 64) > 0.5
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    _, saved = _saved_tensors(lambda: _naive(x, w, None, [m], [1.0], [a, b]))
    assert any(tuple(t.shape) == (48, 64) and t.data_ptr() != w.data_ptr() for t in saved)


def test_dropout_path_matches_no_dropout_in_eval_and_trains():
    """With ``lora_dropout > 0`` training takes the unfused path (base output plus each adapter's masked delta on
    dropped-out inputs). In eval it is the no-dropout model; with the dropout an identity it computes what the fused
    path computes, gradients included; with ``p > 0`` it really drops inputs and still trains."""
    base = make_model("llama")
    make_sparse(base)
    dropped = get_peft_model(
        copy.deepcopy(base), sparse_peft.SparseLoraConfig(r=4, lora_dropout=0.5, init_weights=False)
    )
    fused = get_peft_model(copy.deepcopy(base), sparse_peft.SparseLoraConfig(r=4, init_weights=False))
    fused.load_state_dict(dropped.state_dict())  # the same adapter weights
    dropouts = [
        d for m in dropped.modules() if hasattr(m, "sparse_lora_dropout") for d in m.sparse_lora_dropout.values()
    ]
    assert dropouts and all(isinstance(d, nn.Dropout) for d in dropouts)
    batch = inputs("llama")
    dropped.eval(), fused.eval()
    with torch.no_grad():
        reference = fused(**batch).logits
        torch.testing.assert_close(dropped(**batch).logits, reference, rtol=0, atol=0)
    for d in dropouts:
        d.p = 0.0  # an identity, but still a dropout module: the unfused path runs
    dropped.train(), fused.train()
    losses = [model(**batch).loss for model in (dropped, fused)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss.backward()
    grads = [{n: p.grad for n, p in model.named_parameters() if p.requires_grad} for model in (dropped, fused)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    for d in dropouts:
        d.p = 0.5
    dropped.zero_grad()
    logits = dropped(**batch).logits
    assert not torch.allclose(logits, reference)  # inputs to the adapters were dropped
    logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dropped.parameters() if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in dropped.parameters() if p.requires_grad)


def test_conv1d_gradient_and_merge_keep_zeros():
    torch.manual_seed(0)
    conv = Conv1D(12, 16)  # (d_in=16, d_out=12) storage
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) > 0.5).float())
    zeros = conv.weight == 0
    model = get_peft_model(
        nn.Sequential(conv), sparse_peft.SparseLoraConfig(r=2, target_modules=["0"], init_weights=False)
    )
    layer = model.base_model.model[0]
    x = torch.randn(4, 16)
    torch.testing.assert_close(model(x), x @ (conv.weight + layer.get_delta_weight("default").t()) + conv.bias)
    merged = model.merge_and_unload()
    assert (merged[0].weight[zeros] == 0).all()


def test_nm_mask_type_on_dense_base_merges_to_valid_nm():
    base = make_model("llama")  # dense
    model = get_peft_model(
        base, sparse_peft.SparseLoraConfig(r=4, mask_type="nm", nm_pattern="2:4", init_weights=False)
    )
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert is_nm(layer.get_mask("default"), 2, 4)
    merged = model.merge_and_unload()
    report = sparse_peft.sparsity_report(merged, nm_pattern="2:4")
    assert report.sparsity == 0.0  # the dense base keeps its values; only the delta is N:M
    delta = linear_weight(merged.model.layers[0].mlp.down_proj) - linear_weight(
        make_model("llama").model.layers[0].mlp.down_proj
    )
    assert is_nm(delta, 2, 4)


def test_custom_masks_are_used_and_survive_save_load(tmp_path):
    base = make_model("llama")
    make_sparse(base)
    model = get_peft_model(base, sparse_peft.SparseLoraConfig(r=4, mask_type="custom", init_weights=False))
    name = "model.layers.1.self_attn.q_proj"
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:4] = True
    sparse_peft.set_sparse_lora_masks(model, {name: mask})
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    delta = layer.get_delta_weight("default")
    assert (delta[4:] == 0).all() and (delta[:4] != 0).any()
    model.save_pretrained(tmp_path)
    fresh = make_model("llama")
    make_sparse(fresh)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(loaded.base_model.model.model.layers[1].self_attn.q_proj.get_mask("default"), mask)


def test_loading_onto_a_base_with_other_zeros_is_refused(tmp_path):
    base = make_model("llama")
    make_sparse(base, seed=0)
    get_peft_model(base, sparse_peft.SparseLoraConfig(r=4)).save_pretrained(tmp_path)
    other = make_model("llama")
    make_sparse(other, seed=1)
    with pytest.raises(ValueError, match="different zero pattern"):
        PeftModel.from_pretrained(other, tmp_path)


def test_bf16_merge_cycles_keep_zeros_exactly():
    base = make_model("llama", torch.bfloat16)
    make_sparse(base)
    zeros = (base.model.layers[0].mlp.up_proj.weight == 0).clone()
    model = get_peft_model(base, sparse_peft.SparseLoraConfig(r=4, init_weights=False))
    assert model.base_model.model.model.layers[0].mlp.up_proj.sparse_lora_A["default"].dtype == torch.float32
    for _ in range(5):
        model.merge_adapter()
        model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert (merged.model.layers[0].mlp.up_proj.weight[zeros] == 0).all()


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_bad_rank(bad):
    with pytest.raises(ValueError, match="SparseLoraConfig.r must be a positive integer"):
        sparse_peft.SparseLoraConfig(r=bad)


def test_bad_config_fields():
    with pytest.raises(ValueError, match="lora_dropout"):
        sparse_peft.SparseLoraConfig(lora_dropout=1.5)
    with pytest.raises(ValueError, match="mask_type"):
        sparse_peft.SparseLoraConfig(mask_type="magic")
    with pytest.raises(ValueError, match="needs nm_pattern"):
        sparse_peft.SparseLoraConfig(mask_type="nm")
    with pytest.raises(ValueError, match="0 < N < M"):
        sparse_peft.SparseLoraConfig(mask_type="nm", nm_pattern="4:4")
    with pytest.raises(ValueError, match="N:M pattern"):
        sparse_peft.SparseLoraConfig(mask_type="nm", nm_pattern="2-4")
    with pytest.raises(ValueError, match="exact_gradient must be True or False"):
        sparse_peft.SparseLoraConfig(exact_gradient="no")


def test_unknown_target_module():
    with pytest.raises(ValueError, match="not_a_module"):
        get_peft_model(make_model("llama"), sparse_peft.SparseLoraConfig(target_modules=["not_a_module"]))


def test_non_linear_target_names_the_module():
    with pytest.raises(TypeError, match=r"model\.embed_tokens.*Embedding"):
        get_peft_model(make_model("llama"), sparse_peft.SparseLoraConfig(target_modules=["embed_tokens"]))


def test_mask_of_wrong_shape():
    model = get_peft_model(make_model("llama"), sparse_peft.SparseLoraConfig(r=2, mask_type="custom"))
    with pytest.raises(ValueError, match=r"shape \(32, 64\).*\(d_out, d_in\)=\(32, 32\)"):
        sparse_peft.set_sparse_lora_masks(
            model, {"model.layers.0.self_attn.q_proj": torch.ones(32, 64, dtype=torch.bool)}
        )
    with pytest.raises(KeyError, match="matches no SparseLoRA module"):
        sparse_peft.set_sparse_lora_masks(model, {"nope": torch.ones(32, 32, dtype=torch.bool)})


def test_unknown_model_type_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules is not set"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), sparse_peft.SparseLoraConfig())


def test_nm_mask_type_needs_divisible_inputs():
    with pytest.raises(ValueError, match="divisible by 8"):
        get_peft_model(
            nn.Sequential(nn.Linear(12, 4)),
            sparse_peft.SparseLoraConfig(target_modules=["0"], mask_type="nm", nm_pattern="4:8"),
        )
