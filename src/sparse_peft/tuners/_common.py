"""Pieces shared by the tuners: default target modules per architecture and the zero-pattern check on load.

Sparse fine-tuning recovers a pruned model best when every pruned projection can move, so the defaults cover all
attention and MLP projections of a block (LoRA's peft default covers only q and v).
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
from peft.config import PeftConfig

from .. import _quant
from .._layout import linear_weight
from ..masks import zero_fingerprint
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")  # in the order peft prefers them

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
}


def default_target_modules(model_type: str | None, config_name: str) -> set[str]:
    """The default targets of ``model_type``, or a clear error naming the config field to set."""
    targets = DEFAULT_TARGET_MODULES.get(model_type or "")
    if targets is None:
        raise ValueError(
            f"{config_name}.target_modules is not set and sparse_peft has no default for model_type={model_type!r}. "
            f"Pass target_modules=[...] (module names such as 'q_proj') or target_modules='all-linear'."
        )
    return set(targets)


def base_fingerprint(base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """What an adapter records about the base it is made for, as ``int64``: the 128-bit zero-pattern fingerprint of
    ``weight`` (``base``'s logical weight, :func:`sparse_peft.masks.zero_fingerprint`), followed for a
    bitsandbytes base by how it was quantized (:func:`sparse_peft._quant.recipe`). Shape ``(2,)`` or ``(5,)``.

    The recipe lets the adapter be loaded onto the full-precision model the quantized base was made from: quantizing
    that model's weight the same way must give the recorded zero pattern (see :func:`check_zero_fingerprints`).
    """
    if weight.device.type == "meta":
        return torch.zeros(2, dtype=torch.int64)
    fp = zero_fingerprint(weight)
    codes = _quant.recipe(base)
    return fp if codes is None else torch.cat([fp, torch.tensor(codes, dtype=torch.int64)])


def _made_from(layer: nn.Module, saved: torch.Tensor) -> bool:
    """Whether ``layer``'s full-precision base, quantized the way ``saved`` (a quantized base's fingerprint)
    records, gets the zero pattern the adapter was trained on."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    if saved.numel() <= 2 or _quant.quant_kind(base) is not None:
        return False
    weight = linear_weight(base)  # (d_out, d_in)
    zeros = _quant.zeros_after_quantizing(weight, saved[2:].tolist())
    return torch.equal(zero_fingerprint(~zeros).to(saved.device), saved[:2])


def check_zero_fingerprints(model, state_dict: dict, adapter_name: str, attr: str) -> None:
    """Refuse to load an adapter onto a base whose zero pattern differs from the one it was trained on.

    ``state_dict`` is a checkpoint already remapped to the model's keys. Every ``<module>.<attr>.<adapter_name>``
    entry in it is compared with the fingerprint the freshly injected layer computed from the current base. An
    adapter trained on a bitsandbytes-quantized base also fits the full-precision model that base was quantized from
    (the zeros it was trained on are that model's pruned zeros plus the weights quantization rounded to zero).
    Accepted entries are replaced by the current base's fingerprint, which the layer keeps from then on.
    """
    suffix = f".{attr}.{adapter_name}"
    current = {k: v for k, v in model.named_buffers() if k.endswith(suffix)}
    bad = []
    for key, saved in list(state_dict.items()):
        now = current.get(key) if key.endswith(suffix) else None
        if now is None or now.device.type == "meta":
            continue
        saved = saved.to(now.device, torch.int64)
        if torch.equal(saved[:2], now[:2]) or _made_from(model.get_submodule(key[: -len(suffix)]), saved):
            state_dict[key] = now.clone()
        else:
            bad.append((key[: -len(suffix)], saved.numel() > 2, now.numel() > 2))
    if bad:
        name, saved_q, now_q = bad[0]
        hint = ""
        if now_q and not saved_q:
            hint = (
                " It was trained on a full-precision base and this base is quantized: quantization rounds small "
                "weights to zero, so the patterns differ. Merge it into the full-precision model instead."
            )
        elif saved_q:
            hint = (
                " It was trained on a quantized base: it loads onto that base (same quantization settings) or onto "
                "the full-precision model that base was quantized from (same dtype)."
            )
        raise ValueError(
            f"adapter {adapter_name!r} was trained on a base with a different zero pattern: {len(bad)} module(s) "
            f"differ, first {name!r}. Loading it would silently change which weights are zero. Load it onto the "
            "same pruned base it was trained on (re-apply the saved masks with sparse_peft.pruning.apply_masks "
            f"if needed).{hint}"
        )


@dataclass
class SparseTunerConfig(PeftConfig):
    """The fields every sparse_peft config shares with peft's LoRA config, and their checks.

    Subclasses add ``target_modules`` (with their own defaults) and their method's fields, and call
    ``super().__post_init__()`` first.
    """

    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (or a regex) never to adapt."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Other modules to train fully and save with the adapter, e.g. ['score'] for classification."},
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={
            "help": "Train only these token rows of the embedding (TRL sets this when it adds special tokens). A list "
            "targets the input embedding; a dict maps embedding module names to lists of token ids."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform, e.g. 'layers'."}
    )
    adapter_digest: Optional[str] = field(
        default=None,
        metadata={
            "help": "Written by save_pretrained, not set by hand: the sha256 of the adapter weights file saved next to "
            "this config. Loading through peft checks it, so the weights of a save that died midway are never loaded "
            "under this config."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name, None), list):
                setattr(self, name, set(getattr(self, name)))
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{type(self).__name__}.layers_pattern only works together with layers_to_transform.")

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``adapter_config.json`` atomically, naming the weights it belongs to.

        ``PeftModel.save_pretrained`` writes the weights first and the config last. The config goes to a temporary
        file that is then renamed over the old one, and it records the sha256 of the weights file beside it;
        :meth:`from_pretrained` refuses a folder whose weights do not match. So a save that dies at any point leaves
        the previous adapter or nothing loadable, never new weights under an old config (or the reverse).
        """
        os.makedirs(save_directory, exist_ok=True)
        weights = _weights_file(save_directory)
        config = copy.copy(self)
        config.adapter_digest = None if weights is None else file_sha256(weights)
        tmp = tempfile.mkdtemp(prefix=".adapter_config-", dir=save_directory)
        try:
            super(SparseTunerConfig, config).save_pretrained(tmp, **kwargs)
            os.replace(os.path.join(tmp, CONFIG_NAME), os.path.join(save_directory, CONFIG_NAME))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """peft's loader, plus the check that a local adapter's weights are the ones its config was saved with."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        check_adapter_digest(config, path)
        return config


def _weights_file(directory: str) -> Optional[str]:
    for name in WEIGHTS_NAMES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_adapter_digest(config, directory: str) -> None:
    """Refuse a saved adapter folder whose weights file is not the one its config recorded (an interrupted save)."""
    expected = getattr(config, "adapter_digest", None)
    weights = _weights_file(directory) if expected and os.path.isdir(directory) else None
    if weights is None:
        return
    if file_sha256(weights) != expected:
        raise ValueError(
            f"{weights} does not match the adapter_config.json beside it: the save that wrote it did not finish "
            "(the weights are newer or older than the config). Nothing was loaded. Load the previous checkpoint, or "
            "save the adapter again."
        )
