"""Bitmask encoding of one weight tensor, checksums and dtype names: the pieces the checkpoint format is built from.

A bitmask-encoded tensor is two or three stored tensors: ``mask``, the packed bits of ``x != 0`` (row-major, least
significant bit first, :func:`sparse_peft.masks.pack_mask`), ``values``, those elements in row-major order (NaN
payloads included), and, only when some zero is ``-0.0``, ``signs``: one bit per zero element, set for ``-0.0``.
Masking by multiplication leaves ``-0.0`` wherever a negative weight was pruned, and it comes back bit for bit.
"""

from __future__ import annotations

import zlib

import torch

from ..masks import pack_mask, unpack_mask

# Same-width integer views: "bit pattern is zero" is "integer is zero".
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; raises for dtypes the format does not store."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} cannot be stored in a sparse checkpoint (supported: {sorted(_DTYPES)}).")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises ``KeyError`` for an unknown name."""
    return _DTYPES[name]


def nonzero_bits(tensor: torch.Tensor) -> torch.Tensor:
    """``bool`` tensor of ``tensor``'s shape: ``True`` where the element's bit pattern is not all zeros."""
    t = tensor.contiguous()
    if t.dtype == torch.bool:
        return t.clone()
    return t.view(_INT_VIEW[t.element_size()]) != 0


ENCODABLE = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def encode(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"mask", "values"[, "signs"]}`` on CPU: packed ``uint8`` bits of ``x != 0`` (``ceil(numel / 8)`` bytes),
    the 1-D non-zero values, and the packed sign bits of the zeros when any is ``-0.0``."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
    keep = flat != 0  # (numel,); NaN counts as non-zero
    parts = {"mask": pack_mask(keep), "values": flat[keep]}  # values: (nnz,) row-major
    negative = nonzero_bits(flat[~keep])  # (numel - nnz,): the zeros whose bit pattern is -0.0
    if bool(negative.any()):
        parts["signs"] = pack_mask(negative)
    return {k: v.contiguous() for k, v in parts.items()}


def encoded_bytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def popcount(mask: torch.Tensor) -> int:
    """Number of set bits in a packed ``uint8`` mask (padding bits included)."""
    return int(unpack_mask(mask, (mask.numel() * 8,)).sum())


def decode(
    mask: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...], signs: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`encode`: a tensor of ``shape`` and ``values.dtype``, ``+0.0`` (or ``-0.0`` per ``signs``)
    outside the mask."""
    keep = unpack_mask(mask, shape)  # (*shape,) bool
    out = torch.zeros(shape, dtype=values.dtype)
    out.masked_scatter_(keep, values)  # fills the True positions in row-major order
    if signs is not None:
        zeros = torch.zeros(out.numel() - values.numel(), dtype=values.dtype)  # (numel - nnz,)
        zeros.masked_fill_(unpack_mask(signs, zeros.shape), -0.0)
        out.masked_scatter_(~keep, zeros)
    return out


def crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's raw bytes (catches flipped or overwritten bytes in a stored tensor)."""
    t = tensor.contiguous()
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())
