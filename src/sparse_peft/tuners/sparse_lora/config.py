"""Configuration of sparsity-preserving LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


from ..._registry import SparsePeftType
from .._common import SparseTunerConfig
from ...masks import parse_nm


@dataclass
class SparseLoraConfig(SparseTunerConfig):
    """Configuration of a [`SparseLoraModel`][sparse_peft.SparseLoraModel].

    The effective weight of every target module is ``W + s * M ⊙ (B @ A)`` with ``s = lora_alpha / r``.
    ``M`` is the base weight's non-zero pattern (``mask_type="base"``, the default), the top-N of every group of M
    inputs of the base weight (``mask_type="nm"`` with ``nm_pattern="2:4"``), or masks you set yourself with
    [`set_sparse_lora_masks`][sparse_peft.set_sparse_lora_masks] (``mask_type="custom"``). Merging writes
    ``W + s * M ⊙ (B @ A)`` and therefore keeps every zero of the base outside ``M``.

    Example:
        ```python
        import sparse_peft
        from peft import get_peft_model

        config = sparse_peft.SparseLoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
        # model = get_peft_model(model, config)
        ```
    """

    r: int = field(
        default=8, metadata={"help": "LoRA rank r; the adapter of a d_out x d_in layer has r*(d_in+d_out) values."}
    )
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator: the update is scaled by lora_alpha / r."})
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout on the adapter's input. 0 (the default) lets base and adapter share one fused matmul; "
            "any other value needs a second matmul per layer."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (or a regex) to adapt, e.g. ['q_proj', 'v_proj'], or 'all-linear'. None picks all "
            "attention and MLP projections of known architectures (Llama, Mistral, Qwen2/3, GPT-2, BERT, ...)."
        },
    )
    mask_type: Literal["base", "nm", "custom"] = field(
        default="base",
        metadata={
            "help": "Where M comes from: 'base' = the base weight's non-zeros; 'nm' = the top-N |W| of every group "
            "of M inputs (needs nm_pattern); 'custom' = masks given to sparse_peft.set_sparse_lora_masks after "
            "get_peft_model (until then the base's non-zeros are used)."
        },
    )
    nm_pattern: Optional[str] = field(
        default=None, metadata={"help": "N:M pattern such as '2:4', used when mask_type='nm'."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: A random (Kaiming), B zero, so the adapter starts as the identity. False: both random, "
            "so tests can start from a non-zero update."
        },
    )
    exact_gradient: bool = field(
        default=True,
        metadata={
            "help": "True (default): A and B get the exact gradient of the masked model, which needs the dense "
            "weight gradient g^T x once per layer (one extra d_out x d_in matmul per step). False: the LoRS-style "
            "gradient without the mask (two rank-r matmuls, so a step costs what LoRA's does); forward, merge and "
            "every kept zero stay exactly masked, but the update no longer follows the masked model's gradient on "
            "the pruned positions. See docs/benchmarks.md for what it costs in recovery."
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "Set automatically for transformers' Conv1D (GPT-2), whose weight is stored (d_in, d_out)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SparsePeftType.SPARSE_LORA
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"SparseLoraConfig.r must be a positive integer (e.g. r=8), got {self.r!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"SparseLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.mask_type not in ("base", "nm", "custom"):
            raise ValueError(f"SparseLoraConfig.mask_type must be 'base', 'nm' or 'custom', got {self.mask_type!r}.")
        if self.mask_type == "nm" and self.nm_pattern is None:
            raise ValueError("SparseLoraConfig.mask_type='nm' needs nm_pattern, e.g. nm_pattern='2:4'.")
        parse_nm(self.nm_pattern, field="SparseLoraConfig.nm_pattern")
        if not isinstance(self.exact_gradient, bool):
            raise ValueError(f"SparseLoraConfig.exact_gradient must be True or False, got {self.exact_gradient!r}.")
