"""Which weight slices S²FT trains: module roles, GQA-aware head geometry, and the selection strategies.

Vocabulary:

- A *block* is one transformer layer, named by the module path up to its layer index (``"model.layers.3"``,
  ``"transformer.h.0"``, ``"bert.encoder.layer.1"``).
- A *selection* is, per block, a sorted list of query-head indices and a sorted list of FFN channel indices. It is
  what ``S2FTConfig.selection`` stores (JSON).
- A module's *role* says which of its weight slices a selection touches: ``("cols", "heads")`` for ``o_proj``
  (input columns ``h*head_dim ... (h+1)*head_dim-1`` per head), ``("rows", "kv_heads")`` for ``k_proj``/``v_proj``,
  ``("cols", "channels")`` for ``down_proj`` and so on (see :data:`ROLES`).

GQA mapping: query head ``h`` reads key/value head ``h // group`` with ``group = num_attention_heads //
num_key_value_heads`` (the convention of Llama, Mistral, Qwen2 and Qwen3 in transformers, ``repeat_kv``). Training
the ``v_proj`` rows of the selected heads therefore trains the rows of kv heads ``{h // group}``; a kv head shared by
several query heads is trained once. ``head_dim`` is taken from the weight (``o_proj.in_features //
num_attention_heads``) and checked against ``config.head_dim``, so Qwen3 (``head_dim * heads != hidden_size``) works.

Strategies score every head/channel of a block on its *anchor* (the column-trained projection: ``o_proj`` for heads,
``down_proj`` for channels) and keep the top ones:

- ``weight``: the squared norm of the anchor's slice;
- ``activation``: the squared norm of the anchor's input slice over a calibration batch;
- ``sensitivity``: ``Σ |W ⊙ ∂L/∂W|`` over the anchor's slice (one backward on a labelled batch);
- ``gradient``: ``Σ |∂L/∂W|`` over the anchor's slice;
- ``random``: a seeded permutation.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from ... import _quant
from ..._layout import LINEAR_TYPES, linear_shape, linear_weight
from .config import DATA_STRATEGIES, S2FTConfig

# (module-name suffix, trained axis of the nn.Linear-layout weight, unit). The first matching suffix wins, so the
# more specific "attention.output.dense" comes before BERT's FFN "output.dense".
ROLES: list[tuple[str, str, str]] = [
    ("self_attn.o_proj", "cols", "heads"),
    ("self_attn.q_proj", "rows", "heads"),
    ("self_attn.k_proj", "rows", "kv_heads"),
    ("self_attn.v_proj", "rows", "kv_heads"),
    ("mlp.down_proj", "cols", "channels"),
    ("mlp.up_proj", "rows", "channels"),
    ("mlp.gate_proj", "rows", "channels"),
    ("attn.c_proj", "cols", "heads"),  # GPT-2 (Conv1D)
    ("attn.c_attn", "rows", "qkv_heads"),  # GPT-2 fused q|k|v
    ("mlp.c_proj", "cols", "channels"),
    ("mlp.c_fc", "rows", "channels"),
    ("attention.output.dense", "cols", "heads"),  # BERT / RoBERTa
    ("attention.self.query", "rows", "heads"),
    ("attention.self.key", "rows", "kv_heads"),
    ("attention.self.value", "rows", "kv_heads"),
    ("intermediate.dense", "rows", "channels"),
    ("output.dense", "cols", "channels"),
    ("self_attn.out_proj", "cols", "heads"),  # OPT
    ("fc1", "rows", "channels"),
    ("fc2", "cols", "channels"),
]

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{t: ["o_proj", "down_proj"] for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "gpt2": ["c_proj"],
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "opt": ["out_proj", "fc2"],
}

Selection = dict[str, dict[str, list[int]]]
Batch = Mapping[str, torch.Tensor]


def module_role(name: str) -> Optional[tuple[str, str]]:
    """``(axis, unit)`` of the module called ``name``, or ``None`` if S²FT does not know its structure."""
    for suffix, axis, unit in ROLES:
        if name == suffix or name.endswith("." + suffix):
            return axis, unit
    return None


def block_of(name: str) -> str:
    """The block a module belongs to: its path up to the first numeric component (``model.layers.3``)."""
    match = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return match.group(1) if match else ""


@dataclass(frozen=True)
class Geometry:
    """Attention shape of one model. ``group`` query heads share one kv head."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _model_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    return getattr(cfg, "text_config", None) or cfg


def geometry(model: nn.Module, anchor_name: str, anchor: nn.Module) -> Geometry:
    """Heads, kv heads and head_dim of ``model``, with head_dim read off the heads anchor (``o_proj``)."""
    cfg = _model_config(model)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not heads:
        raise ValueError(
            "S2FT needs config.num_attention_heads to split attention projections into heads; this model has none. "
            "Set S2FTConfig.heads_ratio=0 and target only FFN projections, or give the model a config."
        )
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % kv:
        raise ValueError(
            f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}; S2FT cannot map heads to kv heads."
        )
    d_in = linear_shape(anchor)[1]
    if d_in % heads:
        raise ValueError(f"{anchor_name}: {d_in} input features do not split into num_attention_heads={heads} heads.")
    head_dim = d_in // heads
    declared = getattr(cfg, "head_dim", None)
    if isinstance(declared, int) and declared != head_dim:
        raise ValueError(
            f"{anchor_name} has {d_in} input features = {heads} heads x {head_dim}, but config.head_dim={declared}."
        )
    return Geometry(int(heads), int(kv), int(head_dim))


def _count(ratio: float, n: int) -> int:
    return 0 if ratio <= 0 else min(n, max(1, round(ratio * n)))


# ----------------------------------------------------------------------------------------------------- indices
def _head_span(heads: Iterable[int], head_dim: int, offset: int = 0) -> list[int]:
    return [offset + h * head_dim + i for h in heads for i in range(head_dim)]


def slice_indices(
    name: str, module: nn.Module, entry: Mapping[str, list[int]], geo: Optional[Geometry]
) -> tuple[str, torch.Tensor]:
    """``(axis, sorted int64 indices)`` that ``entry`` (one block's selection) trains in module ``name``."""
    role = module_role(name)
    if role is None:
        known = ", ".join(sorted({s.split(".")[-1] for s, _, _ in ROLES}))
        raise ValueError(
            f"S2FT does not know which heads/channels module {name!r} holds. Target only projections with a known role "
            f"({known}), or remove it from S2FTConfig.target_modules."
        )
    axis, unit = role
    heads, channels = entry.get("heads", []), entry.get("channels", [])
    if unit == "channels":
        idx = list(channels)
    elif geo is None:
        raise ValueError(f"S2FT cannot split {name!r} into heads: no attention geometry was found for its block.")
    elif unit == "heads":
        idx = _head_span(heads, geo.head_dim)
    elif unit == "kv_heads":
        idx = _head_span(sorted({h // geo.group for h in heads}), geo.head_dim)
    else:  # "qkv_heads": GPT-2's fused c_attn rows are [q | k | v], each num_heads * head_dim wide
        width = geo.num_heads * geo.head_dim
        idx = [i for part in range(3) for i in _head_span(heads, geo.head_dim, part * width)]
    size = linear_shape(module)[0 if axis == "rows" else 1]
    if idx and max(idx) >= size:
        raise ValueError(
            f"S2FT selection for {name!r} reaches {axis[:-1]} {max(idx)}, but the module has only {size}; the "
            "selection does not fit this model (was it made for another one?)."
        )
    return axis, torch.tensor(sorted(set(idx)), dtype=torch.int64)


# ------------------------------------------------------------------------------------------------------ anchors
def _anchors(model: nn.Module) -> dict[str, dict[str, tuple[str, nn.Module]]]:
    """Per block: the heads anchor (column-trained attention output) and channels anchor (FFN output)."""
    found: dict[str, dict[str, tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):  # a model that already holds adapters: score the base weight
            module = module.get_base_layer()
        elif ".base_layer" in name:
            continue
        if not isinstance(module, LINEAR_TYPES):
            continue
        role = module_role(name)
        if role in (("cols", "heads"), ("cols", "channels")):
            block = block_of(name)
            found.setdefault(block, {})[role[1]] = (name, module)
    return found


def model_geometries(model: nn.Module) -> dict[str, Geometry]:
    """The :class:`Geometry` of every block that has a heads anchor."""
    return {b: geometry(model, *a["heads"]) for b, a in _anchors(model).items() if "heads" in a}


# ---------------------------------------------------------------------------------------------------- scoring
def _per_head(col_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    return col_scores.reshape(-1, head_dim).sum(-1)  # (num_heads,)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    if k == 0:
        return []
    return sorted(torch.topk(scores.double(), k).indices.tolist())


def _batches(calibration) -> list:
    if calibration is None:
        return []
    return [calibration] if isinstance(calibration, Mapping) else list(calibration)


@torch.no_grad()
def _activation_scores(model, anchors, batches) -> dict[tuple[str, str], torch.Tensor]:
    """Σ_t x_t² per input column of every anchor, over the calibration batches."""
    sums: dict[tuple[str, str], torch.Tensor] = {}
    hooks = []
    for block, pair in anchors.items():
        for unit, (_, module) in pair.items():

            def hook(mod, args, key=(block, unit)):
                x = args[0].detach().float()
                s = x.reshape(-1, x.shape[-1]).pow(2).sum(0)  # (d_in,)
                sums[key] = s if key not in sums else sums[key] + s

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in hooks:
            h.remove()
    return sums


def _gradient_scores(model, anchors, batches, with_weight: bool) -> dict[tuple[str, str], torch.Tensor]:
    """Σ |∂L/∂W| (or Σ |W ⊙ ∂L/∂W|) per input column of every anchor, from one backward per batch."""
    params = [((block, unit), module) for block, pair in anchors.items() for unit, (_, module) in pair.items()]
    quantized = [name for pair in anchors.values() for name, m in pair.values() if _quant.quant_kind(m) is not None]
    if quantized:
        raise ValueError(
            f"S2FT strategies 'sensitivity' and 'gradient' need the weight gradient of {quantized[0]!r}, which a "
            "bitsandbytes-quantized layer does not have. Run s2ft_select on the full-precision model (the choice is "
            "stored in config.selection and applies to its quantized copy), or use strategy 'weight', "
            "'activation' or 'random'."
        )
    flags = {p: p.requires_grad for p in model.parameters()}
    sums: dict[tuple[str, str], torch.Tensor] = {}
    try:
        for p in flags:
            p.requires_grad_(False)
        for _, module in params:
            module.weight.requires_grad_(True)
            module.weight.grad = None
        for batch in batches:
            out = model(**batch)
            loss = getattr(out, "loss", None)
            if loss is None:
                raise ValueError(
                    "S2FT strategies 'sensitivity' and 'gradient' need a calibration batch with labels "
                    "(the model returned no loss); pass e.g. {'input_ids': ids, 'labels': ids}."
                )
            loss.backward()
            for key, module in params:
                grad = module.weight.grad.t() if isinstance(module, Conv1D) else module.weight.grad  # (d_out, d_in)
                w = linear_weight(module).detach()
                s = (grad.float() * w.float() if with_weight else grad.float()).abs().sum(0)  # (d_in,)
                sums[key] = s if key not in sums else sums[key] + s
                module.weight.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            if not flag:
                p.grad = None
    return sums


def _column_scores(model, anchors, strategy, batches) -> dict[tuple[str, str], torch.Tensor]:
    if strategy == "weight":
        return {
            (b, u): linear_weight(m).detach().float().pow(2).sum(0)
            for b, pair in anchors.items()
            for u, (_, m) in pair.items()
        }
    if strategy == "activation":
        return _activation_scores(model, anchors, batches)
    return _gradient_scores(model, anchors, batches, with_weight=strategy == "sensitivity")


def plan(model: nn.Module, config: S2FTConfig, calibration: Union[Batch, Iterable[Batch], None] = None) -> Selection:
    """Choose the heads and channels of every block of ``model`` according to ``config`` (see module doc)."""
    strategy = config.strategy
    batches = _batches(calibration)
    if strategy in DATA_STRATEGIES and not batches:
        raise ValueError(
            f"S2FTConfig.strategy={strategy!r} needs a calibration batch: call "
            "`config = sparse_peft.s2ft_select(model, config, batch)` before get_peft_model (it stores the chosen "
            "heads and channels in config.selection)."
        )
    anchors = _anchors(model)
    if not anchors:
        raise ValueError(
            "S2FT found no attention-output or FFN-output projection (o_proj/down_proj, c_proj, output.dense, ...) to "
            "select heads and channels on. Pass an explicit S2FTConfig.selection for this architecture."
        )
    geos = {b: geometry(model, *a["heads"]) for b, a in anchors.items() if "heads" in a}
    scores = {} if strategy == "random" else _column_scores(model, anchors, strategy, batches)
    gen = torch.Generator().manual_seed(config.seed)
    selection: Selection = {}
    for block, pair in anchors.items():
        entry = {"heads": [], "channels": []}
        if "heads" in pair:
            n, k = geos[block].num_heads, _count(config.heads_ratio, geos[block].num_heads)
            if strategy == "random":
                entry["heads"] = sorted(torch.randperm(n, generator=gen)[:k].tolist())
            else:
                entry["heads"] = _top(_per_head(scores[(block, "heads")], geos[block].head_dim), k)
        if "channels" in pair:
            n = linear_shape(pair["channels"][1])[1]
            k = _count(config.channels_ratio, n)
            if strategy == "random":
                entry["channels"] = sorted(torch.randperm(n, generator=gen)[:k].tolist())
            else:
                entry["channels"] = _top(scores[(block, "channels")], k)
        selection[block] = entry
    return selection


def s2ft_select(
    model: nn.Module, config: S2FTConfig, calibration: Union[Batch, Iterable[Batch], None] = None
) -> S2FTConfig:
    """Run ``config.strategy`` on ``model`` and return a copy of ``config`` with ``selection`` filled in.

    Args:
        model: the base model, before ``get_peft_model`` (a plain transformers model).
        config: an :class:`S2FTConfig`; its ``heads_ratio``, ``channels_ratio``, ``strategy`` and ``seed`` are used.
        calibration: one batch (a dict of tensors for ``model(**batch)``) or a list of them. Needed by the
            ``activation`` (inputs only), ``sensitivity`` and ``gradient`` (with ``labels``) strategies.

    The model is not changed (gradients needed for scoring are cleared and ``requires_grad`` flags restored). The
    returned config is plain JSON-serialisable data, so the choice is saved with the adapter.

    Example:
        ```python
        import sparse_peft
        from peft import get_peft_model

        # config = sparse_peft.S2FTConfig(heads_ratio=0.1, channels_ratio=0.02, strategy="sensitivity")
        # config = sparse_peft.s2ft_select(model, config, {"input_ids": ids, "labels": ids})
        # model = get_peft_model(model, config)
        ```
    """
    if not isinstance(config, S2FTConfig):
        raise TypeError(f"s2ft_select needs an S2FTConfig, got {type(config).__name__}.")
    _quant.guard_repacking(model)  # the forwards below are no-grad evals: bitsandbytes issue 2078
    was_training = model.training
    model.eval()
    try:
        selection = plan(model, config, calibration)
    finally:
        model.train(was_training)
    out = copy.deepcopy(config)
    out.selection = selection
    return out
