"""Bitmask encoding of one weight tensor, checksums and dtype names: the pieces the checkpoint format is built from.

A bitmask-encoded tensor is two or three stored tensors: ``mask``, the packed bits of ``x != 0`` (row-major, least
significant bit first, :func:`sparse_peft.masks.pack_mask`), ``values``, those elements in row-major order (NaN
payloads included), and, only when some zero is ``-0.0``, ``signs``: one bit per zero element, set for ``-0.0``.
Masking by multiplication leaves ``-0.0`` wherever a negative weight was pruned, and it comes back bit for bit.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

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


ENCODABLE = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _ints(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a contiguous CPU tensor's bits as same-width integers."""
    return t.view(_INT_VIEW[t.element_size()]).numpy()


def nonzero(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor != 0`` for a contiguous CPU float tensor, flattened: ``(numel,)`` bool. Computed on the bits (sign
    bit cleared), which numpy does several times faster than torch's half-precision compare; NaN counts as non-zero,
    ``-0.0`` as zero."""
    ints = _ints(tensor.reshape(-1))
    magnitude = np.array(~np.iinfo(ints.dtype).min, dtype=ints.dtype)  # every bit but the sign
    return torch.from_numpy((ints & magnitude) != 0)


def count(bits: torch.Tensor) -> int:
    """Number of ``True`` in a CPU ``bool`` tensor."""
    return int(np.count_nonzero(bits.numpy()))


def group_counts(bits: torch.Tensor, m: int) -> np.ndarray:
    """Number of ``True`` in each group of ``m`` consecutive elements of a contiguous CPU ``bool`` tensor
    (``numel % m == 0``): ``(numel / m,)``. For ``m`` of 4 or 8 a group's 0/1 bytes are one machine word, and
    multiplying it by 0x0101... sums its bytes into the top byte: no per-group reduction loop."""
    flat = bits.reshape(-1).numpy().view(np.uint8)  # (numel,) 0/1
    if m in (4, 8):
        word = np.uint32 if m == 4 else np.uint64
        ones = word(0x01010101) if m == 4 else word(0x0101010101010101)
        return (flat.view(word) * ones) >> word(8 * (m - 1))
    return flat.reshape(-1, m).sum(-1)


def max_group_count(bits: torch.Tensor, m: int) -> int:
    """The largest :func:`group_counts` (0 for an empty tensor)."""
    counts = group_counts(bits, m)
    return int(counts.max()) if counts.size else 0


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a ``bool`` tensor into ``uint8``, least significant bit first (the layout of
    :func:`sparse_peft.masks.pack_mask`), zero-padded to a whole byte."""
    return torch.from_numpy(np.packbits(bits.reshape(-1).numpy(), bitorder="little"))


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """Every bit of a packed ``uint8`` tensor as ``bool``, padding included: ``(8 * len(packed),)``."""
    return torch.from_numpy(np.unpackbits(packed.numpy(), bitorder="little").view(np.bool_))


def encode(tensor: torch.Tensor, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"mask", "values"[, "signs"]}`` on CPU: packed ``uint8`` bits of ``x != 0`` (``ceil(numel / 8)`` bytes),
    the 1-D non-zero values, and the packed sign bits of the zeros when any is ``-0.0``. ``keep``: ``tensor != 0``
    if the caller has it already."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
    keep = (nonzero(flat) if keep is None else keep.reshape(-1)).numpy()  # (numel,); NaN counts as non-zero
    ints = _ints(flat)  # (numel,) bit patterns
    values = ints.take(np.flatnonzero(keep))  # (nnz,) row-major; index lists beat boolean indexing in numpy
    parts = {"mask": pack_bits(torch.from_numpy(keep)), "values": torch.from_numpy(values).view(flat.dtype)}
    negative = ints.take(np.flatnonzero(~keep)) != 0  # (numel - nnz,): a zero with non-zero bits is -0.0
    if negative.any():
        parts["signs"] = pack_bits(torch.from_numpy(negative))
    return parts


def encoded_bytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def decode(
    keep: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...], negative: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`encode` from the unpacked bits: ``keep`` ``(numel,)`` and, if any zero is ``-0.0``,
    ``negative`` ``(numel - nnz,)``. A tensor of ``shape`` and ``values.dtype``."""
    ints = _ints(values.contiguous())  # (nnz,)
    kept = keep.numpy()
    out = np.zeros(kept.size, dtype=ints.dtype)  # (numel,) all bits clear: +0.0
    out[np.flatnonzero(kept)] = ints  # row-major order
    if negative is not None:
        zero_at = np.flatnonzero(~kept)  # (numel - nnz,)
        out[zero_at[negative.numpy()]] = np.iinfo(ints.dtype).min  # -0.0 is the sign bit alone
    return torch.from_numpy(out).view(values.dtype).view(shape)


def copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy ``source`` into the contiguous CPU tensor ``target`` (same dtype and numel) as one plain memcpy.

    numpy's single-threaded copy runs at memory speed; torch's multi-threaded ``copy_`` can stall for milliseconds
    per tensor on a machine whose cores are busy with other processes.
    """
    np.copyto(_ints(target.reshape(-1)), _ints(source.contiguous().reshape(-1)))


def crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's raw bytes (catches flipped or overwritten bytes in a stored tensor)."""
    t = tensor.contiguous()
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())
