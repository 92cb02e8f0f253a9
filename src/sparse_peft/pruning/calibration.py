"""Calibration data and the sequential, block-by-block calibration pass.

:func:`run_sequential` captures what the first decoder block receives (hidden states plus keyword arguments such
as the attention mask and rotary position embeddings), then walks the blocks in order, keeping only one block's
inputs and outputs alive at a time. Within a block it works in one of two ways:

- ``per_layer=False`` (block at a time, the SparseGPT/Wanda papers' protocol): run the calibration inputs once with
  hooks that collect input statistics of the block's linear layers, let a callback prune or repair the whole block,
  then run the inputs again through the *modified* block to get the next block's inputs (two forwards per block).
- ``per_layer=True`` (layer at a time, GPTQ's "true sequential"): run every calibration batch through the block
  together, pausing all of them before each linear layer; once every batch has reached the layer, its input
  statistics are complete and a callback prunes it, then the batches go on through the pruned layer. Each layer is
  calibrated on inputs that already went through the pruned layers before it, and the block's outputs come out of
  the same single forward. The batches run as threads that take turns (one runs at a time), so this needs no
  knowledge of the block's code. Each batch thread runs with the caller's torch settings (grad and inference mode,
  autocast, intra-op thread count, default device, current CUDA device and stream), so the block computes exactly
  what it would in the caller's thread; every thread has ended when the pass returns or raises.

Nothing here changes process-wide state: no thread outlives a call, and the caller's thread count is left alone.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .report import prunable_modules

CalibrationData = Union[torch.Tensor, Iterable[torch.Tensor]]  # (nsamples, seq_len) token ids, or such batches
Device = Union[str, torch.device, None]

_LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")


# ---------------------------------------------------------------- calibration data


def calibration_from_texts(
    tokenizer, texts: Iterable[str], nsamples: int = 128, seq_len: int = 256, seed: int = 0
) -> torch.LongTensor:
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
        raise ValueError(
            f"the calibration texts hold {len(ids)} tokens, fewer than seq_len={seq_len}; "
            "pass more text or a smaller seq_len."
        )
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(nsamples)]
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)


def calibration_from_dataset(
    dataset, tokenizer, text_column: str = "text", nsamples: int = 128, seq_len: int = 256, seed: int = 0
) -> torch.LongTensor:
    """Like :func:`calibration_from_texts`, from the ``text_column`` of a ``datasets.Dataset``."""
    if text_column not in dataset.column_names:
        raise ValueError(f"text_column={text_column!r} is not a column of the dataset; it has {dataset.column_names}.")
    return calibration_from_texts(tokenizer, dataset[text_column], nsamples, seq_len, seed)


def iter_batches(calibration_data: Optional[CalibrationData], batch_size: int) -> list[torch.Tensor]:
    """Split ``(nsamples, seq_len)`` ids into batches, or check and list an iterable of such batches."""
    if calibration_data is None:
        raise ValueError(
            "calibration_data is required here: pass a (nsamples, seq_len) tensor of token ids, e.g. "
            "from sparse_peft.pruning.calibration_from_texts(tokenizer, texts)."
        )
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
    raise ValueError(
        f"cannot find the decoder blocks of {type(base).__name__}: sequential calibration looks for "
        f"{' or '.join(_LAYER_PATHS)}. Use a decoder-only model (Llama, Qwen2/3, Mistral, GPT-2), or "
        "method='magnitude' without calibration."
    )


def block_modules(model: nn.Module, block: nn.Module) -> dict[str, nn.Module]:
    """The prunable modules of ``model`` that live in ``block``, by their full names."""
    inside = set(map(id, block.modules()))
    return {name: m for name, m in prunable_modules(model).items() if id(m) in inside}


# ---------------------------------------------------------------- input statistics


_GRAM_BLOCK = 192  # column block of the Hessian accumulation (see InputStats.add)


def _gram_blocks(d_in: int) -> list[int]:
    """Boundaries of the column blocks of a ``(d_in, d_in)`` Hessian."""
    parts = max(1, -(-d_in // _GRAM_BLOCK))
    return [d_in * i // parts for i in range(parts + 1)]


@dataclass
class InputStats:
    """Running statistics of one linear layer's inputs over calibration tokens (fp32)."""

    count: int = 0
    sq_sum: Optional[torch.Tensor] = None  # (d_in,) sum_t x_tj^2  (Wanda's ||X_j||^2)
    sum: Optional[torch.Tensor] = None  # (d_in,) sum_t x_tj     (DSnoT's mean)
    want_hessian: bool = False
    want_sum: bool = False
    _gram: Optional[torch.Tensor] = field(default=None, repr=False)  # (d_in, d_in); add() fills the upper blocks
    _mirrored: bool = field(default=True, repr=False)  # whether the lower blocks mirror the upper ones

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (T, d_in)
        if self.sq_sum is None:
            d_in = x.shape[1]
            self.sq_sum = x.new_zeros(d_in)
            self.sum = x.new_zeros(d_in) if self.want_sum else None
            self._gram = x.new_zeros(d_in, d_in) if self.want_hessian else None
        self.count += x.shape[0]
        self.sq_sum += (x * x).sum(0)
        if self.sum is not None:
            self.sum += x.sum(0)
        if self._gram is not None:  # X^T X is symmetric: only the block rows right of the diagonal (~60% flops)
            bounds = _gram_blocks(x.shape[1])
            for b0, b1 in zip(bounds[:-1], bounds[1:]):
                self._gram[b0:b1, b0:].addmm_(x[:, b0:b1].t(), x[:, b0:])  # (B, d_in - b0)
            self._mirrored = False

    @property
    def hessian(self) -> Optional[torch.Tensor]:
        """``(d_in, d_in)``: ``sum_t x_t x_t^T`` (SparseGPT, DSnoT's error); ``None`` unless ``want_hessian``."""
        if self._gram is not None and not self._mirrored:
            bounds = _gram_blocks(self._gram.shape[0])
            for b0, b1 in zip(bounds[:-1], bounds[1:]):
                self._gram[b0:b1, :b0] = self._gram[:b0, b0:b1].t()  # mirror the blocks above the diagonal
            self._mirrored = True
        return self._gram

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
def capture_block_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], device: torch.device
) -> list[tuple[torch.Tensor, tuple, dict]]:
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


class _Abort(Exception):
    """Raised inside a paused batch to unwind it when the pass fails elsewhere."""


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu", "privateuseone")


@dataclass(frozen=True)
class _ThreadState:
    """torch's per-thread settings that change what a forward computes, captured in one thread for another.

    A new Python thread starts with torch's defaults: grad mode on, no autocast, the process's default intra-op
    thread count (OpenMP keeps the count per thread), the CPU as default device, CUDA device 0 and its default stream.
    """

    grad: bool
    inference: bool
    num_threads: int
    autocast: tuple[tuple[str, torch.dtype], ...]  # (device type, dtype) for every device type with autocast on
    autocast_cache: bool
    default_device: Optional[torch.device]  # None: the CPU
    cuda: Optional[tuple[int, Any]]  # (current device, current stream) once the caller has initialised CUDA

    @classmethod
    def capture(cls) -> "_ThreadState":
        autocast = tuple(
            (d, torch.get_autocast_dtype(d))
            for d in _AUTOCAST_DEVICES
            if torch.amp.is_autocast_available(d) and torch.is_autocast_enabled(d)
        )
        default = torch.get_default_device()
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialise CUDA here
            cuda = (torch.cuda.current_device(), torch.cuda.current_stream())
        return cls(
            grad=torch.is_grad_enabled(),
            inference=torch.is_inference_mode_enabled(),
            num_threads=torch.get_num_threads(),
            autocast=autocast,
            autocast_cache=torch.is_autocast_cache_enabled(),
            default_device=None if default.type == "cpu" else default,
            cuda=cuda,
        )

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Run the body with these settings; meant for a fresh thread, which ends right after it."""
        if torch.get_num_threads() != self.num_threads:  # this thread's OpenMP count; the caller already uses it
            torch.set_num_threads(self.num_threads)
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode(self.inference))
            stack.enter_context(torch.set_grad_enabled(self.grad))
            for device_type, dtype in self.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=self.autocast_cache))
            if self.default_device is not None:
                stack.enter_context(self.default_device)
            if self.cuda is not None:
                stack.enter_context(torch.cuda.device(self.cuda[0]))
                stack.enter_context(torch.cuda.stream(self.cuda[1]))
            yield


class _LayerByLayer:
    """One block's forward over every cached batch, paused before each prunable layer until all batches arrive.

    Each batch runs in its own thread, and a baton lets exactly one of them run at a time, so the block's code runs
    unchanged, one batch at a time, as in a plain loop. A forward pre-hook on each prunable module records the
    input's statistics and parks the batch there. When every unfinished batch is parked, the main thread calls
    ``on_layer(name, stats)`` for the layer they wait at (which may change its weights), then lets them through.
    Layers fed the same tensor (q/k/v, gate/up) share one :class:`InputStats` and are processed one after another.
    """

    def __init__(self, modules: dict[str, nn.Module], want_hessian: bool, want_sum: bool):
        self.modules = modules
        self.want_hessian, self.want_sum = want_hessian, want_sum
        self.stats: dict[str, InputStats] = {}
        self.processed: set[str] = set()
        self._cond = threading.Condition()
        self._turn: Optional[int] = None  # the batch allowed to run; None = the main thread's turn
        self._abort = False
        self._local = threading.local()

    # ---- worker side (runs in the batch threads)

    def _pre_hook(self, name: str) -> Callable:
        def hook(module, args):
            i = getattr(self._local, "index", None)
            if i is None or name in self.processed:
                return  # not one of our batches, or a repeat call after the layer was already processed
            x = args[0]  # (..., d_in)
            last_x, last_stats = self._last[i]
            if name not in self.stats:  # first batch to reach it: a sibling of the layer just before, or new
                shared = last_stats if last_x is x else None
                self.stats[name] = shared or InputStats(want_hessian=self.want_hessian, want_sum=self.want_sum)
            stats = self.stats[name]
            if not (last_x is x and last_stats is stats):  # a sibling already counted this tensor
                stats.add(x)
            self._last[i] = (x, stats)
            self._park(i, name)

        return hook

    def _park(self, i: int, name: str) -> None:
        with self._cond:
            self._state[i], self._where[i], self._turn = "parked", name, None
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._turn == i)
            self._state[i] = "running"
        if self._abort:
            raise _Abort

    def _work(self, i: int, block: nn.Module, batch: tuple, caller: _ThreadState) -> None:
        self._local.index = i
        with self._cond:
            self._cond.wait_for(lambda: self._turn == i)
            self._state[i] = "running"
        try:
            if not self._abort:
                hidden, args, kwargs = batch
                with caller.applied():
                    self._outputs[i] = _block_output(block(hidden, *args, **kwargs))
        except _Abort:
            pass
        except BaseException as err:  # re-raised by the main thread
            self._errors.append(err)
        finally:
            with self._cond:
                self._state[i], self._turn = "done", None
                self._cond.notify_all()

    # ---- main side

    def _run(self, i: int) -> None:
        """Hand the baton to batch ``i`` and wait until it parks or finishes."""
        with self._cond:
            self._turn = i
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._turn is None)
        if self._errors:
            raise self._errors[0]

    def forward(self, block: nn.Module, cache: list, on_layer: Callable[[str, InputStats], None]) -> list:
        """Run ``block`` on every ``(hidden, args, kwargs)`` of ``cache``; return the outputs, in order."""
        n = len(cache)
        self._state, self._where = ["ready"] * n, [None] * n
        self._outputs, self._errors = [None] * n, []
        self._last: list[tuple] = [(None, None)] * n
        caller = _ThreadState.capture()
        threads = [
            threading.Thread(
                target=self._work,
                args=(i, block, cache[i], caller),
                daemon=True,
                name=f"sparse_peft-calib-{i}",
            )
            for i in range(n)
        ]
        handles = [m.register_forward_pre_hook(self._pre_hook(name)) for name, m in self.modules.items()]
        try:
            for t in threads:
                t.start()
            for i in range(n):
                self._run(i)
            while True:
                parked = [i for i in range(n) if self._state[i] == "parked"]
                if not parked:
                    break
                name = self._where[parked[0]]  # every batch waits at the same layer in a plain decoder block
                on_layer(name, self.stats[name])
                self.processed.add(name)
                for i in parked:
                    if self._where[i] == name:
                        self._run(i)
        except BaseException:
            self._abort = True
            for i in range(n):
                if self._state[i] != "done":
                    with self._cond:
                        self._turn = i
                        self._cond.notify_all()
                        self._cond.wait_for(lambda: self._turn is None)
            raise
        finally:
            for h in handles:
                h.remove()
            for t in threads:
                t.join()
        missed = [name for name in self.modules if name not in self.processed]
        if missed:
            raise RuntimeError(
                f"{missed[:3]} were never called by their block's forward, so per_layer calibration "
                "could not process them; pass per_layer=False (or true_sequential=False to prune)."
            )
        return self._outputs


BlockFn = Callable[[int, dict[str, nn.Module], dict[str, InputStats]], Optional[bool]]


def _calibrate_block(
    block: nn.Module,
    modules: dict[str, nn.Module],
    cache: list,
    process: Callable,
    *,
    per_layer: bool,
    want_hessian: bool,
    want_sum: bool,
    need_outputs: bool,
) -> list:
    """Collect statistics of one block, let ``process`` change it, and return its outputs for every cached batch."""
    if per_layer:
        runner = _LayerByLayer(modules, want_hessian, want_sum)
        return runner.forward(block, cache, lambda name, stats: process({name: modules[name]}, {name: stats}))
    outputs = []
    with _Collector(modules, want_hessian, want_sum) as collector:
        for hidden, args, kwargs in cache:
            collector.new_batch()
            outputs.append(_block_output(block(hidden, *args, **kwargs)))
    changed = process(modules, collector.stats)
    if changed is not False and need_outputs:  # run the changed block again for the next block's inputs
        outputs = [_block_output(block(h, *a, **kw)) for h, a, kw in cache]
    return outputs


class _Progress(tqdm):
    """A tqdm bar that starts no monitor thread: tqdm's would outlive the call (even a disabled bar starts one)."""

    monitor_interval = 0


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    calibration_data: CalibrationData,
    process: BlockFn,
    *,
    want_hessian: bool = False,
    want_sum: bool = False,
    per_layer: bool = False,
    batch_size: int = 8,
    device: Device = None,
    progress: bool = True,
    desc: str = "calibrating",
) -> None:
    """Walk the decoder blocks in order; ``process(index, modules, stats)`` may change the block's weights.

    With ``per_layer=False``, ``process`` gets each block's prunable modules at once, with statistics from the
    block as it was; it returns ``False`` when it left the block unchanged, so the outputs of the statistics pass
    are reused instead of running the block again. With ``per_layer=True``, ``process`` gets one module at a time
    (``modules`` and ``stats`` hold just that layer), in the block's call order, with statistics of inputs that
    went through the already processed layers before it; the block then runs once. With ``device`` set (e.g.
    ``"cuda"`` for a CPU-resident model), each block moves there for its turn and back afterwards.
    """
    layers = decoder_layers(model)
    batches = iter_batches(calibration_data, batch_size)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    blocks = _Progress(layers, desc=desc, unit="block") if progress else layers
    try:
        cache = capture_block_inputs(model, layers, batches, device)
        for index, block in enumerate(blocks):
            block.to(device)
            outputs = _calibrate_block(
                block,
                block_modules(model, block),
                cache,
                lambda modules, stats: process(index, modules, stats),
                per_layer=per_layer,
                want_hessian=want_hessian,
                want_sum=want_sum,
                need_outputs=index < len(layers) - 1,
            )
            cache = [(out, a, kw) for out, (_, a, kw) in zip(outputs, cache)]
            block.to(home)
    finally:
        if progress:
            blocks.close()
        model.train(was_training)
