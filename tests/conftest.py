"""Tiny random models built from configs, and helpers to make them sparse. No hub access anywhere."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any huggingface import: nothing here may reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import torch.nn as nn
import transformers
from transformers.pytorch_utils import Conv1D

transformers.logging.set_verbosity_error()

VOCAB = 128

FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "bert"]
CAUSAL_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]


def make_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 2) -> nn.Module:
    """A tiny random model of ``family``; GQA for qwen2/qwen3/mistral/llama (4 query heads, 2 kv heads)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=16))
    elif family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg)
    elif family == "bert":
        cfg = transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=2,
        )
        model = transformers.BertForSequenceClassification(cfg)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def task_type(family: str) -> str:
    return "SEQ_CLS" if family == "bert" else "CAUSAL_LM"


def prunable(model: nn.Module) -> dict[str, nn.Module]:
    from sparse_peft.pruning.report import prunable_modules

    return {n: m for n, m in prunable_modules(model).items() if "classifier" not in n and "pooler" not in n}


@torch.no_grad()
def make_sparse(model: nn.Module, sparsity: float = 0.5, nm: tuple[int, int] | None = None, seed: int = 0) -> None:
    """Zero weights of every prunable module in place: random unstructured, or N:M by magnitude."""
    from sparse_peft.masks import nm_mask
    from sparse_peft.pruning.report import linear_weight

    g = torch.Generator().manual_seed(seed)
    for module in prunable(model).values():
        w = linear_weight(module)  # (d_out, d_in), a view for Conv1D
        if nm is not None:
            keep = nm_mask(w, *nm)
        else:
            keep = torch.rand(w.shape, generator=g) >= sparsity
        w.mul_(keep.to(w.dtype))


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    from sparse_peft.pruning.report import linear_weight

    return {n: (linear_weight(m) == 0).clone() for n, m in prunable(model).items()}


def inputs(family: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    if family == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=g)}
    return {"input_ids": ids, "labels": ids}


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


@pytest.fixture
def tmp_dir(tmp_path):
    return str(tmp_path)


WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def make_tokenizer():
    """An offline word-level tokenizer over ``WORDS`` (ids 3..VOCAB-1) with pad/eos and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
    )
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
    return tok


def word_texts(n: int = 60, length: int = 40, seed: int = 0) -> list[str]:
    """Texts over ``WORDS`` with a learnable structure (each word tends to follow its predecessor)."""
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        start = int(torch.randint(0, len(WORDS), (1,), generator=g))
        texts.append(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(length)))
    return texts
