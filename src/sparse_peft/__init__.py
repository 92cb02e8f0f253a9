"""sparse_peft: sparsity-preserving fine-tuning for pruned LLMs, as a plugin for Hugging Face PEFT.

Importing this package registers its tuner types with peft, so ``peft.get_peft_model``,
``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained``, ``AutoPeftModel*`` and transformers'
``load_adapter`` handle them like LoRA. Import it before loading a saved sparse adapter.

Importing never initialises CUDA and never compiles: native kernels load lazily on first CUDA use.
"""

from __future__ import annotations

from ._registry import SparsePeftType, register
from .export import SparsityError, VerifyReport, verify
from .pruning.report import SparsityReport, sparsity_report
from .tuners.sparse_lora import SparseLoraConfig, SparseLoraModel, set_sparse_lora_masks
from .tuners.spiel import SpielConfig, SpielModel, fuse_spiel_adapters, spiel_step
from .tuners.s2ft import S2FTConfig, S2FTModel, s2ft_fuse_adapters, s2ft_select

__version__ = "0.1.0"

register(SparsePeftType.SPARSE_LORA, SparseLoraConfig, SparseLoraModel)
register(SparsePeftType.SPIEL, SpielConfig, SpielModel)
register(SparsePeftType.S2FT, S2FTConfig, S2FTModel)

__all__ = [
    "S2FTConfig",
    "S2FTModel",
    "s2ft_fuse_adapters",
    "s2ft_select",
    "SparseLoraConfig",
    "SparseLoraModel",
    "SparsePeftType",
    "SparsityReport",
    "SpielConfig",
    "SpielModel",
    "SparsityError",
    "VerifyReport",
    "fuse_spiel_adapters",
    "spiel_step",
    "set_sparse_lora_masks",
    "sparsity_report",
    "verify",
]
