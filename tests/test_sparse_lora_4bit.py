"""SparseLoRA on bitsandbytes bases (NF4/FP4 Linear4bit, int8 Linear8bitLt), on CPU.

Zeros kept after steps and after merge, exact gradients through the dequantized weight, save/load, fingerprints,
TRL's SFTTrainer on a 4-bit Llama, and what bitsandbytes issue 2078 (in-place repacking on CPUs with AVX512-BF16)
does on this CPU. The guard against it, and the checks every tuner shares, are in test_quant.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

import transformers  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

import sparse_peft  # noqa: E402
from conftest import VOCAB, make_tokenizer  # noqa: E402
from sparse_peft.masks import pack_mask  # noqa: E402
from sparse_peft.tuners.sparse_lora import MaskedLoraLinearFn  # noqa: E402
from sparse_peft._quant import is_repacked_for_cpu  # noqa: E402


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


# ---------------------------------------------------------------------------------------------------------- helpers
def _pruned_linear(d_in=64, d_out=32, seed=0, bias=True) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_((torch.rand_like(lin.weight) > 0.5).float())  # 50% unstructured
        lin.weight[3] = 0  # a whole pruned row: an all-zero quantization block
    return lin


def _quantize(lin: nn.Linear, kind: str) -> nn.Module:
    """``lin`` as a CPU-quantized bitsandbytes layer of ``kind``."""
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=torch.float32,
            quant_type=kind[:3],
            compress_statistics=kind.endswith("double"),
        )
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")  # quantization happens here


def _dense(module: nn.Module) -> torch.Tensor:
    """The dequantized weight ``(d_out, d_in)`` of a bitsandbytes layer (or a SparseLoRA layer around one)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    w = base.weight
    if isinstance(base, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    scb = w.SCB if w.SCB is not None else base.state.SCB
    return bnb.functional.int8_vectorwise_dequant(w.data, scb)


def _wrap(kind: str, **kw):
    model = nn.Sequential(_quantize(_pruned_linear(), kind))
    config = sparse_peft.SparseLoraConfig(r=4, target_modules=["0"], init_weights=False, **kw)
    return get_peft_model(model, config), model


def _requantized(weight, dense: torch.Tensor, kind: str) -> torch.Tensor:
    """``dense`` quantized with ``weight``'s settings and dequantized again."""
    if kind == "int8":
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(dense.half())
        return bnb.functional.int8_vectorwise_dequant(cb, scb)
    q, state = bnb.functional.quantize_4bit(
        dense, blocksize=weight.blocksize, quant_type=weight.quant_type, compress_statistics=weight.compress_statistics
    )
    return bnb.functional.dequantize_4bit(q, state)


def _weight_bytes(module: nn.Module) -> tuple:
    w = module.weight
    return tuple(w.data.shape), w.data.clone(), getattr(w, "quant_state", None) and w.quant_state.absmax.clone()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny pruned Llama saved in fp32; each test reloads it quantized."""
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


def _load_4bit(path: Path, quant_type: str = "nf4") -> nn.Module:
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32
    )
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config, device_map="cpu")


def _projections(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


# ------------------------------------------------------------------------------------------- quantization and zeros
@pytest.mark.parametrize("kind", KINDS)
def test_pruned_zeros_survive_quantization_and_define_the_mask(kind):
    lin = _pruned_linear()
    q = _quantize(lin, kind)
    dense = _dense(q)
    assert (dense[lin.weight == 0] == 0).all()  # exact zero code in NF4, FP4 and int8
    assert not dense.isnan().any()  # the all-zero row (absmax 0) too
    model = get_peft_model(nn.Sequential(q), sparse_peft.SparseLoraConfig(r=2, target_modules=["0"]))
    # M = (dequantized W != 0): NF4 may also round tiny weights to 0, which M then excludes as well
    assert torch.equal(model.base_model.model[0].get_mask("default"), dense != 0)


def test_from_pretrained_quantizes_on_cpu(llama_dir):
    model = _load_4bit(llama_dir)
    assert model.is_loaded_in_4bit
    projections = _projections(model)
    assert len(projections) == 14 and all(type(m) is bnb.nn.Linear4bit for m in projections.values())
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4" for m in projections.values())


# -------------------------------------------------------------------------------------------- gradient and memory
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_equals_autograd_through_dequantized_weight(kind):
    model, _ = _wrap(kind)
    layer = model.base_model.model[0]
    a, b = layer.sparse_lora_A["default"], layer.sparse_lora_B["default"]
    w, m, s = _dense(layer), layer.get_mask("default"), layer.scaling["default"]
    bias = layer.get_base_layer().bias
    x = torch.randn(2, 5, 64, requires_grad=True)
    out = model(x)
    x_ref, a_ref, b_ref = (t.detach().clone().requires_grad_() for t in (x, a, b))
    ref = torch.nn.functional.linear(x_ref, w + s * m * (b_ref @ a_ref), bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, a, b], grad)
    want = torch.autograd.grad(ref, [x_ref, a_ref, b_ref], grad)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, atol=1e-4, rtol=1e-4)


def test_function_with_weight_getter_in_float64():
    """The recompute path of MaskedLoraLinearFn itself, exact in float64."""
    torch.manual_seed(0)
    w = torch.randn(12, 16, dtype=torch.float64)
    calls = []

    def getter():
        calls.append(1)
        return w.clone()

    mask = torch.rand(12, 16) > 0.5
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, 2, dtype=torch.float64, requires_grad=True)
    out = MaskedLoraLinearFn.apply(x, getter, None, (pack_mask(mask),), (12, 16), (0.5,), None, a, b)
    ref = torch.nn.functional.linear(x, w + 0.5 * mask * (b @ a))
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    for g, h in zip(torch.autograd.grad(out, [x, a, b], grad), torch.autograd.grad(ref, [x, a, b], grad)):
        torch.testing.assert_close(g, h)
    assert len(calls) == 2  # dequantized once in forward, once in backward


def test_backward_saves_no_dequantized_weight():
    model, _ = _wrap("nf4")
    x = torch.randn(3, 7, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x)
    assert not any(tuple(t.shape) == (32, 64) for t in saved), [tuple(t.shape) for t in saved]
    out.sum().backward()
    assert x.grad is not None


# ------------------------------------------------------------------------------------------------ training, merge
@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_keep_zeros_and_quantization_settings(kind):
    model, _ = _wrap(kind)
    layer = model.base_model.model[0]
    before = _dense(layer)
    zeros = before == 0
    old = layer.get_base_layer().weight
    old_bytes = old.data.clone()
    for _ in range(3):
        target = before + layer.get_delta_weight("default")  # W + s M ⊙ BA, (d_out, d_in)
        want = _requantized(old, target, kind)
        model.merge_adapter()
        merged = _dense(layer)
        assert (merged[zeros] == 0).all(), "merge revived a pruned weight"
        assert torch.equal(merged != 0, target != 0), "merge changed the zero pattern of W + s M ⊙ BA"
        # exactly "quantize(W + s M ⊙ BA)" with the layer's own settings, except where rounding would lose a non-zero
        kept = ~((want == 0) & (target != 0))
        assert torch.equal(merged[kept], want[kept])
        model.unmerge_adapter()  # exact: the quantized weight the merge replaced comes back, no drift over cycles
        assert torch.equal(layer.get_base_layer().weight.data, old_bytes)
        assert torch.equal(_dense(layer), before)
    model.merge_adapter()
    new = layer.get_base_layer().weight
    assert type(new) is type(old) and new.dtype == old.dtype and new.shape == old.shape
    if kind != "int8":
        assert (new.quant_type, new.blocksize, new.compress_statistics) == (
            old.quant_type,
            old.blocksize,
            old.compress_statistics,
        )
        assert new.quant_state.dtype == old.quant_state.dtype
        assert layer.get_base_layer().compute_dtype == torch.float32
    model.unmerge_adapter()
    unloaded = model.merge_and_unload()
    assert type(unloaded[0]) is type(layer.get_base_layer())
    assert (_dense(unloaded[0])[zeros] == 0).all()


def test_training_steps_keep_zeros_freeze_base_and_merge(llama_dir):
    model = get_peft_model(_load_4bit(llama_dir), sparse_peft.SparseLoraConfig(r=4, init_weights=False))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, sparse_peft.tuners.sparse_lora.SparseLoraLayer)}
    assert len(layers) == 14
    zeros = {n: _dense(m) == 0 for n, m in layers.items()}
    packed = {n: m.get_base_layer().weight.data.clone() for n, m in layers.items()}
    start = {n: m.sparse_lora_B["default"].detach().clone() for n, m in layers.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        for n, m in layers.items():  # effective weight W + s M ⊙ BA keeps every zero after every step
            eff = _dense(m) + m.get_delta_weight("default")
            assert (eff[zeros[n]] == 0).all()
    for n, m in layers.items():
        assert torch.equal(m.get_base_layer().weight.data, packed[n]), f"{n}: the 4-bit base changed"
        assert not torch.equal(m.sparse_lora_B["default"], start[n]), f"{n}: the adapter did not train"
    merged = model.merge_and_unload()
    for n, m in _projections(merged).items():
        assert (_dense(m)[zeros["base_model.model." + n]] == 0).all(), f"{n}: merge revived a zero"


# ----------------------------------------------------------------------------------------- save/load, fingerprint
def test_save_load_round_trip(llama_dir, tmp_path):
    model = get_peft_model(_load_4bit(llama_dir), sparse_peft.SparseLoraConfig(r=4, init_weights=False))
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_load_4bit(llama_dir), tmp_path / "adapter")
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want)
    got = {k: v for k, v in loaded.state_dict().items() if "sparse_lora_mask" in k or "fingerprint" in k}
    assert got and all(torch.equal(v, model.state_dict()[k]) for k, v in got.items())


def test_loading_onto_a_4bit_base_with_other_zeros_is_refused(llama_dir, tmp_path):
    get_peft_model(_load_4bit(llama_dir), sparse_peft.SparseLoraConfig(r=4)).save_pretrained(tmp_path)
    other = _load_4bit(llama_dir, quant_type="fp4")  # same fp32 base; FP4 rounds other small weights to zero
    with pytest.raises(ValueError, match="different zero pattern"):
        PeftModel.from_pretrained(other, tmp_path)


# ---------------------------------------------------------------------------------------------- bitsandbytes #2078
def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def test_bnb_2078_detector_on_a_bare_linear4bit():
    """Report what this CPU does: bnb repacks in place exactly when it detects AVX512-BF16."""
    bnb_says = bool(bnb.functional.has_avx512bf16())
    print(f"/proc/cpuinfo avx512_bf16: {_cpu_has_avx512_bf16()}; bitsandbytes has_avx512bf16(): {bnb_says}")
    q = _quantize(_pruned_linear(), "nf4").eval()
    dense = _dense(q)
    shape, data, absmax = _weight_bytes(q)
    with torch.no_grad():
        q(torch.randn(2, 64))
    repacked = is_repacked_for_cpu(q)
    assert repacked == bnb_says
    if repacked:  # the bug: bytes, shape and absmax changed in place, and the standard dequantization is wrong now
        assert tuple(q.weight.data.shape) != shape or not torch.equal(q.weight.data, data)
        assert not torch.equal(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state), dense)
    else:
        assert torch.equal(q.weight.data, data) and torch.equal(q.weight.quant_state.absmax, absmax)


# ------------------------------------------------------------------------------------------------------------ TRL
def _token_dataset(n=16, length=12):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, VOCAB - 3, (n,), generator=g)
    rows = [(torch.arange(length) + int(s)) % (VOCAB - 3) + 3 for s in starts]  # ids 3..VOCAB-1
    return Dataset.from_dict({"input_ids": [r.tolist() for r in rows]})


def test_sft_trainer_on_a_4bit_llama(llama_dir, tmp_path):
    from trl import SFTConfig, SFTTrainer

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
    config = sparse_peft.SparseLoraConfig(r=4, init_weights=False)
    trainer = SFTTrainer(
        model=_load_4bit(llama_dir),
        args=args,
        train_dataset=_token_dataset(),
        eval_dataset=_token_dataset(4),
        processing_class=make_tokenizer(),
        peft_config=config,
    )
    model = trainer.model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, sparse_peft.tuners.sparse_lora.SparseLoraLayer)}
    layer = next(iter(layers.values()))
    # TRL casts trainable params of a quantized model to bf16 (QLoRA recipe); buffers and ints are left alone
    assert layer.sparse_lora_A["default"].dtype == torch.bfloat16
    assert layer.sparse_lora_mask["default"].dtype == torch.uint8
    assert layer.sparse_lora_fingerprint["default"].dtype == torch.int64
    assert all(torch.equal(m.get_mask("default"), _dense(m) != 0) for m in layers.values())
    zeros = {n: _dense(m) == 0 for n, m in layers.items()}
    start = {n: m.sparse_lora_B["default"].detach().clone() for n, m in layers.items()}
    trainer.train()
    trainer.evaluate()  # eval/no-grad forwards: must not repack anything (bnb issue 2078)
    assert trainer.state.global_step == 3
    assert not any(is_repacked_for_cpu(m) for m in _projections(model).values())
    assert sum(not torch.equal(m.sparse_lora_B["default"], start[n]) for n, m in layers.items()) == len(layers)
    for n, m in layers.items():
        assert ((_dense(m) + m.get_delta_weight("default"))[zeros[n]] == 0).all()
    merged = model.merge_and_unload()
    for n, m in _projections(merged).items():
        assert (_dense(m)[zeros["base_model.model." + n]] == 0).all()


def test_fp32_adapters_restored_after_trl_cast_train(llama_dir):
    """Casting the adapters back to fp32 after TRL's bf16 cast (before train()) keeps fp32 training working."""
    model = get_peft_model(_load_4bit(llama_dir), sparse_peft.SparseLoraConfig(r=4, init_weights=False))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)  # what SFTTrainer does
    model.train()
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()  # bf16 adapters: delta still built in fp32, grads in bf16
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert layer.sparse_lora_A["default"].grad.dtype == torch.bfloat16
    for p in model.parameters():
        if p.requires_grad:
            p.data, p.grad = p.data.float(), None
    model(input_ids=ids, labels=ids).loss.backward()
    assert layer.sparse_lora_A["default"].grad.dtype == torch.float32


def test_prepare_model_for_kbit_training_then_sparse_lora(llama_dir):
    from peft import prepare_model_for_kbit_training

    base = prepare_model_for_kbit_training(_load_4bit(llama_dir), use_gradient_checkpointing=True)
    model = get_peft_model(base, sparse_peft.SparseLoraConfig(r=4, init_weights=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("sparse_lora_" in n for n in trainable)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_autocast_bf16_backward_on_an_fp32_linear():
    """SFTConfig defaults to bf16=True, i.e. CPU autocast: grad_out arrives in bf16 while x is fp32."""
    base = nn.Sequential(_pruned_linear())
    model = get_peft_model(base, sparse_peft.SparseLoraConfig(r=4, target_modules=["0"], init_weights=False))
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    layer = model.base_model.model[0]
    assert x.grad.dtype == torch.float32 and layer.sparse_lora_A["default"].grad.dtype == torch.float32
