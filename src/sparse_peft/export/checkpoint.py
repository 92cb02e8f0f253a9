"""Compact sparse checkpoints: :func:`save_sparse` and :func:`load_sparse`.

A checkpoint is a folder:

- ``sparse_manifest.json``: format name and version, the main dtype, one record per tensor (encoding, shape,
  dtype, shard file, CRC-32 of every stored tensor; for bitmask tensors the non-zero count and N:M pattern) and the
  tied-weight aliases;
- ``sparse-model-0000i-of-0000n.safetensors``: the shards. A Linear weight whose bitmask encoding is smaller than
  the dense tensor is stored as ``<name>::mask`` (packed bits, ``uint8``) and ``<name>::values`` (its non-zeros);
  every other tensor is stored as it is, under its own name;
- ``config.json``, ``generation_config.json`` and tokenizer files, exactly as ``save_pretrained`` writes them.

Writing goes to a temporary sibling folder that is renamed into place at the end, so a failure leaves nothing
half-written and an existing checkpoint untouched. Loading reads the manifest, builds the model from its config
without random initialisation, and streams tensor by tensor from ``safetensors.safe_open`` into the model's own
parameters: nothing is unpickled, and at most one decoded tensor exists next to the model.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .._layout import LINEAR_TYPES
from ..masks import parse_nm
from . import _codec

FORMAT = "sparse_peft.sparse_checkpoint"
VERSION = 1
MANIFEST = "sparse_manifest.json"
_SEP = "::"  # stored keys of a bitmask tensor: "<name>::mask", "<name>::values" (never part of a module name)
_PATTERNS = ("2:4", "4:8")  # N:M patterns recorded (and re-checked on load) when a weight follows them
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class SparseCheckpointError(ValueError):
    """A sparse checkpoint is missing, truncated, corrupted or inconsistent; the message names file and tensor."""


@dataclass
class ExportSummary:
    """What :func:`save_sparse` wrote; ``str(summary)`` is a one-line size summary."""

    path: str
    files: list[str]
    bytes_on_disk: int = field(metadata={"help": "all shard files plus the manifest"})
    dense_bytes: int = field(metadata={"help": "the same tensors stored dense (what save_pretrained writes)"})
    tensors: int = 0
    bitmask_tensors: int = 0
    linear_dense_bytes: int = field(default=0, metadata={"help": "bitmask-encoded Linear weights, stored dense"})
    linear_stored_bytes: int = field(default=0, metadata={"help": "the same weights as bitmask + values"})

    @property
    def ratio(self) -> float:
        """Bytes on disk over the dense size of the same tensors."""
        return self.bytes_on_disk / self.dense_bytes if self.dense_bytes else 1.0

    @property
    def linear_ratio(self) -> float:
        """Stored bytes of the bitmask-encoded Linear weights over their dense bytes."""
        return self.linear_stored_bytes / self.linear_dense_bytes if self.linear_dense_bytes else 1.0

    def __str__(self) -> str:
        mb = 1e6
        return (
            f"{self.path}: {self.bytes_on_disk / mb:.1f} MB in {len(self.files)} shard(s), {self.ratio:.2f}x the "
            f"dense {self.dense_bytes / mb:.1f} MB; {self.bitmask_tensors} of {self.tensors} tensors bitmask-encoded, "
            f"at {self.linear_ratio:.2f}x their dense bytes"
        )


# ---- saving -------------------------------------------------------------------------------------------------
@torch.no_grad()
def save_sparse(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    tokenizer: Optional[Any] = None,
    max_shard_size: Union[int, str] = "2GB",
    overwrite: bool = False,
    progress: bool = False,
) -> ExportSummary:
    """Save a (merged) transformers model as a compact sparse checkpoint that :func:`load_sparse` reads back.

    Every ``nn.Linear`` / ``Conv1D`` weight whose bitmask encoding (one bit per element plus the non-zero values)
    is smaller than the dense tensor is stored that way; everything else is stored as it is. At 50% unstructured
    sparsity that is 0.5625x the dense bytes in bf16 (0.53x in fp32), plus one bit per zero when some zeros are
    ``-0.0`` (masking by multiplication leaves them where negative weights were pruned): 0.594x.

    Args:
        model: a plain ``transformers`` model (merge adapters first with ``merge_and_unload()``).
        path: the checkpoint folder to create.
        tokenizer: saved alongside when given.
        max_shard_size: largest shard, in bytes or as ``"500MB"`` / ``"2GB"``; a larger single tensor gets its own.
        overwrite: replace an existing non-empty ``path`` (atomically; the old one stays until the new is complete).
        progress: show a progress bar over tensors.

    Returns:
        An :class:`ExportSummary` (sizes, ratios; ``str()`` is a one-line summary).
    """
    _check_exportable(model)
    max_bytes = _parse_size(max_shard_size)
    entries, aliases = _unique_state(model)
    linear = _linear_layouts(model)
    with _atomic_folder(Path(path), overwrite) as tmp:
        records, summary = _write_shards(tmp, entries, linear, max_bytes, progress)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": _main_dtype(entries),
            "architecture": type(model).__name__,
            "tensors": records,
            "aliases": aliases,
            "files": summary.files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _save_config(model, tmp, manifest["dtype"])
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        summary.bytes_on_disk = sum((tmp / f).stat().st_size for f in summary.files) + (tmp / MANIFEST).stat().st_size
    summary.path = str(path)
    return summary


def _check_exportable(model: nn.Module) -> None:
    if any(hasattr(m, "base_layer") for m in model.modules()):
        raise ValueError(
            "save_sparse: the model still has adapter layers; call model.merge_and_unload() first and save the result."
        )
    if getattr(model, "config", None) is None or not hasattr(model.config, "save_pretrained"):
        raise ValueError(f"save_sparse needs a transformers model (with a .config); got {type(model).__name__}.")
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError(
            "save_sparse: the model is quantized (config.quantization_config is set); merge into a full-precision "
            "model (bf16/fp16/fp32) and export that."
        )


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int) and size > 0:
        return size
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if match is None or match.group(2).upper() not in units or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size={size!r}: write a positive byte count or a size like '500MB' or '2GB'.")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def _unique_state(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """State-dict entries with tied tensors stored once, and ``{alias: stored name}`` for the others."""
    entries, aliases, seen = [], {}, {}
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            raise ValueError(f"save_sparse: tensor {name!r} is on the meta device (offloaded?); load it fully first.")
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        entries.append((name, tensor))
    return entries, aliases


def _linear_layouts(model: nn.Module) -> dict[str, str]:
    """``{state-dict name of a Linear weight: "linear" or "conv1d"}`` (Conv1D stores its weight transposed)."""
    layouts = {}
    for name, module in model.named_modules():
        if isinstance(module, LINEAR_TYPES) and isinstance(getattr(module, "weight", None), torch.Tensor):
            key = f"{name}.weight" if name else "weight"
            layouts[key] = "linear" if isinstance(module, nn.Linear) else "conv1d"
    return layouts


def _main_dtype(entries: list[tuple[str, torch.Tensor]]) -> str:
    """The floating dtype holding the most elements (the dtype the model is built in on load)."""
    counts: dict[torch.dtype, int] = {}
    for _, t in entries:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return _codec.dtype_name(max(counts, key=counts.get) if counts else torch.float32)


def _nm_pattern(keep: torch.Tensor, layout: str) -> Optional[str]:
    """The tightest of ``_PATTERNS`` that the keep mask follows (groups along d_in), else ``None``."""
    rows = keep if layout == "linear" else keep.t().contiguous()  # (d_out, d_in)
    found = None
    for pattern in sorted(_PATTERNS, key=lambda p: -parse_nm(p)[1]):  # 4:8 first: a 2:4 weight is 4:8 too
        if not _follows(rows, *parse_nm(pattern)):
            break
        found = pattern
    return found


def _follows(keep: torch.Tensor, n: int, m: int) -> bool:
    """At most ``n`` kept per group of ``m`` consecutive inputs (:func:`sparse_peft.masks.is_nm`, on the CPU)."""
    d_out, d_in = keep.shape
    if d_in % m:
        return False
    return _codec.max_group_count(keep.contiguous(), m) <= n


def _encode_entry(name: str, tensor: torch.Tensor, layout: Optional[str]) -> tuple[dict, dict]:
    """``(stored tensors, manifest record)`` for one state-dict entry."""
    t = tensor.detach().to("cpu").contiguous()
    record = {"shape": list(t.shape), "dtype": _codec.dtype_name(t.dtype)}
    dense_bytes = t.numel() * t.element_size()
    if layout is not None and t.dtype in _codec.ENCODABLE and t.dim() == 2:
        keep = _codec.nonzero(t).view(t.shape)  # (rows, cols)
        nnz = _codec.count(keep)
        if (t.numel() + 7) // 8 + nnz * t.element_size() < dense_bytes:  # worth trying (signs may still tip it)
            parts = _codec.encode(t, keep)
            if _codec.encoded_bytes(parts) < dense_bytes:
                record.update(encoding="bitmask", nnz=nnz, layout=layout, signs="signs" in parts)
                record["pattern"] = _nm_pattern(keep, layout)
                record["crc32"] = {part: _codec.crc32(p) for part, p in parts.items()}
                return {f"{name}{_SEP}{part}": p for part, p in parts.items()}, record
    record.update(encoding="dense", crc32=_codec.crc32(t))
    return {name: t}, record


def _write_shards(folder: Path, entries, linear: dict[str, str], max_bytes: int, progress: bool):
    """Encode and write every entry into shards of at most ``max_bytes``; returns ``(records, summary)``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    records: dict[str, dict] = {}
    shards: list[list[str]] = []  # names per shard
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    summary = ExportSummary(path=str(folder), files=[], bytes_on_disk=0, dense_bytes=0)

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(folder / f".shard-{len(shards):05d}"), metadata={"format": FORMAT})
            shards.append([])
            pending, pending_bytes = {}, 0

    for name, tensor in tqdm(entries, desc="export", unit="tensor", disable=not progress):
        if _SEP in name:
            raise ValueError(f"save_sparse: tensor name {name!r} contains {_SEP!r}, which the format reserves.")
        stored, record = _encode_entry(name, tensor, linear.get(name))
        size = sum(t.numel() * t.element_size() for t in stored.values())
        if pending and pending_bytes + size > max_bytes:
            flush()
        pending.update(stored)
        pending_bytes += size
        record["shard"] = len(shards)
        records[name] = record
        _count(summary, tensor, record, size)
    flush()
    return _name_shards(folder, records, len(shards), summary)


def _count(summary: ExportSummary, tensor: torch.Tensor, record: dict, stored_bytes: int) -> None:
    dense = tensor.numel() * tensor.element_size()
    summary.tensors += 1
    summary.dense_bytes += dense
    if record["encoding"] == "bitmask":
        summary.bitmask_tensors += 1
        summary.linear_dense_bytes += dense
        summary.linear_stored_bytes += stored_bytes


def _name_shards(folder: Path, records: dict, n: int, summary: ExportSummary):
    names = [f"sparse-model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(names):
        os.rename(folder / f".shard-{i:05d}", folder / name)
    for record in records.values():
        record["file"] = names[record.pop("shard")]
    summary.files = names
    return records, summary


def _save_config(model: nn.Module, folder: Path, dtype: str) -> None:
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(model, "can_generate", lambda: False)():
        generation_config.save_pretrained(folder)


@contextmanager
def _atomic_folder(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target``, on failure it is removed."""
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        yield tmp
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and removed only afterwards."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


# ---- loading ------------------------------------------------------------------------------------------------
def is_sparse_checkpoint(path: Union[str, os.PathLike]) -> bool:
    """True when ``path`` is a folder holding a sparse checkpoint manifest."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: Union[str, os.PathLike]) -> dict:
    """The validated manifest of the checkpoint in folder ``path``."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise SparseCheckpointError(f"{file}: not found; {path} is not a sparse checkpoint written by save_sparse.")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SparseCheckpointError(f"{file}: not valid JSON ({exc}); the file is truncated or corrupted.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SparseCheckpointError(f"{file}: not a sparse_peft manifest (format != {FORMAT!r}).")
    if manifest.get("version") != VERSION:
        raise SparseCheckpointError(
            f"{file}: format version {manifest.get('version')!r}; this sparse_peft reads version {VERSION} "
            "(upgrade sparse_peft to read newer checkpoints)."
        )
    for key, kind in (("tensors", dict), ("aliases", dict), ("files", list), ("dtype", str)):
        if not isinstance(manifest.get(key), kind):
            raise SparseCheckpointError(f"{file}: field {key!r} is missing or not a {kind.__name__}.")
    for name, record in manifest["tensors"].items():
        _check_record(file, name, record, manifest["files"])
    return manifest


def _check_record(file: Path, name: str, record, files: list) -> None:
    def bad(problem):
        return SparseCheckpointError(f"{file}: tensor {name!r}: {problem}.")

    if not isinstance(record, dict) or record.get("encoding") not in ("dense", "bitmask"):
        raise bad("record has no valid 'encoding' ('dense' or 'bitmask')")
    shape = record.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise bad(f"'shape' {shape!r} is not a list of sizes")
    try:
        _codec.dtype_from_name(record.get("dtype"))
    except (KeyError, TypeError):
        raise bad(f"unknown dtype {record.get('dtype')!r}") from None
    if record["encoding"] == "dense" and not isinstance(record.get("crc32"), int):
        raise bad("'crc32' is missing")
    if record.get("file") not in files:
        raise bad(f"its file {record.get('file')!r} is not among the manifest's files")
    if record["encoding"] == "bitmask":
        if (
            len(shape) != 2
            or not isinstance(record.get("nnz"), int)
            or record.get("layout") not in ("linear", "conv1d")
        ):
            raise bad("a bitmask record needs a 2-D shape, an integer 'nnz' and a layout")
        if record.get("pattern") is not None and record["pattern"] not in _PATTERNS:
            raise bad(f"unknown pattern {record['pattern']!r}")


@torch.no_grad()
def load_sparse(
    path: Union[str, os.PathLike],
    *,
    device: Union[str, torch.device] = "cpu",
    model_class: Optional[type] = None,
    return_tokenizer: bool = False,
    verify_checksums: bool = True,
    progress: bool = False,
):
    """Load a checkpoint written by :func:`save_sparse` as a regular transformers model.

    Weights come back bit for bit (``-0.0`` and NaN payloads included), with the saved config and generation
    config. The model is built from ``config.json`` without random initialisation, then filled tensor by tensor
    from ``safetensors.safe_open``: nothing is unpickled and no second copy of the checkpoint is held in memory.

    Args:
        path: the checkpoint folder.
        device: where the model is built (tensors are decoded on CPU and copied there one at a time).
        model_class: a transformers model class; default the architecture named in ``config.json``.
        return_tokenizer: return ``(model, tokenizer)``; the tokenizer is ``None`` when none was saved.
        verify_checksums: compare each stored tensor's CRC-32 with the manifest (on by default).
        progress: show a progress bar over tensors.

    Raises:
        SparseCheckpointError: a missing, truncated or corrupted file, a manifest that disagrees with the stored
            tensors or with the model, or a bitmask whose popcount differs from its number of values; the message
            names the file and the tensor.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    model = _skeleton(folder, manifest, device, model_class)
    targets = model.state_dict(keep_vars=True)
    _check_names(folder, manifest, targets, type(model).__name__)
    for name, tensor in _iter_tensors(folder, manifest, verify_checksums, progress):
        _fill(targets[name], tensor, folder / manifest["tensors"][name]["file"], name)
    for alias, source in manifest["aliases"].items():
        if targets[alias] is not targets[source]:
            _fill(targets[alias], targets[source].detach(), folder / MANIFEST, alias)
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.eval()
    if not return_tokenizer:
        return model
    return model, _tokenizer(folder)


def _skeleton(folder: Path, manifest: dict, device, model_class) -> nn.Module:
    """The model built from the saved config in the manifest's dtype, on ``device``, without random init."""
    import transformers
    from transformers.initialization import no_init_weights

    config = transformers.AutoConfig.from_pretrained(folder)
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [manifest.get("architecture")])[0]
        model_class = getattr(transformers, str(arch), None)
        if model_class is None:
            raise SparseCheckpointError(
                f"{folder / 'config.json'}: architecture {arch!r} is not a class of this transformers "
                f"{transformers.__version__}; pass model_class=... to load_sparse."
            )
    dtype = _codec.dtype_from_name(manifest["dtype"])
    with no_init_weights(), torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    model.tie_weights()  # skipped with the initialisation
    return model


def _check_names(folder: Path, manifest: dict, targets: dict, arch: str) -> None:
    stored = set(manifest["tensors"]) | set(manifest["aliases"])
    missing = sorted(set(targets) - stored)
    unknown = sorted(stored - set(targets))
    if missing or unknown:
        raise SparseCheckpointError(
            f"{folder / MANIFEST}: the manifest disagrees with the {arch} built from config.json: "
            f"tensors missing {missing[:3]} ({len(missing)}), unknown {unknown[:3]} ({len(unknown)})."
        )
    for alias, source in manifest["aliases"].items():
        if source not in manifest["tensors"]:
            raise SparseCheckpointError(
                f"{folder / MANIFEST}: tensor {alias!r} aliases {source!r}, which is not stored."
            )


def _iter_tensors(folder: Path, manifest: dict, verify_checksums: bool, progress: bool):
    """Yield ``(name, decoded CPU tensor)`` one at a time, file by file, checking each against the manifest."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    by_file: dict[str, list[str]] = {f: [] for f in manifest["files"]}
    for name, record in manifest["tensors"].items():
        by_file[record["file"]].append(name)
    bar = tqdm(total=len(manifest["tensors"]), desc="load", unit="tensor", disable=not progress)
    for file, names in by_file.items():
        path = folder / file
        if not path.is_file():
            raise SparseCheckpointError(f"{path}: missing; it should hold {len(names)} tensors, e.g. {names[:1]}.")
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error type for every header problem
            raise SparseCheckpointError(
                f"{path}: cannot be read as safetensors ({exc}); the file is truncated or corrupted. It holds "
                f"{len(names)} tensors of the checkpoint, e.g. {names[:2]}."
            ) from None
        with handle as f:
            _check_keys(path, f.keys(), names, manifest["tensors"])
            for name in names:
                yield name, _read(path, f, name, manifest["tensors"][name], verify_checksums)
                bar.update(1)
    bar.close()


def _parts(record: dict) -> list[str]:
    return ["mask", "values"] + (["signs"] if record.get("signs") else [])


def _stored_keys(name: str, record: dict) -> list[str]:
    return [f"{name}{_SEP}{part}" for part in _parts(record)] if record["encoding"] == "bitmask" else [name]


def _check_keys(path: Path, keys, names: list[str], records: dict) -> None:
    expected = {k for n in names for k in _stored_keys(n, records[n])}
    missing, extra = sorted(expected - set(keys)), sorted(set(keys) - expected)
    if missing or extra:
        first = (missing or extra)[0].split(_SEP)[0]
        raise SparseCheckpointError(
            f"{path}: tensor {first!r}: the file disagrees with the manifest (missing {missing[:3]}, "
            f"not in the manifest {extra[:3]})."
        )


def _read(path: Path, f, name: str, record: dict, verify_checksums: bool) -> torch.Tensor:
    """One tensor, checked against its record and decoded."""

    def bad(problem):
        return SparseCheckpointError(f"{path}: tensor {name!r}: {problem}.")

    dtype, shape = _codec.dtype_from_name(record["dtype"]), tuple(record["shape"])
    if record["encoding"] == "dense":
        parts = {"tensor": f.get_tensor(name)}
        if parts["tensor"].dtype != dtype or tuple(parts["tensor"].shape) != shape:
            raise bad(
                f"stored as {parts['tensor'].dtype} {tuple(parts['tensor'].shape)}, the manifest says {dtype} {shape}"
            )
        crcs = {"tensor": record["crc32"]}
    else:
        parts = {part: f.get_tensor(f"{name}{_SEP}{part}") for part in _parts(record)}
        _check_parts(parts, record, shape, dtype, bad)
        crcs = record["crc32"]
    if verify_checksums:
        for part, t in parts.items():
            if _codec.crc32(t) != crcs[part]:
                raise bad(
                    f"checksum mismatch{'' if part == 'tensor' else ' in its ' + part}: the stored bytes are corrupted"
                )
    if record["encoding"] == "dense":
        return parts["tensor"]
    keep, negative = _check_bits(parts, record, shape, bad)
    return _codec.decode(keep, parts["values"], shape, negative)


def _check_bits(parts: dict, record: dict, shape: tuple, bad) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Popcounts against the number of values and zeros, and the recorded N:M pattern; returns the unpacked
    ``keep`` ``(numel,)`` and ``negative`` ``(numel - nnz,)`` bits (``None`` without stored signs)."""
    numel = shape[0] * shape[1]
    keep = _codec.unpack_bits(parts["mask"])  # (8 * ceil(numel / 8),), padding included
    ones = _codec.count(keep)
    if ones != record["nnz"]:
        raise bad(f"the bitmask has {ones} bits set but {record['nnz']} values are stored")
    keep = keep[:numel]
    negative = None
    if "signs" in parts:
        negative = _codec.unpack_bits(parts["signs"])
        if _codec.count(negative[numel - ones :]):
            raise bad(f"the sign bits of the zeros run past its {numel - ones} zeros")
        negative = negative[: numel - ones]
    pattern = record.get("pattern")
    if pattern:
        rows = keep.view(shape) if record["layout"] == "linear" else keep.view(shape).t()  # (d_out, d_in)
        if not _follows(rows, *parse_nm(pattern)):
            raise bad(f"the manifest says {pattern}, but the bitmask breaks that pattern")
    return keep, negative


def _check_parts(parts: dict, record: dict, shape: tuple, dtype: torch.dtype, bad) -> None:
    """Dtypes and lengths of the stored parts against the record."""
    numel = shape[0] * shape[1]
    nnz = record["nnz"]
    expected = {
        "mask": (torch.uint8, (numel + 7) // 8),
        "values": (dtype, nnz),
        "signs": (torch.uint8, (numel - nnz + 7) // 8),
    }
    for part, t in parts.items():
        want_dtype, want_len = expected[part]
        if t.dtype != want_dtype or tuple(t.shape) != (want_len,):
            raise bad(
                f"its {part} is {t.dtype} {tuple(t.shape)}, the manifest ({list(shape)}, nnz {nnz}) implies "
                f"{want_dtype} ({want_len},)"
            )


def _fill(target: torch.Tensor, tensor: torch.Tensor, path: Path, name: str) -> None:
    """Copy ``tensor`` into the model's parameter or buffer ``target`` in place, bit for bit."""
    if tuple(target.shape) != tuple(tensor.shape):
        raise SparseCheckpointError(
            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model built from config.json expects "
            f"{tuple(target.shape)}."
        )
    if target.dtype == tensor.dtype and target.device.type == "cpu" and target.is_contiguous():
        _codec.copy_into(target.data, tensor)
    elif target.dtype == tensor.dtype:
        target.data.copy_(tensor)
    else:  # a tensor kept in another dtype than the rest of the model (e.g. fp32 norms in a bf16 model)
        target.data = tensor.to(target.device)


def _tokenizer(folder: Path):
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
