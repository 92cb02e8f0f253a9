"""The steps behind the CLI and the demo: load → evaluate → prune → fine-tune (SFTTrainer) → merge → verify → save.

Each step is a plain function so scripts can reuse them. Models are a local folder or ``"smollm2"`` (the embedded
SmolLM2-135M-Instruct); data is a local ``.txt`` / ``.json`` / ``.jsonl`` file or ``"wiki"`` (the embedded Wikipedia
summaries, split by article).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
DEFAULT_DATA = "wiki"


class UserError(ValueError):
    """A problem with the user's input; the CLI prints it without a traceback."""


# ---- models -------------------------------------------------------------------------------------------------
def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a local folder, a hub id, or the embedded SmolLM2 for ``"smollm2"``.

    A hub id is downloaded as transformers does (set ``HF_HUB_OFFLINE=1`` to forbid it); a local path that is not a
    model folder is a :class:`UserError`.
    """
    if spec == DEFAULT_MODEL:
        from .embedded import load_smollm2

        return load_smollm2(dtype)
    path = Path(spec).expanduser()
    if path.exists() and not (path / "config.json").is_file():  # a file, or a folder without a config
        raise UserError(
            f"--model {spec!r} is not a model folder (no config.json there). Pass a folder saved with "
            f"save_pretrained, a hub id, or {DEFAULT_MODEL!r} for the embedded SmolLM2-135M."
        )
    if path.is_dir():
        return _from_pretrained(path, dtype)
    try:
        return _from_pretrained(spec, dtype)
    except OSError as exc:  # not on the hub, no network, HF_HUB_OFFLINE=1 ...
        raise UserError(f"--model {spec!r} is not a local folder, and loading it as a hub id failed: {exc}") from exc


def _from_pretrained(source, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(source)


def save_model(model: nn.Module, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """``save_pretrained`` the model (and tokenizer) into ``out``, atomically: see :func:`staged_folder`."""
    with staged_folder(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is an existing file; pass a folder path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {str(out)!r} already exists and is not empty; pass --overwrite to replace it.")


def _new_sibling(out: Path, tag: str) -> Path:
    """A fresh hidden folder next to ``out``, created with the umask's permissions (``mkdtemp`` would make it 0700)."""
    for _ in range(100):
        candidate = out.parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir(0o777)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary folder next to {out}")


def _umask_modes(folder: Path) -> None:
    """Give every folder under ``folder`` the mode ``folder`` got from the umask, and every file that mode minus x.

    ``save_pretrained`` writes some files through temporary files (0600); a saved model is meant to be shared.
    """
    dir_mode = stat.S_IMODE(folder.stat().st_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), dir_mode & 0o666)


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder next to ``out``; on success it becomes ``out``, on failure it is removed.

    An existing non-empty ``out`` is a :class:`UserError` unless ``overwrite``; it is then replaced only once the
    new folder is complete, so a failure leaves it as it was. An existing file is never replaced.
    """
    out = Path(out).expanduser()
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(out, "partial")
    try:
        yield tmp
        _umask_modes(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an old ``out`` is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = _new_sibling(out, "old")
        os.rename(out, old / out.name)
    try:
        os.rename(new, out)
    except BaseException:
        if old is not None:
            os.rename(old / out.name, out)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def training_folder(out: str | os.PathLike, overwrite: bool = False, resume: bool = False):
    """The fine-tuning output folder ``out``, written in place so that its checkpoints survive a crash.

    ``resume``: continue in an existing ``out``. ``overwrite``: the old ``out`` is moved aside, deleted once training
    finished, and put back if training fails before writing a checkpoint. Without either, ``out`` must be absent or
    empty; a failed run that wrote no checkpoint leaves nothing behind.
    """
    out = Path(out).expanduser()
    if resume:
        yield out
        _umask_modes(out)
        return
    _check_out(out, overwrite)
    existed = out.exists()
    aside = None
    if existed and any(out.iterdir()):
        aside = _new_sibling(out, "old")
        os.rename(out, aside / out.name)
    out.mkdir(0o777, parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        _after_failure(out, aside, existed)
        raise
    _umask_modes(out)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _after_failure(out: Path, aside: Optional[Path], existed: bool) -> None:
    if any(out.glob("checkpoint-*")):  # the failed run's checkpoints are worth more than a clean folder
        if aside is not None:
            logger.warning("training failed; its checkpoints are in %s, the previous contents in %s", out, aside)
        return
    shutil.rmtree(out, ignore_errors=True)
    if aside is not None:
        os.rename(aside / out.name, out)
        aside.rmdir()
    elif existed:
        out.mkdir(0o777)


# ---- data ---------------------------------------------------------------------------------------------------
def load_texts(spec: str = DEFAULT_DATA, eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(train_texts, eval_texts)``: the embedded Wikipedia split, or the ``text`` field of a local file."""
    if spec == DEFAULT_DATA:
        from .embedded import wiki_split

        return wiki_split(eval_fraction, seed)
    records = _read_records(spec)
    if not records or not isinstance(records[0], dict) or "text" not in records[0]:
        raise UserError(f"--data {spec!r}: expected plain text or records with a 'text' field for this command.")
    texts = [r["text"] for r in records]
    n_eval = max(1, round(len(texts) * eval_fraction))
    return texts[n_eval:], texts[:n_eval]


def _read_records(spec: str) -> list:
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--data {spec!r} does not exist. Pass a .txt, .json or .jsonl file, or {DEFAULT_DATA!r}.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [{"text": t} for t in path.read_text().split("\n\n") if t.strip()]
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else data.get("data", [])
    raise UserError(f"--data {spec!r}: unsupported file type {suffix!r}; use .txt, .json or .jsonl.")


def training_datasets(spec: str, tokenizer, seq_len: int, eval_size: int = 16):
    """``(train, eval)`` ``datasets.Dataset`` for SFTTrainer.

    Plain text becomes pre-tokenized blocks of ``seq_len`` tokens (train from the train split, ``eval_size`` blocks
    from the held-out split). Chat records (``{"messages": [...]}``) stay chat records, and SFTTrainer applies the
    tokenizer's chat template; the last 10% of them are held out.
    """
    import datasets

    from .embedded import token_blocks

    if spec != DEFAULT_DATA:
        records = _read_records(spec)
        if records and isinstance(records[0], dict) and "messages" in records[0]:
            if getattr(tokenizer, "chat_template", None) is None:
                raise UserError(f"--data {spec!r} holds chat 'messages' but the tokenizer has no chat template.")
            chats = [{"messages": r["messages"]} for r in records]
            n_eval = max(1, len(chats) // 10) if len(chats) > 1 else 0
            train = datasets.Dataset.from_list(chats[: len(chats) - n_eval])
            return train, (datasets.Dataset.from_list(chats[len(chats) - n_eval :]) if n_eval else None)
    train_texts, eval_texts = load_texts(spec)
    blocks = token_blocks(tokenizer, train_texts, seq_len=seq_len)  # (N, T)
    if len(blocks) == 0:
        raise UserError(
            f"--data {spec!r} holds fewer than seq_len={seq_len} tokens; pass more text or a smaller --seq-len."
        )
    held_out = token_blocks(tokenizer, eval_texts, seq_len=seq_len, max_blocks=eval_size)
    eval_ds = datasets.Dataset.from_dict({"input_ids": held_out.tolist()}) if len(held_out) else None
    return datasets.Dataset.from_dict({"input_ids": blocks.tolist()}), eval_ds


def eval_blocks(tokenizer, eval_texts: list[str], seq_len: int, n_blocks: int) -> torch.Tensor:
    from .embedded import token_blocks

    blocks = token_blocks(tokenizer, eval_texts, seq_len=seq_len, max_blocks=n_blocks)
    if len(blocks) == 0:
        raise UserError(f"the evaluation texts hold fewer than seq_len={seq_len} tokens.")
    return blocks


# ---- tuners -------------------------------------------------------------------------------------------------
def _sparse_lora(r: int, **_):
    from . import SparseLoraConfig

    return SparseLoraConfig(r=r, lora_alpha=2 * r, task_type="CAUSAL_LM")


def spiel_schedule(steps: Optional[int]) -> dict:
    """SpIEL's drop-and-grow schedule for a run of ``steps`` optimizer steps.

    SpielConfig's defaults reselect every 20 steps, which a short run never reaches. Here a run reselects about five
    times (every ``max(2, steps // 5)`` steps, at most every 20) and accumulates gradients over the last third of each
    interval.
    """
    if not steps:
        return {}
    reselection = min(20, max(2, steps // 5))
    return {"reselection_steps": reselection, "accumulation_steps": max(1, reselection // 3), "total_steps": steps}


def _spiel(r: int, **kw):
    from . import SpielConfig

    return SpielConfig(r=r, task_type="CAUSAL_LM", **spiel_schedule(kw.get("total_steps")))


def _s2ft(r: int, **_):
    from . import S2FTConfig

    return S2FTConfig(task_type="CAUSAL_LM")


METHODS: dict[str, Callable] = {"sparse_lora": _sparse_lora, "spiel": _spiel, "s2ft": _s2ft}
# Learning rates that recover a pruned SmolLM2 well within a few minutes (see docs/benchmarks.md).
DEFAULT_LR = {"sparse_lora": 1e-3, "spiel": 1e-3, "s2ft": 2e-4, "lora": 1e-3}


def peft_config(method: str, r: int = 16, **kw):
    """The config of one of the sparse tuners (``METHODS``), as the CLI and the demo use it."""
    if method not in METHODS:
        raise UserError(f"--method {method!r} is not one of {sorted(METHODS)}.")
    return METHODS[method](r=r, **kw)


def lora_config(r: int = 16):
    """peft LoRA with rank ``r`` on every linear layer but the output head (the seven projections of a Llama block),
    as SparseLoRA's defaults: the LoRA* baseline (train, merge, then :func:`reprune`)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")


@torch.no_grad()
def reprune(model: nn.Module, zeros: dict[str, torch.Tensor]) -> None:
    """Set every weight that was zero in the base (``zeros``, from :func:`zero_masks`) back to zero: LoRA*."""
    from .pruning.report import linear_weight, prunable_modules

    modules = prunable_modules(model)
    for name, was_zero in zeros.items():
        w = linear_weight(modules[name])  # (d_out, d_in), a view for Conv1D
        w.masked_fill_(was_zero.to(w.device), 0)


# ---- fine-tuning --------------------------------------------------------------------------------------------
def finetune(
    model: nn.Module,
    tokenizer,
    config,
    train_dataset,
    *,
    out_dir: str,
    max_steps: int = 100,
    max_seconds: Optional[float] = None,
    lr: float = 1e-3,
    batch_size: int = 4,
    gradient_checkpointing: bool = False,
    eval_dataset=None,
    eval_steps: Optional[int] = None,
    resume_from_checkpoint=None,
    save_steps: Optional[int] = None,
    logging_steps: int = 10,
    check_sparsity_every: int = 0,
    seed: int = 42,
    callbacks: Optional[list] = None,
):
    """Fine-tune with TRL's ``SFTTrainer`` and nothing but ``peft_config``; returns the trainer.

    ``max_steps`` optimizer steps (fewer if ``max_seconds`` of wall time run out first). The same ``seed`` and
    ``train_dataset`` give the same batches in the same order, whatever the tuner. ``gradient_checkpointing`` turns
    on transformers' activation checkpointing.
    """
    from trl import SFTConfig, SFTTrainer

    from .training.callbacks import SparsityCallback, TimeBudgetCallback

    args = SFTConfig(
        output_dir=out_dir,
        max_steps=max_steps,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        activation_checkpointing=gradient_checkpointing,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(10, max(1, max_steps // 10)),
        logging_steps=logging_steps,
        report_to=[],
        bf16=False,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        eval_strategy="steps" if eval_dataset is not None and eval_steps else "no",
        eval_steps=eval_steps,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
        seed=seed,
    )
    callbacks = list(callbacks or [])
    if max_seconds:
        callbacks.append(TimeBudgetCallback(max_seconds))
    if check_sparsity_every:
        callbacks.append(SparsityCallback(check_every=check_sparsity_every, allow_moves=config.peft_type == "SPIEL"))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=config,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


# ---- merge and verify ---------------------------------------------------------------------------------------
@dataclass
class Verification:
    modules: int
    zeros_before: int
    revived: int
    nnz_before: int
    nnz_after: int
    nm_valid: Optional[bool]

    @property
    def ok(self) -> bool:
        return self.nnz_after <= self.nnz_before and self.nm_valid is not False


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    from .pruning.report import linear_weight, prunable_modules

    return {n: (linear_weight(m) == 0).clone() for n, m in prunable_modules(model).items()}


def verify(model: nn.Module, zeros: dict[str, torch.Tensor], nm_pattern: Optional[str] = None) -> Verification:
    """Compare the current weights with the zero masks recorded before fine-tuning."""
    from .pruning.report import linear_weight, prunable_modules, sparsity_report

    mods = prunable_modules(model)
    revived = nnz_after = nnz_before = zeros_before = 0
    for name, was_zero in zeros.items():
        w = linear_weight(mods[name])
        revived += int((w[was_zero] != 0).sum())
        nnz_after += int((w != 0).sum())
        nnz_before += int((~was_zero).sum())
        zeros_before += int(was_zero.sum())
    nm_valid = sparsity_report(model, nm_pattern).nm_valid if nm_pattern else None
    return Verification(len(zeros), zeros_before, revived, nnz_before, nnz_after, nm_valid)
