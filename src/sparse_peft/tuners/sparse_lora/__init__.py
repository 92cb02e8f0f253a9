from .config import SparseLoraConfig
from .layer import Linear, MaskedLoraLinearFn, SparseLoraLayer
from .model import SparseLoraModel, set_sparse_lora_masks

__all__ = [
    "Linear",
    "MaskedLoraLinearFn",
    "SparseLoraConfig",
    "SparseLoraLayer",
    "SparseLoraModel",
    "set_sparse_lora_masks",
]
