"""DDP and FSDP2 on 2 CPU processes (gloo), for every tuner.

- DDP: ranks end identical, and equal to a single process fed the same global batch.
- FSDP2 (``fully_shard`` per decoder layer and on the root, as the Trainer does): ranks end identical, equal to DDP,
  and SpIEL's drop-and-grow runs on the sharded values; the merged model after save/load equals DDP's.
- Wrappers a tuner cannot train under (FSDP1 flat parameters for drop-and-grow) fail with an error naming FSDP2/DDP.

Every multi-process run has a deadline: process-group collectives time out after 60 s and the processes are joined
with a bounded wait, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from peft import PeftModel, get_peft_model, get_peft_model_state_dict

import sparse_peft
from conftest import inputs, make_model, make_sparse
from sparse_peft._dist import full_tensor
from sparse_peft.pruning.report import linear_weight

WORLD = 2
STEPS = 4
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
JOIN_TIMEOUT = 300  # seconds for a whole multi-process run (import and training of both ranks)
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
TUNERS = {
    "sparse_lora": lambda: sparse_peft.SparseLoraConfig(r=4, target_modules=TARGETS, init_weights=False),
    "s2ft": lambda: sparse_peft.S2FTConfig(heads_ratio=0.25, channels_ratio=0.1, init_weights=False),
    "spiel": lambda: sparse_peft.SpielConfig(
        r=2, target_modules=TARGETS, reselection_steps=2, accumulation_steps=1, regrow_fraction=0.5
    ),
    "spiel_ma": lambda: sparse_peft.SpielConfig(
        r=2, target_modules=TARGETS, selection="ma", reselection_steps=2, accumulation_steps=1, regrow_fraction=0.5
    ),
}


# ------------------------------------------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, out_dir: str, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(rank, world, out_dir, *args)
    except BaseException:
        Path(out_dir, f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_processes(fn, out_dir: Path, *args, world: int = WORLD, timeout: float = JOIN_TIMEOUT) -> None:
    """Run ``fn(rank, world, out_dir, *args)`` in ``world`` fresh processes; a crash or a hang fails the test."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, str(out_dir), args), daemon=True) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    errors = "\n".join(f.read_text() for f in sorted(Path(out_dir).glob("error*.txt")))
    if hung:
        pytest.fail(f"ranks {hung} still running after {timeout:.0f} s (a hung collective?); killed.\n{errors}")
    failed = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    if failed:
        pytest.fail(f"ranks failed with exit codes {failed}:\n{errors}")


# ------------------------------------------------------------------------------------------------------- training
def _model(tuner: str):
    base = make_model("llama")
    make_sparse(base)  # a pruned base: SpIEL runs in SEFT mode (partners) and zeros must survive
    torch.manual_seed(0)
    return get_peft_model(base, TUNERS[tuner]())


def _batch(step: int, rank=None) -> dict:
    """The global batch of ``step`` (4 sequences), or rank ``rank``'s half of it."""
    batch = inputs("llama", batch=2 * WORLD, seed=100 + step)
    return batch if rank is None else {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}


def _train(model, wrapped, rank=None, steps=range(STEPS), opt=None):
    opt = opt or torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    wrapped.train()
    for step in steps:
        wrapped(**_batch(step, rank)).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _result(model) -> dict:
    """Every adapter tensor (whole, gathered under FSDP2) and SpIEL's counters."""
    adapter = {k: full_tensor(v).detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    tuner = model.base_model
    return {"adapter": adapter, "stats": tuner.spiel_stats() if hasattr(tuner, "spiel_stats") else {}}


def _save_adapter(model, rank: int, path: str) -> None:
    """Rank 0 writes the adapter (from the whole, gathered state dict under FSDP2)."""
    state = {k: full_tensor(v).detach() for k, v in model.state_dict().items()}  # collective under FSDP2
    if rank == 0:
        model.save_pretrained(path, state_dict=state)


def _ddp_worker(rank: int, world: int, out_dir: str, tuners: list) -> None:
    for tuner in tuners:
        model = _model(tuner)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        _train(model, ddp, rank)
        torch.save(_result(model), os.path.join(out_dir, f"ddp-{tuner}-{rank}.pt"))
        _save_adapter(model, rank, os.path.join(out_dir, f"ddp-{tuner}"))


def _fsdp2_worker(rank: int, world: int, out_dir: str, tuners: list) -> None:
    from torch.distributed.fsdp import fully_shard

    for tuner in tuners:
        model = _model(tuner)
        start = {k: v.clone() for k, v in model.state_dict().items() if "spiel_indices" in k}
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert type(model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight).__name__ == "DTensor"
        _train(model, model, rank)
        result = _result(model)
        result["moved"] = sum(int((result["adapter"][_saved_key(k)] != v).sum()) for k, v in start.items())
        torch.save(result, os.path.join(out_dir, f"fsdp2-{tuner}-{rank}.pt"))
        _save_adapter(model, rank, os.path.join(out_dir, f"fsdp2-{tuner}"))
    _fsdp2_resume(rank, out_dir)
    _fsdp1_refusal(rank, out_dir)


def _fsdp2_spiel():
    from torch.distributed.fsdp import fully_shard

    model = _model("spiel")
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp2_resume(rank: int, out_dir: str) -> None:
    """SpIEL checkpointed after step 2 through torch.distributed.checkpoint (the format of accelerate's FSDP2
    checkpoints), then resumed in a fresh sharded model: the run continues the schedule and ends as uninterrupted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _fsdp2_spiel()
    opt = _train(model, model, rank, steps=range(2))
    state_model, state_opt = get_state_dict(model, opt)
    dcp.save({"model": state_model, "optim": state_opt}, checkpoint_id=os.path.join(out_dir, "dcp"))
    _train(model, model, rank, steps=range(2, STEPS), opt=opt)
    full = _result(model)
    resumed = _fsdp2_spiel()
    fresh = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    state_model, state_opt = get_state_dict(resumed, fresh)
    template = {"model": state_model, "optim": state_opt}
    dcp.load(template, checkpoint_id=os.path.join(out_dir, "dcp"))
    set_state_dict(resumed, fresh, model_state_dict=template["model"], optim_state_dict=template["optim"])
    _train(resumed, resumed, rank, steps=range(2, STEPS), opt=fresh)
    torch.save({"full": full, "resumed": _result(resumed)}, os.path.join(out_dir, f"fsdp2-resume-{rank}.pt"))


def _saved_key(key: str) -> str:
    return key.replace(".default", "")


def _fsdp1_refusal(rank: int, out_dir: str) -> None:
    """FSDP1: SparseLoRA and S²FT train; SpIEL fails with a clear error at the first training forward."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    for tuner in ("sparse_lora", "s2ft"):
        inner = _model(tuner)
        model = FullyShardedDataParallel(inner, use_orig_params=True, device_id=torch.device("cpu"))
        _train(inner, model, rank)
        with FullyShardedDataParallel.summon_full_params(model):
            torch.save(_result(inner), os.path.join(out_dir, f"fsdp1-{tuner}-{rank}.pt"))
    model = FullyShardedDataParallel(_model("spiel"), use_orig_params=True, device_id=torch.device("cpu"))
    try:
        model(**_batch(0, rank)).loss.backward()
        message = None
    except RuntimeError as exc:
        message = str(exc)
    torch.save({"message": message}, os.path.join(out_dir, f"fsdp1-{rank}.pt"))


def _load(out_dir: Path, kind: str, tuner: str, rank: int) -> dict:
    return torch.load(out_dir / f"{kind}-{tuner}-{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_processes(_ddp_worker, out, list(TUNERS))
    return out


@pytest.fixture(scope="module")
def fsdp2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    run_processes(_fsdp2_worker, out, ["sparse_lora", "s2ft", "spiel"])
    return out


# ------------------------------------------------------------------------------------------------------- checks
def _assert_equal_adapters(a: dict, b: dict, what: str, exact: bool) -> None:
    assert a.keys() == b.keys() and a, what
    for key in a:
        if not a[key].is_floating_point() or exact:
            assert torch.equal(a[key], b[key]), f"{what}: {key} differs"
        else:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=f"{what}: {key} differs")


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_ddp_ranks_identical_and_equal_to_one_process(tuner, ddp_dir):
    r0, r1 = (_load(ddp_dir, "ddp", tuner, r) for r in range(WORLD))
    _assert_equal_adapters(r0["adapter"], r1["adapter"], f"DDP rank 0 vs rank 1 ({tuner})", exact=True)
    same = ("step", "reselections", "changed", "total_steps")
    assert [r0["stats"].get(k) for k in same] == [r1["stats"].get(k) for k in same]
    single = _model(tuner)
    _train(single, single)
    _assert_equal_adapters(_result(single)["adapter"], r0["adapter"], f"one process vs DDP ({tuner})", exact=False)
    if tuner.startswith("spiel"):
        assert r0["stats"]["reselections"] == STEPS // 2 and r0["stats"]["changed"] > 0


@pytest.mark.parametrize("tuner", ["sparse_lora", "s2ft", "spiel"])
def test_fsdp2_ranks_identical_and_equal_to_ddp(tuner, fsdp2_dir, ddp_dir):
    f0, f1 = (_load(fsdp2_dir, "fsdp2", tuner, r) for r in range(WORLD))
    _assert_equal_adapters(f0["adapter"], f1["adapter"], f"FSDP2 rank 0 vs rank 1 ({tuner})", exact=True)
    ddp = _load(ddp_dir, "ddp", tuner, 0)
    _assert_equal_adapters(ddp["adapter"], f0["adapter"], f"DDP vs FSDP2 ({tuner})", exact=False)


def test_spiel_drop_and_grow_moves_slots_under_fsdp2(fsdp2_dir):
    result = _load(fsdp2_dir, "fsdp2", "spiel", 0)
    assert result["stats"]["reselections"] == STEPS // 2 and result["stats"]["changed"] > 0
    assert result["moved"] > 0, "no index moved under FSDP2"


def test_spiel_fsdp2_resume_through_distributed_checkpoint_continues_the_schedule(fsdp2_dir):
    runs = [torch.load(fsdp2_dir / f"fsdp2-resume-{r}.pt", weights_only=True) for r in range(WORLD)]
    for run in runs:
        assert run["resumed"]["stats"]["step"] == STEPS and run["resumed"]["stats"]["reselections"] == 1
        _assert_equal_adapters(
            run["full"]["adapter"], run["resumed"]["adapter"], "FSDP2 resumed vs uninterrupted", True
        )
    _assert_equal_adapters(runs[0]["resumed"]["adapter"], runs[1]["resumed"]["adapter"], "resumed ranks", exact=True)


@pytest.mark.parametrize("tuner", ["sparse_lora", "s2ft", "spiel"])
def test_merged_model_after_fsdp2_equals_after_ddp(tuner, fsdp2_dir, ddp_dir):
    merged = {}
    for kind, out in (("ddp", ddp_dir), ("fsdp2", fsdp2_dir)):
        base = make_model("llama")
        make_sparse(base)
        zeros = {n: (linear_weight(m) == 0).clone() for n, m in base.named_modules() if n.endswith("proj")}
        model = PeftModel.from_pretrained(base, str(out / f"{kind}-{tuner}")).merge_and_unload()
        merged[kind] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, module in model.named_modules():
            if name in zeros and tuner != "spiel":  # SpIEL's SEFT mode may move zeros, never add non-zeros
                assert bool((linear_weight(module)[zeros[name]] == 0).all()), f"{kind}: a pruned weight came back"
            if name in zeros:
                nnz = int((~zeros[name]).sum())
                assert int((linear_weight(module) != 0).sum()) <= nnz, f"{kind}: {name} gained non-zeros"
    _assert_equal_adapters(merged["ddp"], merged["fsdp2"], f"merged after DDP vs after FSDP2 ({tuner})", exact=False)


@pytest.mark.parametrize("tuner", ["sparse_lora", "s2ft"])
def test_fsdp1_trains_sparse_lora_and_s2ft_like_ddp(tuner, fsdp2_dir, ddp_dir):
    f0, f1 = (_load(fsdp2_dir, "fsdp1", tuner, r) for r in range(WORLD))
    _assert_equal_adapters(f0["adapter"], f1["adapter"], f"FSDP1 rank 0 vs rank 1 ({tuner})", exact=True)
    _assert_equal_adapters(_load(ddp_dir, "ddp", tuner, 0)["adapter"], f0["adapter"], f"DDP vs FSDP1 ({tuner})", False)


def test_spiel_under_fsdp1_fails_with_a_clear_error(fsdp2_dir):
    for rank in range(WORLD):
        message = torch.load(fsdp2_dir / f"fsdp1-{rank}.pt", weights_only=True)["message"]
        assert message is not None, "SpIEL trained under FSDP1 without an error"
        assert "FSDP1" in message and "FSDP2" in message and "DDP" in message, message


# ------------------------------------------------------------------------------------------- unsupported wrappers
@pytest.mark.parametrize("tuner", ["sparse_lora", "s2ft", "spiel"])
def test_deepspeed_zero3_partitioned_weights_are_refused(tuner):
    model = _model(tuner)
    weight = model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
    weight.ds_id = 0  # what DeepSpeed ZeRO-3 leaves on every partitioned parameter
    model.eval()
    with pytest.raises(RuntimeError, match="DeepSpeed ZeRO stage 3.*DDP or FSDP2"):
        model(**_batch(0))


def test_drop_and_grow_is_refused_under_every_deepspeed_stage(monkeypatch):
    """ZeRO-1/2 keep the base weights whole (SparseLoRA and S²FT run) but step fp32 copies of the trainable values
    that drop-and-grow cannot edit: SpIEL refuses instead of silently never reselecting."""
    monkeypatch.setattr(sparse_peft._dist, "_accelerate_wrapper", lambda: "deepspeed-2")
    spiel = _model("spiel").train()
    with pytest.raises(RuntimeError, match="SpIEL cannot train under DeepSpeed ZeRO stage 2.*DDP or FSDP2"):
        spiel(**_batch(0))
    lora = _model("sparse_lora").train()
    lora(**_batch(0)).loss.backward()


# ------------------------------------------------------------------------------------------------------ tutorial
@pytest.mark.slow
def test_tutorial_cpu_commands_run_as_written(tmp_path):
    """The CPU rehearsal of docs/tutorials/multi_gpu.md (2 processes through accelerate launch): a run and its resume
    from the step-3 checkpoint end with the same adapter."""
    import re
    import subprocess

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "tutorials" / "multi_gpu.md").read_text()
    section = page[page.index("## On CPU processes") :]
    commands = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()
    assert len(commands) == 2 and all(c.startswith("accelerate launch") for c in commands)
    (tmp_path / "examples").symlink_to(root / "examples")
    for command in commands:
        out = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=JOIN_TIMEOUT)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "done: 6 steps on 2 process(es)" in out.stdout, out.stdout[-3000:]
    a, b = (load_file(tmp_path / "runs" / d / "adapter" / "adapter_model.safetensors") for d in ("cpu", "cpu_resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
