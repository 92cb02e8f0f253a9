"""Quality metrics on held-out text: causal-LM perplexity.

Not imported by ``sparse_peft/__init__.py``; import it explicitly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batch_nll(model: torch.nn.Module, input_ids: torch.LongTensor) -> tuple[float, int]:
    """Summed next-token NLL (fp32) and the number of predicted tokens for one batch ``(B, T)``."""
    logits = model(input_ids=input_ids).logits  # (B, T, V)
    pred = logits[:, :-1].float().flatten(0, 1)  # (B*(T-1), V)
    target = input_ids[:, 1:].flatten()  # (B*(T-1),)
    nll = F.cross_entropy(pred, target, reduction="sum")
    return nll.item(), target.numel()


def perplexity(model: torch.nn.Module, blocks: torch.LongTensor, batch_size: int = 4, progress: bool = True) -> float:
    """Causal-LM perplexity ``exp(mean NLL)`` over every predicted token of ``blocks``.

    Each block of length T predicts tokens 1..T-1 from their prefix (no context across blocks);
    the mean is token-weighted over all ``n_blocks * (T - 1)`` predictions. Runs in eval mode
    under ``torch.no_grad()`` on the model's device and restores the previous train/eval mode.
    Works on plain transformers models and on peft models.

    Args:
        model: a causal LM whose forward takes ``input_ids`` and returns ``.logits`` of shape ``(B, T, V)``.
        blocks: ``torch.LongTensor`` of shape ``(n_blocks, T)``, ``T >= 2`` (see ``embedded.token_blocks``).
        batch_size: blocks per forward pass.
        progress: show a tqdm bar.

    Returns:
        Perplexity as a float (``inf`` if the mean NLL overflows ``exp``).
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must have shape (n_blocks>=1, seq_len>=2), got {tuple(blocks.shape)}")
    if blocks.dtype != torch.long:
        raise TypeError(f"blocks must be torch.long token ids, got {blocks.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, was_training = _model_device(model), model.training
    total_nll, total_tokens = 0.0, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(blocks.split(batch_size), desc="perplexity", disable=not progress):
                nll, n = _batch_nll(model, batch.to(device))  # batch: (B, T)
                total_nll, total_tokens = total_nll + nll, total_tokens + n
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    return math.exp(mean_nll) if mean_nll < 700 else math.inf
