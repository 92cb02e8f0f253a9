"""The one place that loads sparse_peft's native (CUDA) code.

Nothing happens at import time. :func:`load` is called by the CUDA implementations of the ops on their first call
and then:

1. returns ``None`` at once if ``SPARSE_PEFT_DISABLE_EXT=1`` (the pure-PyTorch reference is used everywhere);
2. imports the prebuilt module ``sparse_peft.ops._C`` if an ahead-of-time build installed one
   (``SPARSE_PEFT_BUILD_EXT=1 pip install --no-build-isolation .``, see ``setup.py``) and it matches this install:
   it has every kernel op, was built against this torch version and from these ``csrc/`` sources. A prebuilt module
   that does not import or does not match is skipped, with a warning that says why;
3. otherwise compiles ``csrc/*.cu`` + ``csrc/binding.cpp`` with ``torch.utils.cpp_extension.load`` (ninja). The
   build is cached on disk by torch (``TORCH_EXTENSIONS_DIR``), so this costs a minute once per machine.

Both outcomes are cached for the life of the process. A failure is reported once, as a ``RuntimeWarning`` that says
how to fix it, and the reference ops are used from then on; results are the same, only slower.

Build ahead of time with ``SPARSE_PEFT_BUILD_EXT=1 pip install --no-build-isolation .`` (ships the module in the
package) or with ``python -m sparse_peft.ops build`` (fills torch's just-in-time cache), and check which path is in
use with :func:`status` or ``python -m sparse_peft.ops``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

DISABLE_ENV = "SPARSE_PEFT_DISABLE_EXT"
EXT_NAME = "sparse_peft_ext"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("binding.cpp", "scatter_add_delta.cu", "gather_weight_grad.cu")
HEADERS = ("sparse_peft_kernels.h",)
PREBUILT = "sparse_peft.ops._C"  # the ahead-of-time build (setup.py, SPARSE_PEFT_BUILD_EXT=1)
KERNEL_OPS = ("scatter_add_delta_", "gather_weight_grad")  # what binding.cpp defines

_FIX = (
    "sparse_peft falls back to its PyTorch reference ops (same results, slower). To get the CUDA kernels: install a "
    "CUDA toolkit whose major version matches torch.version.cuda (nvcc on PATH or CUDA_HOME set), plus ninja "
    "(`pip install ninja`) and a C++ compiler, then run `python -m sparse_peft.ops build`, or build the kernels into "
    "the package with `SPARSE_PEFT_BUILD_EXT=1 pip install --no-build-isolation .` from a clone. "
    f"Set {DISABLE_ENV}=1 to use the reference deliberately and silence this warning."
)
_REBUILD = (
    "Rebuild it with `SPARSE_PEFT_BUILD_EXT=1 pip install --no-build-isolation .` (add -e for an editable install) "
    f"from a clone, or set {DISABLE_ENV}=1 to use the reference ops."
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

    @property
    def path(self) -> str:
        """The implementation CUDA tensors get: ``"prebuilt"``, ``"jit"`` or ``"reference"``."""
        return self.source if self.available else "reference"


_STATE: Optional[ExtensionState] = None
_LOCK = threading.Lock()


def disabled() -> bool:
    """True when ``SPARSE_PEFT_DISABLE_EXT`` is set to a true value (``1``, ``true``, ``yes``)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def sources_hash(csrc: Path = CSRC) -> str:
    """16 hex digits naming the kernel sources; an ahead-of-time build records them and :func:`load` compares."""
    h = hashlib.sha256()
    for name in sorted(SOURCES + HEADERS):
        h.update(name.encode() + b"\0" + (csrc / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _torch_release() -> str:
    """``major.minor.patch`` of the running torch (``2.13.0+cu130`` -> ``2.13.0``), as binding.cpp records it."""
    import torch

    m = re.match(r"\d+\.\d+\.\d+", torch.__version__)
    return m.group(0) if m else torch.__version__


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def _prebuilt_mismatch(mod: Any) -> str:
    """Why an imported prebuilt module cannot serve this install, or ``""`` when it matches."""
    missing = [op for op in KERNEL_OPS if not callable(getattr(mod, op, None))]
    if missing:
        return f"it lacks the op(s) {', '.join(missing)}"
    built_for, running = getattr(mod, "torch_version", "unknown"), _torch_release()
    if built_for != running:
        return f"it was built for torch {built_for}, this is torch {running}"
    try:
        expected = sources_hash()
    except OSError:  # csrc/ not shipped: nothing to compare against (and nothing to compile either)
        return ""
    if getattr(mod, "sources_hash", "") != expected:
        return "it was built from other kernel sources than the installed csrc/"
    return ""


def _import_prebuilt() -> tuple[Optional[Any], str]:
    """``(module, "")`` for a usable ahead-of-time build, else ``(None, why)``; ``why == ""``: none installed."""
    try:
        mod = importlib.import_module(PREBUILT)
    except ModuleNotFoundError as exc:
        if exc.name == PREBUILT:
            return None, ""
        return None, f"it does not import ({_first_line(exc)})"
    except Exception as exc:  # undefined symbol after a torch/CUDA change, wrong architecture, ...
        return None, f"it does not import ({_first_line(exc)})"
    why = _prebuilt_mismatch(mod)
    return (None, why) if why else (mod, "")


def _prebuilt_file() -> Optional[str]:
    """Where the prebuilt module is installed, without importing it (``None`` when there is none)."""
    mod = sys.modules.get(PREBUILT)
    if mod is not None:  # already imported (by load)
        return getattr(mod, "__file__", None) or PREBUILT
    try:
        spec = importlib.util.find_spec(PREBUILT)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


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
    mod, why = _import_prebuilt()
    if mod is not None:
        return ExtensionState(mod, "prebuilt")
    skipped = f"prebuilt {PREBUILT} skipped: {why}" if why else ""
    if skipped:
        warnings.warn(
            f"sparse_peft: {skipped}; compiling the kernels just in time instead. {_REBUILD}",
            RuntimeWarning,
            stacklevel=4,
        )
    try:
        return ExtensionState(_compile(verbose), "jit", skipped)
    except Exception as exc:  # compiler missing, CUDA mismatch, ninja missing, ...
        # the full compiler log: `python -m sparse_peft.ops build`
        return ExtensionState(None, "failed", "; ".join(filter(None, [_first_line(exc), skipped])))


def load(verbose: bool = False) -> Optional[Any]:
    """The native module, or ``None`` when the reference path must be used. Builds at most once per process."""
    global _STATE
    if _STATE is None:
        with _LOCK:  # one build even if several threads hit their first CUDA op together
            if _STATE is None:
                state = _try_load(verbose)
                if state.source == "failed":
                    warnings.warn(
                        f"sparse_peft: could not build the CUDA extension ({state.reason}). {_FIX}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                _STATE = state
    return _STATE.module


def status() -> dict:
    """Which path the ops on CUDA tensors use, without building or importing anything.

    Returns ``{"path", "loaded", "source", "reason", "prebuilt"}``:

    - ``path``: ``"prebuilt"`` (the ahead-of-time module), ``"jit"`` (compiled just in time) or ``"reference"``
      (pure PyTorch); ``"not-loaded"`` before the first CUDA call (:func:`probe` decides it without compiling);
    - ``loaded``: whether the kernels are in use; ``source``: ``prebuilt``, ``jit``, ``disabled``, ``failed`` or
      ``not-loaded``; ``reason``: why not the kernels, or why a prebuilt module was skipped;
    - ``prebuilt``: the installed ahead-of-time module file, or ``None``.

    CPU tensors always use the reference.
    """
    if _STATE is None:
        off = disabled()
        return {
            "path": "reference" if off else "not-loaded",
            "loaded": False,
            "source": "disabled" if off else "not-loaded",
            "reason": f"{DISABLE_ENV}=1" if off else "",
            "prebuilt": _prebuilt_file(),
        }
    return {
        "path": _STATE.path,
        "loaded": _STATE.available,
        "source": _STATE.source,
        "reason": _STATE.reason,
        "prebuilt": _prebuilt_file(),
    }


def probe() -> dict:
    """:func:`status`, with the path decided now as far as that needs no compiler.

    When nothing is loaded yet: with ``SPARSE_PEFT_DISABLE_EXT=1`` the path is ``"reference"``; a matching prebuilt
    module is loaded (an import, which does not initialise CUDA) and the path is ``"prebuilt"``; otherwise the path is
    ``"jit"``, with the reason, and nothing is compiled until the first CUDA call (or ``python -m sparse_peft.ops
    build``); on a CPU build of torch it is ``"reference"``.
    """
    if _STATE is None:
        if not disabled():
            mod, why = _import_prebuilt()
            if mod is None:
                import torch

                why = f"prebuilt {PREBUILT} skipped: {why}" if why else f"no prebuilt {PREBUILT} installed"
                if torch.version.cuda is None:
                    cpu = f"torch {torch.__version__} is a CPU build, so every op runs the reference"
                    return {**status(), "path": "reference", "reason": f"{why}; {cpu}"}
                return {**status(), "path": "jit", "reason": f"{why}; the kernels compile on the first CUDA call"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nothing can fail here: disabled, or a prebuilt that just matched
            load()
    return status()


def _reset_for_tests() -> None:
    global _STATE
    _STATE = None


_PATHS = {
    "prebuilt": "the CUDA kernels of the ahead-of-time build",
    "jit": "the CUDA kernels, compiled just in time and cached by torch under TORCH_EXTENSIONS_DIR",
    "reference": "the pure-PyTorch reference ops",
}


def _main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        mod = load(verbose=True)
        print("sparse_peft: CUDA extension", "ready" if mod is not None else "NOT available", status())
        return 0 if mod is not None else 1
    if argv:
        print("usage: python -m sparse_peft.ops [build]")
        return 2
    info = probe()
    print(f"sparse_peft ops: {info['path']}: CUDA tensors use {_PATHS[info['path']]}; CPU tensors use the reference")
    print(info)
    return 0
