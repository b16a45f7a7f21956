"""`subspace-optim train --distributed ddp|fsdp2` under torchrun (2 processes, gloo, CPU) against one process.

The same flags, the same global batch: the final validation loss must be within 0.1% of the single-process run
(it agrees to about 1e-7 here). FSDP2's sharded checkpoint resumes at 2 processes and at 1, like the
single-process run's own resume; one run folder is written, by rank 0. The fused loss runs under DDP (with the
gradients reduced in the subspace) and under FSDP2 (with RSO, whose checkpoint also resumes at 1 process).
Under `torchrun --max-restarts 1` with `--resume auto`, a rank SIGKILLed mid-run restarts the job from its last
complete checkpoint, past the folder an interrupted write left, and the job ends as the uninterrupted DDP and FSDP2
runs do.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch
from safetensors.torch import load_file

from subspace_optim.cli import main
from torchrun import ENV
from torchrun import torchrun as launch
from subspace_optim.train.runlog import read_metrics

ARGS = ["--model", "llama-tiny", "--batch-size", "4", "--seq-len", "32", "--update-gap", "2", "--eval-every", "3",
        "--eval-batches", "2", "--warmup", "1", "--optimizer", "golore", "--lr", "1e-2", "--quiet",
        "--save-every", "3", "--steps", "6"]


RSO = ["--optimizer", "rso", "--moments", "project", "--fused-loss"]
# llama-tiny with lm_head tied to the embedding (32000 x 128 parameters fewer)
TIED = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 128, "intermediate_size": 352,
        "num_hidden_layers": 6, "num_attention_heads": 4, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(*args: str, processes: int = 2) -> None:
    """``subspace-optim train`` under torchrun."""
    launch("-m", "subspace_optim", "train", *args, processes=processes, timeout=300)


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
    # the fused loss under FSDP2 (its module the root, which unshards lm_head), lm_head tied to the embedding, at
    # 4 processes: FSDP2 over 2 rows of a 2 x 2 mesh, tensor parallelism within each (--tp 2)
    (root / "tied.json").write_text(json.dumps(TIED))
    tied = ["--model", str(root / "tied.json"), "--fused-loss"]
    assert main(["train", *ARGS, *tied, "--out", str(root / "single-tied")]) in (0, None)
    torchrun(*ARGS, *tied, "--out", str(root / "fsdp2-tied"), "--distributed", "fsdp2", "--tp", "2", processes=4)
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
def test_fused_loss_with_a_tied_lm_head_under_fsdp2_by_tensor_parallel_ends_at_the_single_process_loss(runs):
    """--fused-loss under FSDP2 x TP (4 processes, --tp 2), lm_head tied to the embedding: the same loss as one
    process; the batch is split among the 2 data-parallel rows only."""
    single, distributed = val_loss(runs / "single-tied"), val_loss(runs / "fsdp2-tied")
    assert abs(distributed - single) <= 1e-5 * abs(single)
    summaries = {name: json.loads((runs / name / "summary.json").read_text()) for name in ("fsdp2-tied", "fsdp2")}
    assert summaries["fsdp2-tied"]["parameters"] == summaries["fsdp2"]["parameters"] - 32000 * 128
    assert summaries["fsdp2-tied"]["processes"] == 4 and summaries["fsdp2-tied"]["tokens"] == 6 * 4 * 32


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
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["train", "--distributed", "fsdp2", "--tp", "3", "--steps", "1", "--quiet"]) == 2
    assert "--tp 3 must divide the 4 processes" in capsys.readouterr().err
    assert main(["train", "--distributed", "fsdp2", "--tp", "2", "--batch-size", "3", "--steps", "1", "--quiet"]) == 2
    assert "must divide among the 2 data-parallel rows of --tp 2 processes" in capsys.readouterr().err


def test_tensor_parallel_refuses_heads_that_do_not_divide():
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from subspace_optim.train.config import UsageError
    from subspace_optim.train.parallel import tensor_parallel

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=22, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=40))
    with pytest.raises(UsageError, match="4 attention heads and 2 key/value heads must divide among the 4"):
        tensor_parallel(model, SimpleNamespace(size=lambda: 4))


def test_clipping_over_several_meshes_is_torchs_clipping_on_one():
    """parallel.clip_grad_norm_ (which --tp needs) without DTensors: torch's clip_grad_norm_, bitwise; it clips."""
    import copy

    from subspace_optim.train.parallel import clip_grad_norm_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    twin, x = copy.deepcopy(model), torch.randn(5, 4)
    for m in (model, twin):
        m(x).square().sum().mul(100).backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    assert expected > 0.5 and torch.equal(clip_grad_norm_(twin.parameters(), 0.5), expected)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters()))
    assert torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()]) <= 0.5 + 1e-6


def test_what_would_stop_a_torchrun_restart_is_said_at_the_start(monkeypatch):
    from subspace_optim.train.parallel import check_restarts

    for key, value in {"TORCHELASTIC_MAX_RESTARTS": "1", "RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(key, value)
    with pytest.warns(UserWarning) as caught:
        check_restarts(None)
    assert ["add --resume auto" in str(w.message) for w in caught] == [True, False]
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in str(caught[1].message)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_restarts("auto")  # the command the docs show: nothing to say
        monkeypatch.setenv("RANK", "1")
        check_restarts(None)  # rank 0 says it once


@pytest.mark.parametrize("flags, message", [
    (["--distributed", "fsdp2", "--optimizer", "galore-torch"], "the SVD of each gradient as a plain tensor"),
    (["--distributed", "fsdp2", "--optimizer", "lora"], "use --distributed ddp"),
    (["--distributed", "ddp", "--optimizer", "galore", "--layerwise"], "unreduced"),
    (["--grad-comm", "subspace"], "add --distributed ddp"),
    (["--distributed", "fsdp2", "--grad-comm", "subspace"], "add --distributed ddp"),
    (["--distributed", "ddp", "--grad-comm", "subspace", "--optimizer", "adamw"], "projects no gradients"),
    (["--distributed", "ddp", "--grad-comm", "subspace", "--clip", "1"], "no global gradient norm"),
    (["--tp", "2"], "a dimension of an FSDP2 mesh"),
    (["--distributed", "ddp", "--tp", "2"], "a dimension of an FSDP2 mesh"),
    (["--distributed", "fsdp2", "--tp", "0"], "a dimension of an FSDP2 mesh"),
    (["--distributed", "fsdp2", "--tp", "2", "--optimizer", "rso"], "RSO's layers"),
])
def test_combinations_not_distributed_yet_are_refused_clearly(flags, message, capsys):
    assert main(["train", "--steps", "1", "--quiet", *flags]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- restarts: torchrun --max-restarts 1, a rank killed

KILL_AFTER, KILL_AT, FINAL = "step_00000003", 4, "step_00000006"  # ARGS save at steps 3 and 6
#: torch 2.13's torchrun shares its rendezvous TCPStore with the workers and keeps a killed attempt's keys in it, so
#: a restarted process group can read a dead rank's address (pytorch/pytorch#135712): its opt-out gives every attempt
#: a store of its own.
RESTARTABLE = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _logged(out, step: int) -> bool:
    """Whether metrics.csv has a row for ``step`` (written before that step's checkpoint, after the last one's)."""
    try:
        return any(row["step"] == str(step) for row in read_metrics(out / "metrics.csv"))
    except FileNotFoundError:
        return False


def _kill_rank_1_mid_run(out, mode: str) -> list[dict]:
    """Run ARGS under `torchrun --max-restarts 1 ... --resume auto`; once step 4 is logged (the step-3 checkpoint
    in place), freeze the workers, leave what a write killed at step 6 leaves, SIGKILL rank 1 and let torchrun
    restart the job. Returns the metrics rows at the kill."""
    command = [*TORCHRUN, "--max-restarts", "1", "-m", "subspace_optim", "train",
               *ARGS, "--distributed", mode, "--out", str(out), "--resume", "auto"]
    with open(out.parent / f"{out.name}.log", "w") as log:
        job = subprocess.Popen(command, env=RESTARTABLE, stdout=log, stderr=subprocess.STDOUT)
    try:
        ckpts, deadline = out / "checkpoints", time.monotonic() + 240
        while not _logged(out, KILL_AT):  # the step-3 save (cleanup of older folders included) is over
            assert job.poll() is None and time.monotonic() < deadline, f"no step {KILL_AT}: see {log.name}"
            time.sleep(0.005)
        workers = {int(env["RANK"]): p for p in psutil.Process(job.pid).children() if "RANK" in (env := p.environ())}
        for worker in workers.values():
            worker.send_signal(signal.SIGSTOP)
        assert not (ckpts / FINAL).exists(), "the run ended before the kill"
        rows = read_metrics(out / "metrics.csv")
        if mode == "fsdp2":  # every shard and DCP's metadata written, the commit (state.pt, rename) killed
            partial = ckpts / f".tmp-{FINAL}"
            if not partial.exists():  # (else the freeze caught the write itself)
                shutil.copytree(ckpts / KILL_AFTER / "dcp", partial / "dcp")
        else:  # rank 0 killed halfway through model.safetensors
            weights = (ckpts / KILL_AFTER / "model.safetensors").read_bytes()
            (ckpts / ".tmp-killed").mkdir()
            (ckpts / ".tmp-killed" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
        workers[1].send_signal(signal.SIGKILL)
        workers[0].send_signal(signal.SIGCONT)
        assert job.wait(timeout=240) == 0, open(log.name).read()[-4000:]
    finally:
        if job.poll() is None:  # a check failed: end the job, and its workers (torchrun gives each its own session)
            for process in [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            job.wait()
    return rows


@pytest.fixture(scope="module")
def restarted(runs):
    """The DDP and FSDP2 jobs, each killed once and restarted, side by side (they spend most time starting): about
    30 s together on 2 idle cores."""
    with ThreadPoolExecutor(2) as pool:
        rows = dict(zip(("ddp", "fsdp2"), pool.map(lambda mode: _kill_rank_1_mid_run(runs / f"{mode}-restarted",
                                                                                     mode), ("ddp", "fsdp2"))))
    return runs, rows


def _states(folder, mode: str) -> dict:
    """A final checkpoint's weights, optimizer state, data position, scheduler and RNG, as nested tensors."""
    state = torch.load(folder / "state.pt", weights_only=True)
    if mode == "fsdp2":  # DCP's shards, gathered into one file
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(folder / "dcp", f"{tmp}/gathered.pt")
            state.update(torch.load(f"{tmp}/gathered.pt", weights_only=True))
    else:
        state["model"] = load_file(folder / "model.safetensors")
    del state["scheduler"]["_step_count"]  # counts the calls of this process (a resume adds one), not the steps
    return {k: state[k] for k in ("step", "model", "optimizer", "data", "scheduler", "rng")}


def _differences(a, b, where="") -> list[tuple[str, float]]:
    """(path, max |a - b|) of every number in two nested states, inf where their structure differs."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}/{i}")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype:
        return [(where, 0.0 if torch.equal(a, b) else (a.double() - b.double()).abs().max().item())]
    return [(where, 0.0 if a == b else float("inf"))]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("mode, tolerance", [("ddp", 0.0), ("fsdp2", 1e-6)])
def test_a_killed_rank_restarts_from_the_last_complete_checkpoint_and_ends_like_the_uninterrupted_run(
        restarted, mode, tolerance):
    runs, at_kill = restarted
    whole, out = runs / mode, runs / f"{mode}-restarted"
    # resumed from step 3: the rows up to it are the first attempt's (its own tokens/s), the later ones rewritten
    rows = read_metrics(out / "metrics.csv")
    assert rows[:3] == at_kill[mode][:3] and [r["step"] for r in rows] == [str(s) for s in range(1, 7)]
    # the interrupted write was never read, and the step-6 save removed it
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [KILL_AFTER, FINAL]
    # the same losses, weights, optimizer state, data position and RNG as the job never killed
    expected = read_metrics(whole / "metrics.csv")
    for row, reference in zip(rows, expected):
        for key in ("loss", "val_loss"):
            assert abs(float(row[key] or 0) - float(reference[key] or 0)) <= tolerance, (row["step"], key)
    assert abs(val_loss(out) - val_loss(whole)) <= tolerance
    differences = _differences(_states(out / "checkpoints" / FINAL, mode),
                               _states(whole / "checkpoints" / FINAL, mode))
    assert max(differences, key=lambda d: d[1])[1] <= tolerance, max(differences, key=lambda d: d[1])
