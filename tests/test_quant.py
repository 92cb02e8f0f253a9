"""Every tuner on bitsandbytes bases (NF4/FP4 Linear4bit with and without double quantization, int8 Linear8bitLt),
on CPU: training, merges that keep the zero pattern through re-quantization, exact unmerge, save/load, merging an
adapter trained on the quantized copy into the full-precision model, the sparsity tools on quantized models, the
guard against bitsandbytes issue 2078 for all three tuners, and clear errors for unsupported quantization.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

import transformers  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

import sparse_peft  # noqa: E402
from conftest import VOCAB, make_tokenizer  # noqa: E402
from sparse_peft import _quant  # noqa: E402
from sparse_peft.training.callbacks import SparsityCallback  # noqa: E402


def _bnb_runs_on_cpu() -> str:
    try:
        q, state = bnb.functional.quantize_4bit(torch.ones(8, 64), blocksize=64, quant_type="nf4")
        bnb.functional.dequantize_4bit(q, state)
    except Exception as exc:  # a build without CPU support
        return f"{type(exc).__name__}: {exc}"
    return ""


_REASON = _bnb_runs_on_cpu()
pytestmark = [
    pytest.mark.skipif(bool(_REASON), reason=f"bitsandbytes cannot quantize on this CPU ({_REASON})"),
    pytest.mark.filterwarnings("ignore:Merging SparseLoRA into a 4-bit base"),
]

KINDS = ["nf4", "fp4", "nf4-double", "int8"]
TUNERS = ["sparse_lora", "spiel", "s2ft"]
PREFIX = {"sparse_lora": "sparse_lora_", "spiel": "spiel_", "s2ft": "s2ft_"}


# ---------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny 50%-pruned Llama saved in fp32; tests load it quantized (or not) from here."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_((torch.rand_like(p) > 0.5).float())
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


def _load(path: Path, kind: str = "nf4") -> nn.Module:
    if kind == "fp32":
        return transformers.AutoModelForCausalLM.from_pretrained(path)
    if kind == "int8":
        quant = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    else:
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=kind[:3],
            bnb_4bit_use_double_quant=kind.endswith("double"),
            bnb_4bit_compute_dtype=torch.float32,
        )
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")


def _config(tuner: str, **kw):
    if tuner == "sparse_lora":
        return sparse_peft.SparseLoraConfig(r=4, init_weights=False, **kw)
    if tuner == "spiel":  # drop-and-grow after step 2 (SEFT on this sparse base): revivals and partner kills
        return sparse_peft.SpielConfig(r=2, init_weights=False, reselection_steps=2, accumulation_steps=1, **kw)
    return sparse_peft.S2FTConfig(heads_ratio=0.25, channels_ratio=0.1, init_weights=False, **kw)


def _dense(module: nn.Module) -> torch.Tensor:
    """The dequantized weight ``(d_out, d_in)`` of a bitsandbytes layer (or of a tuner layer around one), computed
    with bitsandbytes directly, not through sparse_peft."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    w = base.weight
    if isinstance(base, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    scb = w.SCB if w.SCB is not None else base.state.SCB
    return bnb.functional.int8_vectorwise_dequant(w.data, scb)


def _layers(model: nn.Module) -> dict[str, BaseTunerLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "get_delta_weight")}


def _quantized(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def _trainable(layer) -> torch.Tensor:
    for name in ("sparse_lora_B", "spiel_values", "s2ft_delta"):
        if hasattr(layer, name):
            return getattr(layer, name)["default"]
    raise AssertionError(type(layer))


def _ids(seed: int = 0, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _train(model: nn.Module, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        ids = _ids(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _check_pattern(tuner: str, effective: torch.Tensor, base: torch.Tensor, where: str) -> None:
    """SparseLoRA and S²FT keep every zero of the base; SpIEL in SEFT mode keeps the exact number of non-zeros."""
    if tuner == "spiel":
        assert int((effective != 0).sum()) == int((base != 0).sum()), f"{where}: non-zero count changed"
    else:
        assert (effective[base == 0] == 0).all(), f"{where}: a pruned weight came back"


# ----------------------------------------------------------------------------------------- the shared quant module
@pytest.mark.parametrize("kind", KINDS)
def test_logical_shape_and_weight_never_come_from_packed_storage(llama_dir, kind):
    model = _load(llama_dir, kind)
    o_proj = model.model.layers[0].self_attn.o_proj
    down = model.model.layers[0].mlp.down_proj
    if kind != "int8":
        assert tuple(o_proj.weight.shape) == (64 * 64 // 2, 1)  # what the code used to read: 1 input feature
    assert _quant.logical_shape(o_proj) == (64, 64) and _quant.logical_shape(down) == (64, 128)
    assert sparse_peft._layout.linear_shape(down) == (64, 128)
    assert torch.equal(sparse_peft._layout.linear_weight(down), _dense(down))


def _block_growing_merge(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A quantized layer and a new dense weight whose larger absmax makes plain rounding lose small non-zeros."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.mul_((torch.rand_like(lin.weight) > 0.5).float())
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(
            64, 32, bias=False, quant_type=kind[:3], compress_statistics=kind.endswith("double"), compute_dtype=None
        )
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")
    new = _dense(q).clone()
    new[:, 0] = 3 * new.abs().max()  # every block (a row here) and every row gets a larger absmax
    return q, new


@pytest.mark.parametrize("kind", KINDS)
def test_requantize_keeps_the_zero_pattern_where_plain_rounding_would_not(kind):
    q, new = _block_growing_merge(kind)
    old_bytes = q.weight.data.clone()
    before = _dense(q)
    plain = _quant._dequantized(q, _quant._quantize(q, new.to(before.dtype if kind != "int8" else torch.float16)))
    assert ((plain == 0) & (new != 0)).any(), "precondition: plain re-quantization loses small non-zeros here"
    handle = _quant.requantize(q, new)
    merged = _dense(q)
    assert torch.equal(merged != 0, new != 0)  # every zero kept, every non-zero kept
    lifted = (plain == 0) & (new != 0)
    assert torch.equal(merged[~lifted], plain[~lifted])  # elsewhere exactly what plain re-quantization gives
    assert (merged[lifted].abs() <= (merged.abs().amax() / 10)).all()  # lifted ones sit on the smallest codes
    _quant.restore(q, handle)
    assert torch.equal(q.weight.data, old_bytes) and torch.equal(_dense(q), before)


def test_requantize_that_cannot_keep_the_pattern_leaves_the_layer_unchanged():
    q, _ = _block_growing_merge("int8")
    old_bytes = q.weight.data.clone()
    new = _dense(q).clone()
    new[5] = torch.where(new[5] != 0, torch.full_like(new[5], 1e-12), new[5])  # a row below fp16's smallest value
    with pytest.raises(RuntimeError, match="zero pattern.*unchanged"):
        _quant.requantize(q, new, "layer.5")
    assert torch.equal(q.weight.data, old_bytes)


# ------------------------------------------------------------------------------ training and merging on every base
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tuner", TUNERS)
def test_train_merge_unmerge_keep_the_pattern_and_the_quantized_settings(llama_dir, tuner, kind):
    model = get_peft_model(_load(llama_dir, kind), _config(tuner))
    layers = _layers(model)
    assert len(layers) == (4 if tuner == "s2ft" else 14)
    before = {n: _dense(m) for n, m in layers.items()}
    packed = {n: m.get_base_layer().weight.data.clone() for n, m in layers.items()}
    start = {n: _trainable(m).detach().clone() for n, m in layers.items()}
    _train(model)
    if tuner == "spiel":
        assert model.base_model.spiel_stats()["reselections"] == 1
    effective = {}
    for n, m in layers.items():  # training: the base is frozen, the adapter moved, the pattern holds
        assert torch.equal(m.get_base_layer().weight.data, packed[n]), f"{n}: the quantized base changed"
        assert not torch.equal(_trainable(m), start[n]), f"{n}: the adapter did not train"
        effective[n] = before[n] + m.get_delta_weight("default")  # (d_out, d_in)
        _check_pattern(tuner, effective[n], before[n], n)
    old = {n: m.get_base_layer().weight for n, m in layers.items()}
    model.merge_adapter()  # dequantize, apply, re-quantize with the layer's settings, keeping the zero pattern
    for n, m in layers.items():
        merged = _dense(m)
        assert torch.equal(merged != 0, effective[n] != 0), f"{n}: merge changed the zero pattern"
        assert (merged - effective[n]).norm() < (before[n] - effective[n]).norm(), f"{n}: the adapter was not merged"
        new, w = m.get_base_layer().weight, old[n]
        assert type(new) is type(w) and new.dtype == w.dtype
        if kind != "int8":
            same = ("quant_type", "blocksize", "compress_statistics", "quant_storage")
            assert all(getattr(new, a) == getattr(w, a) for a in same)
            assert new.quant_state.dtype == w.quant_state.dtype
    model.unmerge_adapter()  # exact: the replaced quantized weights come back
    for n, m in layers.items():
        assert torch.equal(m.get_base_layer().weight.data, packed[n]) and torch.equal(_dense(m), before[n]), n
    merged = model.merge_and_unload()
    for n, m in _quantized(merged).items():
        key = "base_model.model." + n
        if key in effective:
            assert type(m) is type(layers[key].get_base_layer())
            assert torch.equal(_dense(m) != 0, effective[key] != 0), n


@pytest.mark.parametrize("tuner", TUNERS)
def test_adapter_shapes_come_from_the_logical_shape(llama_dir, tuner):
    model = get_peft_model(_load(llama_dir, "nf4"), _config(tuner))
    attn = model.base_model.model.model.layers[0].self_attn
    mlp = model.base_model.model.model.layers[0].mlp
    if tuner == "sparse_lora":
        assert attn.o_proj.sparse_lora_A["default"].shape == (4, 64)
        assert mlp.down_proj.sparse_lora_B["default"].shape == (64, 4)
    elif tuner == "spiel":
        assert attn.o_proj.spiel_values["default"].numel() == 2 * (64 + 64)
        assert mlp.down_proj.spiel_values["default"].numel() == 2 * (128 + 64)
    else:
        assert attn.o_proj.s2ft_delta["default"].shape == (64, 16)  # one of 4 heads of head_dim 16
        assert mlp.down_proj.s2ft_delta["default"].shape == (64, 13)  # 10% of 128 channels
    assert (mlp.down_proj.out_features, mlp.down_proj.in_features) == (64, 128)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("tuner", TUNERS)
def test_save_load_round_trip(llama_dir, tmp_path, tuner, kind):
    model = get_peft_model(_load(llama_dir, kind), _config(tuner))
    _train(model, steps=3)
    model.eval()
    ids = _ids(7)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_load(llama_dir, kind), tmp_path / "adapter")
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=0)
    mine = {k: v for k, v in model.state_dict().items() if PREFIX[tuner] in k}
    theirs = loaded.state_dict()
    assert mine and all(torch.equal(v, theirs[k]) for k, v in mine.items())


# ------------------------------------------------------------------------------- merge into the full-precision base
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("tuner", TUNERS)
def test_adapter_trained_on_the_quantized_copy_merges_into_the_full_precision_model(llama_dir, tmp_path, tuner, kind):
    quantized = get_peft_model(_load(llama_dir, kind), _config(tuner))
    _train(quantized)
    quantized.save_pretrained(tmp_path / "adapter")
    fp = _load(llama_dir, "fp32")
    original = {n: m.weight.detach().clone() for n, m in fp.named_modules() if n.endswith("proj")}
    rounded = {n.removesuffix(".base_layer"): _dense(m) == 0 for n, m in _quantized(quantized.base_model.model).items()}
    extra = sum(int((rounded[n] & (original[n] != 0)).sum()) for n in rounded)
    assert extra > 0, "precondition: quantization rounded some kept weights to zero"

    loaded = PeftModel.from_pretrained(fp, tmp_path / "adapter")  # refused before: the zero patterns differ
    indices = {n.removeprefix("base_model.model."): m for n, m in _layers(loaded).items()}
    merged = loaded.merge_and_unload()
    changed = 0
    for n, w0 in original.items():
        w = dict(merged.named_modules())[n].weight.detach()
        changed += int(not torch.equal(w, w0))
        if tuner == "spiel":  # SEFT: the full-precision model's non-zero count per module, exactly
            assert int((w != 0).sum()) == int((w0 != 0).sum()), n
            revived = ((w != 0) & (w0 == 0)).reshape(-1).nonzero().squeeze(1)
            assert torch.isin(revived, indices[n].spiel_indices["default"].long()).all(), f"{n}: zero moved by itself"
        else:  # every pruned zero of the full-precision model stays zero
            assert (w[w0 == 0] == 0).all(), f"{n}: merge revived a pruned weight"
    assert changed > 0


@pytest.mark.parametrize("tuner", TUNERS)
def test_loading_onto_a_full_precision_model_it_was_not_made_from_is_refused(llama_dir, tmp_path, tuner):
    quantized = get_peft_model(_load(llama_dir, "nf4"), _config(tuner))
    quantized.save_pretrained(tmp_path / "adapter")
    other = _load(llama_dir, "fp32")
    with torch.no_grad():  # prune a few more weights of every projection: another sparse model
        for n, m in other.named_modules():
            if n.endswith("proj"):
                m.weight[:, :2] = 0
    with pytest.raises(ValueError, match="different zero pattern.*quantized base"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")


@pytest.mark.parametrize("tuner", TUNERS)
def test_full_precision_adapter_on_a_quantized_base_is_refused_with_the_reason(llama_dir, tmp_path, tuner):
    get_peft_model(_load(llama_dir, "fp32"), _config(tuner)).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="different zero pattern.*this base is quantized"):
        PeftModel.from_pretrained(_load(llama_dir, "nf4"), tmp_path / "adapter")


# -------------------------------------------------------------------------------------------- TRL's bf16 cast
@pytest.mark.parametrize("tuner", ["spiel", "s2ft"])
def test_sft_trainer_casts_values_not_indices_and_training_keeps_the_pattern(llama_dir, tmp_path, tuner):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [[3 + (start + i) % (VOCAB - 3) for i in range(12)] for start in range(0, 64, 4)]
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=16,
        dataset_num_proc=None,
        eval_strategy="no",
    )
    trainer = SFTTrainer(
        model=_load(llama_dir, "nf4"),
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        eval_dataset=Dataset.from_dict({"input_ids": rows[:4]}),
        processing_class=make_tokenizer(),
        peft_config=_config(tuner),
    )
    layers = _layers(trainer.model)
    for m in layers.values():  # TRL casts trainable parameters of a quantized model to bf16; integers are kept
        assert _trainable(m).dtype == torch.bfloat16
        index = m.spiel_indices["default"] if tuner == "spiel" else m.s2ft_index["default"]
        assert index.dtype in (torch.int32, torch.int64)
    base = {n: _dense(m) for n, m in layers.items()}
    start = {n: _trainable(m).detach().clone() for n, m in layers.items()}
    trainer.train()
    trainer.evaluate()  # no-grad eval forwards: nothing may be repacked (bitsandbytes issue 2078)
    assert not any(_quant.is_repacked_for_cpu(m) for m in _quantized(trainer.model).values())
    for n, m in layers.items():
        assert not torch.equal(_trainable(m), start[n]), n
        _check_pattern(tuner, base[n] + m.get_delta_weight("default"), base[n], n)
    merged = trainer.model.merge_and_unload()
    for n, m in _quantized(merged).items():
        if "base_model.model." + n in base:
            _check_pattern(tuner, _dense(m), base["base_model.model." + n], n)


# ---------------------------------------------------------------------------------------------- sparsity tools
@pytest.mark.parametrize("kind", KINDS)
def test_sparsity_report_reads_the_dequantized_weights(llama_dir, kind):
    model = _load(llama_dir, kind)
    report = sparse_peft.sparsity_report(model, nm_pattern="2:4")
    rows = {r.name: r for r in report.modules}
    quantized = _quantized(model)
    assert set(rows) == set(quantized) and len(rows) == 14
    for n, m in quantized.items():
        w = _dense(m)
        assert rows[n].shape == tuple(w.shape) and rows[n].numel == w.numel()
        assert rows[n].zeros == int((w == 0).sum())
    assert 0.45 < report.sparsity < 0.7 and report.nm_valid is False


@pytest.mark.parametrize("tuner", TUNERS)
def test_sparsity_callback_on_a_quantized_base(llama_dir, tuner):
    model = get_peft_model(_load(llama_dir, "nf4"), _config(tuner))
    callback = SparsityCallback(check_every=1)
    callback.on_train_begin(None, None, None, model=model)  # used to fail on the packed weight's shape
    _train(model)
    stats = callback.check(model)
    assert stats["sparsity/excess_nnz"] == 0
    if tuner != "spiel":
        assert stats["sparsity/revived"] == 0
    layer = next(iter(_layers(model).values()))  # and it does see a violation: a dense weight under the adapter
    _quant.requantize(layer.get_base_layer(), torch.randn(layer.out_features, layer.in_features))
    stats = callback.check(model)
    assert stats["sparsity/revived"] > 0 and stats["sparsity/excess_nnz"] > 0


@pytest.mark.parametrize("tuner", TUNERS)
def test_zero_masks_and_verify_on_a_quantized_model(llama_dir, tuner):
    from sparse_peft.pipeline import verify, zero_masks

    model = get_peft_model(_load(llama_dir, "nf4"), _config(tuner))
    zeros = zero_masks(model)
    assert all(tuple(z.shape) in {(64, 64), (32, 64), (128, 64), (64, 128)} for z in zeros.values())
    _train(model)
    merged = model.merge_and_unload()
    result = verify(merged, zeros)
    assert result.ok and result.nnz_after <= result.nnz_before
    if tuner != "spiel":
        assert result.revived == 0


def test_pruning_refuses_to_write_into_a_quantized_model(llama_dir):
    from sparse_peft.pruning import apply_masks, get_masks, prune

    model = _load(llama_dir, "nf4")
    with pytest.raises(TypeError, match=r"prune writes weights in place.*quantized.*full-precision"):
        prune(model, "magnitude", 0.6, progress=False)
    masks = get_masks(model)  # reading works: logical (d_out, d_in) masks
    assert masks["model.layers.0.mlp.down_proj"].shape == (64, 128)
    with pytest.raises(TypeError, match="apply_masks writes weights in place"):
        apply_masks(model, masks)


def test_s2ft_gradient_selection_on_a_quantized_model_names_the_alternative(llama_dir):
    model = _load(llama_dir, "nf4")
    config = sparse_peft.S2FTConfig(heads_ratio=0.25, channels_ratio=0.1, strategy="gradient")
    ids = _ids()
    with pytest.raises(ValueError, match="full-precision model"):
        sparse_peft.s2ft_select(model, config, {"input_ids": ids, "labels": ids})


# ------------------------------------------------------------------------------------------ bitsandbytes #2078
def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.mark.skipif(
    not _cpu_has_avx512_bf16(), reason="the CPU has no AVX512-BF16 (/proc/cpuinfo): bnb #2078 cannot occur"
)
def test_bnb_2078_reproduces_on_this_cpu(llama_dir):
    """The bug itself: a bare 4-bit model's no-grad eval forward repacks its weights in place."""
    model = _load(llama_dir, "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    before, data = _dense(layer), layer.weight.data.clone()
    model.eval()
    with torch.no_grad():
        model(input_ids=_ids())
    assert _quant.is_repacked_for_cpu(layer)
    assert not torch.equal(layer.weight.data, data) or tuple(layer.weight.data.shape) != tuple(data.shape)
    assert not torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state), before)
    for tuner in TUNERS:  # every tuner refuses the repacked weight instead of training on it
        with pytest.raises(RuntimeError, match="issue 2078"):
            get_peft_model(model, _config(tuner))


@pytest.mark.parametrize("tuner", TUNERS)
def test_guard_no_grad_eval_forward_repacks_nothing(llama_dir, tuner):
    """After get_peft_model no Linear4bit is repacked, adapted or not (on this CPU too)."""
    targets = ["q_proj", "down_proj"] if tuner != "s2ft" else ["o_proj"]
    model = get_peft_model(_load(llama_dir, "nf4"), _config(tuner, target_modules=targets))
    quantized = _quantized(model)
    before = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for n, m in quantized.items()}
    assert all(not m.support_avx512bf16_for_cpu for m in quantized.values())
    model.eval()
    ids = _ids(shape=(1, 6))
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
        with model.disable_adapter():
            model(input_ids=ids)
        model.merge_adapter()
        model(input_ids=ids)
        model.unmerge_adapter()
    for n, m in quantized.items():
        assert not _quant.is_repacked_for_cpu(m), n
        assert torch.equal(m.weight.data, before[n][0]) and torch.equal(m.weight.quant_state.absmax, before[n][1]), n
    _train(model, steps=1)  # gradients still reach the first layer's adapters through unadapted 4-bit layers
    first = next(iter(_layers(model).values()))
    assert _trainable(first).grad is None  # zeroed by the optimizer step...
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert _trainable(first).grad.abs().sum() > 0  # ...and non-zero after a backward


def test_guard_s2ft_select_on_a_bare_quantized_model(llama_dir):
    model = _load(llama_dir, "nf4")
    config = sparse_peft.S2FTConfig(heads_ratio=0.25, channels_ratio=0.1, strategy="activation")
    config = sparse_peft.s2ft_select(model, config, {"input_ids": _ids()})  # no-grad eval forwards
    assert not any(_quant.is_repacked_for_cpu(m) for m in _quantized(model).values())
    model = get_peft_model(model, config)  # and the weights are still usable
    assert len(_layers(model)) == 4


def _repack(module: nn.Module) -> None:
    """What bitsandbytes' CPU inference path does to a Linear4bit on an AVX512-BF16 CPU (pure PyTorch, any CPU)."""
    w = module.weight
    w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu(w.data, w.quant_state)


@pytest.mark.parametrize("tuner", TUNERS)
def test_guard_refuses_a_weight_repacked_before_wrapping(llama_dir, tuner):
    model = _load(llama_dir, "nf4")
    _repack(model.model.layers[1].mlp.up_proj)  # not even a target of S²FT: still refused
    with pytest.raises(RuntimeError, match=r"'model\.layers\.1\.mlp\.up_proj'.*issue 2078.*reload"):
        get_peft_model(model, _config(tuner))


@pytest.mark.parametrize("tuner", TUNERS)
def test_guard_a_weight_repacked_after_wrapping_fails_loudly(llama_dir, tuner):
    model = get_peft_model(_load(llama_dir, "nf4"), _config(tuner))
    _repack(model.base_model.model.model.layers[0].self_attn.o_proj.get_base_layer())
    ids = _ids()
    with pytest.raises(RuntimeError, match=r"self_attn\.o_proj.*issue 2078"):
        model(input_ids=ids, labels=ids)
    with pytest.raises(RuntimeError, match="issue 2078"):
        model.merge_adapter()


# ------------------------------------------------------------------------------------- unsupported quantization
class _GPTQLikeLinear(nn.Module):
    """The storage of a GPTQ/AWQ layer (packed int32 ``qweight``, ``scales``), as another quantizer leaves it."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.register_buffer("qweight", torch.zeros(d_in // 8, d_out, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(1, d_out, dtype=torch.float16))


def _swap_o_proj(model: nn.Module, kind: str) -> None:
    attn = model.model.layers[0].self_attn
    if kind == "float8":
        attn.o_proj.weight.data = attn.o_proj.weight.data.to(torch.float8_e4m3fn)
    else:
        attn.o_proj = _GPTQLikeLinear(64, 64)


@pytest.mark.parametrize("tuner", TUNERS)
def test_8bit_with_an_outlier_threshold_is_refused_naming_the_fix(llama_dir, tuner):
    quant = transformers.BitsAndBytesConfig(load_in_8bit=True)  # transformers' default llm_int8_threshold=6.0
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=quant, device_map="cpu")
    with pytest.raises(TypeError, match=r"'model\.layers\.0\..*threshold=6.*Supported: .*llm_int8_threshold=0\.0"):
        get_peft_model(model, _config(tuner))


@pytest.mark.parametrize("how", ["float8", "gptq_like"])
@pytest.mark.parametrize("tuner", TUNERS)
def test_another_quantizer_is_refused_naming_the_module_and_what_is_supported(llama_dir, tuner, how):
    model = _load(llama_dir, "fp32")
    _swap_o_proj(model, how)
    reason = "float8_e4m3fn" if how == "float8" else "'qweight'"
    with pytest.raises(TypeError, match=rf"'model\.layers\.0\.self_attn\.o_proj'.*{reason}.*Supported: .*Linear4bit"):
        get_peft_model(model, _config(tuner, target_modules=["o_proj"]))
