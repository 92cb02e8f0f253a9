"""Configuration of SpIEL: sparse fine-tuning with a trainable delta at k flat indices, and drop-and-grow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


from ..._registry import SparsePeftType
from .._common import SparseTunerConfig
from ...masks import parse_nm

VALUES_DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass
class SpielConfig(SparseTunerConfig):
    """Configuration of a [`SpielModel`][sparse_peft.SpielModel] (peft type ``SPIEL``).

    Every target weight ``W`` (``nn.Linear`` layout ``(d_out, d_in)``) gets ``k`` trainable ``values`` at ``k``
    unique flat ``indices`` (``k = i * d_in + j``); the effective weight is ``W + scatter(values)``. Every
    ``reselection_steps`` optimizer steps the smallest ``|values|`` are dropped and as many new indices are grown
    where the accumulated gradient (``selection="ag"``) or the row/column momentum approximation
    (``selection="ma"``) scores highest. This runs by itself inside ``transformers.Trainer`` / TRL ``SFTTrainer``
    and any loop that calls ``optimizer.step()`` of a ``torch.optim.Optimizer``; its state is part of the optimizer's
    state, so checkpoints that hold the optimizer resume it exactly.

    The budget is one of ``r`` (``k = r * (d_in + d_out)`` per module, the parameter count of LoRA rank ``r``),
    ``density`` (``k = round(density * d_in * d_out)``) or ``num_deltas`` (a total over all targets, shared in
    proportion to their sizes). With none given, ``r=8``.

    Example:
        ```python
        import sparse_peft
        from peft import get_peft_model

        config = sparse_peft.SpielConfig(r=16, target_modules=["q_proj", "v_proj"], reselection_steps=20)
        # model = get_peft_model(model, config)
        ```
    """

    r: Optional[int] = field(
        default=None,
        metadata={
            "help": "Budget as a LoRA rank: k = r * (d_in + d_out) values per module, the same trainable count as "
            "LoRA with rank r. Default 8 when neither density nor num_deltas is given. Set only one budget."
        },
    )
    density: Optional[float] = field(
        default=None,
        metadata={"help": "Budget as a fraction of each target weight: k = round(density * d_in * d_out), in (0, 1]."},
    )
    num_deltas: Optional[int] = field(
        default=None,
        metadata={
            "help": "Budget as a total number of values over all target modules, shared in proportion to each "
            "module's size (rounded per module, at least 1)."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (or a regex) to adapt, e.g. ['q_proj', 'v_proj'], or 'all-linear'. None picks all "
            "attention and MLP projections of known architectures (Llama, Mistral, Qwen2/3, GPT-2, BERT, ...)."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: values start at 0 (the adapter starts as the identity). False: values start random "
            "(normal, std 0.1) so tests can start from a non-zero delta. Indices start uniformly at random."
        },
    )
    selection: Literal["ag", "ma"] = field(
        default="ag",
        metadata={
            "help": "How growth candidates are scored. 'ag': |gradient of W| accumulated over the accumulation_steps "
            "steps before each reselection (a transient weight-sized buffer per module during those steps only). "
            "'ma': momentum approximation from row/column accumulators (d_out + d_in floats per module, decayed with "
            "the optimizer's beta2; needs an Adam-family optimizer), no dense gradient at all."
        },
    )
    reselection_steps: int = field(default=20, metadata={"help": "Run drop-and-grow every this many optimizer steps."})
    accumulation_steps: int = field(
        default=5,
        metadata={
            "help": "selection='ag' only: accumulate |gradient of W| over this many optimizer steps before each "
            "reselection (at most reselection_steps)."
        },
    )
    regrow_fraction: float = field(
        default=0.2,
        metadata={"help": "Fraction of each module's k values dropped and regrown at a reselection, in [0, 1]."},
    )
    regrow_schedule: Literal["linear", "cosine"] = field(
        default="linear",
        metadata={
            "help": "How regrow_fraction decays to 0 over the run: 'linear' or 'cosine'. When the run's length is "
            "unknown (no total_steps, no SpielCallback) the fraction stays constant."
        },
    )
    total_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "Number of optimizer steps of the run, for the regrow schedule. None: the Trainer's "
            "state.max_steps when sparse_peft.training.SpielCallback is passed to it; otherwise the fraction stays "
            "constant (logged once)."
        },
    )
    preserve_sparsity: Optional[bool] = field(
        default=None,
        metadata={
            "help": "SEFT mode: keep the merged weight's number of non-zeros per module exactly equal to the base's "
            "(and the N:M pattern on N:M bases). None: on when the base's target weights are detected sparse "
            "(logged); the resolved value is saved."
        },
    )
    nm_pattern: Optional[str] = field(
        default=None,
        metadata={
            "help": "SEFT mode only: N:M pattern of the base to keep (e.g. '2:4'); swaps then stay inside each group "
            "of M inputs. None detects 1:4/2:4, 4:8 and 8:16 bases automatically."
        },
    )
    values_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the trainable values, whatever the base dtype: 'float32' (default), "
            "'float64', 'bfloat16' or 'float16'."
        },
    )
    auto_reselection: bool = field(
        default=True,
        metadata={
            "help": "True: drop-and-grow runs by itself after every step of the torch optimizer that steps the "
            "values (found at its first step, then that optimizer's own step hook). False: call "
            "sparse_peft.spiel_step(model, optimizer) yourself after each optimizer.step()."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SparsePeftType.SPIEL
        self._check_budget()
        self._check_schedule()
        if self.selection not in ("ag", "ma"):
            raise ValueError(f"SpielConfig.selection must be 'ag' or 'ma', got {self.selection!r}.")
        if self.values_dtype not in VALUES_DTYPES:
            raise ValueError(f"SpielConfig.values_dtype must be one of {VALUES_DTYPES}, got {self.values_dtype!r}.")
        parse_nm(self.nm_pattern, field="SpielConfig.nm_pattern")
        if self.preserve_sparsity not in (None, True, False):
            raise ValueError(
                f"SpielConfig.preserve_sparsity must be None, True or False, got {self.preserve_sparsity!r}."
            )

    def _check_budget(self) -> None:
        given = [n for n in ("r", "density", "num_deltas") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"SpielConfig: set only one budget of r, density and num_deltas; got {', '.join(given)}.")
        if not given:
            self.r = 8
        if self.r is not None and (not _is_int(self.r) or self.r <= 0):
            raise ValueError(f"SpielConfig.r must be a positive integer (e.g. r=16), got {self.r!r}.")
        if self.density is not None and not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"SpielConfig.density must be in (0, 1] (e.g. density=0.01), got {self.density!r}.")
        if self.num_deltas is not None and (not _is_int(self.num_deltas) or self.num_deltas <= 0):
            raise ValueError(f"SpielConfig.num_deltas must be a positive integer, got {self.num_deltas!r}.")

    def _check_schedule(self) -> None:
        for name in ("reselection_steps", "accumulation_steps"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"SpielConfig.{name} must be a positive integer, got {v!r}.")
        if self.accumulation_steps > self.reselection_steps:
            raise ValueError(
                f"SpielConfig.accumulation_steps={self.accumulation_steps} exceeds reselection_steps="
                f"{self.reselection_steps}; lower accumulation_steps (gradients are accumulated only in the steps "
                "before each reselection)."
            )
        if not 0.0 <= float(self.regrow_fraction) <= 1.0:
            raise ValueError(
                f"SpielConfig.regrow_fraction must be in [0, 1] (e.g. 0.2; 0 disables drop-and-grow), "
                f"got {self.regrow_fraction!r}."
            )
        if self.regrow_schedule not in ("linear", "cosine"):
            raise ValueError(f"SpielConfig.regrow_schedule must be 'linear' or 'cosine', got {self.regrow_schedule!r}.")
        if self.total_steps is not None and (not _is_int(self.total_steps) or self.total_steps <= 0):
            raise ValueError(
                f"SpielConfig.total_steps must be a positive integer or None (from SpielCallback, or constant), "
                f"got {self.total_steps!r}."
            )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
