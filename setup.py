"""The build step pyproject.toml cannot express: the CUDA kernels, on request.

``SPARSE_PEFT_BUILD_EXT=1 pip install --no-build-isolation .`` (or ``-e .``) also compiles
``src/sparse_peft/ops/csrc`` with torch's ``CUDAExtension``/``BuildExtension`` into the package, as
``sparse_peft/ops/_C*.so``; ``sparse_peft.ops._extension`` prefers that module over a just-in-time build. It needs a
CUDA build of torch in the build environment (hence ``--no-build-isolation``) and a CUDA toolkit whose major version
matches ``torch.version.cuda`` (``nvcc``, found through ``CUDA_HOME``). A missing prerequisite stops the install
with a message that names the fix. Without the switch the install is pure Python: torch is not imported here.

Everything else about the build is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from types import ModuleType
from typing import Any, MutableMapping

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_ENV = "SPARSE_PEFT_BUILD_EXT"
CSRC = "src/sparse_peft/ops/csrc"  # relative: setuptools wants relative extension sources
DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100, H100, and PTX for newer GPUs; used when no GPU is visible at build time


# ---------------------------------------------------------------------------------- SPARSE_PEFT_BUILD_EXT=1 (CUDA)
class ExtensionBuildError(SystemExit):
    """A missing prerequisite of ``SPARSE_PEFT_BUILD_EXT=1``; a ``SystemExit``, so pip shows no traceback."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(
            f"sparse_peft: {BUILD_ENV}=1 cannot build the CUDA kernels: {problem}\n"
            f"  Fix: {fix}\n"
            f"  Or install without {BUILD_ENV} (pure Python): the kernels then build on the first CUDA call."
        )


def build_requested(env: MutableMapping[str, str] = os.environ) -> bool:
    """True when ``SPARSE_PEFT_BUILD_EXT`` is set to a true value (``1``, ``true``, ``yes``, ``on``)."""
    return env.get(BUILD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _require_cuda_torch() -> ModuleType:
    """torch, if it imports in the build environment and is a CUDA build."""
    try:
        import torch
        import torch.utils.cpp_extension  # noqa: F401  (CUDA_HOME, CUDAExtension, BuildExtension)
    except ImportError as exc:
        raise ExtensionBuildError(
            f"torch does not import in the build environment ({exc}). By default pip builds in an isolated "
            "environment that has no torch.",
            f"install torch with CUDA first, then run `{BUILD_ENV}=1 pip install --no-build-isolation .` "
            "(setuptools and wheel must be installed too).",
        ) from None
    if torch.version.cuda is None:
        raise ExtensionBuildError(
            f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None).",
            "install a CUDA build of torch first (https://pytorch.org/get-started/locally/), then rerun with "
            "--no-build-isolation.",
        )
    return torch


def _require_nvcc(torch: ModuleType) -> str:
    """The CUDA toolkit folder torch will compile with; its nvcc must exist and match torch's CUDA major version."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc.exe" if os.name == "nt" else "nvcc") if home else ""
    wanted = torch.version.cuda.split(".")[0]
    if not nvcc or not os.path.isfile(nvcc):
        raise ExtensionBuildError(
            f"nvcc not found (torch's CUDA_HOME is {home!r}).",
            f"install a CUDA {wanted}.x toolkit and set CUDA_HOME to it (the folder holding bin/nvcc, "
            "e.g. CUDA_HOME=/usr/local/cuda).",
        )
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ExtensionBuildError(
            f"{nvcc} --version failed ({exc}).", "set CUDA_HOME to a working CUDA toolkit."
        ) from None
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found and found.group(1) != wanted:
        raise ExtensionBuildError(
            f"{nvcc} is CUDA {found.group(1)}.{found.group(2)}, but torch {torch.__version__} was built with CUDA "
            f"{torch.version.cuda}.",
            f"set CUDA_HOME to a CUDA {wanted}.x toolkit, or install the torch build that matches your toolkit.",
        )
    return home


def _arch_list(torch: ModuleType, env: MutableMapping[str, str]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for the build: the user's, torch's default for the visible GPUs, or DEFAULT_ARCHS.

    torch derives the list from the visible GPUs and fails on an empty one, which is the usual case in a Docker build.
    """
    if not env.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        env["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    return env.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs"


def _extension_module() -> ModuleType:
    """``sparse_peft/ops/_extension.py`` loaded by path (stdlib-only imports): it owns the source list and its hash."""
    spec = importlib.util.spec_from_file_location(
        "_sparse_peft_extension_for_setup", os.path.join(HERE, "src", "sparse_peft", "ops", "_extension.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def extension_setup_kwargs(env: MutableMapping[str, str] = os.environ) -> dict[str, Any]:
    """Extra ``setup()`` arguments: none by default; ``sparse_peft.ops._C`` with ``SPARSE_PEFT_BUILD_EXT=1``.

    Raises :class:`ExtensionBuildError` (a ``SystemExit`` naming the fix) when torch, its CUDA build or nvcc is missing.
    May set ``TORCH_CUDA_ARCH_LIST`` in ``env`` (see :func:`_arch_list`).
    """
    if not build_requested(env):
        return {}
    torch = _require_cuda_torch()
    _require_nvcc(torch)
    archs = _arch_list(torch, env)
    ext = _extension_module()
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    module = CUDAExtension(
        name=ext.PREBUILT,
        sources=[f"{CSRC}/{name}" for name in ext.SOURCES],
        include_dirs=[os.path.join(HERE, CSRC)],
        # the loader compares this hash with the installed csrc/ to tell a stale prebuilt module from a matching one
        extra_compile_args={"cxx": ["-O3", f"-DSPARSE_PEFT_SOURCES_HASH={ext.sources_hash()}"], "nvcc": ["-O3"]},
    )
    print(
        f"sparse_peft: building {ext.PREBUILT} with torch {torch.__version__} (CUDA {torch.version.cuda}) "
        f"for TORCH_CUDA_ARCH_LIST={archs}"
    )
    return {"ext_modules": [module], "cmdclass": {"build_ext": BuildExtension}}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for the helpers above
    extra = extension_setup_kwargs()
    setup(**extra)
