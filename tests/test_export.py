"""Export: compact sparse checkpoints (round trips, size, safety), verify, semi-structured 2:4 and the CLI."""

from __future__ import annotations

import json
import os
import struct
import weakref
from pathlib import Path

import pytest
import torch
import transformers

from conftest import make_model, make_sparse, make_tokenizer, prunable
from sparse_peft import SparsityError, verify
from sparse_peft.export import (
    SemiStructuredUnavailable,
    SparseCheckpointError,
    load_sparse,
    read_manifest,
    save_sparse,
    semi_structured_plan,
    to_semi_structured,
)
from sparse_peft.export import _codec, semi_structured
from sparse_peft.masks import nm_mask, pack_mask
from sparse_peft.pruning import get_masks, prune, save_masks
from sparse_peft.pruning.report import linear_weight

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, for bit-exact comparisons (``torch.equal`` says ``-0.0 == 0.0``)."""
    t = t.detach().contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bit_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(bits(sa[k]), bits(sb[k])), f"{k} differs"


def odd_llama(dtype=torch.float32) -> torch.nn.Module:
    """Every dimension odd or not a multiple of 8 (numel of each weight too)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=123,
        hidden_size=39,
        intermediate_size=53,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=10,
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def plant_specials(model: torch.nn.Module) -> None:
    """A -0.0 and a +0.0 among the zeros, and a NaN with a payload, in the first prunable weight."""
    w = linear_weight(next(iter(prunable(model).values())))
    with torch.no_grad():
        zero = (w == 0).nonzero()
        w[tuple(zero[0])] = -0.0
        w[tuple(zero[1])] = 0.0
        nan = torch.tensor([0x7FC1 if w.element_size() == 2 else 0x7FC00001], dtype=bits(w).dtype)
        w.view(bits(w).dtype)[0, 0] = nan[0]


# ---- round trips --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_round_trip_is_bit_exact(family, dtype, tmp_path):
    model = make_model(family, dtype)
    make_sparse(model, 0.6)
    plant_specials(model)
    tokenizer = make_tokenizer()
    summary = save_sparse(model, tmp_path / "ck", tokenizer=tokenizer)
    assert summary.bitmask_tensors == len(prunable(model))  # the sparse weights are stored compactly

    loaded, tok = load_sparse(tmp_path / "ck", return_tokenizer=True)
    assert type(loaded) is type(model)
    assert_bit_identical(model, loaded)
    model.save_pretrained(tmp_path / "dense")  # the config is the one save_pretrained writes, byte for byte
    assert (tmp_path / "ck" / "config.json").read_text() == (tmp_path / "dense" / "config.json").read_text()
    from_dense = transformers.AutoConfig.from_pretrained(tmp_path / "dense").to_dict()
    assert loaded.config.to_dict() | {"_name_or_path": ""} == from_dense | {"_name_or_path": ""}
    assert tok("w1 w2 w3")["input_ids"] == tokenizer("w1 w2 w3")["input_ids"]
    if family == "gpt2":  # tied embeddings are stored once and stay tied
        assert "lm_head.weight" in read_manifest(tmp_path / "ck")["aliases"]
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # buffers that are not in the state dict (rotary) come back too
        model.eval()
        a, b = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_shapes_not_multiples_of_8(dtype, tmp_path):
    model = odd_llama(dtype)
    make_sparse(model, 0.5)
    plant_specials(model)
    assert all(linear_weight(m).numel() % 8 for m in prunable(model).values())
    save_sparse(model, tmp_path / "ck")
    assert_bit_identical(model, load_sparse(tmp_path / "ck"))
    assert load_sparse(tmp_path / "ck").generation_config.to_dict() == model.generation_config.to_dict()


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 13), (2, 8), (1, 9)])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_codec_round_trip(shape, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g).to(dtype)
    w[torch.rand(shape, generator=g) < 0.5] = 0.0
    w[torch.rand(shape, generator=g) < 0.2] = -0.0
    parts = _codec.encode(w)
    nnz = int((w != 0).sum())
    assert parts["mask"].numel() == -(-w.numel() // 8) and parts["values"].numel() == nnz
    assert torch.equal(parts["mask"], pack_mask(w != 0))  # the bit layout of sparse_peft.masks
    keep = _codec.unpack_bits(parts["mask"])[: w.numel()]
    negative = _codec.unpack_bits(parts["signs"])[: w.numel() - nnz] if "signs" in parts else None
    out = _codec.decode(keep, parts["values"], shape, negative)
    assert out.dtype == dtype and torch.equal(bits(out), bits(w))


@pytest.mark.parametrize("m", [4, 8, 16])
def test_max_group_count_matches_a_reshape_sum(m):
    g = torch.Generator().manual_seed(m)
    for _ in range(20):
        keep = torch.rand(6, 8 * m, generator=g) < torch.rand(1, generator=g)
        assert _codec.max_group_count(keep, m) == int(keep.reshape(6, -1, m).sum(-1).max())


def test_round_trip_keeps_a_tensor_in_another_dtype(tmp_path):
    """A bf16 model with an fp32 norm (mixed precision): each tensor comes back in its own dtype."""
    model = make_model("llama", torch.bfloat16)
    make_sparse(model, 0.5)
    model.model.norm.float()
    save_sparse(model, tmp_path / "ck")
    loaded = load_sparse(tmp_path / "ck")
    assert loaded.model.norm.weight.dtype == torch.float32 and loaded.model.layers[0].mlp.up_proj.weight.dtype == (
        torch.bfloat16
    )
    assert_bit_identical(model, loaded)


@pytest.mark.cuda
def test_load_onto_the_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = make_model("gpt2", torch.float16)
    make_sparse(model, 0.5)
    save_sparse(model.cuda(), tmp_path / "ck")  # saving from the GPU too
    loaded = load_sparse(tmp_path / "ck", device="cuda")
    assert loaded.transformer.h[0].attn.c_attn.weight.device.type == "cuda"
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert_bit_identical(model.cpu(), loaded.cpu())


def test_sharded_write_and_load(tmp_path):
    model = make_model("llama")
    make_sparse(model, 0.5)
    summary = save_sparse(model, tmp_path / "ck", max_shard_size="4KB")
    assert len(summary.files) > 3
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.safetensors")) == sorted(summary.files)
    assert summary.files[0].endswith(f"-of-{len(summary.files):05d}.safetensors")
    assert_bit_identical(model, load_sparse(tmp_path / "ck"))
    with pytest.raises(ValueError, match="max_shard_size"):
        save_sparse(model, tmp_path / "x", max_shard_size="lots")


def test_size_goal_on_a_real_shaped_model(tmp_path):
    """SmolLM2's layer shapes in bf16, magnitude-pruned: the pruned Linears take <= 0.6x their save_pretrained bytes,
    and a model that is mostly such Linears <= 0.6x on disk as a whole; 2:4 the same, 70% far less."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    ratios = {}
    for label, kw in {"50%": dict(sparsity=0.5), "2:4": dict(pattern="2:4"), "70%": dict(sparsity=0.7)}.items():
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
        prune(model, "magnitude", progress=False, **kw)
        model.save_pretrained(tmp_path / f"dense{label[0]}")
        dense = (tmp_path / f"dense{label[0]}" / "model.safetensors").stat().st_size
        summary = save_sparse(model, tmp_path / f"sparse{label[0]}")
        on_disk = sum((tmp_path / f"sparse{label[0]}" / f).stat().st_size for f in summary.files)
        ratios[label] = (
            summary.linear_ratio,
            (on_disk + (tmp_path / f"sparse{label[0]}" / "sparse_manifest.json").stat().st_size) / dense,
        )
        assert summary.bitmask_tensors == 14
    assert ratios["50%"][0] <= 0.6 and ratios["50%"][1] <= 0.6, ratios
    assert ratios["2:4"][0] <= 0.6 and ratios["2:4"][1] <= 0.6, ratios
    assert ratios["70%"][0] <= 0.45 and ratios["70%"][1] <= 0.45, ratios


def test_only_weights_that_shrink_are_bitmask_encoded(tmp_path):
    model = make_model("llama")
    make_sparse(model, 0.02)  # too dense: a bitmask would cost more than it saves
    summary = save_sparse(model, tmp_path / "ck")
    assert summary.bitmask_tensors == 0
    assert {r["encoding"] for r in read_manifest(tmp_path / "ck")["tensors"].values()} == {"dense"}
    assert_bit_identical(model, load_sparse(tmp_path / "ck"))


def test_nm_pattern_is_recorded(tmp_path):
    model = make_model("llama")
    make_sparse(model, nm=(2, 4))
    save_sparse(model, tmp_path / "ck")
    records = read_manifest(tmp_path / "ck")["tensors"]
    assert {records[f"{n}.weight"]["pattern"] for n in prunable(model)} == {"2:4"}


# ---- writes are atomic, refusals are clear ------------------------------------------------------------------
def test_failed_write_leaves_nothing_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = make_model("llama")
    make_sparse(model, 0.5)
    save_sparse(model, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}

    import safetensors.torch

    calls = []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    other = make_model("llama", seed=1)
    make_sparse(other, 0.5)
    for target, overwrite in [(tmp_path / "ck", True), (tmp_path / "new", False)]:
        calls.clear()
        with pytest.raises(OSError, match="disk full"):
            save_sparse(other, target, max_shard_size="4KB", overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp folder, no half-written "new"
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before


def test_existing_folder_needs_overwrite(tmp_path):
    model = make_model("llama")
    make_sparse(model, 0.5)
    save_sparse(model, tmp_path / "ck")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_sparse(model, tmp_path / "ck")
    other = make_model("llama", seed=1)
    save_sparse(other, tmp_path / "ck", overwrite=True)
    assert_bit_identical(other, load_sparse(tmp_path / "ck"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_refuses_unmerged_and_quantized_models(tmp_path):
    import peft

    model = make_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        save_sparse(lora, tmp_path / "a")
    plain = make_model("llama")
    plain.config.quantization_config = {"load_in_4bit": True}
    with pytest.raises(ValueError, match="quantized"):
        save_sparse(plain, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- loading streams and never unpickles --------------------------------------------------------------------
def test_load_never_unpickles(tmp_path, monkeypatch):
    import pickle

    model = make_model("gpt2")
    make_sparse(model, 0.5)
    save_sparse(model, tmp_path / "ck", tokenizer=make_tokenizer())

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load_sparse")

    for owner, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(owner, name, refuse)
    loaded, tok = load_sparse(tmp_path / "ck", return_tokenizer=True)
    assert tok is not None
    assert_bit_identical(model, loaded)


def test_load_streams_tensor_by_tensor(tmp_path, monkeypatch):
    """No whole-file load, and at most the current and the previous decoded tensor alive at any time."""
    import safetensors.torch

    model = make_model("llama")
    make_sparse(model, 0.5)
    save_sparse(model, tmp_path / "ck")
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("load_file reads a whole file"))
    alive: list[weakref.ref] = []
    peak = 0
    real_decode = _codec.decode

    def tracking_decode(*args, **kwargs):
        nonlocal peak
        out = real_decode(*args, **kwargs)
        alive.append(weakref.ref(out))
        peak = max(peak, sum(r() is not None for r in alive))
        return out

    monkeypatch.setattr(_codec, "decode", tracking_decode)
    assert_bit_identical(model, load_sparse(tmp_path / "ck"))
    assert len(alive) == len(prunable(model)) and peak <= 2


# ---- corrupt, truncated and inconsistent files --------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = make_model("llama")
    make_sparse(model, 0.5)
    save_sparse(model, tmp_path / "ck", max_shard_size="20KB")
    return tmp_path / "ck"


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "sparse_manifest.json").read_text())


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "sparse_manifest.json").write_text(json.dumps(manifest))


def _a_bitmask_tensor(folder: Path) -> tuple[str, dict]:
    records = _manifest(folder)["tensors"]
    return next((n, r) for n, r in records.items() if r["encoding"] == "bitmask")


def _byte_range(file: Path, key: str) -> tuple[int, int]:
    """Absolute byte range of stored tensor ``key`` inside a safetensors file."""
    raw = file.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + header_len])[key]["data_offsets"]
    return 8 + header_len + start, 8 + header_len + end


def test_truncated_shard_names_file_and_tensor(saved):
    name, record = _a_bitmask_tensor(saved)
    shard = saved / record["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(SparseCheckpointError) as err:
        load_sparse(saved)
    assert record["file"] in str(err.value) and "truncated" in str(err.value)
    assert any(n in str(err.value) for n, r in _manifest(saved)["tensors"].items() if r["file"] == record["file"])


def test_missing_shard(saved):
    name, record = _a_bitmask_tensor(saved)
    (saved / record["file"]).unlink()
    with pytest.raises(SparseCheckpointError, match=f"{record['file']}: missing"):
        load_sparse(saved)


@pytest.mark.parametrize("part", ["values", "mask"])
def test_flipped_byte_is_caught_by_the_checksum(saved, part):
    name, record = _a_bitmask_tensor(saved)
    shard = saved / record["file"]
    start, end = _byte_range(shard, f"{name}::{part}")
    raw = bytearray(shard.read_bytes())
    raw[(start + end) // 2] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(SparseCheckpointError, match="checksum mismatch") as err:
        load_sparse(saved)
    assert record["file"] in str(err.value) and repr(name) in str(err.value) and part in str(err.value)


def test_bitmask_popcount_disagreeing_with_values(saved):
    """A mask with one bit too many, written consistently (checksum updated): the popcount check catches it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    name, record = _a_bitmask_tensor(saved)
    shard = saved / record["file"]
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mask = tensors[f"{name}::mask"]
    keep = _codec.unpack_bits(mask)[: record["shape"][0] * record["shape"][1]].clone()
    keep[(~keep).nonzero()[0]] = True  # one more kept position than there are values
    tensors[f"{name}::mask"] = _codec.pack_bits(keep)
    save_file(tensors, str(shard))
    manifest = _manifest(saved)
    manifest["tensors"][name]["crc32"]["mask"] = _codec.crc32(tensors[f"{name}::mask"])
    _write_manifest(saved, manifest)
    with pytest.raises(SparseCheckpointError) as err:
        load_sparse(saved)
    message = str(err.value)
    assert record["file"] in message and repr(name) in message
    assert f"{record['nnz'] + 1} bits set but {record['nnz']} values" in message


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda r: r.update(shape=[r["shape"][0], r["shape"][1] + 1]), "implies"),
        (lambda r: r.update(nnz=r["nnz"] - 1), "implies"),
        (lambda r: r.update(dtype="float16"), "implies"),
        (lambda r: r.update(pattern="2:4"), "breaks that pattern"),
        (lambda r: r.update(encoding="dense"), "disagrees with the manifest"),
        (lambda r: r.update(encoding="zip"), "encoding"),
    ],
    ids=["shape", "nnz", "dtype", "pattern", "encoding", "unknown-encoding"],
)
def test_manifest_disagreeing_with_the_tensors(saved, edit, needle):
    name, record = _a_bitmask_tensor(saved)
    manifest = _manifest(saved)
    edit(manifest["tensors"][name])
    if manifest["tensors"][name]["encoding"] == "dense":
        manifest["tensors"][name]["crc32"] = 0
    _write_manifest(saved, manifest)
    with pytest.raises(SparseCheckpointError, match=needle) as err:
        load_sparse(saved)
    assert repr(name) in str(err.value) and (
        "sparse_manifest.json" in str(err.value) or record["file"] in str(err.value)
    )


def test_manifest_missing_a_tensor_or_broken(saved):
    manifest = _manifest(saved)
    name = next(iter(manifest["tensors"]))
    del manifest["tensors"][name]
    _write_manifest(saved, manifest)
    with pytest.raises(SparseCheckpointError, match="manifest disagrees") as err:
        load_sparse(saved)
    assert name in str(err.value)
    (saved / "sparse_manifest.json").write_text('{"format": "sparse_peft.sparse_checkpoint", "vers')
    with pytest.raises(SparseCheckpointError, match="sparse_manifest.json: not valid JSON"):
        load_sparse(saved)
    (saved / "sparse_manifest.json").unlink()
    with pytest.raises(SparseCheckpointError, match="not a sparse checkpoint"):
        load_sparse(saved)


def test_newer_format_version_is_refused(saved):
    manifest = _manifest(saved)
    manifest["version"] = 99
    _write_manifest(saved, manifest)
    with pytest.raises(SparseCheckpointError, match="upgrade sparse_peft"):
        load_sparse(saved)


# ---- verify -------------------------------------------------------------------------------------------------
def _merged_sparse_lora(base: torch.nn.Module) -> torch.nn.Module:
    import copy

    import peft

    from sparse_peft import SparseLoraConfig

    model = peft.get_peft_model(copy.deepcopy(base), SparseLoraConfig(r=2, init_weights=False))
    return model.merge_and_unload()


@pytest.mark.parametrize("kind", ["model", "masks", "file"])
def test_verify_passes_a_real_merge_for_every_reference_kind(kind, tmp_path):
    base = make_model("llama")
    make_sparse(base, 0.5)
    merged = _merged_sparse_lora(base)
    assert not all(torch.equal(a, b) for a, b in zip(base.parameters(), merged.parameters()))
    reference = {"model": base, "masks": get_masks(base), "file": tmp_path / "masks.safetensors"}[kind]
    save_masks(get_masks(base), tmp_path / "masks.safetensors")
    report = verify(merged, reference)
    assert report.ok and report.revived == 0 and len(report.modules) == len(prunable(base))
    assert report.reference_zeros == sum(int((linear_weight(m) == 0).sum()) for m in prunable(base).values())
    assert "0 of" in str(report)


def test_verify_catches_a_planted_nonzero():
    base = make_model("llama")
    make_sparse(base, 0.5)
    merged = _merged_sparse_lora(base)
    w = merged.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w[tuple((w == 0).nonzero()[3])] = 1e-3
    with pytest.raises(SparsityError, match=r"model\.layers\.1\.mlp\.down_proj: 1 pruned weights are non-zero") as err:
        verify(merged, base)
    assert err.value.report.revived == 1 and not err.value.report.ok


def test_verify_catches_an_invalid_2_4_group():
    base = make_model("llama")
    make_sparse(base, nm=(2, 4))
    merged = _merged_sparse_lora(base)
    assert verify(merged, base).nm_pattern == "2:4"  # inferred from the reference
    w = merged.model.layers[0].self_attn.q_proj.weight  # (d_out, d_in): revive one weight, prune one in another group
    with torch.no_grad():
        w[0, (w[0, :4] == 0).nonzero()[0, 0]] = 0.5
        w[1, (w[1, :4] != 0).nonzero()[0, 0]] = 0.0
    with pytest.raises(SparsityError, match=r"q_proj: 1 groups break the 2:4 pattern"):
        verify(merged, base, allow_moves=True)  # nnz unchanged, so only the group check can fail
    with pytest.raises(SparsityError, match=r"q_proj: 1 pruned weights are non-zero; .*q_proj: 1 groups break"):
        verify(merged, base)


def test_verify_allow_moves_checks_counts_not_positions():
    base = make_model("llama")
    make_sparse(base, 0.5)
    moved = _merged_sparse_lora(base)
    w = moved.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        w[tuple((w == 0).nonzero()[0])] = 0.25  # revive one ...
        w[tuple((w != 0).nonzero()[-1])] = 0.0  # ... and prune another: nnz unchanged (SpIEL's SEFT mode)
    with pytest.raises(SparsityError):
        verify(moved, base)
    report = verify(moved, base, allow_moves=True)
    assert report.revived == 1 and "1 non-zeros moved" in str(report)
    with torch.no_grad():
        w[tuple((w == 0).nonzero()[0])] = 0.25
    with pytest.raises(SparsityError, match="up_proj: 1 more non-zeros than the reference"):
        verify(moved, base, allow_moves=True)


def test_verify_explicit_pattern_on_an_unstructured_reference():
    base = make_model("llama")
    make_sparse(base, 0.5)
    with pytest.raises(SparsityError, match="break the 2:4 pattern"):
        verify(base, base, nm_pattern="2:4")
    with pytest.raises(ValueError, match="nm_pattern"):
        verify(base, base, nm_pattern="4:2")


def test_verify_bad_references(tmp_path):
    import peft

    base = make_model("llama")
    make_sparse(base, 0.5)
    masks = get_masks(base)
    with pytest.raises(ValueError, match="no such Linear module"):
        verify(base, {**masks, "model.layers.9.mlp.up_proj": masks["model.layers.0.mlp.up_proj"]})
    with pytest.raises(ValueError, match="is \\(64, 32\\) in the model"):
        verify(base, {"model.layers.0.mlp.up_proj": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool keep mask"):
        verify(base, {"model.layers.0.mlp.up_proj": torch.ones(64, 32)})
    with pytest.raises(FileNotFoundError, match="save_masks"):
        verify(base, tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 8)
    with pytest.raises(ValueError, match="not a mask file"):
        verify(base, tmp_path / "junk.safetensors")
    with pytest.raises(TypeError, match="pruned base model"):
        verify(base, 42)
    lora = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        verify(lora, masks)


# ---- 2:4 semi-structured ------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_semi_structured_on_cpu_says_it_needs_cuda_sm80():
    model = make_model("llama", torch.float16)
    make_sparse(model, nm=(2, 4))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(SemiStructuredUnavailable, match=r"CUDA GPU with compute capability 8\.0 or newer \(sm80\+"):
        to_semi_structured(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # untouched


def test_semi_structured_needs_the_weights_on_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = make_model("llama", torch.float16)
    with pytest.raises(SemiStructuredUnavailable, match="not on the GPU"):
        to_semi_structured(model)


def _mixed_model() -> torch.nn.Module:
    """A 2:4 fp16 Llama whose layer 1 MLP breaks one rule each: not 2:4, fp32, a shape the backend refuses."""
    model = make_model("llama", torch.float16)
    make_sparse(model, nm=(2, 4))
    layer = model.model.layers[1].mlp
    with torch.no_grad():
        layer.up_proj.weight[0, :4] = 1.0  # a full group
        layer.gate_proj.float()
    return model


def test_semi_structured_plan_lists_what_stays_dense():
    plan = semi_structured_plan(_mixed_model())
    assert plan["model.layers.1.mlp.up_proj"].startswith("not 2:4")
    assert plan["model.layers.1.mlp.gate_proj"].startswith("dtype float32")
    assert "not a multiple of (32, 64)" in plan["model.layers.0.self_attn.q_proj"]  # 32 x 32 in the tiny model
    gpt2 = make_model("gpt2", torch.float16)
    make_sparse(gpt2, nm=(2, 4))
    assert all("Conv1D" in reason for reason in semi_structured_plan(gpt2).values())


def test_to_semi_structured_converts_what_fits_and_lists_the_rest(monkeypatch):
    """The bookkeeping, with torch's conversion stood in by a CPU fake that refuses one shape like the backend."""
    model = _mixed_model()
    monkeypatch.setattr(semi_structured, "_require_sm80", lambda model: None)

    def fake_compress(weight):
        if weight.shape == (32, 64):  # down_proj (d_out=32, d_in=64)
            raise RuntimeError("Error original_tensor.shape torch.Size([32, 64]) is not supported!\nmore")
        return weight.clone()

    monkeypatch.setattr(semi_structured, "_compress", fake_compress)
    report = to_semi_structured(model)
    assert set(report.dense) == {
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    }
    assert (
        report.dense["model.layers.0.mlp.down_proj"]
        == "Error original_tensor.shape torch.Size([32, 64]) is not supported!"
    )
    assert len(report.converted) == 14 - 4
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert "10 Linear weights converted, 4 stay dense" in str(report)


@pytest.mark.cuda
def test_semi_structured_linear_matches_dense_on_gpu():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a CUDA GPU with compute capability 8.0+")
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        linear = torch.nn.Linear(256, 512, device="cuda", dtype=dtype)
        with torch.no_grad():
            linear.weight.mul_(nm_mask(linear.weight, 2, 4))
        model = torch.nn.Sequential(linear)
        x = torch.randn(4, 64, 256, device="cuda", dtype=dtype)  # (B, T, d_in)
        with torch.no_grad():
            dense = model(x)
            report = to_semi_structured(model)
            sparse = model(x)
        assert report.converted == ["0"] and not report.dense
        assert type(linear.weight).__name__.startswith("SparseSemiStructuredTensor")
        assert to_semi_structured(model).converted == ["0"]  # a second call keeps the converted weight
        torch.testing.assert_close(sparse, dense, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_semi_structured_smollm2_greedy_generation_matches_dense():
    """SmolLM2-135M, magnitude 2:4, fp16 on the GPU: 32 greedy tokens with the converted model match the dense-with-
    zeros model (or, where a near-tie flips a token, the teacher-forced logits stay within tolerance)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a CUDA GPU with compute capability 8.0+")
    from sparse_peft.embedded import load_smollm2

    model, tokenizer = load_smollm2(torch.float32)
    prune(model, "magnitude", pattern="2:4", progress=False)
    model = model.to("cuda", torch.float16).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids.cuda()
    greedy = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    with torch.no_grad():
        dense_out = model.generate(ids, **greedy)
        dense_logits = model(dense_out).logits.float()
        report = to_semi_structured(model)
        sparse_out = model.generate(ids, **greedy)
        sparse_logits = model(dense_out).logits.float()
    assert len(report.converted) == 7 * 30 and not report.dense, report
    assert dense_out.shape[1] == ids.shape[1] + 32
    if not torch.equal(sparse_out, dense_out):
        scale = dense_logits.abs().max()
        assert (sparse_logits - dense_logits).abs().max() <= 0.02 * scale
        assert (sparse_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean() >= 0.95


# ---- CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_cli")
    tok = make_tokenizer()
    for name, kw, dtype in [("u50", dict(sparsity=0.5), torch.float32), ("nm24", dict(nm=(2, 4)), torch.bfloat16)]:
        model = make_model("llama", dtype)
        make_sparse(model, **kw)
        model.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d


def _cli(argv, capsys):
    from sparse_peft.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_export_sparse_then_dense(cli_models, tmp_path, capsys):
    code, out, err = _cli(["export", "--model", cli_models / "u50", "--out", tmp_path / "sp"], capsys)
    assert code == 0, err
    assert "bitmask-encoded" in out and "x the dense" in out and len(out.strip().splitlines()) == 1
    assert "export" in err  # the progress bar
    original = transformers.AutoModelForCausalLM.from_pretrained(cli_models / "u50")
    assert_bit_identical(original, load_sparse(tmp_path / "sp"))

    code, out, err = _cli(["export", "--model", tmp_path / "sp", "--format", "dense", "--out", tmp_path / "de"], capsys)
    assert code == 0, err
    assert "dense checkpoint" in out and "MB" in out
    assert_bit_identical(original, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "de"))
    assert (tmp_path / "de" / "tokenizer.json").exists()

    code, _, err = _cli(["export", "--model", cli_models / "u50", "--out", tmp_path / "sp"], capsys)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    code, _, err = _cli(["export", "--model", cli_models / "u50", "--overwrite", "--out", tmp_path / "sp"], capsys)
    assert code == 0, err


def test_cli_export_semi_structured(cli_models, tmp_path, capsys):
    code, out, err = _cli(
        ["export", "--model", cli_models / "nm24", "--format", "semi-structured", "--out", tmp_path / "s"], capsys
    )
    assert code == 0, err
    assert "of 14 2:4 Linear weights fit" in out and "to_semi_structured" in out
    records = read_manifest(tmp_path / "s")["tensors"]
    assert {r["pattern"] for r in records.values() if r["encoding"] == "bitmask"} == {"2:4"}
    for model, dtype, needle in [
        ("u50", "bf16", "every pruned Linear weight in 2:4"),
        ("nm24", "fp32", "--dtype bf16"),
    ]:
        code, _, err = _cli(
            [
                "export",
                "--model",
                cli_models / model,
                "--dtype",
                dtype,
                "--format",
                "semi-structured",
                "--out",
                tmp_path / "x",
            ],
            capsys,
        )
        assert code == 2 and needle in err and "Traceback" not in err
        assert not (tmp_path / "x").exists()


def test_cli_export_help_has_examples(capsys):
    code, out, _ = _cli(["export", "--help"], capsys)
    assert code == 0 and "examples:" in out and "--format" in out


def test_cli_merge_runs_verify_and_saves_nothing_on_failure(cli_models, tmp_path, capsys):
    """A SparseLoRA adapter whose custom mask covers pruned weights brings them back: merge must refuse, name the
    module, and write nothing."""
    import peft

    import sparse_peft

    base = transformers.AutoModelForCausalLM.from_pretrained(cli_models / "u50")
    everything = {n: torch.ones_like(linear_weight(m), dtype=torch.bool) for n, m in prunable(base).items()}
    config = sparse_peft.SparseLoraConfig(r=2, target_modules=["up_proj"], mask_type="custom", init_weights=False)
    model = peft.get_peft_model(base, config)
    sparse_peft.set_sparse_lora_masks(model, {n: m for n, m in everything.items() if n.endswith("up_proj")})
    model.save_pretrained(tmp_path / "adapter")
    code, _, err = _cli(
        ["merge", "--model", cli_models / "u50", "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged"],
        capsys,
    )
    assert code == 2 and "up_proj" in err and "pruned weights are non-zero" in err
    assert not (tmp_path / "merged").exists()
    assert os.listdir(tmp_path) == ["adapter"]


def test_masks_of_a_lora_wrapped_model_are_its_base_modules():
    """LoRA's own lora_A / lora_B Linears are not prunable modules, so get_masks(peft_model) is the base's masks."""
    import peft

    base = make_model("llama")
    make_sparse(base, 0.5)
    expected = get_masks(base)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["up_proj", "q_proj"]))
    masks = get_masks(lora)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[n], expected[n]) for n in masks)
