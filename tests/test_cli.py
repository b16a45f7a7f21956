"""The command line: help for every flag, and bad input rejected in one line before any training."""

import argparse
import subprocess
import sys

import pytest

from subspace_optim.cli import build_parser, main


def test_every_flag_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "finetune", "compare"} <= set(sub.choices)
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
    train_flags = {s for a in sub.choices["train"]._actions for s in a.option_strings}
    contract = ("--model --data --optimizer --rank --update-gap --scale --rule --target --layerwise --steps "
                "--batch-size --grad-accum --seq-len --lr --warmup --min-lr-ratio --weight-decay --clip --dtype "
                "--seed --eval-every --save-every --out --resume").split()
    assert set(contract) <= train_flags


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "subspace_optim", "train", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--optimizer" in result.stdout


def test_no_command_prints_help():
    assert main([]) == 2


@pytest.fixture
def tiny_text(tmp_path):
    path = tmp_path / "my.txt"
    path.write_text("\n\n".join(f"Paragraph {i} of my own text, long enough to pack. " * 4 for i in range(30)))
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama-42b"], "unknown model 'llama-42b'"),
    (["--optimizer", "sgdx"], "unknown optimizer 'sgdx'"),
    (["--optimizer", "golore@150"], "x must be between 0 and 100"),
    (["--data", "no/such/file.txt"], "no such file or folder"),
    (["--data", "{empty}"], "no text found"),
    (["--seq-len", "4096"], "--seq-len 4096 is longer than llama-tiny allows (1024 positions)"),
    (["--optimizer", "rso", "--layerwise"], "--layerwise: --optimizer rso cannot update weights inside backward"),
    (["--optimizer", "full", "--moments", "keep"], "--moments keep: --optimizer full has no subspace moments"),
    (["--optimizer", "golore", "--rso-eta", "1"], "--rso-eta needs --optimizer rso, not golore"),
    (["--optimizer", "galore", "--random-basis", "regenerate"], "--optimizer galore has no random bases"),
    (["--optimizer", "galore", "--layerwise", "--clip", "1.0"], "--clip cannot be used with --layerwise"),
    (["--optimizer", "adamw", "--rule", "lion"], "use --optimizer full"),
    (["--optimizer", "galore", "--target", "nothing_matches"], "selects no nn.Linear"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--resume", "{empty}"], "not a run folder"),
    (["--tokenizer", "missing.model"], "tokenizer file not found"),
    (["--optimizer", "adamw", "--weights", "int8"], "--weights int8: --optimizer adamw does not hold"),
    (["--optimizer", "adamw", "--projection-dtype", "bf16"], "--optimizer adamw computes no projections"),
    (["--optimizer", "adamw", "--weight-rounding", "stochastic"], "--optimizer adamw rounds to nearest"),
    (["--optimizer", "golore", "--weights", "int8", "--distributed", "ddp"], "--weights int8 is single-process"),
])
def test_bad_input_is_one_line_on_stderr(tmp_path, tiny_text, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{empty}", str(tmp_path / "empty")) for a in argv]
    out = tmp_path / "run"
    # defaults for a fast run first: argparse keeps the last value of a repeated flag
    assert main(["train", "--data", tiny_text, "--seq-len", "32", "--steps", "1", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("subspace-optim train: error: ")
    assert not out.exists()  # rejected before the run folder (or any training) exists


def test_finetune_bad_input(tmp_path, capsys):
    (tmp_path / "one.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    assert main(["finetune", "--data", str(tmp_path / "one.jsonl")]) == 2
    assert "a single class 'x'" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tmp_path)]) == 2
    assert "not a local HF checkpoint folder" in capsys.readouterr().err


def test_help_lists_every_method_and_every_default(capsys, monkeypatch):
    """--optimizer's help comes from the method registry; a default of 0 is shown like any other."""
    from subspace_optim.train.optimizers import OPTIMIZERS

    monkeypatch.setenv("COLUMNS", "10000")  # one line per flag: argparse would wrap inside "galore-torch"

    for command, zero_defaults in (("train", ["--seed", "--weight-decay", "--save-every"]),
                                   ("finetune", ["--seed", "--weight-decay", "--save-every", "--eval-batches"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        text = text[text.index("options:"):]  # past the usage line
        optimizer_help = text[text.index("--optimizer OPTIMIZER"):text.index("--rule {")]
        assert all(f"{name}: " in optimizer_help for name in OPTIMIZERS), optimizer_help
        for flag in zero_defaults:
            flag_help = text[text.index(flag + " "):]
            assert "(default: 0" in flag_help[:flag_help.index(" --", 2)], (command, flag)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "GoLore@x%," in capsys.readouterr().out


def test_dtype_spellings_are_the_same_for_train_and_memory(capsys):
    parser = build_parser()
    for spelling, name in (("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp32", "float32")):
        assert parser.parse_args(["train", "--dtype", spelling]).dtype == name
        assert parser.parse_args(["finetune", "--dtype", spelling]).dtype == name
        assert parser.parse_args(["memory", "--dtype", spelling]).dtype == name
    assert main(["memory", "--model", "llama-tiny", "--dtype", "float32"]) == 0
    assert "float32" in capsys.readouterr().out


def test_rank_not_below_a_layer_trains_it_at_full_rank_with_one_warning(tmp_path, tiny_text, capsys):
    """The library's rule in the harness too: a weight whose smaller side is not above --rank is trained at full
    rank, and the run says so in one line."""
    out = tmp_path / "run"
    assert main(["train", "--data", tiny_text, "--seq-len", "32", "--steps", "1", "--optimizer", "galore",
                 "--rank", "200", "--batch-size", "2", "--eval-batches", "1", "--quiet", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("subspace-optim train: warning: rank 200 >= min(m, n)")
    assert "trained at full rank" in err


def test_argparse_rejects_bad_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--rule", "rmsprop"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
