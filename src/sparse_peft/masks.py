"""Sparsity masks: N:M patterns, bit-packing and zero-pattern fingerprints.

Shared by the tuners (which must keep a base's zeros), the pruning toolkit (which makes them) and the report.
All masks are boolean tensors shaped like the weight as ``nn.Linear`` stores it, ``(d_out, d_in)``; N:M groups run
along ``d_in`` (consecutive inputs of one output row), which is the layout sparse tensor cores accelerate.
"""

from __future__ import annotations

import hashlib
import re

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def parse_nm(pattern: str | tuple[int, int] | None, field: str = "pattern") -> tuple[int, int] | None:
    """Parse ``"2:4"`` (or ``(2, 4)``) into ``(n, m)``; ``None`` stays ``None``.

    Raises a ``ValueError`` naming ``field`` when the pattern is malformed or ``n >= m``.
    """
    if pattern is None:
        return None
    if isinstance(pattern, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if match is None:
            raise ValueError(f"{field}={pattern!r} is not an N:M pattern; write it like '2:4' or '4:8'.")
        n, m = int(match.group(1)), int(match.group(2))
    else:
        n, m = (int(v) for v in pattern)
    if not 0 < n < m:
        raise ValueError(f"{field}={pattern!r}: an N:M pattern needs 0 < N < M (e.g. '2:4'), got N={n}, M={m}.")
    return n, m


def nm_mask(weight: torch.Tensor, n: int, m: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``n`` highest-scoring entries of every group of ``m`` consecutive inputs.

    ``scores`` defaults to ``|weight|``. Ties are broken towards the lower index, so the result is deterministic.
    """
    d_out, d_in = weight.shape
    if d_in % m:
        raise ValueError(f"an N:M pattern with M={m} needs d_in divisible by {m}; this weight has d_in={d_in}.")
    s = (weight.abs() if scores is None else scores).float().reshape(d_out, d_in // m, m)  # (d_out, G, m)
    top = torch.topk(s, n, dim=-1, sorted=False).indices  # (d_out, G, n)
    mask = torch.zeros_like(s, dtype=torch.bool)
    mask.scatter_(-1, top, True)
    return mask.reshape(d_out, d_in)


def is_nm(mask_or_weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs holds at most ``n`` non-zeros."""
    t = mask_or_weight
    d_out, d_in = t.shape
    if d_in % m:
        return False
    nnz = (t != 0).reshape(d_out, d_in // m, m).sum(-1)  # (d_out, G)
    return bool((nnz <= n).all())


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask into ``uint8`` bits (1/8 of a bool mask, 1/32 of an fp32 weight)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = _BIT_WEIGHTS.to(flat.device)
    return (flat.reshape(-1, 8) * bits).sum(-1, dtype=torch.uint8)  # (ceil(numel/8),)


_LUTS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _bit_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(256, 8)`` table: row ``b`` holds the 8 bits of byte ``b`` (least significant first) as 0/1 in ``dtype``."""
    key = (dtype, device)
    table = _LUTS.get(key)
    if table is None:
        table = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).to(dtype=dtype, device=device)
        _LUTS[key] = table
    return table


def _numel(shape: torch.Size | tuple[int, ...]) -> int:
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a boolean tensor of ``shape``.

    One table lookup per byte (no per-bit passes); the 0/1 bytes are reinterpreted as ``bool`` without a copy.
    """
    table = _bit_table(torch.uint8, packed.device)
    flat = table.index_select(0, packed.int()).view(torch.bool).reshape(-1)  # (8 * len(packed),)
    return flat[: _numel(shape)].reshape(shape)


def unpack_mask_as(packed: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """:func:`unpack_mask` as 0/1 values of ``dtype`` (e.g. fp32), ready to multiply with.

    Multiplying by a float 0/1 mask is several times faster on CPU than ``masked_fill`` or ``torch.where`` with a
    random boolean mask (those branch per element). Note ``x * 0`` is ``-0.0`` for negative ``x`` and NaN for an
    infinite ``x``: use it for computation, and ``torch.where`` where bit-exact values matter (merging).
    """
    table = _bit_table(dtype, packed.device)
    flat = table.index_select(0, packed.int()).reshape(-1)  # (8 * len(packed),)
    return flat[: _numel(shape)].reshape(shape)


def zero_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """A 128-bit fingerprint of the zero pattern of ``weight`` (and its shape), as two int64 values.

    Two weights get the same fingerprint exactly when they have the same shape and zeros at the same places
    (up to sha256 collisions), whatever their values or dtype.
    """
    packed = pack_mask(weight.detach() != 0).cpu()
    digest = hashlib.sha256()
    digest.update(str(tuple(weight.shape)).encode())
    digest.update(packed.numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()[:16]), dtype=torch.int64).clone()
