"""sparse_peft.ops: reference vs naive dense maths, opcheck, gradcheck, the loader; and (``-m cuda``) kernel vs reference.

CPU tests run in CI. GPU tests are marked ``cuda`` and also skip without a GPU; run them with ``pytest -m cuda``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_peft import ops
from sparse_peft.ops import _extension, reference
from sparse_peft.ops import ops as ops_impl

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the kernels' dtypes
REF_DTYPES = DTYPES + [torch.float64]  # the reference also takes fp64, and then sums in fp64
IDX_DTYPES = [torch.int32, torch.int64]
FAST = settings(max_examples=30, deadline=None, derandomize=True)


def acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype the ops promise: fp32, or fp64 for fp64."""
    return torch.promote_types(torch.float32, dtype)


# ------------------------------------------------------------------------------------------------------ naive maths
def naive_scatter(weight, indices, values):
    """Python loop in float64, rounded once to weight.dtype."""
    flat = weight.double().flatten().clone()
    for k, v in zip(indices.tolist(), values.double().tolist()):
        flat[k] += v
    return flat.view(weight.shape).to(weight.dtype)


def naive_dense_grad(grad_output, input):
    """The full weight gradient ``g^T x`` in float64, ``(d_out, d_in)``."""
    g = grad_output.reshape(-1, grad_output.shape[-1]).double()
    x = input.reshape(-1, input.shape[-1]).double()
    return g.t() @ x


def close(actual, expected, dtype=torch.float32, scale=1.0):
    tol = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * max(1.0, scale))


# ---------------------------------------------------------------------------------------------------- strategies
@st.composite
def problems(draw):
    """Random (weight dims, token dims, indices with repeats, dtypes, layout) problems."""
    d_out, d_in = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    lead = draw(st.sampled_from([(0,), (1,), (5,), (2, 3), (3, 1)]))  # 2-D and 3-D inputs, incl. empty
    k = draw(st.integers(0, 2 * d_out * d_in))
    idx = draw(st.lists(st.integers(0, d_out * d_in - 1), min_size=k, max_size=k))  # unsorted, repeats
    return dict(
        d_out=d_out,
        d_in=d_in,
        lead=lead,
        idx=idx,
        dtype=draw(st.sampled_from(REF_DTYPES)),
        idx_dtype=draw(st.sampled_from(IDX_DTYPES)),
        transposed=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def make_tokens(p, d, gen):
    """A (*lead, d) tensor, optionally a non-contiguous view."""
    if p["transposed"] and len(p["lead"]) == 1:
        return torch.randn(d, *p["lead"], generator=gen).to(p["dtype"]).t()  # (T, d) non-contiguous
    return torch.randn(*p["lead"], d, generator=gen).to(p["dtype"])


# ------------------------------------------------------------------------------------------- reference vs naive
@FAST
@given(problems(), st.booleans())
def test_scatter_add_delta_matches_naive(p, fp32_values):
    gen = torch.Generator().manual_seed(p["seed"])
    w = torch.randn(p["d_in"], p["d_out"], generator=gen).to(p["dtype"])
    w = w.t() if p["transposed"] else w.t().contiguous()  # (d_out, d_in), maybe non-contiguous
    idx = torch.tensor(p["idx"], dtype=p["idx_dtype"])
    v = torch.randn(len(p["idx"]), generator=gen).to(torch.float32 if fp32_values else p["dtype"])
    w2 = w.clone()
    assert ops.scatter_add_delta_(w2, idx, v, alpha=-0.5) is w2
    assert w2.dtype == w.dtype and w2.shape == w.shape
    close(w2, naive_scatter(w, idx, -0.5 * v.double()), p["dtype"], scale=4.0)


@FAST
@given(problems())
def test_gather_weight_grad_matches_naive(p):
    gen = torch.Generator().manual_seed(p["seed"])
    g, x = make_tokens(p, p["d_out"], gen), make_tokens(p, p["d_in"], gen)
    idx = torch.tensor(p["idx"], dtype=p["idx_dtype"])
    out = ops.gather_weight_grad(g, x, idx)
    assert out.dtype == acc(p["dtype"]) and out.shape == (len(p["idx"]),)
    close(out, naive_dense_grad(g, x).flatten()[idx.long()], acc(p["dtype"]), scale=10.0)


@FAST
@given(problems(), st.booleans(), st.booleans())
def test_partial_weight_grad_matches_naive(p, use_rows, use_cols):
    gen = torch.Generator().manual_seed(p["seed"])
    g, x = make_tokens(p, p["d_out"], gen), make_tokens(p, p["d_in"], gen)
    rows = torch.randint(0, p["d_out"], (3,), generator=gen).to(p["idx_dtype"]) if use_rows else None
    cols = torch.randint(0, p["d_in"], (2,), generator=gen).to(p["idx_dtype"]) if use_cols else None
    out = ops.partial_weight_grad(g, x, rows, cols)
    dense = naive_dense_grad(g, x)
    if rows is not None:
        dense = dense[rows.long()]
    if cols is not None:
        dense = dense[:, cols.long()]
    assert out.dtype == acc(p["dtype"])
    close(out, dense, acc(p["dtype"]), scale=10.0)
    close(ops_impl._partial_weight_grad_mm(g, x, rows, cols), dense, acc(p["dtype"]), scale=10.0)  # the CUDA path


def test_fp64_sums_in_fp64():
    """fp64 inputs are summed in fp64, not fp32: a 1e-12 step next to 1.0 survives, as does a fp64 product."""
    w = torch.ones(2, 3, dtype=torch.float64)
    ops.scatter_add_delta_(w, torch.tensor([4, 4]), torch.tensor([1e-12, 2e-12], dtype=torch.float64))
    assert w[1, 1].item() == 1.0 + 3e-12 and w[0, 0].item() == 1.0
    w32 = torch.ones(1, 2)  # an fp32 weight with fp64 values: summed in fp64, rounded once
    ops.scatter_add_delta_(w32, torch.tensor([0, 0]), torch.tensor([0.5 + 2**-30, 0.5 - 2**-30], dtype=torch.float64))
    assert w32[0, 0].item() == 2.0
    g = torch.tensor([[1.0 + 1e-12]], dtype=torch.float64)
    x = torch.tensor([[1.0 - 1e-12, 3.0]], dtype=torch.float64)
    assert ops.gather_weight_grad(g, x, torch.tensor([0])).item() == (1.0 + 1e-12) * (1.0 - 1e-12)
    assert ops.partial_weight_grad(g, x, cols=torch.tensor([0])).item() == (1.0 + 1e-12) * (1.0 - 1e-12)
    assert ops_impl._native(torch.ones(1), torch.ones(1, dtype=torch.float64)) is None  # fp64: never the fp32 kernel


def test_duplicates_accumulate_and_round_once():
    w = torch.zeros(1, 4, dtype=torch.bfloat16)
    idx = torch.tensor([2, 2, 2, 2])
    v = torch.full((4,), 1.0 / 1024)  # each alone would round away next to 1.0 in bf16
    w[0, 2] = 1.0
    ops.scatter_add_delta_(w, idx, v)
    assert w[0, 2].item() == torch.tensor(1.0 + 4.0 / 1024).to(torch.bfloat16).item()
    g, x = torch.randn(3, 2), torch.randn(3, 5)
    got = ops.gather_weight_grad(g, x, torch.tensor([7, 1, 7]))
    assert got[0] == got[2]  # each occurrence gets the same value


def test_empty_index_sets():
    w = torch.randn(3, 4)
    empty = torch.empty(0, dtype=torch.int64)
    assert torch.equal(ops.scatter_add_delta_(w.clone(), empty, torch.empty(0)), w)
    assert ops.gather_weight_grad(torch.randn(5, 3), torch.randn(5, 4), empty).shape == (0,)
    assert ops.partial_weight_grad(torch.randn(5, 3), torch.randn(5, 4), cols=empty).shape == (3, 0)


def test_inplace_on_parameter_and_bad_arguments():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    ops.scatter_add_delta_(p, torch.tensor([5]), torch.tensor([2.0]))
    assert p[1, 2].item() == 2.0 and p.requires_grad
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.scatter_add_delta_(p, torch.tensor([0.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="indices but"):
        ops.scatter_add_delta_(p, torch.tensor([0, 1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="token counts"):
        ops.gather_weight_grad(torch.randn(4, 2), torch.randn(5, 3), torch.tensor([0]))


def test_every_op_has_a_caller():
    """Each public op is called by a tuner: an op nobody calls is deleted with its kernel, not kept untested in use."""
    tuners = "\n".join(p.read_text() for p in (ROOT / "src" / "sparse_peft" / "tuners").rglob("*.py"))
    public = [n for n in ops.__all__ if n not in ("reference", "extension_status")]
    assert public and all(callable(getattr(ops, n)) for n in public)
    unused = [n for n in public if not re.search(rf"\b{re.escape(n)}(?!\w)", tuners)]
    assert unused == [], f"ops no tuner calls: {unused}"


# ------------------------------------------------------------------------------------------- opcheck / gradcheck
def _samples(dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)

    i32 = torch.tensor([3, 0, 3, 11], dtype=torch.int32)
    i64 = torch.tensor([5, 2], dtype=torch.int64)
    empty = torch.empty(0, dtype=torch.int64)
    cols = torch.tensor([3, 0, 3], dtype=torch.int64)
    return {
        "gather_weight_grad": [(t(2, 5, 3), t(2, 5, 4), i32), (t(6, 3), t(6, 4), i64), (t(6, 3), t(6, 4), empty)],
        "partial_weight_grad": [
            (t(2, 5, 3), t(2, 5, 4), torch.tensor([2, 0, 2]), None),
            (t(6, 3), t(6, 4), None, cols),
            (t(6, 3), t(6, 4), torch.tensor([1]), cols),
        ],
    }


OPS = {
    "gather_weight_grad": torch.ops.sparse_peft.gather_weight_grad.default,
    "partial_weight_grad": torch.ops.sparse_peft.partial_weight_grad.default,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(name, requires_grad, dtype):
    for args in _samples(dtype, requires_grad=requires_grad)[name]:
        torch.library.opcheck(OPS[name], args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_inplace(dtype):
    w = torch.randn(3, 4, dtype=dtype)
    torch.library.opcheck(
        torch.ops.sparse_peft.scatter_add_delta_inplace.default,
        (w, torch.tensor([1, 1, 2]), torch.randn(3, dtype=dtype), 0.5),
    )


@pytest.mark.parametrize("name", sorted(OPS))
def test_gradcheck_fp64(name):
    """fp64 gradcheck and gradgradcheck at torch's default tolerances: the ops sum fp64 inputs in fp64."""
    for args in _samples(torch.float64, requires_grad=True)[name]:
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]

        def fn(*ts, args=args):
            it = iter(ts)
            full = [next(it) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            return OPS[name](*full)

        assert torch.autograd.gradcheck(fn, tensors)
        assert torch.autograd.gradgradcheck(fn, tensors)


# ------------------------------------------------------------------------------------------------------- loader
def test_import_is_lazy():
    """Importing sparse_peft / sparse_peft.ops neither initialises CUDA nor builds anything."""
    code = (
        "import sys, torch, sparse_peft, sparse_peft.ops as o;"
        "assert not torch.cuda.is_initialized();"
        "assert o._extension._STATE is None;"
        "assert o._extension.PREBUILT not in sys.modules, 'prebuilt module imported at import time';"
        "assert 'torch.utils.cpp_extension' not in sys.modules, 'cpp_extension imported at import time'"
    )
    env = {k: v for k, v in os.environ.items() if k != _extension.DISABLE_ENV}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.fixture
def fresh_loader(monkeypatch):
    """A loader with nothing cached and no prebuilt module (even if an ahead-of-time build sits in src/)."""
    _extension._reset_for_tests()
    monkeypatch.setitem(sys.modules, _extension.PREBUILT, None)  # import -> ModuleNotFoundError, as if not installed
    yield monkeypatch
    _extension._reset_for_tests()


def fake_prebuilt(**overrides) -> types.ModuleType:
    """A stand-in for the ahead-of-time ``sparse_peft.ops._C`` that matches this install unless overridden."""
    mod = types.ModuleType(_extension.PREBUILT)
    for op in _extension.KERNEL_OPS:
        setattr(mod, op, lambda *args: None)
    mod.torch_version = _extension._torch_release()
    mod.sources_hash = _extension.sources_hash()
    for name, value in overrides.items():
        if value is None:
            delattr(mod, name)
        else:
            setattr(mod, name, value)
    return mod


def no_build(verbose=False):
    pytest.fail("must not compile")


def test_disable_env_forces_reference(fresh_loader):
    fresh_loader.setenv(_extension.DISABLE_ENV, "1")
    fresh_loader.setattr(_extension, "_compile", no_build)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _extension.load() is None
    assert _extension.status() == {
        "path": "reference",
        "loaded": False,
        "source": "disabled",
        "reason": "SPARSE_PEFT_DISABLE_EXT=1",
        "prebuilt": None,
    }


def test_failed_build_is_cached_and_reported_once(fresh_loader):
    fresh_loader.delenv(_extension.DISABLE_ENV, raising=False)
    calls = []

    def boom(verbose=False):
        calls.append(1)
        raise RuntimeError("Ninja is required to load C++ extensions")

    fresh_loader.setattr(_extension, "_compile", boom)
    with pytest.warns(RuntimeWarning, match="pip install ninja"):
        assert _extension.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _extension.load() is None  # cached: no second build, no second warning
    assert calls == [1]
    assert _extension.status()["source"] == "failed" and "Ninja" in _extension.status()["reason"]


def test_successful_build_is_cached(fresh_loader):
    fresh_loader.delenv(_extension.DISABLE_ENV, raising=False)
    sentinel = object()
    calls = []
    fresh_loader.setattr(_extension, "_compile", lambda verbose=False: calls.append(1) or sentinel)
    assert _extension.load() is sentinel and _extension.load() is sentinel and calls == [1]
    assert _extension.status() == {"path": "jit", "loaded": True, "source": "jit", "reason": "", "prebuilt": None}


def test_prebuilt_module_is_preferred(fresh_loader):
    fresh_loader.delenv(_extension.DISABLE_ENV, raising=False)
    fake = fake_prebuilt()
    fresh_loader.setitem(sys.modules, _extension.PREBUILT, fake)
    fresh_loader.setattr(_extension, "_compile", no_build)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _extension.load() is fake and _extension.load() is fake
    st = _extension.status()
    assert (st["path"], st["loaded"], st["source"], st["reason"]) == ("prebuilt", True, "prebuilt", "")
    assert st["prebuilt"] == _extension.PREBUILT  # the fake has no __file__; a real one reports its .so path


def test_prebuilt_module_is_ignored_when_disabled(fresh_loader):
    fresh_loader.setenv(_extension.DISABLE_ENV, "1")
    fresh_loader.setitem(sys.modules, _extension.PREBUILT, fake_prebuilt())
    fresh_loader.setattr(_extension, "_compile", no_build)
    assert _extension.load() is None
    assert _extension.status()["path"] == "reference" and _extension.status()["source"] == "disabled"
    assert _extension.probe()["path"] == "reference"


@pytest.mark.parametrize(
    "overrides, why",
    [
        ({"gather_weight_grad": None}, "lacks the op(s) gather_weight_grad"),
        ({"torch_version": "1.0.0"}, "built for torch 1.0.0"),
        ({"sources_hash": ""}, "other kernel sources"),
    ],
)
def test_mismatched_prebuilt_falls_back_to_jit(fresh_loader, overrides, why):
    fresh_loader.delenv(_extension.DISABLE_ENV, raising=False)
    fresh_loader.setitem(sys.modules, _extension.PREBUILT, fake_prebuilt(**overrides))
    sentinel, calls = object(), []
    fresh_loader.setattr(_extension, "_compile", lambda verbose=False: calls.append(1) or sentinel)
    with pytest.warns(RuntimeWarning, match=re.escape(why) + ".*--no-build-isolation"):
        assert _extension.load() is sentinel
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _extension.load() is sentinel  # cached: reported once
    assert calls == [1]
    st = _extension.status()
    assert st["path"] == "jit" and why in st["reason"]


def test_prebuilt_that_does_not_import_falls_back(fresh_loader):
    """A prebuilt .so left behind by a torch upgrade fails to import (undefined symbol): use the JIT build."""
    fresh_loader.delenv(_extension.DISABLE_ENV, raising=False)
    real_import = importlib.import_module

    def import_module(name, package=None):
        if name == _extension.PREBUILT:
            raise ImportError("_C.so: undefined symbol: _ZN3c104cuda20getCurrentCUDAStreamEa")
        return real_import(name, package)

    def compile_fails(verbose=False):
        raise OSError("no nvcc")

    fresh_loader.setattr(importlib, "import_module", import_module)
    fresh_loader.setattr(_extension, "_compile", compile_fails)
    with pytest.warns(RuntimeWarning) as record:
        assert _extension.load() is None
    messages = [str(w.message) for w in record]
    assert any("undefined symbol" in m for m in messages) and any("no nvcc" in m for m in messages)
    st = _extension.status()
    assert st["path"] == "reference" and st["source"] == "failed"
    assert "no nvcc" in st["reason"] and "undefined symbol" in st["reason"]


def test_probe_decides_the_path_without_compiling(fresh_loader, capsys):
    fresh_loader.delenv(_extension.DISABLE_ENV, raising=False)
    fresh_loader.setattr(_extension, "_compile", no_build)
    info = _extension.probe()  # nothing installed: the first CUDA call would compile (reference on a CPU torch)
    assert info["path"] == ("reference" if torch.version.cuda is None else "jit") and not info["loaded"]
    assert "no prebuilt sparse_peft.ops._C installed" in info["reason"] and _extension._STATE is None
    fake = fake_prebuilt()
    fresh_loader.setitem(sys.modules, _extension.PREBUILT, fake)
    assert _extension._main([]) == 0
    assert "sparse_peft ops: prebuilt" in capsys.readouterr().out and _extension.load() is fake


def test_binding_defines_the_kernel_ops():
    """The loader's KERNEL_OPS (what a prebuilt module must have) are exactly what binding.cpp defines."""
    text = (_extension.CSRC / "binding.cpp").read_text()
    assert tuple(re.findall(r'm\.def\("(\w+)"', text)) == _extension.KERNEL_OPS
    assert 'm.attr("torch_version")' in text and 'm.attr("sources_hash")' in text


# ------------------------------------------------------------------------------ setup.py: SPARSE_PEFT_BUILD_EXT=1
@pytest.fixture
def setup_py():
    """setup.py as a module (its ``setup()`` call only runs as ``__main__``)."""
    spec = importlib.util.spec_from_file_location("sparse_peft_setup_py", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_nvcc(tmp_path: Path, release: str) -> Path:
    """A CUDA_HOME whose bin/nvcc reports ``release``."""
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.0'\n")
    nvcc.chmod(0o755)
    return nvcc.parent.parent


def test_setup_without_the_switch_is_pure_python(setup_py):
    assert setup_py.extension_setup_kwargs({}) == {}
    assert setup_py.extension_setup_kwargs({setup_py.BUILD_ENV: "0"}) == {}
    code = (
        "import runpy, sys; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py', run_name='__main__');"
        "assert 'torch' not in sys.modules, 'setup.py imported torch'"
    )
    env = {k: v for k, v in os.environ.items() if k != setup_py.BUILD_ENV}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "sparse-peft", out.stdout + out.stderr


def test_setup_switch_without_torch_names_the_fix(setup_py, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as in pip's isolated build environment
    with pytest.raises(setup_py.ExtensionBuildError, match="--no-build-isolation") as err:
        setup_py.extension_setup_kwargs({setup_py.BUILD_ENV: "1"})
    assert "install torch with CUDA first" in str(err.value.code) and "Traceback" not in str(err.value.code)


def test_setup_switch_with_cpu_torch_names_the_fix(setup_py, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(setup_py.ExtensionBuildError, match="(?s)CPU-only build.*install a CUDA build of torch"):
        setup_py.extension_setup_kwargs({setup_py.BUILD_ENV: "1"})


def test_setup_switch_without_nvcc_names_the_fix(setup_py, monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    for home in (None, str(tmp_path)):  # torch found no toolkit; CUDA_HOME points at a folder without bin/nvcc
        monkeypatch.setattr(cpp, "CUDA_HOME", home)
        with pytest.raises(setup_py.ExtensionBuildError, match="(?s)nvcc not found.*set CUDA_HOME"):
            setup_py.extension_setup_kwargs({setup_py.BUILD_ENV: "1"})


def test_setup_switch_with_mismatched_nvcc_names_the_fix(setup_py, monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp, "CUDA_HOME", str(fake_nvcc(tmp_path, "12.4")))
    with pytest.raises(setup_py.ExtensionBuildError, match="(?s)CUDA 12.4, but torch .* CUDA 13.0.*set CUDA_HOME"):
        setup_py.extension_setup_kwargs({setup_py.BUILD_ENV: "1"})


def test_setup_switch_builds_the_prebuilt_module(setup_py, monkeypatch, tmp_path):
    """With a (faked) CUDA torch and nvcc: one CUDAExtension, named as the loader imports it, recording the hash."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp, "CUDA_HOME", str(fake_nvcc(tmp_path, "13.0")))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    env = {setup_py.BUILD_ENV: "1"}
    kwargs = setup_py.extension_setup_kwargs(env)
    (ext,) = kwargs["ext_modules"]
    assert ext.name == _extension.PREBUILT == "sparse_peft.ops._C"
    assert [Path(s).name for s in ext.sources] == list(_extension.SOURCES)
    assert all(not os.path.isabs(s) and (ROOT / s).is_file() for s in ext.sources)
    assert f"-DSPARSE_PEFT_SOURCES_HASH={_extension.sources_hash()}" in ext.extra_compile_args["cxx"]
    assert issubclass(kwargs["cmdclass"]["build_ext"], cpp.BuildExtension)
    assert env["TORCH_CUDA_ARCH_LIST"] == setup_py.DEFAULT_ARCHS  # no GPU visible: torch alone would fail
    env = {setup_py.BUILD_ENV: "1", "TORCH_CUDA_ARCH_LIST": "8.6"}
    setup_py.extension_setup_kwargs(env)
    assert env["TORCH_CUDA_ARCH_LIST"] == "8.6"  # the user's choice wins


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernels_compile():
    env = dict(os.environ, SPARSE_PEFT_CHECK_BINDING="0")  # the .cu files only: seconds
    res = subprocess.run(
        ["bash", str(ROOT / ".ci" / "compile_kernels.sh")], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernels_and_binding_compile():
    """The .cu files and binding.cpp (torch headers, about a minute on 2 cores); a CPU build of torch is enough."""
    env = dict(os.environ, SPARSE_PEFT_CHECK_BINDING="1", PYTHON=sys.executable)
    res = subprocess.run(
        ["bash", str(ROOT / ".ci" / "compile_kernels.sh")], capture_output=True, text=True, timeout=600, env=env
    )
    assert res.returncode == 0 and "binding.cpp not checked" not in res.stdout, res.stdout + res.stderr


# ============================================================================================== GPU (pytest -m cuda)
def cuda_test(fn):
    """Mark a GPU test: selected by ``-m cuda`` and skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


def _torch_lowp_error(fn_lowp, ref):
    """Max abs error of a bf16 torch computation against the fp32 reference: the tolerance scale."""
    return (fn_lowp().float() - ref.float()).abs().max().item()


def _assert_within(actual, ref, torch_err, what):
    err = (actual.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    bound = 2.0 * torch_err + 1e-6 * (1.0 + ref.float().abs().max().item() if ref.numel() else 1.0)
    assert err <= bound, f"{what}: kernel error {err:.3g} > 2x torch bf16 error ({torch_err:.3g})"


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    mod = _extension.load()
    assert mod is not None, f"CUDA extension did not build: {_extension.status()}"
    return mod


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES)
@pytest.mark.parametrize("shape", [(37, 129), (256, 1024), (1, 1)])
@cuda_test
def test_cuda_scatter_matches_reference(ext, dtype, idx_dtype, shape):
    torch.manual_seed(0)
    w = torch.randn(*shape, device="cuda").to(dtype)
    n = w.numel()
    idx = torch.randint(0, n, (max(1, n // 10) + 3,), device="cuda").to(idx_dtype)  # with repeats
    v = torch.randn(idx.numel(), device="cuda")
    ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for alpha in (1.0, -0.25):
        w2, w3 = w.clone(), w.clone()
        w_t = w.t().contiguous().t()  # non-contiguous weight
        ops.scatter_add_delta_(w2, idx, v, alpha=alpha)
        ops.scatter_add_delta_(w_t, idx, v, alpha=alpha)
        reference.scatter_add_delta_(w3, idx, v, alpha=alpha)
        torch.testing.assert_close(w2.float(), w3.float(), rtol=ulp, atol=ulp)
        torch.testing.assert_close(w_t.float(), w3.float(), rtol=ulp, atol=ulp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES)
@pytest.mark.parametrize("lead,d_out,d_in", [((3,), 5, 7), ((2, 13), 37, 129), ((4, 256), 512, 384), ((1,), 1, 1)])
@cuda_test
def test_cuda_gather_matches_reference(ext, dtype, idx_dtype, lead, d_out, d_in):
    torch.manual_seed(0)
    g = torch.randn(*lead, d_out, device="cuda").to(dtype)
    x = torch.randn(*lead, d_in + 3, device="cuda").to(dtype)[..., 1 : d_in + 1]  # non-contiguous
    idx = torch.randint(0, d_out * d_in, (max(1, d_out * d_in // 20) + 5,), device="cuda").to(idx_dtype)
    out = ops.gather_weight_grad(g, x, idx)
    ref = reference.gather_weight_grad(g, x, idx)
    g16, x16 = g.reshape(-1, d_out).bfloat16(), x.reshape(-1, d_in).bfloat16()
    torch_err = _torch_lowp_error(lambda: (g16.t() @ x16).flatten()[idx.long()], ref)
    _assert_within(out, ref, torch_err, "gather_weight_grad")
    # gradients (double backward) go through the same formulas on both paths
    gg, xx = g.float().requires_grad_(), x.float().requires_grad_()
    up = torch.randn_like(ref)
    got = torch.autograd.grad((ops.gather_weight_grad(gg, xx, idx) * up).sum(), (gg, xx))
    want = torch.autograd.grad((reference.gather_weight_grad(gg, xx, idx) * up).sum(), (gg, xx))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@cuda_test
def test_cuda_partial_matches_reference(dtype):
    torch.manual_seed(0)
    g = torch.randn(2, 33, 96, device="cuda").to(dtype)
    x = torch.randn(2, 33, 80, device="cuda").to(dtype)
    cols = torch.randperm(80, device="cuda")[:7]
    rows = torch.tensor([5, 1, 5, 90], device="cuda", dtype=torch.int32)
    for r, c in ((None, cols), (rows, None), (rows, cols)):
        out = ops.partial_weight_grad(g, x, r, c)
        ref = reference.partial_weight_grad(g, x, r, c)
        g16, x16 = g.reshape(-1, 96).bfloat16(), x.reshape(-1, 80).bfloat16()
        dense = g16.t() @ x16
        dense = dense if r is None else dense[r.long()]
        dense = dense if c is None else dense[:, c.long()]
        _assert_within(out, ref, _torch_lowp_error(lambda: dense, ref), "partial_weight_grad")


@cuda_test
def test_cuda_fp64_takes_the_reference(ext):
    """fp64 inputs never reach the fp32 kernels: they are summed in fp64 on the GPU too."""
    w = torch.ones(2, 3, dtype=torch.float64, device="cuda")
    ops.scatter_add_delta_(w, torch.tensor([4, 4], device="cuda"), torch.tensor([1e-12, 2e-12], device="cuda").double())
    assert w[1, 1].item() == 1.0 + 3e-12
    g = torch.tensor([[1.0 + 1e-12]], dtype=torch.float64, device="cuda")
    x = torch.tensor([[1.0 - 1e-12]], dtype=torch.float64, device="cuda")
    got = ops.gather_weight_grad(g, x, torch.tensor([0], device="cuda"))
    assert got.dtype == torch.float64 and got.item() == (1.0 + 1e-12) * (1.0 - 1e-12)


@cuda_test
def test_cuda_int64_flat_index_space(ext):
    """A weight with more than 2**31 elements: int64 indices near the end address it correctly."""
    d_out, d_in = 2**16 + 3, 2**15 + 1  # 2.15e9 elements, 4.3 GB in bf16
    assert d_out * d_in > 2**31
    w = torch.zeros(d_out, d_in, device="cuda", dtype=torch.bfloat16)
    idx = torch.tensor([d_out * d_in - 1, 2**31 + 7, 5, 2**31 + 7], device="cuda", dtype=torch.int64)
    v = torch.tensor([1.0, 2.0, 3.0, 4.0], device="cuda")
    ops.scatter_add_delta_(w, idx, v)
    flat = w.view(-1)
    assert flat[-1].item() == 1.0 and flat[2**31 + 7].item() == 6.0 and flat[5].item() == 3.0
    del w, flat
    torch.cuda.empty_cache()
    g = torch.randn(16, d_out, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16, d_in, device="cuda", dtype=torch.bfloat16)
    got = ops.gather_weight_grad(g, x, idx)
    ref = torch.stack([(g[:, k // d_in].float() * x[:, k % d_in].float()).sum() for k in idx.tolist()])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


class _SpielLinearFn(torch.autograd.Function):
    """A SpIEL-style linear on the ops: forward scatters the delta, backward gathers the gradient at the indices."""

    @staticmethod
    def forward(ctx, x, weight, indices, values):
        w = ops.scatter_add_delta_(weight.clone(), indices, values.detach())  # (d_out, d_in)
        ctx.save_for_backward(x, w, indices)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w, indices = ctx.saved_tensors
        return g @ w, None, None, ops.gather_weight_grad(g, x, indices)


@cuda_test
def test_cuda_sparse_training_step_matches_reference(ext):
    """Op-level SpIEL and S²FT steps on the GPU vs the same step on the CPU reference path.

    The SpIEL/S²FT tuners did not exist when this was written; a tuner-level step belongs with them.
    """
    torch.manual_seed(0)
    d_out, d_in, T = 256, 384, 2 * 64
    weight = torch.randn(d_out, d_in)
    x = torch.randn(2, 64, d_in)
    target = torch.randn(2, 64, d_out)
    indices = torch.randperm(d_out * d_in)[: d_out * d_in // 100]
    cols = torch.randperm(d_in)[:8]
    results = {}
    for dev in ("cpu", "cuda"):
        values = torch.zeros(indices.numel(), device=dev, requires_grad=True)
        opt = torch.optim.SGD([values], lr=0.1)
        for _ in range(3):  # SpIEL
            y = _SpielLinearFn.apply(x.to(dev), weight.to(dev), indices.to(dev), values)
            loss = ((y - target.to(dev)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        w = weight.to(dev).clone()
        for _ in range(3):  # S²FT: train only weight[:, cols] from the partial gradient
            y = x.to(dev) @ w.t()
            g = 2 * (y - target.to(dev)) / y.numel()
            w[:, cols.to(dev)] -= 0.1 * ops.partial_weight_grad(g, x.to(dev), cols=cols.to(dev))
        results[dev] = (values.detach().cpu(), w.cpu())
    for a, b in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _tuner_steps(make_config, use_kernels: bool, steps: int = 3) -> dict[str, torch.Tensor]:
    """A few AdamW steps of a tiny Llama with a sparse tuner on the GPU; trainable tensors afterwards (on CPU)."""
    from conftest import inputs, make_model
    from peft import get_peft_model

    saved = _extension._STATE
    _extension._STATE = None if use_kernels else _extension.ExtensionState(None, "disabled", "test: reference path")
    try:
        torch.manual_seed(0)
        model = get_peft_model(make_model("llama"), make_config()).cuda()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        batch = {k: v.cuda() for k, v in inputs("llama", batch=2, seq=16).items()}
        for _ in range(steps):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert (_extension.load() is not None) == use_kernels
        return {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        _extension._STATE = saved


@cuda_test
def test_cuda_spiel_training_step_matches_reference(ext):
    """A full SpIEL training step on the GPU: native kernels vs the reference path, same device and seed.

    (S²FT has no hand-written kernel: its op runs the same cuBLAS code on both paths, so it is compared with the
    CPU reference at op level in test_cuda_partial_matches_reference and test_cuda_sparse_training_step_matches_reference.)
    """
    import sparse_peft

    def make():
        return sparse_peft.SpielConfig(r=2, init_weights=False, auto_reselection=False, task_type="CAUSAL_LM")

    native, ref = _tuner_steps(make, True), _tuner_steps(make, False)
    assert native.keys() == ref.keys() and native
    for name in native:
        torch.testing.assert_close(native[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
