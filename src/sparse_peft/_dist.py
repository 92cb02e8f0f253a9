"""Distributed helpers shared by the tuners: collectives of the default group, FSDP2's DTensors, unsupported wrappers.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a ``DTensor`` sharded on dim 0 outside
forward, and buffers (SpIEL's indices, the masks) are ordinary tensors replicated on every rank. Code that edits
parameters between steps works on full tensors (:func:`full_tensor`) and writes back through a tensor sharded like the
parameter (:func:`shard_like`), so one code path serves single-process, DDP and FSDP2 training.
"""

from __future__ import annotations

import sys
import weakref
from typing import Optional

import torch
import torch.nn as nn

ALTERNATIVE = (
    "Train with DDP or FSDP2 instead (accelerate: distributed_type MULTI_GPU, or FSDP with fsdp_version: 2; "
    "the transformers Trainer uses FSDP2 by default); see the multi-GPU tutorial of sparse_peft."
)


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing torch.distributed when it is unused)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``t`` itself, or the all-gathered value of a DTensor (a collective: every rank calls it)."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every rank) laid out like ``ref``: a DTensor with ``ref``'s mesh and placements, cut
    locally without communication, or ``full`` itself when ``ref`` is an ordinary tensor."""
    if not is_dtensor(ref):
        return full.to(ref.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


class DistSync:
    """Collectives of the default process group: sum a tensor over ranks, or take rank 0's copy."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.world_size = dist.get_world_size()

    def all_reduce(self, t: torch.Tensor) -> None:
        self.dist.all_reduce(t)

    def broadcast(self, t: torch.Tensor) -> None:
        self.dist.broadcast(t, src=0)


def dist_sync() -> Optional[DistSync]:
    """A :class:`DistSync` when ``torch.distributed`` runs with more than one rank, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistSync()
    return None


def _accelerate_wrapper() -> Optional[str]:
    """``"deepspeed-<stage>"`` or ``"fsdp1"`` when accelerate has been set up for one of them, else None.

    Only reads accelerate's state when accelerate is already imported and initialised; never initialises it.
    """
    state_mod = sys.modules.get("accelerate.state")
    if state_mod is None or not state_mod.is_initialized():
        return None
    state = state_mod.AcceleratorState()
    kind = str(getattr(state.distributed_type, "value", state.distributed_type)).upper()
    if kind == "DEEPSPEED":
        plugin = getattr(state, "deepspeed_plugin", None)
        return f"deepspeed-{getattr(plugin, 'zero_stage', '?')}"
    if kind == "FSDP" and getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", 2) == 1:
        return "fsdp1"
    return None


def param_wrapper(p: torch.Tensor) -> Optional[str]:
    """What sharded ``p`` in place: ``"deepspeed-3"`` (ZeRO-3 partitioned), ``"fsdp1"`` (flattened), or None."""
    if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
        return "deepspeed-3"
    if getattr(p, "_fsdp_flattened", False):
        return "fsdp1"
    return None


def unsupported_wrapper(params: list[torch.Tensor], drop_and_grow: bool) -> Optional[str]:
    """The wrapper among ``params`` (or in accelerate's set-up) that a tuner cannot train under, or None.

    DeepSpeed ZeRO-3 partitions every parameter, including the frozen base weights our autograd functions read
    directly, so no tuner runs under it. Drop-and-grow (SpIEL) also edits its values and their optimizer state in
    place between steps, which FSDP1's flat parameters and every DeepSpeed ZeRO stage (it steps fp32 copies of its
    own) make impossible.
    """
    found = next((w for w in map(param_wrapper, params) if w is not None), None) or _accelerate_wrapper()
    if found is None:
        return None
    if found == "deepspeed-3" or (drop_and_grow and (found.startswith("deepspeed") or found == "fsdp1")):
        return found
    return None


def check_wrapping(
    module: nn.Module, tuner: str, drop_and_grow: bool = False, edited: Optional[list[torch.Tensor]] = None
) -> None:
    """Raise a clear error when ``module``'s parameters live under a wrapper ``tuner`` cannot train under.

    ``edited``: the tensors drop-and-grow edits between steps, as the module holds them now (in forward). One that is
    no longer an ``nn.Parameter`` has been replaced by a view into a flat parameter (FSDP1).
    """
    found = unsupported_wrapper(list(module.parameters()), drop_and_grow)
    if found is None and drop_and_grow and any(not isinstance(t, nn.Parameter) for t in edited or ()):
        found = "fsdp1"
    if found is None:
        return
    if found == "fsdp1":
        what = "FSDP1 (FullyShardedDataParallel flat parameters)"
    else:
        what = f"DeepSpeed ZeRO stage {found.split('-', 1)[1]}"
    why = (
        "it partitions the frozen base weights, which the tuner's forward reads directly"
        if found == "deepspeed-3"
        else "drop-and-grow rewrites the values and their optimizer state in place between steps, and this wrapper "
        "keeps them in flat shards of its own"
    )
    raise RuntimeError(f"{tuner} cannot train under {what}: {why}. {ALTERNATIVE}")


class WrappingGuard:
    """Mixin for the tuner models: :meth:`_before_forward` runs before every forward of the wrapped model, through a
    forward pre-hook on ``tuner.model`` (peft enters there both from ``BaseTuner.forward`` and, for the plain
    ``PeftModel``, directly). By default it refuses wrappers the tuner cannot run under."""

    guard_name = "this tuner"

    def _guard_forward(self) -> None:
        """Register the pre-hook on ``self.model`` (once; call from ``_create_and_replace``)."""
        if "_sparse_peft_guard" in self.__dict__:
            return
        ref = weakref.ref(self)

        def hook(module, args) -> None:
            tuner = ref()
            if tuner is not None:
                tuner._before_forward()

        self.__dict__["_sparse_peft_guard"] = self.model.register_forward_pre_hook(hook)

    def _before_forward(self) -> None:
        check_wrapping(self.model, self.guard_name)
