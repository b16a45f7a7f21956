"""Smoke tests of `subspace-optim reproduce NAME --quick`: each writes its report and plots at toy size, and never
where the committed reports live; --dry-run runs and writes nothing. (pretrain: tests/test_study.py.)"""

import json
from pathlib import Path

import pytest

from subspace_optim.cli import EXPERIMENTS, main
from subspace_optim.experiments.counterexample import switch_text

COMMITTED = "the committed report\n"


@pytest.fixture
def out(tmp_path, monkeypatch):
    """A fresh current folder holding a 'committed' docs/results, as a clone of the repository does."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs" / "results").mkdir(parents=True)
    for name in EXPERIMENTS:
        (tmp_path / "docs" / "results" / f"{name}.md").write_text(COMMITTED)
    return tmp_path


def _reproduce(name, out):
    """`reproduce NAME --quick` with the default folders: the report goes under runs/reproduce/quick."""
    assert main(["reproduce", name, "--quick"]) == 0
    assert (out / "docs" / "results" / f"{name}.md").read_text() == COMMITTED
    assert not list((out / "docs" / "results").glob("*.png"))
    report = (out / "runs" / "reproduce" / "quick" / f"{name}.md").read_text()
    assert f"`subspace-optim reproduce {name} --quick`" in report and "commit `" in report
    assert "wall time" in report and "seeds" in report and "toy size" in report
    return report


def test_counterexample(out):
    report = _reproduce("counterexample", out)
    assert (out / "runs" / "reproduce" / "quick" / "counterexample.png").stat().st_size > 0
    assert "GaLore (small batch)" in report and "auto" in report and "None" not in report


def test_refresh_cost(out):
    report = _reproduce("refresh-cost", out)
    assert "online PCA step" in report and (out / "runs" / "reproduce" / "quick" / "refresh-cost.png").is_file()


@pytest.mark.slow
def test_memory(out):
    """The claim: the estimator reproduces the seeds' totals, LLaMA-7B with Adam in BF16 at 58 GB (activation
    checkpointing) and GPT-3 175B at 1620 GB (no recomputation), within 5%; and the report's table shows those
    computed totals beside the seeds', not numbers written into its template."""
    from subspace_optim.memory_estimate import estimate

    report = _reproduce("memory", out)
    for model, activations, seed in (("llama-7b", "checkpoint", 58), ("gpt3-175b", "full", 1620)):
        total = estimate(model, "adamw", batch=1, seq=2048, dtype="bf16", activations=activations)["total"] / 1e9
        assert abs(total / seed - 1) < 0.05, (model, total)
        row = next(line for line in report.splitlines() if line.startswith(f"| {model} | {activations} |"))
        assert f"| {total:.2f} ({seed}) |" in row and f"| {total / seed - 1:+.1%} |" in row, row
    assert "estimate / measured" in report


@pytest.mark.slow
def test_finetune(out):
    report = _reproduce("finetune", out)
    assert "GaLore r=4" in report and "LoRA r=8" in report and "±" in report


@pytest.mark.slow
def test_precision(out):
    report = _reproduce("precision", out)
    for name in ("float32", "bf16, nearest", "bf16, stochastic", "int8, stochastic"):
        assert f"| {name} |" in report
    assert "--weights int8" in report and "--weight-rounding stochastic" in report


def test_memory_large_is_a_dry_run_here(out, capsys):
    """The large runs take tens of minutes and 20 GiB: the suite only checks what they would run."""
    assert main(["reproduce", "memory", "--large", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# reproduce memory: would write docs/results/memory-large.md")
    assert len(lines) == 4 and all("--model llama-" in line and "--steps 6 --save-every 5" in line for line in lines[1:])
    assert sum("--weights int8" in line for line in lines) == 2
    assert main(["reproduce", "pretrain", "--large"]) == 2
    assert main(["reproduce", "memory", "--max-runs", "1"]) == 2  # only --large builds over invocations
    assert "--max-runs 1: only pretrain, precision and memory --large" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--quick"], ["--quick", "--out", "{out}/docs/results"],
                                  ["--scale", "paper", "--out", "docs/results"]])
def test_only_the_full_experiment_may_write_the_committed_reports(out, capsys, argv):
    argv = [a.replace("{out}", str(out)) for a in argv]
    if "--out" in argv:  # refused before anything runs
        assert main(["reproduce", "pretrain", *argv]) == 2
        assert "only the full experiment rewrites the committed reports" in capsys.readouterr().err
    else:
        assert main(["reproduce", "all", *argv, "--dry-run"]) == 0
        assert "docs/results" not in capsys.readouterr().out
    assert all((out / "docs" / "results" / f"{n}.md").read_text() == COMMITTED for n in EXPERIMENTS)


@pytest.mark.parametrize("name", [*EXPERIMENTS, "all"])
def test_dry_run_says_what_and_where_and_runs_nothing(out, capsys, monkeypatch, name):
    from subspace_optim.experiments import report

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run started the experiment")

    monkeypatch.setattr(report.Report, "__init__", refuse)
    monkeypatch.setattr(report, "harness", refuse)
    assert main(["reproduce", name, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for each in EXPERIMENTS if name == "all" else [name]:
        assert f"# reproduce {each}: would write docs/results/{each}.md" in printed
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == \
        ["docs", "docs/results", *sorted(f"docs/results/{n}.md" for n in EXPERIMENTS)]  # nothing new
    assert all((out / "docs" / "results" / f"{n}.md").read_text() == COMMITTED for n in EXPERIMENTS)


def test_dry_run_prints_the_commands(capsys, out):
    assert main(["reproduce", "pretrain", "--scale", "paper", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# reproduce pretrain: would write runs/reproduce/paper/pretrain.md and its plots, after running:"
    assert any(line.startswith("[run] subspace-optim train --model llama-60m --data allenai/c4") and "--optimizer rso"
               in line and "--out runs/reproduce/pretrain-paper/" in line for line in lines)
    assert lines[-1].startswith("[waiting for its method's learning-rate grid] ")


def test_scale_is_pretrain_only(capsys):
    assert main(["reproduce", "counterexample", "--scale", "paper", "--dry-run"]) == 2
    assert "only pretrain has a paper scale" in capsys.readouterr().err


def test_auto_without_a_switch_reads_no_switch():
    assert switch_text({("AdamW", 0): 200, ("MSGD", 1): None}) == "AdamW seed 0: step 200, MSGD seed 1: no switch"


@pytest.mark.slow
def test_memory_large_end_to_end_at_toy_size(out, monkeypatch, capsys):
    """The large runs' machinery on llama-tiny: the run, its resumed last step in a fresh process (bitwise equal),
    the attributed peak and the estimate in the report; --max-runs 0 lists a configuration it did not run."""
    from subspace_optim.experiments import memory_large

    monkeypatch.setattr(memory_large, "STEPS", 1)
    monkeypatch.setattr(memory_large, "COMMON", {**memory_large.COMMON, "seq_len": 32, "eval_batches": 1})
    monkeypatch.setattr(memory_large, "RUNS", (("llama-tiny, int8 weights", 1.0,
                                                dict(model="llama-tiny", rank=16, weights="int8")),))
    assert main(["reproduce", "memory", "--large", "--out", str(out / "report")]) == 0
    report = (out / "report" / "memory-large.md").read_text()
    assert "equal the uninterrupted run's bitwise" in report and "DIFFER" not in report
    assert "| llama-tiny, int8 weights | 1.0 |" in report and "runtime (Python, torch, libraries)" in report
    assert "transients of the peak's phase" in report and "host" in report
    runs = Path("runs") / "reproduce" / "memory-large"
    assert json.loads((runs / "llama-tiny-int8-weights-resumed" / "verified.json").read_text())["bitwise"]
    assert not (runs / "llama-tiny-int8-weights" / "checkpoints").exists()  # the verdict kept, the bytes freed
    assert main(["reproduce", "memory", "--large", "--out", str(out / "report")]) == 0  # reused, from the verdict
    body = lambda text: text.split("\nLLaMA-7B and 13B, trained", 1)[1]  # noqa: E731 (the header times itself)
    assert body((out / "report" / "memory-large.md").read_text()) == body(report)
    monkeypatch.setattr(memory_large, "RUNS", (("llama-tiny, bf16 weights", 1.0,
                                                dict(model="llama-tiny", rank=16)),))
    assert main(["reproduce", "memory", "--large", "--max-runs", "0", "--out", str(out / "report")]) == 0
    assert "| llama-tiny, bf16 weights | 1.0 | not run |" in (out / "report" / "memory-large.md").read_text()
