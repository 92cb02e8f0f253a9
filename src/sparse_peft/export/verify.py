"""``verify``: prove that a merged (or otherwise changed) model kept the zeros of its pruned base."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn

from .._layout import linear_weight
from ..masks import parse_nm
from ..pruning.masks_io import load_masks
from . import _codec
from ..pruning.report import prunable_modules

_INFERRED_PATTERNS = ("2:4", "4:8")


@dataclass
class ModuleCheck:
    """One module of a :class:`VerifyReport`."""

    name: str
    shape: tuple[int, int]
    reference_nnz: int = field(metadata={"help": "weights the reference keeps"})
    nnz: int = field(metadata={"help": "non-zero weights of the checked model"})
    revived: int = field(metadata={"help": "non-zeros where the reference has a zero"})
    bad_groups: int = field(default=0, metadata={"help": "N:M groups with more than N non-zeros"})

    @property
    def reference_zeros(self) -> int:
        return self.shape[0] * self.shape[1] - self.reference_nnz


@dataclass
class VerifyReport:
    """What :func:`verify` checked. ``ok`` is always ``True`` on a returned report (failures raise)."""

    modules: list[ModuleCheck]
    nm_pattern: Optional[str] = None
    allow_moves: bool = False

    @property
    def revived(self) -> int:
        return sum(m.revived for m in self.modules)

    @property
    def reference_zeros(self) -> int:
        return sum(m.reference_zeros for m in self.modules)

    @property
    def reference_nnz(self) -> int:
        return sum(m.reference_nnz for m in self.modules)

    @property
    def nnz(self) -> int:
        return sum(m.nnz for m in self.modules)

    @property
    def bad_groups(self) -> int:
        return sum(m.bad_groups for m in self.modules)

    def failures(self) -> list[str]:
        """One line per failing module, naming it and the count."""
        lines = []
        for m in self.modules:
            if not self.allow_moves and m.revived:
                lines.append(f"{m.name}: {m.revived} pruned weights are non-zero")
            if self.allow_moves and m.nnz > m.reference_nnz:
                lines.append(f"{m.name}: {m.nnz - m.reference_nnz} more non-zeros than the reference")
            if m.bad_groups:
                lines.append(f"{m.name}: {m.bad_groups} groups break the {self.nm_pattern} pattern")
        return lines

    @property
    def ok(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "nm_pattern": self.nm_pattern,
            "allow_moves": self.allow_moves,
            "revived": self.revived,
            "reference_zeros": self.reference_zeros,
            "reference_nnz": self.reference_nnz,
            "nnz": self.nnz,
            "modules": [asdict(m) for m in self.modules],
        }

    def __str__(self) -> str:
        nm = f", {self.nm_pattern} valid" if self.nm_pattern and not self.bad_groups else ""
        nnz = f"nnz {self.reference_nnz:,} -> {self.nnz:,}"
        if self.allow_moves:
            return f"verified {len(self.modules)} modules (moves allowed): {nnz}, {self.revived:,} non-zeros moved{nm}"
        return (
            f"verified {len(self.modules)} modules: {self.revived:,} of {self.reference_zeros:,} pruned weights "
            f"non-zero, {nnz}{nm}"
        )


class SparsityError(ValueError):
    """Raised by :func:`verify`; ``.report`` holds the full :class:`VerifyReport`."""

    def __init__(self, message: str, report: VerifyReport):
        super().__init__(message)
        self.report = report


@torch.no_grad()
def verify(
    model: nn.Module,
    reference: Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike],
    *,
    nm_pattern: Optional[str] = None,
    allow_moves: bool = False,
) -> VerifyReport:
    """Check that ``model`` kept the zeros of its pruned base; raise naming every module that did not.

    Args:
        model: the model to check (merged: a model with unmerged adapter layers is refused).
        reference: the pruned base model, its keep masks (``{module name: bool (d_out, d_in)}``, ``True`` = kept,
            as :func:`sparse_peft.pruning.get_masks` returns), or a mask file written by
            :func:`sparse_peft.pruning.save_masks`.
        nm_pattern: also check this N:M pattern (e.g. ``"2:4"``) on every reference module; default: the
            pattern the reference follows, if it follows ``2:4`` or ``4:8``.
        allow_moves: for SpIEL in SEFT mode, where merging may move non-zeros: check only that no module has
            more non-zeros than the reference (and the N:M pattern), not their positions.

    Returns:
        A :class:`VerifyReport` (``print`` it for a one-line summary).

    Raises:
        SparsityError: a pruned zero came back (or, with ``allow_moves``, a module gained non-zeros), or an N:M
            group holds too many non-zeros. The message names each module and its count.
        ValueError: the reference does not match the model (unknown module, other shape) or is not a mask.
    """
    if any(hasattr(m, "base_layer") for m in model.modules()):
        raise ValueError("verify: the model still has adapter layers; verify the result of model.merge_and_unload().")
    masks = _reference_masks(reference)
    pattern = nm_pattern if nm_pattern is not None else _inferred_pattern(masks)
    nm = parse_nm(pattern, field="nm_pattern")
    modules = prunable_modules(model)
    checks = [_check_module(name, modules.get(name), keep, nm) for name, keep in masks.items()]
    report = VerifyReport(checks, pattern, allow_moves)
    failures = report.failures()
    if failures:
        more = f"; ... and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise SparsityError(
            f"verify failed for {len(failures)} module check(s): " + "; ".join(failures[:5]) + more, report
        )
    return report


def _reference_masks(reference) -> dict[str, torch.Tensor]:
    if isinstance(reference, nn.Module):
        return {name: torch.from_numpy(_nonzero(linear_weight(m))) for name, m in prunable_modules(reference).items()}
    if isinstance(reference, (str, os.PathLike)):
        return _mask_file(Path(reference))
    if isinstance(reference, Mapping):
        for name, mask in reference.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
                raise ValueError(
                    f"verify: reference[{name!r}] must be a 2-D bool keep mask (True = kept), as "
                    "sparse_peft.pruning.get_masks returns."
                )
        return dict(reference)
    raise TypeError(
        f"verify: reference must be the pruned base model, a dict of keep masks, or a mask file path; "
        f"got {type(reference).__name__}."
    )


def _mask_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"verify: mask file {path} does not exist (write one with sparse_peft.pruning.save_masks)."
        )
    try:
        masks = load_masks(path)
    except Exception as exc:  # safetensors' own error type for a bad header
        raise ValueError(f"verify: {path} is not a mask file written by save_masks ({exc}).") from None
    if not masks:
        raise ValueError(f"verify: {path} holds no masks (write one with sparse_peft.pruning.save_masks).")
    return masks


def _inferred_pattern(masks: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The first N:M pattern that every reference mask follows (and that prunes something), else ``None``."""
    if not masks or all(bool(m.all()) for m in masks.values()):
        return None
    for pattern in _INFERRED_PATTERNS:
        n, m = parse_nm(pattern)
        if all(k.shape[1] % m == 0 and _codec.max_group_count(k.contiguous(), m) <= n for k in masks.values()):
            return pattern
    return None


def _nonzero(weight: torch.Tensor) -> np.ndarray:
    """``weight != 0`` as a numpy ``bool`` array ``(d_out, d_in)`` on the CPU."""
    w = weight.detach()
    if w.device.type == "cpu" and w.dtype in _codec.ENCODABLE:
        return _codec.nonzero(w.contiguous()).numpy().reshape(w.shape)  # single-threaded, bit-level
    return (w != 0).cpu().numpy()


def _check_module(name: str, module: Optional[nn.Module], keep: torch.Tensor, nm) -> ModuleCheck:
    if module is None:
        raise ValueError(f"verify: the reference has a mask for {name!r}, but the model has no such Linear module.")
    w = linear_weight(module)  # (d_out, d_in)
    if tuple(w.shape) != tuple(keep.shape):
        raise ValueError(f"verify: {name!r} is {tuple(w.shape)} in the model but {tuple(keep.shape)} in the reference.")
    kept = keep.detach().cpu().numpy()  # (d_out, d_in) bool
    nonzero = _nonzero(w)  # (d_out, d_in) bool
    revived = int(np.count_nonzero(nonzero & ~kept))
    check = ModuleCheck(name, tuple(w.shape), int(np.count_nonzero(kept)), int(np.count_nonzero(nonzero)), revived)
    if nm is not None:
        check.bad_groups = _bad_groups(nonzero, *nm)
    return check


def _bad_groups(nonzero: np.ndarray, n: int, m: int) -> int:
    """Groups of ``m`` consecutive inputs with more than ``n`` non-zeros (every group, if ``d_in % m``)."""
    d_out, d_in = nonzero.shape
    if d_in % m:
        return d_out * -(-d_in // m)
    counts = _codec.group_counts(torch.from_numpy(np.ascontiguousarray(nonzero)), m)  # (d_out * d_in / m,)
    return int(np.count_nonzero(counts > n))
