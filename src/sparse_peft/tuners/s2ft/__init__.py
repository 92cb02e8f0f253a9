from .config import S2FTConfig
from .layer import Linear, S2FTLayer, S2FTLinearFn
from .model import S2FTModel, check_disjoint, s2ft_fuse_adapters
from .selection import s2ft_select

__all__ = [
    "Linear",
    "S2FTConfig",
    "S2FTLayer",
    "S2FTLinearFn",
    "S2FTModel",
    "check_disjoint",
    "s2ft_fuse_adapters",
    "s2ft_select",
]
