"""Which method recovers a pruned model best, side by side: SmolLM2-135M pruned with Wanda, every method trained on
the same batches, in the same order, for the same number of optimizer steps.

Protocol (every trained row):

- the same pruned weights (Wanda 50%, Wanda 2:4, and Wanda 70% for the leading methods), calibrated once per
  pattern on windows of the training articles;
- the same batches in the same order (``--steps`` x ``--batch-size`` blocks of ``--seq-len`` tokens from the
  training articles, shuffled once with a fixed seed), the same AdamW (weight decay 0), the same schedule (linear
  warm-up over the first 10% of steps, cosine decay to 10% of the peak);
- only the learning rate differs: each method takes the best of a grid of at least three values, scored by a
  shorter proxy run (``--grid-steps``) on a validation slice of *training-split* articles that no training batch
  comes from, never on the reported eval. The grid is run once, on ``--grid-pattern``, and its choice reused for the
  other patterns. A best value at the edge of the grid extends the grid by one more value in that direction.

Reported per row: perplexity on held-out Wikipedia articles (split by article), perplexity on a second domain (a
slice of the CPython standard library's own source, read from this interpreter's ``stdlib``), recovery =
``(ppl_pruned - ppl) / (ppl_pruned - ppl_dense_finetuned)``, trainable parameters, memory (trainable parameters +
gradients + AdamW state + tensors saved for backward on the first step, deduplicated by storage), wall time of
training and merging, and an exact sparsity check of the merged model against the pruned base (per module non-zero
count and, for N:M, every group).

Methods: ``dense``, ``dense_lora`` (the control: the dense model fine-tuned the same way with LoRA), ``pruned``,
``masked_ft`` (every parameter trains; pruned positions get no gradient), ``lora_star`` (peft LoRA, merged, re-pruned
to the mask: "LoRA*"), ``sparse_lora`` (exact gradient), ``sparse_lora_fast`` (``exact_gradient=False``),
``spiel_ag`` / ``spiel_ma`` (SEFT mode, the default on a pruned base), ``spiel_ag_star`` / ``spiel_ma_star``
(``preserve_sparsity=False``, merged and re-pruned to the mask), ``s2ft`` (its defaults), ``s2ft_r16`` (LoRA r=16's
trainable count), ``supertuning`` and ``shira`` (peft's sparse-delta tuners at the same count, merged and
re-pruned). Every adapter trains all seven projections; LoRA-family ranks are ``--rank`` (16).

Outputs (``--out-dir``, default ``benchmarks/results``): ``recovery.json``, ``recovery.md`` (the tables) and
``recovery.png`` (perplexity per method, grouped by sparsity).

    python benchmarks/recovery.py                              # the full CPU run (about two hours on 2 cores)
    python benchmarks/recovery.py --device cuda --steps 400 --seq-len 512 --batch-size 8   # the same on a GPU
    python benchmarks/recovery.py --quick                      # a tiny random Llama, a minute: checks the protocol
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

import sparse_peft
from sparse_peft.embedded import token_blocks, wiki_split
from sparse_peft.evaluation import perplexity
from sparse_peft.masks import is_nm, parse_nm
from sparse_peft.pruning import calibration_from_texts, prune
from sparse_peft.pruning.report import linear_weight, prunable_modules

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PATTERNS = ("50%", "2:4", "70%")
VALIDATION_ARTICLES = 400  # the last training-split articles: the LR grid's validation slice, never trained on


# ------------------------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    steps: int = 48
    grid_steps: int = 16
    seq_len: int = 256
    batch_size: int = 2
    rank: int = 16
    eval_blocks: int = 32
    code_blocks: int = 16
    val_blocks: int = 8
    nsamples: int = 64
    patterns: tuple = PATTERNS
    grid_pattern: str = "50%"
    methods: Optional[tuple] = None
    leading: tuple = ("masked_ft", "lora_star", "sparse_lora", "spiel_ag", "s2ft_r16")
    device: str = "cpu"
    dtype: str = "fp32"
    seed: int = 0
    quick: bool = False


QUICK = dict(
    steps=6, grid_steps=3, seq_len=32, batch_size=2, rank=2, eval_blocks=4, code_blocks=4, val_blocks=2, nsamples=4
)


# ---------------------------------------------------------------------------------------------- model and data
class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, EOS 256: the tokenizer of the ``--quick`` model (no files needed)."""

    eos_token_id = 256
    vocab_size = 257

    def __call__(self, texts, add_special_tokens: bool = False):
        if isinstance(texts, str):
            return {"input_ids": list(texts.encode("utf-8"))}
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}


def tiny_llama() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config).eval()


def load(settings: Settings):
    """``(model, tokenizer)``: SmolLM2-135M (or the tiny random Llama in ``--quick``), on the device."""
    if settings.quick:
        model, tok = tiny_llama(), ByteTokenizer()
    else:
        from sparse_peft.embedded import load_smollm2

        model, tok = load_smollm2()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[settings.dtype]
    return model.to(device=settings.device, dtype=dtype), tok


def code_texts(max_chars: int = 2_000_000) -> list[str]:
    """Source files of this interpreter's standard library (top level, sorted by name): the second domain."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not texts:
        raise FileNotFoundError(f"no standard library sources under {root}")
    return texts


@dataclass
class Data:
    train: torch.Tensor  # (steps, B, T): the batches, in order
    val: torch.Tensor  # (V, T) validation slice of the training split (LR grid only)
    wiki: torch.Tensor  # (E, T) held-out articles
    code: torch.Tensor  # (C, T) standard library source
    calibration: torch.Tensor  # (nsamples, T)
    digest: str  # sha256 of the batches


def make_data(tok, s: Settings) -> Data:
    train_texts, eval_texts = wiki_split()
    fit_texts, val_texts = train_texts[:-VALIDATION_ARTICLES], train_texts[-VALIDATION_ARTICLES:]
    need = s.steps * s.batch_size
    blocks = token_blocks(tok, fit_texts, seq_len=s.seq_len, max_blocks=max(need, 64) * 4)  # (N, T)
    g = torch.Generator().manual_seed(s.seed)
    order = torch.randperm(len(blocks), generator=g)
    order = order.repeat(-(-need // len(order)))[:need]  # cycles only if the text is shorter than the run
    train = blocks[order].view(s.steps, s.batch_size, s.seq_len)
    calibration = calibration_from_texts(tok, fit_texts[:4000], nsamples=s.nsamples, seq_len=s.seq_len, seed=s.seed)
    return Data(
        train=train,
        val=token_blocks(tok, val_texts, seq_len=s.seq_len, max_blocks=s.val_blocks),
        wiki=token_blocks(tok, eval_texts, seq_len=s.seq_len, max_blocks=s.eval_blocks),
        code=token_blocks(tok, code_texts(), seq_len=s.seq_len, max_blocks=s.code_blocks),
        calibration=calibration,
        digest=batch_digest(train),
    )


def batch_digest(batches: torch.Tensor) -> str:
    return hashlib.sha256(batches.contiguous().numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------- pruning
def prune_base(dense: nn.Module, pattern: str, data: Data) -> nn.Module:
    model = copy.deepcopy(dense)
    nm = parse_nm(pattern) if ":" in pattern else None
    sparsity = None if nm else float(pattern.rstrip("%")) / 100
    prune(model, "wanda", sparsity, pattern if nm else None, data.calibration, progress=False)
    return model


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: kept (bool, nn.Linear layout)}`` of every prunable module."""
    return {n: linear_weight(m) != 0 for n, m in prunable_modules(model).items()}


@torch.no_grad()
def reprune(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Re-apply the pruned base's masks to a merged model (what LoRA* and the other re-pruned rows do)."""
    for name, module in prunable_modules(model).items():
        w = linear_weight(module)
        w.mul_(masks[name].to(w.dtype))


@torch.no_grad()
def sparsity_check(model: nn.Module, kept: dict[str, torch.Tensor], pattern: str) -> dict:
    """The merged model against the pruned base: non-zeros per module may not grow; N:M groups must stay valid."""
    revived = nnz_before = nnz_after = grown_modules = 0
    nm = parse_nm(pattern) if ":" in pattern else None
    nm_valid = True if nm else None
    zeros = numel = 0
    for name, module in prunable_modules(model).items():
        w = linear_weight(module)
        before, after = int(kept[name].sum()), int((w != 0).sum())
        revived += int((w[~kept[name]] != 0).sum())
        nnz_before, nnz_after = nnz_before + before, nnz_after + after
        grown_modules += after > before
        zeros, numel = zeros + w.numel() - after, numel + w.numel()
        if nm and not is_nm(w, *nm):
            nm_valid = False
    return {
        "sparsity": zeros / numel,
        "nnz_before": nnz_before,
        "nnz_after": nnz_after,
        "revived": revived,
        "modules_over_budget": grown_modules,
        "nm_valid": nm_valid,
        "exact": grown_modules == 0 and nm_valid is not False,
    }


# ----------------------------------------------------------------------------------------------------- methods
@dataclass
class Method:
    label: str
    grid: tuple  # learning rates, ascending
    build: Callable  # (pruned base, settings) -> model to train
    reprune: bool = False  # merged, then re-pruned to the mask
    keeps: str = "zeros"  # what the tuner itself promises: "zeros" (the mask), "count" (SEFT) or "-"


def _peft(config):
    def build(base: nn.Module, s: Settings) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(copy.deepcopy(base), config(s))

    return build


def _lora(s):
    from peft import LoraConfig

    return LoraConfig(r=s.rank, lora_alpha=2 * s.rank, target_modules=TARGETS, task_type="CAUSAL_LM")


def spiel_schedule(steps: int) -> dict:
    """SpIEL's drop-and-grow schedule for a run of ``steps``: about five reselections, each after a window of
    accumulated gradients a third as long, regrowth decaying linearly to 0 over the run."""
    every = max(2, steps // 5)
    return dict(reselection_steps=every, accumulation_steps=max(1, every // 3), total_steps=steps)


def _spiel(selection: str, preserve: bool):
    def config(s):
        return sparse_peft.SpielConfig(
            r=s.rank,
            selection=selection,
            preserve_sparsity=preserve,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
            **spiel_schedule(s.steps),
        )

    return config


def _s2ft_r(s: Settings, model: nn.Module) -> sparse_peft.S2FTConfig:
    """S²FT with one head per block and as many FFN channels as fill LoRA rank ``s.rank``'s count per block."""
    cfg = model.config
    d, inter = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    lora = s.rank * (4 * d + 2 * (d + kv) + 3 * (d + inter))  # q, o + k, v + gate, up, down
    head = d * (d // cfg.num_attention_heads)  # one o_proj head slice
    channels = max(1, round((lora - head) / d))
    return sparse_peft.S2FTConfig(
        heads_ratio=1 / cfg.num_attention_heads, channels_ratio=channels / inter, task_type="CAUSAL_LM"
    )


def _s2ft_matched(base: nn.Module, s: Settings) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(copy.deepcopy(base), _s2ft_r(s, base))


def _supertuning(base: nn.Module, s: Settings) -> nn.Module:
    """peft's Super-Tuning with one density over all targets, so its total equals LoRA rank ``s.rank``'s."""
    from peft import SupertuningConfig, get_peft_model

    mods = [m for n, m in prunable_modules(base).items() if n.split(".")[-1] in TARGETS]
    lora = sum(s.rank * sum(linear_weight(m).shape) for m in mods)
    density = lora / sum(linear_weight(m).numel() for m in mods)
    return get_peft_model(
        copy.deepcopy(base), SupertuningConfig(sparsity=1 - density, target_modules=TARGETS, task_type="CAUSAL_LM")
    )


def _shira(s):
    from peft import ShiraConfig

    return ShiraConfig(r=s.rank, target_modules=TARGETS, task_type="CAUSAL_LM")


def _masked_ft(base: nn.Module, s: Settings) -> nn.Module:
    """Every parameter trains; the pruned positions of every prunable weight get a zero gradient (so AdamW with
    weight decay 0 never moves them) and are re-zeroed after each step as a guard."""
    model = copy.deepcopy(base)
    model.requires_grad_(True)
    masks = masks_of(model)
    guards = []
    for name, module in prunable_modules(model).items():
        w = module.weight
        keep = masks[name] if w.shape == masks[name].shape else masks[name].t()  # Conv1D stores (d_in, d_out)
        keep = keep.to(w.dtype)
        w.register_hook(lambda g, keep=keep: g * keep)
        guards.append((w, keep))
    model._masked_ft_guards = guards
    return model


LR_WIDE = (3e-4, 1e-3, 3e-3)
METHODS: dict[str, Method] = {
    "masked_ft": Method("masked full FT", (3e-5, 1e-4, 3e-4), _masked_ft),
    "lora_star": Method("LoRA* (merged, re-pruned)", LR_WIDE, _peft(_lora), reprune=True, keeps="-"),
    "sparse_lora": Method(
        "SparseLoRA",
        LR_WIDE,
        _peft(
            lambda s: sparse_peft.SparseLoraConfig(
                r=s.rank, lora_alpha=2 * s.rank, target_modules=TARGETS, task_type="CAUSAL_LM"
            )
        ),
    ),
    "sparse_lora_fast": Method(
        "SparseLoRA, unmasked gradient",
        LR_WIDE,
        _peft(
            lambda s: sparse_peft.SparseLoraConfig(
                r=s.rank, lora_alpha=2 * s.rank, exact_gradient=False, target_modules=TARGETS, task_type="CAUSAL_LM"
            )
        ),
    ),
    "spiel_ag": Method("SpIEL-AG (SEFT)", LR_WIDE, _peft(_spiel("ag", True)), keeps="count"),
    "spiel_ma": Method("SpIEL-MA (SEFT)", LR_WIDE, _peft(_spiel("ma", True)), keeps="count"),
    "spiel_ag_star": Method(
        "SpIEL-AG* (no SEFT, re-pruned)", LR_WIDE, _peft(_spiel("ag", False)), reprune=True, keeps="-"
    ),
    "spiel_ma_star": Method(
        "SpIEL-MA* (no SEFT, re-pruned)", LR_WIDE, _peft(_spiel("ma", False)), reprune=True, keeps="-"
    ),
    "s2ft": Method(
        "S²FT (defaults)", (1e-4, 3e-4, 1e-3), _peft(lambda s: sparse_peft.S2FTConfig(task_type="CAUSAL_LM"))
    ),
    "s2ft_r16": Method("S²FT (LoRA's count)", (1e-4, 3e-4, 1e-3), _s2ft_matched),
    "supertuning": Method("peft Super-Tuning* (re-pruned)", LR_WIDE, _supertuning, reprune=True, keeps="-"),
    "shira": Method("peft SHiRA* (re-pruned)", LR_WIDE, _peft(_shira), reprune=True, keeps="-"),
}


# ---------------------------------------------------------------------------------------------------- training
def lr_lambda(steps: int) -> Callable[[int], float]:
    warmup = max(1, round(0.1 * steps))

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


def state_bytes(model: nn.Module) -> int:
    """Trainable parameters + their gradients + AdamW's two fp32 moments."""
    return sum(p.numel() * (2 * p.element_size() + 8) for p in model.parameters() if p.requires_grad)


class SavedTensors:
    """Counts the distinct storages autograd saves for backward (parameters and buffers excluded)."""

    def __init__(self, model: nn.Module):
        self.resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.storages: dict[int, int] = {}

    def pack(self, t):
        if isinstance(t, torch.Tensor) and not t.is_sparse:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.resident:
                self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def train(model: nn.Module, batches: torch.Tensor, lr: float, device: str, desc: str) -> dict:
    """AdamW over ``batches`` (steps, B, T) with the shared schedule; returns losses and the memory count."""
    from tqdm.auto import tqdm

    model.train()
    if hasattr(model, "config"):
        model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(len(batches)))
    guards = getattr(model, "_masked_ft_guards", ())
    losses, saved = [], SavedTensors(model)
    for step in tqdm(range(len(batches)), desc=desc, leave=False):
        ids = batches[step].to(device)
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for w, keep in guards:
                w.mul_(keep)
        losses.append(loss.item())
    model.eval()
    trainable = sum(p.numel() for p in params)
    return {"losses": losses, "trainable": trainable, "memory_bytes": state_bytes(model) + saved.total}


def finish(model: nn.Module, method: Method, kept: dict[str, torch.Tensor]) -> nn.Module:
    """The plain merged model of a trained row (re-pruned when the method says so)."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    if method.reprune:
        reprune(merged, kept)
    for p in merged.parameters():
        p.requires_grad_(False)
    merged.__dict__.pop("_masked_ft_guards", None)
    return merged


def evaluate(model: nn.Module, data: Data) -> dict:
    kw = dict(batch_size=8, progress=False)
    return {"ppl_wiki": perplexity(model, data.wiki, **kw), "ppl_code": perplexity(model, data.code, **kw)}


def run_method(
    name: str, method: Method, base: nn.Module, kept, pattern: str, lr: float, data: Data, s: Settings
) -> dict:
    t0 = time.perf_counter()
    model = method.build(base, s)
    stats = train(model, data.train, lr, s.device, f"{pattern} {name} lr={lr:g}")
    merged = finish(model, method, kept)
    seconds = time.perf_counter() - t0
    row = {
        "method": name,
        "label": method.label,
        "pattern": pattern,
        "lr": lr,
        "seconds": seconds,
        "trainable": stats["trainable"],
        "memory_bytes": stats["memory_bytes"],
        "reprune": method.reprune,
        "keeps": method.keeps,
        "batches": data.digest,
        "loss_first": stats["losses"][0],
        "loss_last": stats["losses"][-1],
        "max_loss": max(stats["losses"]),
        "losses": stats["losses"],
    }
    row.update(evaluate(merged, data))
    row["check"] = sparsity_check(merged, kept, pattern)
    stats_fn = getattr(getattr(model, "base_model", None), "spiel_stats", None)
    if stats_fn is not None:
        row["spiel"] = {k: v for k, v in stats_fn().items() if k != "reselect_seconds"}
    del model, merged
    return row


# --------------------------------------------------------------------------------------------------------- grid
def choose_lr(name: str, base: nn.Module, data: Data, s: Settings) -> dict:
    """The grid's best learning rate by validation perplexity after a ``grid_steps`` proxy run."""
    method = METHODS[name]
    proxy = replace(s, steps=s.grid_steps)  # schedules that depend on the run's length see the proxy's
    grid, scores = list(method.grid), {}

    def score(lr: float) -> float:
        model = method.build(base, proxy)
        train(model, data.train[: s.grid_steps], lr, s.device, f"grid {name} lr={lr:g}")
        merged = finish(model, method, masks_of(base))
        ppl = perplexity(merged, data.val, batch_size=8, progress=False)
        return ppl if math.isfinite(ppl) else float("inf")

    for lr in grid:
        scores[lr] = score(lr)
    best = min(scores, key=scores.get)
    if best in (grid[0], grid[-1]):  # at an edge: one more value beyond it
        step = grid[1] / grid[0]
        extra = float(f"{best / step if best == grid[0] else best * step:.3g}")
        scores[extra] = score(extra)
        best = min(scores, key=scores.get)
    return {"method": name, "grid": {f"{k:g}": v for k, v in sorted(scores.items())}, "lr": best}


# ------------------------------------------------------------------------------------------------------ report
def add_recovery(rows: list[dict]) -> None:
    ref = {r["method"]: r for r in rows if r["pattern"] == "dense"}
    target = ref["dense_lora"]["ppl_wiki"]
    pruned = {r["pattern"]: r["ppl_wiki"] for r in rows if r["method"] == "pruned"}
    for r in rows:
        p = pruned.get(r["pattern"])
        r["recovery"] = None if p is None or r["method"] == "pruned" else (p - r["ppl_wiki"]) / (p - target)
        r["worse_than_pruned"] = p is not None and r["method"] != "pruned" and r["ppl_wiki"] > p


def goals(rows: list[dict]) -> list[dict]:
    """The issue's goals, each with the numbers that decide it."""
    out = []
    by = {(r["pattern"], r["method"]): r for r in rows}
    for pattern in ("50%", "2:4"):
        star = by.get((pattern, "lora_star"))
        for m in ("sparse_lora", "sparse_lora_fast", "spiel_ag", "spiel_ma", "s2ft_r16"):
            r = by.get((pattern, m))
            if star and r:
                out.append(
                    {
                        "goal": f"{pattern}: {m} beats LoRA*",
                        "value": r["ppl_wiki"],
                        "reference": star["ppl_wiki"],
                        "met": r["ppl_wiki"] < star["ppl_wiki"],
                    }
                )
        for anchor in ("supertuning", "shira"):
            a = by.get((pattern, anchor))
            best = min(
                (by[(pattern, m)] for m in ("spiel_ag", "spiel_ma") if (pattern, m) in by),
                key=lambda r: r["ppl_wiki"],
                default=None,
            )
            if a and best:
                out.append(
                    {
                        "goal": f"{pattern}: SpIEL ({best['method']}) beats {anchor}",
                        "value": best["ppl_wiki"],
                        "reference": a["ppl_wiki"],
                        "met": best["ppl_wiki"] < a["ppl_wiki"],
                    }
                )
        full = by.get((pattern, "masked_ft"))
        ours = [
            by[(pattern, m)]
            for m in ("sparse_lora", "sparse_lora_fast", "spiel_ag", "spiel_ma", "s2ft", "s2ft_r16")
            if (pattern, m) in by
        ]
        if full and ours:
            eligible = [r for r in ours if r["trainable"] * 10 <= full["trainable"]]
            best = min(eligible, key=lambda r: r["ppl_wiki"])
            out.append(
                {
                    "goal": f"{pattern}: best tuner ({best['method']}) within 10% of masked full FT",
                    "value": best["ppl_wiki"],
                    "reference": full["ppl_wiki"],
                    "met": best["ppl_wiki"] <= 1.1 * full["ppl_wiki"],
                }
            )
    trained = [r for r in rows if r["pattern"] != "dense" and r["method"] != "pruned"]
    worse = [f"{r['pattern']} {r['method']}" for r in trained if r["worse_than_pruned"]]
    out.append({"goal": "no row ends worse than its pruned base", "value": worse, "met": not worse})
    inexact = [f"{r['pattern']} {r['method']}" for r in trained if not r["check"]["exact"]]
    out.append({"goal": "merged sparsity exact in every row", "value": inexact, "met": not inexact})
    return out


def _fmt_mem(b: Optional[int]) -> str:
    return "-" if not b else f"{b / 2**20:,.0f} MB"


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = []
    for pattern in ["dense", *result["settings"]["patterns"]]:
        sub = [r for r in rows if r["pattern"] == pattern]
        if not sub:
            continue
        lines += [
            f"**{'dense model' if pattern == 'dense' else 'Wanda ' + pattern}**",
            "",
            "| method | lr | wiki ppl | code ppl | recovery | trainable | memory | time | merged sparsity |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sub:
            c = r.get("check")
            check = (
                "-"
                if c is None
                else (
                    f"{c['sparsity']:.2%} {'exact' if c['exact'] else 'NOT exact'}"
                    + (f", {c['revived']:,} revived / {c['nnz_after']:,} nnz" if c["revived"] else "")
                    + ("" if c["nm_valid"] is None else (", N:M valid" if c["nm_valid"] else ", N:M BROKEN"))
                )
            )
            rec = "-" if r.get("recovery") is None else f"{r['recovery']:.2f}"
            lr = "-" if r.get("lr") is None else f"{r['lr']:g}"
            trainable = f"{r['trainable']:,}" if r.get("trainable") else "-"
            lines.append(
                f"| {r['label']} | {lr} | {r['ppl_wiki']:.2f} | {r['ppl_code']:.2f} | {rec} | {trainable} | "
                f"{_fmt_mem(r.get('memory_bytes'))} | {r.get('seconds', 0):.0f} s | {check} |"
            )
        lines.append("")
    if result.get("grid"):
        lines += [
            "**Learning-rate grid** (validation perplexity after the proxy run; chosen value in bold)",
            "",
            "| method | grid |",
            "|---|---|",
        ]
        for g in result["grid"]:
            cells = ", ".join(
                (f"**{k}: {v:.2f}**" if float(k) == g["lr"] else f"{k}: {v:.2f}") for k, v in g["grid"].items()
            )
            lines.append(f"| {g['method']} | {cells} |")
        lines.append("")
    lines += ["**Goals**", "", "| goal | value | reference | met |", "|---|---|---|---|"]
    for g in result["goals"]:
        val = g["value"] if not isinstance(g["value"], float) else f"{g['value']:.2f}"
        ref = g.get("reference")
        lines.append(
            f"| {g['goal']} | {val or 'none'} | {'-' if ref is None else f'{ref:.2f}'} | "
            f"{'yes' if g['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    patterns = [p for p in result["settings"]["patterns"] if any(r["pattern"] == p for r in rows)]
    ref = {r["method"]: r["ppl_wiki"] for r in rows if r["pattern"] == "dense"}
    fig, axes = plt.subplots(1, len(patterns), figsize=(5.5 * len(patterns), 4.8), squeeze=False)
    for ax, pattern in zip(axes[0], patterns):
        sub = [r for r in rows if r["pattern"] == pattern]
        labels = [r["label"] for r in sub]
        values = [r["ppl_wiki"] for r in sub]
        colors = [
            "#999999"
            if r["method"] == "pruned"
            else "#d62728"
            if r["reprune"]
            else "#7f7f7f"
            if r["method"] == "masked_ft"
            else "#1f77b4"
            for r in sub
        ]
        ax.barh(range(len(sub)), values, color=colors)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
        ax.set_yticks(range(len(sub)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.15 * max(values))
        for name, style in (("dense", ":"), ("dense_lora", "--")):
            if name in ref:
                ax.axvline(
                    ref[name],
                    color="k",
                    linestyle=style,
                    linewidth=1,
                    label="dense" if name == "dense" else "dense + LoRA (control)",
                )
        ax.set_title(f"Wanda {pattern}")
        ax.set_xlabel("held-out Wikipedia perplexity (lower is better)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.suptitle(
        "Recovery of a pruned model: blue = sparsity-preserving tuner, red = merged then re-pruned", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------- main
def parse(argv=None) -> Settings:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Settings()
    ap.add_argument("--steps", type=int, default=d.steps, help="optimizer steps of every run (default %(default)s)")
    ap.add_argument("--grid-steps", type=int, default=d.grid_steps, help="steps of a learning-rate proxy run")
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--rank", type=int, default=d.rank, help="LoRA rank that sets every method's trainable count")
    ap.add_argument("--eval-blocks", type=int, default=d.eval_blocks, help="held-out Wikipedia blocks")
    ap.add_argument("--code-blocks", type=int, default=d.code_blocks, help="standard-library source blocks")
    ap.add_argument("--val-blocks", type=int, default=d.val_blocks, help="validation blocks of the LR grid")
    ap.add_argument("--nsamples", type=int, default=d.nsamples, help="Wanda calibration windows")
    ap.add_argument("--patterns", default=",".join(d.patterns), help="comma-separated, from 50%%, 2:4, 70%%")
    ap.add_argument("--grid-pattern", default=d.grid_pattern, help="the pattern the LR grid runs on")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=LR",
        help="skip the grid for METHOD and use LR (repeatable)",
    )
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16"])
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama and a handful of steps")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from <out-dir>/recovery.partial.json (same options)",
    )
    args = ap.parse_args(argv)
    s = Settings(
        steps=args.steps,
        grid_steps=args.grid_steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        rank=args.rank,
        eval_blocks=args.eval_blocks,
        code_blocks=args.code_blocks,
        val_blocks=args.val_blocks,
        nsamples=args.nsamples,
        patterns=tuple(p.strip() for p in args.patterns.split(",") if p.strip()),
        grid_pattern=args.grid_pattern,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        quick=args.quick,
        methods=tuple(m.strip() for m in args.methods.split(",")) if args.methods else None,
    )
    if s.quick:
        for k, v in QUICK.items():
            setattr(s, k, v)
    bad = [m for m in s.methods or () if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    if any(p not in PATTERNS for p in s.patterns):
        ap.error(f"--patterns: choose from {', '.join(PATTERNS)}")
    if s.grid_steps > s.steps:
        ap.error("--grid-steps must not exceed --steps")
    fixed = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in METHODS:
            ap.error(f"--lr {item!r}: unknown method {name!r}")
        fixed[name] = float(value)
    return s, fixed, Path(args.out_dir), args.resume


def methods_for(pattern: str, s: Settings) -> list[str]:
    chosen = list(s.methods or METHODS)
    return [m for m in chosen if pattern != "70%" or m in s.leading]


class Progress:
    """Rows and grid results so far, written (atomically) to ``recovery.partial.json`` after each one, so a long run
    that stops can continue with ``--resume``: finished rows and grid entries are reused when the settings match."""

    def __init__(self, path: Path, s: Settings, resume: bool):
        self.path, self.settings = path, json.loads(json.dumps(asdict(s)))  # tuples as JSON lists
        self.rows, self.grid, self.elapsed = [], {}, 0.0
        self.start = time.perf_counter()
        if resume and path.exists():
            saved = json.loads(path.read_text())
            if saved["settings"] != self.settings:
                raise SystemExit(
                    f"--resume: {path} was written with other settings; rerun without --resume "
                    "(or with the same options)."
                )
            self.rows, self.grid, self.elapsed = saved["rows"], saved["grid"], saved["elapsed"]
            print(f"resuming: {len(self.rows)} rows and {len(self.grid)} grid results from {path}", flush=True)

    def row(self, pattern: str, method: str) -> Optional[dict]:
        return next((r for r in self.rows if r["pattern"] == pattern and r["method"] == method), None)

    def add(self, row: Optional[dict] = None, grid: Optional[dict] = None) -> None:
        if row is not None:
            self.rows.append(row)
        if grid is not None:
            self.grid[grid["method"]] = grid
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"settings": self.settings, "rows": self.rows, "grid": self.grid, "elapsed": self.seconds}, indent=1
            )
        )
        tmp.replace(self.path)

    @property
    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.start


def run(s: Settings, fixed: dict, out_dir: Path, resume: bool = False) -> dict:
    torch.manual_seed(s.seed)
    state = Progress(out_dir / "recovery.partial.json", s, resume)
    dense, tok = load(s)
    data = make_data(tok, s)
    if state.row("dense", "dense") is None:
        state.add({"method": "dense", "label": "dense", "pattern": "dense", "reprune": False, **evaluate(dense, data)})
    ev = state.row("dense", "dense")
    print(f"dense: wiki {ev['ppl_wiki']:.2f}, code {ev['ppl_code']:.2f}", flush=True)

    bases, lrs = {}, dict(fixed)
    for name in [m for m in (s.methods or METHODS) if m not in fixed]:
        if name not in state.grid:
            if s.grid_pattern not in bases:
                bases[s.grid_pattern] = prune_base(dense, s.grid_pattern, data)
            state.add(grid=choose_lr(name, bases[s.grid_pattern], data, s))
        lrs[name] = state.grid[name]["lr"]
        print(f"grid {name}: {state.grid[name]['grid']} -> {lrs[name]:g}", flush=True)
    lrs.setdefault("dense_lora", lrs.get("lora_star", METHODS["lora_star"].grid[1]))

    if state.row("dense", "dense_lora") is None:
        control = Method("dense + LoRA (control)", (), _peft(_lora), keeps="-")
        row = run_method("dense_lora", control, dense, masks_of(dense), "dense", lrs["dense_lora"], data, s)
        row.pop("check")
        state.add(row)
    print(f"dense_lora: wiki {state.row('dense', 'dense_lora')['ppl_wiki']:.2f}", flush=True)

    for pattern in s.patterns:
        todo = [m for m in methods_for(pattern, s) if state.row(pattern, m) is None]
        if not todo and state.row(pattern, "pruned") is not None:
            continue
        base = bases.pop(pattern, None) or prune_base(dense, pattern, data)
        kept = masks_of(base)
        if state.row(pattern, "pruned") is None:
            state.add(
                {
                    "method": "pruned",
                    "label": "pruned",
                    "pattern": pattern,
                    "reprune": False,
                    "check": sparsity_check(base, kept, pattern),
                    **evaluate(base, data),
                }
            )
        print(f"{pattern} pruned: wiki {state.row(pattern, 'pruned')['ppl_wiki']:.2f}", flush=True)
        for name in todo:
            row = run_method(name, METHODS[name], base, kept, pattern, lrs[name], data, s)
            state.add(row)
            print(
                f"{pattern} {name}: wiki {row['ppl_wiki']:.2f} code {row['ppl_code']:.2f} "
                f"({row['seconds']:.0f} s, exact={row['check']['exact']})",
                flush=True,
            )
        del base
    return report(state, s, lrs, data, out_dir)


def report(state: Progress, s: Settings, lrs: dict, data: Data, out_dir: Path) -> dict:
    names = ["dense", "dense_lora", "pruned", *METHODS]
    rows = sorted(state.rows, key=lambda r: ((["dense", *PATTERNS].index(r["pattern"])), names.index(r["method"])))
    add_recovery(rows)
    result = {
        "benchmark": "recovery",
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": asdict(s),
        "lrs": lrs,
        "grid": list(state.grid.values()),
        "batches": data.digest,
        "rows": rows,
        "goals": goals(rows),
        "wall_seconds": state.seconds,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recovery.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (out_dir / "recovery.md").write_text(md)
    plot(result, out_dir / "recovery.png")
    print("\n" + md)
    print(f"wall time {result['wall_seconds']:.0f} s; wrote {out_dir}/recovery.json, recovery.md, recovery.png")
    return result


def main(argv=None) -> dict:
    s, fixed, out_dir, resume = parse(argv)
    return run(s, fixed, out_dir, resume)


if __name__ == "__main__":
    main()
