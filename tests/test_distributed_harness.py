"""`subspace-optim train --distributed ddp|fsdp2` under torchrun (2 processes, gloo, CPU) against one process.

The same flags, the same global batch: the final validation loss must be within 0.1% of the single-process run
(it agrees to about 1e-7 here). FSDP2's sharded checkpoint resumes at 2 processes and at 1, like the
single-process run's own resume; one run folder is written, by rank 0. The fused loss runs under DDP (with the
gradients reduced in the subspace) and under FSDP2 (with RSO, whose checkpoint also resumes at 1 process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from subspace_optim.cli import main

ARGS = ["--model", "llama-tiny", "--batch-size", "4", "--seq-len", "32", "--update-gap", "2", "--eval-every", "3",
        "--eval-batches", "2", "--warmup", "1", "--optimizer", "golore", "--lr", "1e-2", "--quiet",
        "--save-every", "3", "--steps", "6"]


RSO = ["--optimizer", "rso", "--moments", "project", "--fused-loss"]
# llama-tiny with lm_head tied to the embedding (32000 x 128 parameters fewer)
TIED = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 128, "intermediate_size": 352,
        "num_hidden_layers": 6, "num_attention_heads": 4, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}


def torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "subspace_optim", "train", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def val_loss(folder) -> float:
    return json.loads((folder / "summary.json").read_text())["final_val_loss"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    assert main(["train", *ARGS, "--out", str(root / "single")]) in (0, None)
    torchrun(*ARGS, "--out", str(root / "ddp"), "--distributed", "ddp")
    torchrun(*ARGS, "--out", str(root / "fsdp2"), "--distributed", "fsdp2")
    # gradients reduced in the subspace, layer-wise with two micro-batches a step, around the fused loss's module,
    # against the same on one process
    subspace = ["--layerwise", "--grad-accum", "2", "--fused-loss"]
    assert main(["train", *ARGS, *subspace, "--out", str(root / "single-layerwise")]) in (0, None)
    torchrun(*ARGS, *subspace, "--out", str(root / "ddp-subspace"), "--distributed", "ddp", "--grad-comm", "subspace")
    # the fused loss under FSDP2 (its module the root, which unshards lm_head), lm_head tied to the embedding
    (root / "tied.json").write_text(json.dumps(TIED))
    tied = ["--model", str(root / "tied.json"), "--fused-loss"]
    assert main(["train", *ARGS, *tied, "--out", str(root / "single-tied")]) in (0, None)
    torchrun(*ARGS, *tied, "--out", str(root / "fsdp2-tied"), "--distributed", "fsdp2")
    # RSO layers sharded by FSDP2, with the fused loss; project: B's moments carried at the merges
    assert main(["train", *ARGS, *RSO, "--out", str(root / "single-rso")]) in (0, None)
    torchrun(*ARGS, *RSO, "--out", str(root / "fsdp2-rso"), "--distributed", "fsdp2")
    return root


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_end_at_the_single_process_loss(runs, mode):
    single, distributed = val_loss(runs / "single"), val_loss(runs / mode)
    assert abs(distributed - single) <= 1e-3 * abs(single)
    summary = json.loads((runs / mode / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["tokens"] == 6 * 4 * 32  # --batch-size is the global batch
    assert not list(runs.glob(f"{mode}*/**/rank*"))  # one run folder, no per-rank copies


@pytest.mark.distributed
def test_gradients_reduced_in_the_subspace_end_at_the_single_process_loss(runs):
    """--grad-comm subspace --layerwise --grad-accum 2 --fused-loss under DDP: R all-reduced from the hooks, DDP
    around the fused loss's module reducing the rest (lm_head's gradient made in its forward), the same steps."""
    single, distributed = val_loss(runs / "single-layerwise"), val_loss(runs / "ddp-subspace")
    assert abs(distributed - single) <= 1e-4 * abs(single)
    config = json.loads((runs / "ddp-subspace" / "config.json").read_text())
    assert config["grad_comm"] == "subspace" and config["layerwise"] and config["clip"] == 0


@pytest.mark.distributed
def test_fused_loss_with_a_tied_lm_head_under_fsdp2_ends_at_the_single_process_loss(runs):
    """--fused-loss under FSDP2, lm_head tied to the embedding: the same loss as one process (equal here)."""
    single, distributed = val_loss(runs / "single-tied"), val_loss(runs / "fsdp2-tied")
    assert abs(distributed - single) <= 1e-5 * abs(single)
    summaries = {name: json.loads((runs / name / "summary.json").read_text()) for name in ("fsdp2-tied", "fsdp2")}
    assert summaries["fsdp2-tied"]["parameters"] == summaries["fsdp2"]["parameters"] - 32000 * 128


@pytest.mark.distributed
def test_rso_with_the_fused_loss_under_fsdp2_takes_the_single_process_steps(runs):
    """RSO under FSDP2: W, B and B's moments sharded by rows, every merge W <- W + B P and moment transfer done on
    each rank's rows with the replicated P; the fused loss inside FSDP2's root. 3 merges in 6 steps; the val loss
    agrees to about 3e-7 here (the weights: docs/distributed.md)."""
    single, distributed = val_loss(runs / "single-rso"), val_loss(runs / "fsdp2-rso")
    assert abs(distributed - single) <= 1e-5 * abs(single)
    config = json.loads((runs / "fsdp2-rso" / "config.json").read_text())
    assert config["optimizer"] == "rso" and config["fused_loss"] and config["distributed"] == "fsdp2"


@pytest.mark.distributed
def test_rso_fsdp2_checkpoint_resumes_at_one_process(runs):
    """From the sharded checkpoint of step 3 (after the merge of step 2) to step 6 at one process: each P follows
    its restored outer count, the inner count and moments follow the optimizer's state: the uninterrupted run."""
    shutil.copytree(runs / "fsdp2-rso", runs / "fsdp2-rso-from-3")
    shutil.rmtree(runs / "fsdp2-rso-from-3" / "checkpoints" / "step_00000006")
    assert main(["train", "--resume", str(runs / "fsdp2-rso-from-3"), "--steps", "6", "--quiet",
                 "--distributed", "none"]) in (0, None)
    reference = val_loss(runs / "single-rso")
    assert abs(val_loss(runs / "fsdp2-rso-from-3") - reference) <= 1e-5 * abs(reference)


@pytest.mark.distributed
def test_fsdp2_checkpoint_resumes_at_two_processes_and_at_one(runs):
    for name in ("single", "fsdp2"):
        shutil.copytree(runs / name, runs / f"{name}-resumed")
    assert (runs / "fsdp2" / "checkpoints" / "step_00000006" / "dcp").is_dir()
    assert main(["train", "--resume", str(runs / "single-resumed"), "--steps", "9", "--quiet"]) in (0, None)
    torchrun("--resume", str(runs / "fsdp2-resumed"), "--steps", "9", "--quiet", "--distributed", "fsdp2")
    shutil.copytree(runs / "fsdp2", runs / "fsdp2-on-one")
    assert main(["train", "--resume", str(runs / "fsdp2-on-one"), "--steps", "9", "--quiet",
                 "--distributed", "none"]) in (0, None)
    reference = val_loss(runs / "single-resumed")
    for name in ("fsdp2-resumed", "fsdp2-on-one"):
        assert abs(val_loss(runs / name) - reference) <= 1e-3 * abs(reference), name


def test_distributed_without_torchrun_and_an_uneven_batch_get_clear_errors(capsys, monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert main(["train", "--distributed", "ddp", "--steps", "1", "--quiet"]) == 2
    assert "torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--distributed", "fsdp2", "--batch-size", "3", "--steps", "1", "--quiet"]) == 2
    assert "must divide among the 2 processes" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--distributed", "fsdp2", "--optimizer", "galore-torch"], "the SVD of each gradient as a plain tensor"),
    (["--distributed", "fsdp2", "--optimizer", "lora"], "use --distributed ddp"),
    (["--distributed", "ddp", "--optimizer", "galore", "--layerwise"], "unreduced"),
    (["--grad-comm", "subspace"], "add --distributed ddp"),
    (["--distributed", "fsdp2", "--grad-comm", "subspace"], "add --distributed ddp"),
    (["--distributed", "ddp", "--grad-comm", "subspace", "--optimizer", "adamw"], "projects no gradients"),
    (["--distributed", "ddp", "--grad-comm", "subspace", "--clip", "1"], "no global gradient norm"),
])
def test_combinations_not_distributed_yet_are_refused_clearly(flags, message, capsys):
    assert main(["train", "--steps", "1", "--quiet", *flags]) == 2
    assert message in capsys.readouterr().err
