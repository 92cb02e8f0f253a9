"""End-to-end tests of every ``sparse-peft`` command on a tiny model saved to a temp dir, and the quick demo."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model, make_tokenizer, word_texts
from sparse_peft.cli import main
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


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prune_finetune_eval_merge_report(workdir, capsys):
    d = str(workdir)
    code, out, _ = _run(
        [
            "prune",
            "--model",
            f"{d}/tiny",
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--data",
            f"{d}/train.txt",
            "--seq-len",
            "16",
            "--nsamples",
            "8",
            "--out",
            f"{d}/pruned",
        ],
        capsys,
    )
    assert code == 0 and "overall" in out
    code, out, _ = _run(["report", "--model", f"{d}/pruned", "--json"], capsys)
    assert code == 0 and abs(json.loads(out)["sparsity"] - 0.5) < 1e-6

    code, out, _ = _run(
        [
            "finetune",
            "--model",
            f"{d}/pruned",
            "--method",
            "sparse_lora",
            "--r",
            "4",
            "--data",
            f"{d}/train.txt",
            "--seq-len",
            "16",
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--out",
            f"{d}/adapter",
        ],
        capsys,
    )
    assert code == 0, out
    code, out, _ = _run(
        [
            "eval",
            "--model",
            f"{d}/pruned",
            "--adapter",
            f"{d}/adapter",
            "--data",
            f"{d}/train.txt",
            "--seq-len",
            "16",
            "--blocks",
            "4",
            "--json",
        ],
        capsys,
    )
    assert code == 0 and json.loads(out)["perplexity"] > 1

    code, out, _ = _run(
        ["merge", "--model", f"{d}/pruned", "--adapter", f"{d}/adapter", "--out", f"{d}/merged"], capsys
    )
    assert code == 0 and "0 of" in out
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(f"{d}/merged")
    pruned = transformers.AutoModelForCausalLM.from_pretrained(f"{d}/pruned")
    for (n, a), (_, b) in zip(merged.named_parameters(), pruned.named_parameters()):
        if n.endswith("proj.weight"):
            assert (a[b == 0] == 0).all(), f"{n}: a zero came back"
    assert not all(torch.equal(a, b) for a, b in zip(merged.parameters(), pruned.parameters()))


def test_prune_magnitude_with_refit_changes_kept_weights(workdir, capsys):
    """--refit needs calibration data even for magnitude: the kept weights move, the zeros stay where they were."""
    d = str(workdir)
    common = [
        "prune",
        "--model",
        f"{d}/tiny",
        "--method",
        "magnitude",
        "--pattern",
        "2:4",
        "--data",
        f"{d}/train.txt",
        "--seq-len",
        "16",
        "--nsamples",
        "8",
    ]
    assert _run(common + ["--out", f"{d}/mag"], capsys)[0] == 0
    code, out, _ = _run(common + ["--refit", "--out", f"{d}/mag_refit"], capsys)
    assert code == 0 and "overall" in out
    import transformers

    plain = transformers.AutoModelForCausalLM.from_pretrained(f"{d}/mag")
    refit = transformers.AutoModelForCausalLM.from_pretrained(f"{d}/mag_refit")
    assert sparsity_report(refit, "2:4").nm_valid
    projections = [
        (a, b)
        for (n, a), (_, b) in zip(plain.named_parameters(), refit.named_parameters())
        if n.endswith("proj.weight")
    ]
    assert all(torch.equal(a == 0, b == 0) for a, b in projections)  # magnitude masks do not depend on data
    assert not all(torch.equal(a, b) for a, b in projections)


def test_finetune_on_chat_data_with_eval(workdir, capsys):
    d = str(workdir)
    code, out, err = _run(
        [
            "finetune",
            "--model",
            f"{d}/tiny",
            "--method",
            "sparse_lora",
            "--r",
            "2",
            "--data",
            f"{d}/chat.jsonl",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--eval-steps",
            "1",
            "--out",
            f"{d}/chat-adapter",
        ],
        capsys,
    )
    assert code == 0, err
    assert (workdir / "chat-adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["report", "--model", "/no/such/dir"], "is not a model folder"),
        (["prune", "--model", "{tiny}", "--method", "magnitude", "--sparsity", "1.5", "--out", "{tmp}/x"], "sparsity"),
        (["prune", "--model", "{tiny}", "--method", "magnitude", "--pattern", "4:2", "--out", "{tmp}/x"], "0 < N < M"),
        (["eval", "--model", "{tiny}", "--data", "/no/such.jsonl"], "does not exist"),
        (
            [
                "finetune",
                "--model",
                "{tiny}",
                "--method",
                "nope",
                "--data",
                "{train}",
                "--seq-len",
                "16",
                "--out",
                "{tmp}/y",
            ],
            "is not one of",
        ),
    ],
)
def test_errors_are_clear(workdir, capsys, argv, needle):
    fmt = {"tiny": f"{workdir}/tiny", "tmp": str(workdir), "train": f"{workdir}/train.txt"}
    code, _, err = _run([a.format(**fmt) for a in argv], capsys)
    assert code == 2 and needle in err and "Traceback" not in err


def test_every_command_has_help_with_examples(capsys):
    for command in ["prune", "finetune", "eval", "merge", "report", "demo"]:
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert "examples:" in capsys.readouterr().out


def test_demo_quick(tmp_path, capsys):
    """The README's main job in its --quick form: the real SmolLM2, a few blocks and steps per method."""
    code = main(["demo", "--quick", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    rows = {r["model"].split(" ")[0]: r for r in results["rows"]}
    assert rows["dense"]["sparsity"] < 0.01 and abs(rows["pruned"]["sparsity"] - 0.5) < 1e-3
    recovered = [r for r in results["rows"] if r["model"].startswith("recovered")]
    assert len(recovered) == len(results["methods"]) >= 1
    for r in recovered:
        assert abs(r["sparsity"] - 0.5) < 1e-3 and r["trainable"] > 0
    assert "perplexity" in out
    merged = sparsity_report(__import__("transformers").AutoModelForCausalLM.from_pretrained(results["merged_model"]))
    assert abs(merged.sparsity - 0.5) < 1e-3
