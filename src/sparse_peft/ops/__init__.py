"""Sparse training ops: ``torch.library`` custom ops with CUDA kernels and a pure-PyTorch twin.

- :func:`scatter_add_delta_`: ``W += alpha * scatter(values)`` at flat indices, in place (SpIEL's effective weight,
  merge and unmerge).
- :func:`gather_weight_grad`: the weight gradient at flat indices only (an SDDMM; SpIEL backward).
- :func:`partial_weight_grad`: the weight gradient of selected rows/columns (S²FT partial backprop).

Flat index ``k`` addresses ``weight[k // d_in, k % d_in]`` of an ``nn.Linear`` weight ``(d_out, d_in)``.
:mod:`sparse_peft.ops.reference` holds the definitions. Importing this package registers the ops and nothing else:
native code is loaded on the first CUDA call, from the module an ahead-of-time install built
(``SPARSE_PEFT_BUILD_EXT=1``) or else compiled just in time (see :func:`extension_status` and
``python -m sparse_peft.ops``; ``SPARSE_PEFT_DISABLE_EXT=1`` forces the reference).
"""

from __future__ import annotations

from . import reference
from ._extension import status as extension_status
from .ops import gather_weight_grad, partial_weight_grad, scatter_add_delta_

__all__ = [
    "extension_status",
    "gather_weight_grad",
    "partial_weight_grad",
    "reference",
    "scatter_add_delta_",
]
