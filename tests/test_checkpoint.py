"""Checkpoints: the last K kept and verified, weights_only loading, fallback past damaged ones on --resume, and
clear one-line errors for foreign ones."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from subspace_optim.cli import main
from subspace_optim.train import checkpoint

STEP1, STEP2 = "step_00000001", "step_00000002"


def _train(tmp, out, steps, *extra):
    assert main(["train", "--model", str(tmp / "tiny.json"), "--data", str(tmp / "text.txt"), "--optimizer",
                 "golore", "--rank", "4", "--steps", str(steps), "--save-every", "1", "--seq-len", "16",
                 "--batch-size", "2", "--out", str(out), "--quiet", *extra]) == 0


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    (tmp / "tiny.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                               "num_hidden_layers": 1, "num_attention_heads": 2,
                                               "vocab_size": 32000, "max_position_embeddings": 64}))
    (tmp / "text.txt").write_text("\n\n".join(f"Article {i}. " + "Markets rose as shares gained. " * 6
                                              for i in range(40)))
    return tmp


@pytest.fixture(scope="module")
def run_dir(tmp):
    """A 2-step run on a small slice of real text, checkpointed every step."""
    _train(tmp, tmp / "run", 2)
    return tmp / "run"


@pytest.fixture(scope="module")
def three_steps(tmp):
    """The same run taken to step 3 in one go: what a resumed run must equal."""
    _train(tmp, tmp / "three", 3)
    return load_file(tmp / "three" / "checkpoints" / "step_00000003" / "model.safetensors")


def test_the_last_two_checkpoints_are_kept_and_verified(run_dir, tmp):
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == [STEP1, STEP2]
    state = torch.load(run_dir / "checkpoints" / STEP2 / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["data"] == {"position": 4}
    assert set(state["rng"]) >= {"torch", "python"}
    sums = json.loads((run_dir / "checkpoints" / STEP2 / "sha256.json").read_text())
    assert set(sums) == {"model.safetensors", "state.pt"}
    _train(tmp, tmp / "keep3", 4, "--keep-checkpoints", "3")
    assert [p.name[-1] for p in sorted((tmp / "keep3" / "checkpoints").iterdir())] == ["2", "3", "4"]


def copy_run(run_dir, tmp_path, damage=None, steps=(STEP2,)):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for step in steps:
        damage(copy / "checkpoints" / step)
    return copy


def truncate_state(step):
    data = (step / "state.pt").read_bytes()
    (step / "state.pt").write_bytes(data[: len(data) // 2])


def garble_state(step):
    """Flip bytes inside a tensor: torch.load would read the garbage without complaint."""
    data = bytearray((step / "state.pt").read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 8])
    (step / "state.pt").write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate_state, garble_state])
def test_resume_falls_back_past_a_damaged_checkpoint(run_dir, tmp_path, capsys, three_steps, damage):
    """The newest checkpoint's state.pt is truncated (or garbled): --resume warns in one line naming it, resumes
    from step 1, and ends exactly where an uninterrupted run ends."""
    copy = copy_run(run_dir, tmp_path, damage)
    capsys.readouterr()
    assert main(["train", "--resume", str(copy), "--steps", "3", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("subspace-optim train: warning: ")
    assert f"{STEP2}/state.pt" in err and f"resuming from the older checkpoint {copy / 'checkpoints' / STEP1}" in err
    resumed = load_file(copy / "checkpoints" / "step_00000003" / "model.safetensors")
    assert resumed.keys() == three_steps.keys() and all(torch.equal(resumed[k], three_steps[k]) for k in resumed)
    # the damaged step 2 was rewritten by the resumed run, and the last two are kept
    assert [p.name for p in sorted((copy / "checkpoints").iterdir())] == [STEP2, "step_00000003"]


def test_regenerated_random_bases_resume_to_the_same_weights(tmp, three_steps):
    """--random-basis regenerate: a 2-step run resumed from its step-1 checkpoint (its schedule is the 3-step one's
    there) ends at step 3 exactly where the uninterrupted run that keeps its bases ends; the setting is in
    config.json, and a resume keeps it."""
    out = tmp / "regenerate"
    _train(tmp, out, 2, "--random-basis", "regenerate")
    assert json.loads((out / "config.json").read_text())["random_basis"] == "regenerate"
    shutil.rmtree(out / "checkpoints" / STEP2)
    assert main(["train", "--resume", str(out), "--steps", "3", "--quiet"]) == 0
    resumed = load_file(out / "checkpoints" / "step_00000003" / "model.safetensors")
    assert resumed.keys() == three_steps.keys() and all(torch.equal(resumed[k], three_steps[k]) for k in resumed)


def test_resume_auto_starts_the_run_in_out_and_the_same_command_continues_it(tmp, run_dir, three_steps, tmp_path,
                                                                             capsys):
    """--resume auto, what a restarted job repeats: a new run in --out while it has no checkpoint (also over a
    start killed before its first save, whose leftovers go), then the same command resumes it from its newest
    complete checkpoint (step 1: the write of step 2 was killed before its rename), and once the run is complete
    has nothing to do."""
    out, ckpts = tmp_path / "auto", tmp_path / "auto" / "checkpoints"
    (ckpts / ".tmp-killed").mkdir(parents=True)  # the first write of a killed start
    shutil.copy(run_dir / "config.json", out / "config.json")
    _train(tmp, out, 2, "--resume", "auto")
    assert sorted(p.name for p in ckpts.iterdir()) == [STEP1, STEP2]
    (ckpts / STEP2).rename(ckpts / ".tmp-killed")
    step1 = "".join((out / "metrics.csv").read_text().splitlines(keepends=True)[:2])  # the header and step 1
    _train(tmp, out, 3, "--resume", "auto")
    assert (out / "metrics.csv").read_text().startswith(step1)  # kept: resumed, not started over
    assert sorted(p.name for p in ckpts.iterdir()) == [STEP2, "step_00000003"]  # and the leftover removed
    resumed = load_file(out / "checkpoints" / "step_00000003" / "model.safetensors")
    assert resumed.keys() == three_steps.keys() and all(torch.equal(resumed[k], three_steps[k]) for k in resumed)
    capsys.readouterr()
    metrics = (out / "metrics.csv").read_text()
    _train(tmp, out, 3, "--resume", "auto")
    assert "complete at step 3, nothing to train" in capsys.readouterr().out
    assert (out / "metrics.csv").read_text() == metrics


def test_resume_auto_needs_out_and_never_starts_over_unreadable_checkpoints(run_dir, tmp_path, capsys, monkeypatch):
    assert main(["train", "--resume", "auto", "--steps", "1", "--quiet"]) == 2
    assert "add --out DIR" in capsys.readouterr().err
    copy = copy_run(run_dir, tmp_path, truncate_state, steps=(STEP1, STEP2))
    assert main(["train", "--resume", "auto", "--out", str(copy), "--steps", "3", "--quiet"]) == 2
    assert "no readable checkpoint" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun's first restart, without --resume auto
    assert main(["train", "--out", str(copy), "--steps", "3", "--quiet"]) == 2
    assert "already holds a run" in (err := capsys.readouterr().err) and "add --resume auto" in err


def resume_error(copy, capsys):
    assert main(["train", "--resume", str(copy), "--steps", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_no_readable_checkpoint_is_a_clear_error(run_dir, tmp_path, capsys):
    err = resume_error(copy_run(run_dir, tmp_path, truncate_state, steps=(STEP1, STEP2)), capsys)
    assert "no readable checkpoint" in err and f"{STEP1}/state.pt" in err and f"{STEP2}/state.pt" in err


def test_damaged_weights_are_found_too(run_dir, tmp_path, capsys):
    def garble(step):
        (step / "model.safetensors").write_bytes(b"not safetensors")

    err = resume_error(copy_run(run_dir, tmp_path, garble, steps=(STEP1, STEP2)), capsys)
    assert f"{STEP2}/model.safetensors does not match its SHA-256" in err


def test_a_checkpoint_that_fails_verification_after_writing_keeps_the_older_ones(tmp, tmp_path, monkeypatch,
                                                                                 capsys):
    """A write that comes out short (a full disk, say) is caught before it replaces anything."""
    out = tmp_path / "run"
    _train(tmp, out, 1)
    save = torch.save

    def short_write(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)
        path.write_bytes(path.read_bytes()[:-100])

    monkeypatch.setattr(torch, "save", short_write)
    assert main(["train", "--resume", str(out), "--steps", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint of step 2 failed verification after writing" in err and err.count("\n") == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == [STEP1]  # no temporary folder left either
    checkpoint.verify(out / "checkpoints" / STEP1)


def test_checkpoint_of_another_run_is_refused(run_dir, tmp_path, capsys):
    def other_optimizer(step):
        state = torch.load(step / "state.pt", weights_only=True)
        state["identity"]["optimizer"] = "galore"
        torch.save(state, step / "state.pt")
        (step / "sha256.json").unlink()  # an edited file, not a damaged one

    err = resume_error(copy_run(run_dir, tmp_path, other_optimizer), capsys)
    assert "does not match this run (optimizer: checkpoint 'galore' vs run 'golore')" in err


def test_checkpoint_of_another_model_size_is_one_line(run_dir, tmp_path, capsys):
    """The run's --model config file now describes a wider model: one line naming the file and a mismatch,
    not torch's list of every size mismatch."""
    copy = copy_run(run_dir, tmp_path, lambda step: None)
    config = json.loads((copy / "config.json").read_text())
    wider = tmp_path / "tiny.json"
    wider.write_text(json.dumps({**json.loads((run_dir.parent / "tiny.json").read_text()), "hidden_size": 64}))
    config["model"] = str(wider)
    (copy / "config.json").write_text(json.dumps(config))
    for step in (STEP1, STEP2):  # the identity names the model file; point it at the new path
        folder = copy / "checkpoints" / step
        state = torch.load(folder / "state.pt", weights_only=True)
        state["identity"]["model"] = str(wider)
        torch.save(state, folder / "state.pt")
        (folder / "sha256.json").unlink()
    err = resume_error(copy, capsys)
    assert f"checkpoint weights {copy / 'checkpoints' / STEP2 / 'model.safetensors'} do not fit the model" in err
    assert "differ in shape, e.g. lm_head.weight: 32000x32 in the checkpoint, 32000x64 in the model" in err


def test_missing_checkpoint(run_dir, tmp_path, capsys):
    copy = copy_run(run_dir, tmp_path, shutil.rmtree, steps=(STEP1, STEP2))
    assert "has no checkpoint yet" in resume_error(copy, capsys)


@pytest.mark.skipif(not __import__("subspace_optim.memory_measured", fromlist=["x"]).reset_peak(torch.device("cpu")),
                    reason="needs a resettable peak RSS (Linux)")
def test_weights_are_saved_and_loaded_without_a_second_copy(tmp_path):
    """Saving streams each tensor from its own memory and loading copies one tensor at a time into the model: the
    peak of either adds at most a fraction of the weights (one tensor, the page cache aside), never a copy of them.
    An int8 weight is saved as its codes and row scales, and loads back bitwise."""
    from torch import nn

    from subspace_optim.memory_measured import PhasePeaks, return_freed_memory, weight_bytes
    from subspace_optim.precision import to_int8

    return_freed_memory()
    model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(48)])  # 48 x 4 MiB = 192 MiB
    model[0].weight = nn.Parameter(to_int8(model[0].weight.to(torch.bfloat16)), requires_grad=True)
    path = tmp_path / "model.safetensors"
    checkpoint.save_file(checkpoint.flat_weights(model), str(path))  # warm-up: imports, first allocations
    peaks = PhasePeaks(torch.device("cpu"))
    with peaks.phase("save"):
        checkpoint.save_file(checkpoint.flat_weights(model), str(path))
    saved = {k: v.clone() for k, v in checkpoint.flat_weights(model).items()}
    with torch.no_grad():
        for p in model.parameters():
            (p.int_data if hasattr(p, "int_data") else p).zero_()
    with peaks.phase("load"):
        checkpoint._load_weights(path, model, torch.device("cpu"))
    size = weight_bytes(model)
    for phase in ("save", "load"):
        added = peaks.phases[phase]["peak"] - peaks.phases[phase]["start"]
        assert added < 0.25 * size, (phase, added, size)
    loaded = checkpoint.flat_weights(model)
    assert loaded.keys() == saved.keys() and {"0.weight.int_data", "0.weight.scale"} <= loaded.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
