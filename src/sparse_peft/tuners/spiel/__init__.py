from .config import SpielConfig
from .layer import Linear, SpielLayer, SpielLinearFn
from .model import SpielModel, fuse_spiel_adapters, reset_optimizer_slots, spiel_step

__all__ = [
    "Linear",
    "SpielConfig",
    "SpielLayer",
    "SpielLinearFn",
    "SpielModel",
    "fuse_spiel_adapters",
    "reset_optimizer_slots",
    "spiel_step",
]
