"""Calibration data and the sequential, block-by-block calibration pass.

:func:`run_sequential` captures what the first decoder block receives (hidden states plus keyword arguments such
as the attention mask and rotary position embeddings), then walks the blocks in order. For each block it runs the
calibration inputs once with hooks that collect input statistics of its linear layers, lets a callback prune or
repair the block, and runs the inputs again through the *modified* block to get the next block's inputs. Only one
block's inputs and outputs are alive at a time.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .report import prunable_modules

_LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")


# ---------------------------------------------------------------- calibration data


def calibration_from_texts(tokenizer, texts: Iterable[str], nsamples: int = 128, seq_len: int = 256,
                           seed: int = 0) -> torch.LongTensor:
    """``(nsamples, seq_len)`` token ids: the texts are tokenized, joined with EOS and cut into random windows.

    Raises ``ValueError`` when the texts hold fewer than ``seq_len + 1`` tokens.
    """
    if nsamples < 1 or seq_len < 1:
        raise ValueError(f"nsamples={nsamples} and seq_len={seq_len} must both be at least 1.")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
    if len(ids) <= seq_len:
        raise ValueError(f"the calibration texts hold {len(ids)} tokens, fewer than seq_len={seq_len}; "
                         "pass more text or a smaller seq_len.")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(nsamples)]
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)


def calibration_from_dataset(dataset, tokenizer, text_column: str = "text", nsamples: int = 128,
                             seq_len: int = 256, seed: int = 0) -> torch.LongTensor:
    """Like :func:`calibration_from_texts`, from the ``text_column`` of a ``datasets.Dataset``."""
    if text_column not in dataset.column_names:
        raise ValueError(f"text_column={text_column!r} is not a column of the dataset; it has {dataset.column_names}.")
    return calibration_from_texts(tokenizer, dataset[text_column], nsamples, seq_len, seed)


def iter_batches(calibration_data, batch_size: int) -> list[torch.Tensor]:
    """Split ``(nsamples, seq_len)`` ids into batches, or check and list an iterable of such batches."""
    if calibration_data is None:
        raise ValueError("calibration_data is required here: pass a (nsamples, seq_len) tensor of token ids, e.g. "
                         "from sparse_peft.pruning.calibration_from_texts(tokenizer, texts).")
    if isinstance(calibration_data, torch.Tensor):
        batches = [calibration_data] if calibration_data.dim() == 2 else None
        if batches is None:
            shape = tuple(calibration_data.shape)
            raise ValueError(f"calibration_data must be 2-D (nsamples, seq_len); got shape {shape}.")
        batches = list(calibration_data.split(batch_size))
    else:
        batches = list(calibration_data)
    if not batches:
        raise ValueError("calibration_data is empty; pass at least one (nsamples, seq_len) batch of token ids.")
    for b in batches:
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.dtype not in (torch.long, torch.int, torch.int32):
            raise ValueError("calibration_data batches must be integer tensors shaped (batch, seq_len) of token ids.")
    return batches


# ---------------------------------------------------------------- model structure


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: ``model.model.layers`` (Llama, Qwen, Mistral) or ``model.transformer.h`` (GPT-2)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in _LAYER_PATHS:
        obj: Any = base
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(f"cannot find the decoder blocks of {type(base).__name__}: sequential calibration looks for "
                     f"{' or '.join(_LAYER_PATHS)}. Use a decoder-only model (Llama, Qwen2/3, Mistral, GPT-2), or "
                     "method='magnitude' without calibration.")


def block_modules(model: nn.Module, block: nn.Module) -> dict[str, nn.Module]:
    """The prunable modules of ``model`` that live in ``block``, by their full names."""
    inside = set(map(id, block.modules()))
    return {name: m for name, m in prunable_modules(model).items() if id(m) in inside}


# ---------------------------------------------------------------- input statistics


@dataclass
class InputStats:
    """Running statistics of one linear layer's inputs over calibration tokens (fp32)."""

    count: int = 0
    sq_sum: Optional[torch.Tensor] = None  # (d_in,) sum_t x_tj^2  (Wanda's ||X_j||^2)
    sum: Optional[torch.Tensor] = None  # (d_in,) sum_t x_tj     (DSnoT's mean)
    hessian: Optional[torch.Tensor] = None  # (d_in, d_in) sum_t x_t x_t^T  (SparseGPT, DSnoT's error)
    want_hessian: bool = False
    want_sum: bool = False

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (T, d_in)
        if self.sq_sum is None:
            d_in = x.shape[1]
            self.sq_sum = x.new_zeros(d_in)
            self.sum = x.new_zeros(d_in) if self.want_sum else None
            self.hessian = x.new_zeros(d_in, d_in) if self.want_hessian else None
        self.count += x.shape[0]
        self.sq_sum += (x * x).sum(0)
        if self.sum is not None:
            self.sum += x.sum(0)
        if self.hessian is not None:
            self.hessian.addmm_(x.t(), x)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sq_sum / max(self.count, 1) - self.mean**2).clamp_min(0)


@dataclass
class _Collector:
    """Forward hooks that feed :class:`InputStats`; layers fed the same tensor (q/k/v, gate/up) share one."""

    modules: dict[str, nn.Module]
    want_hessian: bool
    want_sum: bool
    stats: dict[str, InputStats] = field(default_factory=dict)
    _seen: list = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._seen.clear()

    def new_batch(self) -> None:
        self._seen.clear()

    def _hook(self, name: str) -> Callable:
        def hook(module, args, output):
            x = args[0]
            if name not in self.stats:
                shared = next((s for t, s in self._seen if t is x), None)  # same input tensor as a sibling
                self.stats[name] = shared or InputStats(want_hessian=self.want_hessian, want_sum=self.want_sum)
                if shared is not None:
                    return
            stats = self.stats[name]
            if any(s is stats for _, s in self._seen):
                return  # already counted this batch through a sibling
            stats.add(x)
            self._seen.append((x, stats))

        return hook


# ---------------------------------------------------------------- the sequential pass


class _Stop(Exception):
    pass


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor],
                         device: torch.device) -> list[tuple[torch.Tensor, tuple, dict]]:
    """Run the model up to the first block for each batch; return ``(hidden_states, args, kwargs)`` per batch."""
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for key in ("past_key_values", "past_key_value", "layer_past"):
            kwargs.pop(key, None)
        kwargs["use_cache"] = False
        captured.append((hidden.detach().to(device), _to(tuple(args[1:]), device), _to(kwargs, device)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(_model_device(model)), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


BlockFn = Callable[[int, dict[str, nn.Module], dict[str, InputStats]], Optional[bool]]


@torch.no_grad()
def run_sequential(model: nn.Module, calibration_data, process: BlockFn, *, want_hessian: bool = False,
                   want_sum: bool = False, batch_size: int = 8, device=None, progress: bool = True,
                   desc: str = "calibrating") -> None:
    """Walk the decoder blocks in order; ``process(index, modules, stats)`` may change the block's weights.

    ``process`` returns ``False`` when it left the block unchanged, so the outputs of the statistics pass are
    reused instead of running the block again. With ``device`` set (e.g. ``"cuda"`` for a CPU-resident model),
    each block moves there for its turn and back afterwards.
    """
    layers = decoder_layers(model)
    batches = iter_batches(calibration_data, batch_size)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    try:
        cache = capture_block_inputs(model, layers, batches, device)
        for index, block in enumerate(tqdm(layers, desc=desc, unit="block", disable=not progress)):
            block.to(device)
            modules = block_modules(model, block)
            outputs = []
            with _Collector(modules, want_hessian, want_sum) as collector:
                for hidden, args, kwargs in cache:
                    collector.new_batch()
                    outputs.append(_block_output(block(hidden, *args, **kwargs)))
            changed = process(index, modules, collector.stats)
            if changed is not False:
                outputs = [_block_output(block(h, *a, **kw)) for h, a, kw in cache]
            cache = [(out, a, kw) for out, (_, a, kw) in zip(outputs, cache)]
            block.to(home)
    finally:
        model.train(was_training)
