"""Quantized bases: the one module that reads and writes bitsandbytes weights.

The tuners, the sparsity report, the callbacks and the pruning toolkit see every layer through its *logical* weight,
``(d_out, d_in)`` in ``nn.Linear`` layout, and its logical shape. For a bitsandbytes layer this module produces that
weight (dequantizing into a fresh tensor) and writes one back (quantizing with the layer's own settings). Nothing
else in sparse_peft touches packed storage.

Supported: ``Linear4bit`` (NF4 or FP4, with or without double quantization) and ``Linear8bitLt`` holding int8
weights with ``threshold=0``. A layer quantized any other way is refused with an error naming the module and what is
supported (:func:`check_supported`).

Writing back keeps the zero pattern exactly (:func:`requantize`): every zero maps to the exact zero code (NF4, FP4
and int8 all have one), and a non-zero that plain rounding would send to zero gets the smallest non-zero code of its
block or row instead. So a merge into a quantized base never revives a pruned weight and never loses a kept one.

Also here: the guard against bitsandbytes issue 2078 (:data:`BNB_2078`, :func:`guard_repacking`).

bitsandbytes is never imported when this module is; functions look it up in ``sys.modules`` (a bitsandbytes layer
implies it is loaded) and import it only to quantize a full-precision weight for a fingerprint check.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

SUPPORTED = (
    "torch.nn.Linear, transformers' Conv1D, bitsandbytes Linear4bit (NF4 or FP4, with or without double "
    "quantization) and bitsandbytes Linear8bitLt (int8 weights, threshold=0.0)"
)

BNB_2078 = (
    "bitsandbytes issue 2078: on CPUs with AVX512-BF16, a no-grad eval forward through bitsandbytes' own "
    "Linear4bit.forward repacks the 4-bit weight in place, after which dequantizing it gives wrong values, merges "
    "come out wrong and gradients stop"
)

_FLOAT8 = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)
# Attributes by which other quantizers' layers (GPTQ, AWQ, HQQ, compressed-tensors, ...) can be recognised.
_FOREIGN_ATTRS = ("qweight", "W_q", "weight_packed", "qzeros", "weight_scale")


# ---- what a layer is -------------------------------------------------------------------------------------------
def quant_kind(module: nn.Module) -> Optional[str]:
    """``"4bit"`` for a bitsandbytes ``Linear4bit`` (NF4/FP4), ``"8bit"`` for ``Linear8bitLt``, else ``None``."""
    bnb = sys.modules.get("bitsandbytes")  # a bnb layer implies bnb is loaded; never import it here
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def _is_tensor_subclass(w: torch.Tensor) -> bool:
    """A weight stored as a tensor subclass (torchao, quanto), except DTensor (FSDP2 shards, not quantization)."""
    data = w.data if isinstance(w, nn.Parameter) else w
    if type(data) is torch.Tensor:
        return False
    return type(data).__name__ != "DTensor"


def unsupported_quantization(module: nn.Module) -> Optional[str]:
    """Why sparse_peft cannot read or write ``module``'s weight, or ``None`` when it can."""
    kind = quant_kind(module)
    if kind == "4bit":
        if getattr(module.weight, "quant_state", None) is None:
            return "its Linear4bit weight is not quantized yet (move the module to a device first: .to('cpu'))"
        return None
    if kind == "8bit":
        if module.weight.dtype != torch.int8:
            return (
                f"it is a Linear8bitLt holding {module.weight.dtype} weights (has_fp16_weights=True or not quantized)"
            )
        threshold = float(getattr(module.state, "threshold", 0.0) or 0.0)
        if threshold > 0:
            return (
                f"it is a Linear8bitLt with threshold={threshold:g}: bitsandbytes' forward then runs the LLM.int8() "
                "outlier decomposition, which sparse_peft (computing through the dequantized weight) does not reproduce"
            )
        return None
    cls = type(module)
    package = cls.__module__.split(".")[0]
    if package == "bitsandbytes":
        return f"bitsandbytes' {cls.__name__} is not one of the supported bitsandbytes layers"
    found = [a for a in _FOREIGN_ATTRS if getattr(module, a, None) is not None]
    if found:
        return f"it is quantized by {package} (it holds {found[0]!r})"
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        if _is_tensor_subclass(w):
            return f"its weight is a {type(w.data).__name__} (quantized by {type(w.data).__module__.split('.')[0]})"
        if not w.is_floating_point() or w.dtype in _FLOAT8:
            return f"its weight is stored as {w.dtype}, i.e. quantized"
    return None


def is_supported(module: nn.Module) -> bool:
    """``nn.Linear`` / ``Conv1D`` with a floating-point weight, or a supported bitsandbytes layer."""
    if quant_kind(module) is None and type(module) not in (nn.Linear, Conv1D):
        return False
    return unsupported_quantization(module) is None


def check_supported(module: nn.Module, name: str, who: str) -> None:
    """Raise a ``TypeError`` naming ``name``, its type, why it is refused and what ``who`` supports."""
    if is_supported(module):
        return
    cls = type(module)
    reason = unsupported_quantization(module)
    if reason is None and isinstance(module, (nn.Linear, Conv1D)):
        reason = "only the exact layer types below are supported, not subclasses from elsewhere"
    elif reason is None:
        reason = "it is not a linear layer"
    if "threshold=" in reason:
        fix = (
            "Load the model with BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0), or in 4 bits "
            "(load_in_4bit=True)."
        )
    else:
        fix = (
            "Remove it from target_modules (or add it to exclude_modules); to train a quantized model, load it with "
            "BitsAndBytesConfig(load_in_4bit=True) or (load_in_8bit=True, llm_int8_threshold=0.0)."
        )
    raise TypeError(
        f"{who} cannot adapt module {name!r} of type {cls.__name__} ({cls.__module__}): {reason}. "
        f"Supported: {SUPPORTED}. {fix}"
    )


def check_readable(module: nn.Module, name: str = "") -> None:
    """Raise a clear ``TypeError`` when ``module``'s weight is quantized in a way sparse_peft cannot read."""
    reason = unsupported_quantization(module)
    if reason is not None:
        where = f"module {name!r}" if name else f"a {type(module).__name__}"
        raise TypeError(f"sparse_peft cannot read the weight of {where}: {reason}. Supported: {SUPPORTED}.")


# ---- logical shape and weight ---------------------------------------------------------------------------------
def logical_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a linear layer, whatever its storage (packed 4-bit, Conv1D's transpose)."""
    if quant_kind(module) is not None:  # the packed weight's shape says nothing; nn.Linear's fields do
        return module.out_features, module.in_features
    d0, d1 = module.weight.shape
    return (d1, d0) if isinstance(module, Conv1D) else (d0, d1)


def dequantize(module: nn.Module, name: str = "") -> torch.Tensor:
    """The weight of a bitsandbytes layer, ``(d_out, d_in)``, in a fresh tensor (4-bit: the dtype it was quantized
    from; 8-bit: fp32)."""
    import bitsandbytes as bnb  # already loaded: quant_kind found a bnb layer

    check_readable(module, name)
    w = module.weight
    if quant_kind(module) == "4bit":
        check_not_repacked(module, name)
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)  # (d_out, d_in)
    return bnb.functional.int8_vectorwise_dequant(w.data, _scb(module))  # (d_out, d_in) fp32


def _scb(module: nn.Module) -> torch.Tensor:
    """The per-row scales of a ``Linear8bitLt`` (bitsandbytes moves them from the weight to ``state`` on forward)."""
    w = module.weight
    return w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB


def logical_weight(module: nn.Module, name: str = "") -> torch.Tensor:
    """The weight in ``nn.Linear`` layout ``(d_out, d_in)``: the parameter itself for ``nn.Linear``, a transposed
    view for ``Conv1D``, a fresh dequantized tensor for a bitsandbytes layer (writing to it changes nothing)."""
    if quant_kind(module) is not None:
        return dequantize(module, name)
    w = module.weight
    if not w.is_floating_point() or w.dtype in _FLOAT8:
        check_readable(module, name)
    return w.t() if isinstance(module, Conv1D) else w


# ---- writing a weight back --------------------------------------------------------------------------------------
def _quantize(module: nn.Module, dense: torch.Tensor) -> Any:
    """``dense`` ``(d_out, d_in)`` quantized with ``module``'s settings: ``(data, state)`` for 4-bit, ``(cb, scb)``
    for 8-bit."""
    import bitsandbytes as bnb

    if quant_kind(module) == "4bit":
        old = module.weight
        return bnb.functional.quantize_4bit(
            dense.contiguous(),
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
        )
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(dense.contiguous())  # as Int8Params does
    return cb, scb


def _dequantized(module: nn.Module, q: Any) -> torch.Tensor:
    import bitsandbytes as bnb

    if quant_kind(module) == "4bit":
        return bnb.functional.dequantize_4bit(q[0], q[1])
    return bnb.functional.int8_vectorwise_dequant(q[0], q[1])


def _smallest_codes(module: nn.Module, dense: torch.Tensor) -> torch.Tensor:
    """Per entry of ``dense``, the smallest non-zero value of its sign that quantizes to a non-zero code,
    ``(d_out, d_in)``: the smallest code of that sign times the absmax of the entry's 4-bit block, or absmax/127 of
    its int8 row."""
    import bitsandbytes as bnb

    d = dense.float()
    if quant_kind(module) == "8bit":
        return d.abs().amax(1, keepdim=True).div(127.0).expand_as(d) * d.sign()  # (d_out, d_in)
    code = bnb.functional.get_4bit_type(module.weight.quant_type, device=d.device)  # (16,) normalised codes
    pos, neg = code[code > 0].min(), code[code < 0].max()
    flat = d.reshape(-1)  # (numel,)
    bs = module.weight.blocksize
    pad = (-flat.numel()) % bs
    absmax = F.pad(flat.abs(), (0, pad)).view(-1, bs).amax(1)  # (blocks,)
    scale = absmax.repeat_interleave(bs)[: flat.numel()].view_as(d)  # (d_out, d_in)
    return torch.where(d > 0, pos, neg) * scale


def requantize(module: nn.Module, dense: torch.Tensor, name: str = "") -> Any:
    """Replace the weight of bitsandbytes layer ``module`` by ``dense`` ``(d_out, d_in)``, quantized like the old one
    (quant type, block size, double quantization, storage, dtype). Returns a handle for :func:`restore`.

    The zero pattern of ``dense`` is kept exactly: zeros quantize to the exact zero code, and a non-zero that
    rounding would send to zero (smaller than half the smallest code of its block) is written as that smallest
    code. Lossy for non-zeros otherwise, as in peft's LoRA merge. The layer is unchanged if this raises.
    """
    import bitsandbytes as bnb

    kind = quant_kind(module)
    nonzero = dense != 0  # (d_out, d_in) the pattern to keep, before any cast
    target = module.weight.quant_state.dtype if kind == "4bit" else torch.float16
    d = dense.to(target)
    q = _quantize(module, d)
    lost = nonzero & (_dequantized(module, q) == 0)
    if bool(lost.any()):  # raising these to the smallest code leaves every absmax (and all other codes) unchanged
        d = torch.where(lost, _smallest_codes(module, d).to(target), d)
        q = _quantize(module, d)
    if not torch.equal(_dequantized(module, q) != 0, nonzero):
        where = f" of module {name!r}" if name else ""
        raise RuntimeError(
            f"re-quantizing the weight{where} would change its zero pattern (non-zeros too small for "
            f"{target}); the layer is unchanged."
        )
    old = module.weight, (_scb(module) if kind == "8bit" else None)
    if kind == "4bit":
        data, state = q
        w = module.weight
        module.weight = bnb.nn.Params4bit(
            data,
            requires_grad=False,
            quant_state=state,
            blocksize=w.blocksize,
            compress_statistics=w.compress_statistics,
            quant_type=w.quant_type,
            quant_storage=w.quant_storage,
            module=module,
            bnb_quantized=True,
        )
        module.quant_state = state
    else:
        _set_int8(module, *q)
    return old


def _set_int8(module: nn.Module, cb: torch.Tensor, scb: torch.Tensor) -> None:
    import bitsandbytes as bnb

    module.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    module.state.reset_grads()  # drops the CB/SCB bitsandbytes cached from the old weight


def restore(module: nn.Module, handle: Any) -> None:
    """Put back the weight :func:`requantize` replaced (exact: the very same quantized tensors)."""
    weight, scb = handle
    if quant_kind(module) == "4bit":
        module.weight = weight
        module.quant_state = weight.quant_state
    else:
        _set_int8(module, weight.data, scb)


# ---- computing with a quantized base ----------------------------------------------------------------------------
def compute_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a bitsandbytes layer computes in (``Linear4bit.compute_dtype``; else the input's)."""
    return getattr(module, "compute_dtype", None) or x.dtype


def linear(module: nn.Module, x: torch.Tensor, name: str = "") -> torch.Tensor:
    """``module(x)`` for a bitsandbytes layer, computed through the dequantized weight in its compute dtype.

    Tuners use this for the base alone (adapters disabled or merged) instead of bitsandbytes' own forward, whose
    CPU inference path repacks the weight in place (bitsandbytes issue 2078).
    """
    dtype = compute_dtype(module, x)
    bias = None if module.bias is None else module.bias.to(dtype)
    return F.linear(x.to(dtype), dequantize(module, name).to(dtype), bias).to(x.dtype)


# ---- bitsandbytes issue 2078 ------------------------------------------------------------------------------------
def is_repacked_for_cpu(module: nn.Module) -> bool:
    """True when bitsandbytes has repacked this ``Linear4bit``'s weight for its AVX512-BF16 CPU kernel (issue 2078)."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def check_not_repacked(module: nn.Module, name: str = "") -> None:
    """Raise a clear error when ``module``'s 4-bit weight was repacked in place (bitsandbytes issue 2078)."""
    if is_repacked_for_cpu(module):
        where = f" of module {name!r}" if name else ""
        raise RuntimeError(
            f"The 4-bit weight{where} is in bitsandbytes' CPU inference layout ({BNB_2078}). sparse_peft cannot use "
            "it. Fix: reload the quantized model and call get_peft_model before any eval/no-grad forward; sparse_peft "
            "then sets support_avx512bf16_for_cpu=False on every Linear4bit, which stops the repacking (do the same "
            "yourself before running inference on a bare 4-bit model)."
        )


def guard_repacking(model: nn.Module) -> None:
    """Guard every ``Linear4bit`` of ``model``, adapted or not, against bitsandbytes issue 2078.

    On CPUs with AVX512-BF16, bitsandbytes' own no-grad eval forward repacks a 4-bit weight in place; gradients then
    stop flowing through that layer and dequantizing it gives wrong values. Switching the repacking off keeps
    bitsandbytes on its ordinary (slower on that CPU, but correct) path; a weight that is already repacked is refused
    with a clear error.
    """
    for name, module in model.named_modules():
        if quant_kind(module) == "4bit":
            check_not_repacked(module, name)
            module.support_avx512bf16_for_cpu = False


# ---- fingerprints across precisions ------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TYPES = ("nf4", "fp4", "int8")


def recipe(module: nn.Module) -> Optional[list[int]]:
    """How ``module`` was quantized, as ints (quant type, block size, dtype it was quantized from); ``None`` for a
    full-precision layer. Stored after the zero-pattern hash in an adapter's fingerprint."""
    kind = quant_kind(module)
    if kind is None:
        return None
    if kind == "8bit":
        return [_TYPES.index("int8"), 0, _DTYPES.index(torch.float16)]
    w = module.weight
    if w.quant_state.dtype not in _DTYPES:
        return None
    return [_TYPES.index(w.quant_type), int(w.blocksize), _DTYPES.index(w.quant_state.dtype)]


def zeros_after_quantizing(weight: torch.Tensor, codes: list[int]) -> torch.Tensor:
    """The zero pattern ``(d_out, d_in)`` that quantizing full-precision ``weight`` the way ``codes`` (see
    :func:`recipe`) describes gives: the pruned zeros plus the small weights rounded to zero."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(
            "this adapter was trained on a bitsandbytes-quantized base; checking it against a full-precision base "
            "needs bitsandbytes (pip install bitsandbytes)."
        ) from exc
    qtype, blocksize, dtype = _TYPES[codes[0]], codes[1], _DTYPES[codes[2]]
    w = weight.detach().to(dtype).contiguous()
    if qtype == "int8":
        cb, _, _ = bnb.functional.int8_vectorwise_quant(w)
        return cb == 0
    data, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type=qtype)
    return bnb.functional.dequantize_4bit(data, state) == 0


__all__ = [
    "BNB_2078",
    "SUPPORTED",
    "check_not_repacked",
    "check_readable",
    "check_supported",
    "compute_dtype",
    "dequantize",
    "guard_repacking",
    "is_repacked_for_cpu",
    "is_supported",
    "linear",
    "logical_shape",
    "logical_weight",
    "quant_kind",
    "recipe",
    "requantize",
    "restore",
    "unsupported_quantization",
    "zeros_after_quantizing",
]
