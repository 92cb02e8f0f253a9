"""Shared by the examples: the embedded SmolLM2 (or a tiny random Llama with its tokenizer) and data blocks."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoTokenizer

from sparse_peft.embedded import load_smollm2, smollm2_dir, token_blocks, wiki_split


def model_and_tokenizer(tiny: bool):
    """SmolLM2-135M-Instruct, or (``tiny``) a 2-layer random Llama with the same tokenizer, for smoke tests."""
    if not tiny:
        return load_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config), tokenizer


def blocks(tokenizer, seq_len: int, n_train: int, n_eval: int):
    """``(train, eval)`` token blocks ``(n, seq_len)`` from the embedded Wikipedia summaries, split by article."""
    train_texts, eval_texts = wiki_split()
    return (
        token_blocks(tokenizer, train_texts[: 40 * n_train], seq_len, n_train),
        token_blocks(tokenizer, eval_texts[: 40 * n_eval], seq_len, n_eval),
    )
