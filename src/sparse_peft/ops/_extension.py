"""The one place that loads sparse_peft's native (CUDA) code.

Nothing happens at import time. :func:`load` is called by the CUDA implementations of the ops on their first call
and then:

1. returns ``None`` at once if ``SPARSE_PEFT_DISABLE_EXT=1`` (the pure-PyTorch reference is used everywhere);
2. imports a prebuilt module ``sparse_peft._C`` if an ahead-of-time build installed one;
3. otherwise compiles ``csrc/*.cu`` + ``csrc/binding.cpp`` with ``torch.utils.cpp_extension.load`` (ninja). The
   build is cached on disk by torch (``TORCH_EXTENSIONS_DIR``), so this costs a minute once per machine.

Both outcomes are cached for the life of the process. A failure is reported once, as a ``RuntimeWarning`` that says
how to fix it, and the reference ops are used from then on; results are the same, only slower.

Build ahead of time (e.g. in a Docker image) with::

    python -m sparse_peft.ops build

and check which path is in use with :func:`status` or ``python -m sparse_peft.ops``.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

DISABLE_ENV = "SPARSE_PEFT_DISABLE_EXT"
EXT_NAME = "sparse_peft_ext"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("binding.cpp", "scatter_add_delta.cu", "gather_weight_grad.cu")

_FIX = (
    "sparse_peft falls back to its PyTorch reference ops (same results, slower). To get the CUDA kernels: install a "
    "CUDA toolkit whose major version matches torch.version.cuda (nvcc on PATH or CUDA_HOME set), plus ninja "
    "(`pip install ninja`) and a C++17 compiler, then run `python -m sparse_peft.ops build`. "
    f"Set {DISABLE_ENV}=1 to use the reference deliberately and silence this warning."
)


@dataclass(frozen=True)
class ExtensionState:
    """Outcome of the first :func:`load` call: ``module`` is set on success, ``reason`` says why not otherwise."""

    module: Optional[Any]
    source: str  # "prebuilt", "jit", "disabled" or "failed"
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.module is not None


_STATE: Optional[ExtensionState] = None
_LOCK = threading.Lock()


def disabled() -> bool:
    """True when ``SPARSE_PEFT_DISABLE_EXT`` is set to a true value (``1``, ``true``, ``yes``)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _compile(verbose: bool = False) -> Any:
    import torch.utils.cpp_extension as cpp  # deferred: imports setuptools machinery

    return cpp.load(
        name=EXT_NAME,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        verbose=verbose,
    )


def _try_load(verbose: bool = False) -> ExtensionState:
    if disabled():
        return ExtensionState(None, "disabled", f"{DISABLE_ENV}=1")
    try:
        from sparse_peft import _C  # type: ignore[attr-defined]  # an ahead-of-time build, if one was installed

        return ExtensionState(_C, "prebuilt")
    except ImportError:
        pass
    try:
        return ExtensionState(_compile(verbose), "jit")
    except Exception as exc:  # compiler missing, CUDA mismatch, ninja missing, ...
        first = (str(exc).strip().splitlines() or [""])[0][:300]  # the full compiler log: `python -m sparse_peft.ops build`
        return ExtensionState(None, "failed", f"{type(exc).__name__}: {first}")


def load(verbose: bool = False) -> Optional[Any]:
    """The native module, or ``None`` when the reference path must be used. Builds at most once per process."""
    global _STATE
    if _STATE is None:
        with _LOCK:  # one build even if several threads hit their first CUDA op together
            if _STATE is None:
                state = _try_load(verbose)
                if state.source == "failed":
                    warnings.warn(f"sparse_peft: could not build the CUDA extension ({state.reason}). {_FIX}",
                                  RuntimeWarning, stacklevel=2)
                _STATE = state
    return _STATE.module


def status() -> dict:
    """Which path the ops use, without building anything: ``{"loaded": ..., "source": ..., "reason": ...}``.

    ``source`` is ``"not-loaded"`` before the first CUDA call, then ``"prebuilt"``/``"jit"`` (kernels in use) or
    ``"disabled"``/``"failed"`` (reference in use). CPU tensors always use the reference.
    """
    if _STATE is None:
        return {"loaded": False, "source": "disabled" if disabled() else "not-loaded", "reason": ""}
    return {"loaded": _STATE.available, "source": _STATE.source, "reason": _STATE.reason}


def _reset_for_tests() -> None:
    global _STATE
    _STATE = None


def _main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        mod = load(verbose=True)
        print("sparse_peft: CUDA extension", "ready" if mod is not None else "NOT available", status())
        return 0 if mod is not None else 1
    print(status())
    return 0

