"""Configuration of S²FT: structured sparse fine-tuning of whole attention heads and FFN channels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


from ..._registry import SparsePeftType
from .._common import SparseTunerConfig

STRATEGIES = ("random", "weight", "activation", "sensitivity", "gradient")
DATA_STRATEGIES = ("activation", "sensitivity", "gradient")


@dataclass
class S2FTConfig(SparseTunerConfig):
    """Configuration of an [`S2FTModel`][sparse_peft.S2FTModel] ("select sparsely, compute densely").

    Per transformer block, S²FT picks ``heads_ratio`` of the attention heads and ``channels_ratio`` of the FFN
    channels and trains only the weight slices that belong to them:

    - a head ``h`` is the ``head_dim`` input columns ``h*head_dim ... (h+1)*head_dim-1`` of ``o_proj`` (and, when
      targeted, the matching output rows of ``q_proj``; of ``k_proj``/``v_proj`` through the GQA group
      ``h // (num_attention_heads // num_key_value_heads)``; of GPT-2's fused ``c_attn`` for q, k and v);
    - a channel ``c`` is input column ``c`` of ``down_proj`` (and, when targeted, output row ``c`` of
      ``up_proj``/``gate_proj``).

    The default ``target_modules`` are the column-trained projections (``o_proj`` and ``down_proj`` on Llama-like
    models, ``c_proj`` on GPT-2, ``output.dense`` on BERT). Add ``v_proj`` (or ``up_proj``, ``gate_proj``, ...) to
    also train the rows of the selected heads/channels there.

    ``strategy="random"`` and ``"weight"`` select when ``get_peft_model`` runs. The data-driven strategies need a
    calibration batch: call ``config = sparse_peft.s2ft_select(model, config, batch)`` first. Either way the chosen
    heads and channels end up in ``selection`` (plain JSON lists), so a saved adapter records exactly what it trains.

    Example:
        ```python
        import sparse_peft
        from peft import get_peft_model

        config = sparse_peft.S2FTConfig(heads_ratio=0.1, channels_ratio=0.02)
        # model = get_peft_model(model, config)
        ```
    """

    heads_ratio: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of attention heads per block to train (o_proj input-column slices; v_proj/q_proj/k_proj "
            "output rows too if targeted). The count is max(1, round(ratio * num_heads)) for a ratio > 0; 0 trains "
            "no head."
        },
    )
    channels_ratio: float = field(
        default=0.02,
        metadata={
            "help": "Fraction of FFN channels (intermediate units) per block to train (down_proj input columns; "
            "up_proj/gate_proj output rows too if targeted). Same rounding as heads_ratio; 0 trains no channel."
        },
    )
    strategy: Literal["random", "weight", "activation", "sensitivity", "gradient"] = field(
        default="random",
        metadata={
            "help": "How heads/channels are chosen: 'random' (seeded), 'weight' (largest slice norm of o_proj/down_proj), "
            "'activation' (largest input norm to o_proj/down_proj), 'sensitivity' (largest sum |W * dL/dW| of the "
            "slice) or 'gradient' (largest sum |dL/dW|). The last three need sparse_peft.s2ft_select(model, config, "
            "batch) before get_peft_model."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random strategy."})
    selection: Optional[dict[str, dict[str, list[int]]]] = field(
        default=None,
        metadata={
            "help": "The explicit choice, {block name: {'heads': [...], 'channels': [...]}}, e.g. "
            "{'model.layers.0': {'heads': [3], 'channels': [5, 17]}}. Filled by get_peft_model (random/weight) or "
            "sparse_peft.s2ft_select; when set it wins over heads_ratio/channels_ratio/strategy."
        },
    )
    preserve_sparsity: bool = field(
        default=True,
        metadata={
            "help": "Keep the base's zeros inside the trained slices (the delta is multiplied by the slice's non-zero "
            "mask), so a merged pruned model keeps its exact zeros and N:M pattern. False trains every slice entry."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the slice deltas start at zero (identity). False: random, so tests start non-zero."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Projections to train slices of. None = the per-architecture default (o_proj + down_proj on "
            "Llama/Mistral/Qwen2/Qwen3, c_proj on GPT-2, output.dense on BERT). Supported roles: o_proj/q_proj/k_proj/"
            "v_proj, down_proj/up_proj/gate_proj, GPT-2 attn.c_proj/attn.c_attn/mlp.c_proj/mlp.c_fc, BERT attention "
            "query/key/value/output.dense and intermediate/output.dense, OPT out_proj/fc1/fc2."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SparsePeftType.S2FT
        for name in ("heads_ratio", "channels_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"S2FTConfig.{name} must be a fraction in [0, 1] (e.g. {name}=0.05), got {value!r}.")
        if self.selection is None and self.heads_ratio == 0 and self.channels_ratio == 0:
            raise ValueError(
                "S2FTConfig.heads_ratio and S2FTConfig.channels_ratio are both 0, so nothing would be trained; set at "
                "least one of them > 0 (e.g. channels_ratio=0.02)."
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"S2FTConfig.strategy must be one of {', '.join(map(repr, STRATEGIES))}; got {self.strategy!r}."
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"S2FTConfig.seed must be an integer, got {self.seed!r}.")
        if self.selection is not None:
            self.selection = _validate_selection(self.selection)


def _validate_selection(selection) -> dict[str, dict[str, list[int]]]:
    """Check the JSON shape of ``S2FTConfig.selection`` and normalise it to sorted unique int lists."""
    hint = "write it like {'model.layers.0': {'heads': [1], 'channels': [4, 9]}}"
    if not isinstance(selection, dict):
        raise ValueError(
            f"S2FTConfig.selection must be a dict of block name -> dict; {hint}. Got {type(selection).__name__}."
        )
    out = {}
    for block, entry in selection.items():
        if not isinstance(block, str) or not isinstance(entry, dict) or set(entry) - {"heads", "channels"}:
            raise ValueError(
                f"S2FTConfig.selection[{block!r}] must be a dict with keys 'heads' and/or 'channels'; {hint}."
            )
        clean = {}
        for key in ("heads", "channels"):
            values = entry.get(key, [])
            if not isinstance(values, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
            ):
                raise ValueError(
                    f"S2FTConfig.selection[{block!r}][{key!r}] must be a list of non-negative ints; got {values!r}."
                )
            clean[key] = sorted(set(int(v) for v in values))
        out[block] = clean
    return out
