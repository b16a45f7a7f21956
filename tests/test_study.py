"""The pretraining study (`reproduce pretrain`): its trained tokenizer, its model, its verdict rules, its run store
(reuse, code changes, resuming) and the results index built from the reports. The study itself runs at --quick size."""

from __future__ import annotations

import importlib.util
import json
import shlex
import time
import subprocess
import sys
from pathlib import Path

import pytest

from subspace_optim.cli import EXPERIMENTS, main
from subspace_optim.experiments import index, pretrain, runstore
from subspace_optim.experiments.pretrain import SCALES, Ppl, better, not_worse, run_for
from subspace_optim.train.config import UsageError
from subspace_optim.train.tokenizer import bpe_key, file_sha256, load_tokenizer, trained_bpe

ROOT = Path(__file__).resolve().parents[1]
DOCS = [f"Story {i}: the council of {town} approved the budget for the new library and the school. " * 4
        for i, town in enumerate(["Leeds", "York", "Bath", "Ely", "Hull", "Wells"] * 5)]
QUICK = Path("runs/reproduce/quick")


# ---------------------------------------------------------------- tokenizer


def test_trained_bpe_is_deterministic_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPACE_OPTIM_CACHE", str(tmp_path / "a"))
    here = trained_bpe(300, DOCS).read_bytes()
    # another process: the Rust side's hash maps are seeded per process
    code = ("import json, sys; from subspace_optim.train.tokenizer import trained_bpe; "
            "print(trained_bpe(300, json.loads(sys.stdin.read())))")
    path = subprocess.run([sys.executable, "-c", code], input=json.dumps(DOCS), capture_output=True, text=True,
                          check=True, env={"SUBSPACE_OPTIM_CACHE": str(tmp_path / "b"),
                                           "PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}).stdout
    assert Path(path.strip()).read_bytes() == here
    assert Path(path.strip()).parent != (tmp_path / "a" / "tokenizers")


def test_trained_bpe_is_cached_by_documents_settings_and_size(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPACE_OPTIM_CACHE", str(tmp_path))
    first = trained_bpe(300, DOCS)
    import tokenizers.trainers

    monkeypatch.setattr(tokenizers.trainers, "BpeTrainer", None)  # a second training would fail
    assert trained_bpe(300, DOCS) == first
    assert len({bpe_key(300, DOCS), bpe_key(301, DOCS), bpe_key(300, DOCS[:-1])}) == 3


def test_load_tokenizer_refuses_streams_and_tiny_vocabularies():
    with pytest.raises(UsageError, match="streamed dataset"):
        load_tokenizer("bpe:300", None)
    with pytest.raises(UsageError, match="at least 258"):
        load_tokenizer("bpe:100", DOCS)


def test_a_run_records_its_tokenizer_trained_on_the_training_split(tmp_path):
    from subspace_optim.train.data import read_documents, split

    data = tmp_path / "toy.txt"
    data.write_text("\n\n".join(DOCS + [f"Held out {i}: a quarrel about zebras and quinces." for i in range(40)]))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--tokenizer", "bpe:300", "--steps", "1", "--batch-size", "2",
                 "--seq-len", "16", "--eval-batches", "1", "--quiet", "--out", str(out)]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["tokenizer"] == "bpe:300" and info["vocab_size"] == 300
    assert info["tokenizer_sha256"] == file_sha256(Path(info["tokenizer_file"]))
    train_docs = split(read_documents(str(data)), 0.05)[0]
    assert len(train_docs) < len(DOCS) + 40  # some documents were held out, and the file is keyed by the rest
    assert bpe_key(300, train_docs)[:20] in Path(info["tokenizer_file"]).name


# ---------------------------------------------------------------- the study's design


def test_llama_study_is_mostly_projected_linear_layers():
    """At least 70% of the study model's parameters are in the weights that the subspace methods project."""
    from subspace_optim import subspace_param_groups
    from subspace_optim.train.models import build_causal_lm, causal_lm_config
    from subspace_optim.train.tokenizer import bpe_vocab_size

    base = SCALES["cpu"].base
    model = build_causal_lm(causal_lm_config(base["model"], bpe_vocab_size(base["tokenizer"]), 0, 1))
    groups = subspace_param_groups(model, rank=base["rank"])
    projected = sum(p.numel() for g in groups if "rank" in g for p in g["params"])
    assert projected / sum(p.numel() for p in model.parameters()) >= 0.7


def test_every_run_sees_a_million_tokens_in_the_same_order():
    scale = SCALES["cpu"]
    runs = [run_for(scale, m, lr, s) for m in scale.methods for lr in scale.lr_grid for s in scale.seeds]
    runs += [run_for(scale, "galore", 1e-2, 0, batch=b) for b in scale.batch_sweep]
    for run in runs:
        f = run.flags
        assert f["steps"] * f["batch_size"] * f["seq_len"] == 512 * 8 * 256 >= 10**6
        assert f["data"] == "bbcnews" and f["eval_batches"] == 0  # the whole validation split
    assert len({r.key for r in runs}) == len(runs)
    assert len(scale.lr_grid) >= 3 and len(scale.seeds) >= 2
    # what differs between two methods' runs at one lr and seed: the optimizer only (and AdamW has no rank)
    a, b = run_for(scale, "galore", 1e-2, 0).flags, run_for(scale, "rso", 1e-2, 0).flags
    assert {k for k in a if a[k] != b.get(k)} == {"optimizer"}


def test_verdict_rules():
    assert not_worse(Ppl([101, 103]), Ppl([100, 100]), 0.03) == "reproduced"
    assert not_worse(Ppl([98, 98]), Ppl([100, 100]), 0.03) == "reproduced"  # better, but within the tolerance
    assert not_worse(Ppl([80, 81]), Ppl([100, 101]), 0.03) == "reproduced, and beaten: 20% lower, not within 3%"
    assert not_worse(Ppl([120, 121]), Ppl([100, 101]), 0.03) == "not reproduced"
    assert not_worse(Ppl([100, 120]), Ppl([100, 100]), 0.03).startswith("inconclusive")  # 10% worse, spread 14%
    assert better(Ppl([90, 91]), Ppl([100, 101])) == "reproduced"
    assert better(Ppl([100, 101]), Ppl([90, 91])) == "not reproduced"
    assert better(Ppl([95, 105]), Ppl([100, 101])).startswith("inconclusive")


def test_code_digest_ignores_docstrings_comments_and_layout_not_code():
    a = 'def f(x):\n    """Doc."""\n    return x + 1  # note\n'
    b = 'def f(x):\n    """Another doc."""\n\n    return (x +\n            1)\n'
    assert runstore._code_only(a) == runstore._code_only(b) != runstore._code_only(a.replace("+ 1", "+ 2"))


@pytest.mark.slow
def test_training_code_holds_every_module_a_run_imports(tmp_path):
    data = tmp_path / "toy.txt"
    data.write_text("\n\n".join(DOCS))
    code = ("import sys; from subspace_optim.cli import main; "
            f"main(['train', '--data', {str(data)!r}, '--optimizer', 'rso', '--steps', '1', '--batch-size', '2', "
            f"'--seq-len', '16', '--eval-batches', '1', '--quiet', '--out', {str(tmp_path / 'run')!r}]); "
            "print(*sorted(m.__file__ for n, m in list(sys.modules.items()) if n.startswith('subspace_optim')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    files = {Path(f) for f in loaded.stdout.split()[-40:] if f.endswith(".py")}
    hashed = set(runstore.training_code())
    # the command line imports the memory estimator for its `memory` subcommand's flags; a run never calls it
    assert {f for f in files if f.name not in runstore.NOT_TRAINING} <= hashed
    assert runstore.PACKAGE / "rso.py" in files and runstore.PACKAGE / "train" / "tokenizer.py" in hashed
    # the harness is digested by source, the optimizer library by the probe, and nothing is in neither
    harness = set(runstore.harness_code())
    assert all((runstore.PACKAGE / f).is_file() for f in runstore.PROBED)
    assert harness | {runstore.PACKAGE / f for f in (*runstore.PROBED, runstore.SETTINGS_CODE)} == hashed
    assert runstore.PACKAGE / "optimizer.py" not in harness and runstore.PACKAGE / "train" / "loop.py" in harness


def test_the_optimizer_probe_sees_numbers_not_source(monkeypatch):
    """A refactor of the library that computes the same numbers keeps a run; a change of one number does not."""
    from subspace_optim import projectors

    flags = run_for(SCALES["quick"], "golore@20", 1e-3, 0).flags
    before = runstore.optimizer_probe(flags)
    assert runstore.optimizer_probe(run_for(SCALES["quick"], "golore@20", 1e-2, 1).flags) == before
    assert runstore.optimizer_probe(run_for(SCALES["quick"], "galore", 1e-3, 0).flags) != before
    svd = projectors.top_singular
    monkeypatch.setattr(projectors, "top_singular", lambda *a, **k: svd(*a, **k))  # a refactor
    assert runstore.optimizer_probe(flags) == before
    monkeypatch.setattr(projectors, "top_singular", lambda *a, **k: svd(*a, **k) * (1 + 1e-6))  # a new number
    assert runstore.optimizer_probe(flags) != before


# ---------------------------------------------------------------- the study at --quick size


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """`reproduce pretrain --quick` once, in a fresh folder that holds a 'committed' docs/results."""
    root = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        (root / "docs" / "results").mkdir(parents=True)
        (root / "docs" / "results" / "pretrain.md").write_text("committed\n")
        assert main(["reproduce", "pretrain", "--quick"]) == 0
        yield root


def _verdicts(report: Path) -> dict[str, str]:
    return {claim: verdict for claim, verdict, *_ in index.verdict_rows(report)}


def _planned_quick() -> int:
    """Runs of the quick study: a 2-lr grid at seed 0, seed 1 at the best lr, and 7 sub-study runs x 2 seeds
    (batch 4 for GaLore, GoLore and auto; GaLore at rank 8; GoLore's 8-bit moments; GaLore with kept moments, and
    with galore-torch's AdamW arithmetic too)."""
    methods = len([m for m in SCALES["quick"].methods if m != "galore-torch" or importlib.util.find_spec("galore_torch")])
    return 2 * methods + methods + 7 * 2


@pytest.mark.slow
def test_quick_study_end_to_end(quick):
    assert (quick / "docs" / "results" / "pretrain.md").read_text() == "committed\n"
    assert sorted(p.name for p in (quick / "docs" / "results").iterdir()) == ["pretrain.md"]
    report = (quick / QUICK / "pretrain.md").read_text()
    n = _planned_quick()
    assert "toy size" in report and "commit `" in report and f"Status: {n} of {n} runs stored" in report
    assert (quick / QUICK / "pretrain.png").stat().st_size > 0 and (quick / QUICK / "pretrain-batch.png").is_file()
    assert (quick / QUICK / "pretrain-auto-switches.png").is_file() and "auto's switch steps" in report
    assert "galore-torch's AdamW arithmetic (= galore-torch)" in report
    verdicts = _verdicts(quick / QUICK / "pretrain.md")
    assert len(verdicts) == 10 and not any(v.startswith(("**pending", "**not planned")) for v in verdicts.values())
    stored = sorted((quick / QUICK / "pretrain-runs").iterdir())
    assert len(stored) == n
    for folder in stored:
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metrics.csv", "provenance.json",
                                                          "summary.json"]
    provenance = json.loads((stored[0] / "provenance.json").read_text())
    assert provenance["identity"]["code"] == runstore.code_digest() and len(provenance["commit"]) == 40
    flags = json.loads((stored[0] / "config.json").read_text())
    assert provenance["identity"]["optimizer"] == runstore.optimizer_probe({k: flags[k] for k in run_for(
        SCALES["quick"], flags["optimizer"], flags["lr"], flags["seed"]).flags})
    assert f"`{provenance['commit'][:10]}`" in report
    for method in ("adamw", "full-scaled", "galore", "golore", "golore@20", "online_pca", "auto", "rso"):
        assert f"\n| {method} | 0.01" in report or f"\n| {method} | 0.001" in report  # its best lr


@pytest.mark.slow
def test_a_second_invocation_reuses_every_stored_run(quick, monkeypatch, capsys):
    monkeypatch.chdir(quick)
    monkeypatch.setattr(runstore.RunStore, "_launch", lambda *a: pytest.fail("a stored run was run again"))
    assert main(["reproduce", "pretrain", "--quick"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {QUICK / 'pretrain.md'}"]
    assert main(["reproduce", "pretrain", "--quick", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == _planned_quick() and all(line.startswith("[reuse] subspace-optim train") for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("changed, why", [("code_digest", "its code changed since"),
                                          ("optimizer_probe", "its optimizer changed since"),
                                          ("bpe_key", "its tokenizer changed since")])
def test_a_run_whose_code_or_tokenizer_changed_is_run_again(quick, monkeypatch, capsys, changed, why):
    monkeypatch.chdir(quick)
    monkeypatch.setattr(pretrain if changed == "bpe_key" else runstore, changed, lambda *a: "something else")
    assert main(["reproduce", "pretrain", "--quick", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    grid = [line for line in lines if not line.startswith("[waiting")]
    assert grid and all(line.startswith(f"[rerun: {why}") for line in grid)


@pytest.mark.slow
def test_index_of_the_quick_reports(quick, monkeypatch):
    monkeypatch.chdir(quick)
    assert main(["reproduce", "index", "--quick"]) == 0
    text = (quick / QUICK / "README.md").read_text()
    assert index.BEGIN in text and "| [pretrain](pretrain.md) |" in text
    assert text.count("](pretrain.md)") == 10


def test_max_runs_builds_the_study_over_invocations_and_an_interrupted_run_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "pretrain", "--quick", "--max-runs", "0"]) == 0
    verdicts = _verdicts(QUICK / "pretrain.md")
    assert all(v == "**pending**" for v in verdicts.values()) and not (QUICK / "pretrain.png").exists()

    from subspace_optim.train import checkpoint

    save = checkpoint.save

    def save_then_stop(run_dir, step, *args, **kwargs):
        save(run_dir, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    assert main(["reproduce", "pretrain", "--quick", "--max-runs", "1"]) == 130
    monkeypatch.setattr(checkpoint, "save", save)
    capsys.readouterr()
    assert main(["reproduce", "pretrain", "--quick", "--dry-run"]) == 0
    first = capsys.readouterr().out.splitlines()[1]
    assert first.startswith("[resume from step 2] ") and "adamw-lr0.001-s0" in first
    assert main(["reproduce", "pretrain", "--quick", "--max-runs", "1"]) == 0
    stored = QUICK / "pretrain-runs" / "adamw-lr0.001-s0"
    provenance = json.loads((stored / "provenance.json").read_text())
    assert [s["finished"] for s in provenance["segments"]] == [False, True]
    methods = (_planned_quick() - 14) // 3  # the grid and seed 1, without the 7 sub-study runs x 2 seeds
    assert f"Status: 1 of {2 * methods} runs stored" in (QUICK / "pretrain.md").read_text()

    # the resumed run equals the same run never interrupted
    argv = shlex.split(provenance["command"])[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "uninterrupted")
    assert main([*argv, "--quiet"]) == 0
    resumed, whole = (json.loads((p / "summary.json").read_text()) for p in (stored, tmp_path / "uninterrupted"))
    assert resumed["final_val_ppl"] == whole["final_val_ppl"] and resumed["final_train_loss"] == whole["final_train_loss"]


# ---------------------------------------------------------------- the results index


def test_index_copies_each_reports_verdicts_between_its_markers(tmp_path):
    from subspace_optim.experiments.report import Report

    for name, rows in (("memory", [["m claim", "**reproduced**", "a | b", "p"]]),
                       ("counterexample", [["c claim", "**partly**", "x", "y"]]), ("other", None)):
        Report(name, tmp_path, ["subspace-optim", "reproduce", name]).write(name, "\nbody\n", seeds=0, verdicts=rows)
    (tmp_path / "README.md").write_text(f"intro\n\n{index.BEGIN}\nold table\n{index.END}\n\nafter\n")
    args = type("Args", (), {"out": tmp_path})
    index.main(args)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("intro\n") and text.endswith("\n\nafter\n") and "old table" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert rows == ["| c claim | [counterexample](counterexample.md) | **partly** | x | y |",
                    "| m claim | [memory](memory.md) | **reproduced** | a \\| b | p |"]
    index.main(args)
    assert (tmp_path / "README.md").read_text() == text


def test_the_committed_index_is_generated_from_the_committed_reports():
    text = (ROOT / "docs" / "results" / "README.md").read_text()
    assert index.BEGIN in text and index.END in text
    table = text[text.index(index.BEGIN) + len(index.BEGIN):text.index(index.END)].strip()
    assert table == index.index_table(ROOT / "docs" / "results")
    linked = {p.stem for p in index.reports(ROOT / "docs" / "results")}
    assert set(EXPERIMENTS) <= linked


@pytest.mark.slow
def test_jobs_run_that_many_training_processes_at_once(tmp_path, monkeypatch, capsys):
    """--jobs 2: two fresh training processes overlap in time; both are stored; --methods picks whose runs."""
    import dataclasses

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(SCALES, "quick", dataclasses.replace(SCALES["quick"], fresh_process=True))
    spans, launch = [], runstore.RunStore._launch

    def timed(self, argv, log):
        start = time.monotonic()
        launch(self, argv, log)
        spans.append((start, time.monotonic()))

    monkeypatch.setattr(runstore.RunStore, "_launch", timed)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    assert main(["reproduce", "pretrain", "--quick", "--max-runs", "2", "--jobs", "2", "--methods", "golore"]) == 0
    assert sorted(p.name for p in (QUICK / "pretrain-runs").iterdir()) == ["golore-lr0.001-s0", "golore-lr0.01-s0"]
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1  # the two runs overlapped
    assert main(["reproduce", "pretrain", "--quick", "--methods", "sgd"]) == 2
    assert main(["reproduce", "finetune", "--quick", "--jobs", "2"]) == 2
    assert main(["reproduce", "pretrain", "--quick", "--jobs", "0"]) == 2
    assert "--methods sgd: the study's methods are" in capsys.readouterr().err


def test_a_best_lr_at_the_grids_edge_widens_the_grid_one_rung_at_a_time(monkeypatch):
    import dataclasses
    import math
    import types

    from subspace_optim.experiments.pretrain import LR_LADDER, Study

    monkeypatch.setitem(SCALES, "quick", dataclasses.replace(SCALES["quick"], lr_ladder=LR_LADDER))
    study = Study(types.SimpleNamespace(quick=True, scale="cpu", runs="runs/reproduce", out="unused"), dry_run=True)
    optimum = {"adamw": 3e-2, "galore": 3e-4, "golore": 3e-3}  # above, below and within the grid (1e-3, 1e-2)
    ran = []

    def result(run):
        method, lr = run.flags["optimizer"], run.flags["lr"]
        ran.append((method, lr))
        ppl = 10 + math.log10(lr / optimum.get(method, 3e-3)) ** 2
        return types.SimpleNamespace(summary={"final_val_ppl": ppl})

    monkeypatch.setattr(study, "result", result)
    assert study.lr_grid("adamw") == ([1e-3, 1e-2, 3e-2, 1e-1], 3e-2)
    assert study.lr_grid("galore") == ([1e-4, 3e-4, 1e-3, 1e-2], 3e-4)
    assert study.lr_grid("golore") == ([3e-4, 1e-3, 1e-2], 1e-3)  # 1e-3 at the edge, then inside: one rung
    monkeypatch.setattr(study, "result", lambda run: None if run.flags["lr"] == 3e-2 else result(run))
    assert study.lr_grid("adamw") == ([1e-3, 1e-2, 3e-2], None)  # the widening waits for its run


def test_a_run_that_finished_after_its_orchestrator_stopped_is_stored_not_run_again(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "pretrain", "--quick", "--max-runs", "1"]) == 0
    stored = QUICK / "pretrain-runs" / "adamw-lr0.001-s0"
    scratch = Path("runs/reproduce/pretrain-quick/adamw-lr0.001-s0")
    started = json.loads((scratch / "started.json").read_text())
    # as if the orchestrator had been killed while the training process went on to write its summary
    started["segments"] = [{"wall_s": 1.0, "finished": False, **runstore.code_provenance()}]
    (scratch / "started.json").write_text(json.dumps(started))
    for name in runstore.KEPT:
        (scratch / name).write_bytes((stored / name).read_bytes())
    summary = (stored / "summary.json").read_text()
    import shutil

    shutil.rmtree(stored)
    capsys.readouterr()
    assert main(["reproduce", "pretrain", "--quick", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("[store (finished, not yet stored)] ")
    monkeypatch.setattr(runstore.RunStore, "_launch", lambda *a: pytest.fail("a finished run was run again"))
    assert main(["reproduce", "pretrain", "--quick", "--max-runs", "1", "--methods", "adamw"]) == 0
    assert (stored / "summary.json").read_text() == summary
    provenance = json.loads((stored / "provenance.json").read_text())
    assert [s["finished"] for s in provenance["segments"]] == [False, True]


def test_switch_grid_places_each_weight_by_module_and_layer():
    from subspace_optim.experiments.pretrain import switch_grid

    modules, grid = switch_grid({"model.layers.1.self_attn.v_proj.weight": 50,
                                 "model.layers.0.mlp.down_proj.weight": 100, "model.norm.weight": 3}, 2, 200)
    assert modules[:7] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert grid[2][1] == 0.25 and grid[6][0] == 0.5
    assert sum(x == x for row in grid for x in row) == 2  # the rest NaN: never switched
