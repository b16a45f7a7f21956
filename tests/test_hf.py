"""subspace_optim.hf: the optimizer inside transformers.Trainer, on one process and under torchrun (DDP, FSDP2)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import hf_worker as worker  # noqa: E402  (tests/ is on sys.path: conftest.py)
from torchrun import torchrun as launch  # noqa: E402

from subspace_optim import SubspaceAdamW, SubspaceSGD, target_modules  # noqa: E402
from subspace_optim.hf import optimizer_cls_and_kwargs  # noqa: E402

WD = 0.1  # the worker's TrainingArguments(weight_decay=...)


def _names(model) -> dict:
    return {id(p): n for n, p in model.named_parameters()}


def test_trainer_trains_with_low_rank_state_and_its_weight_decay(tmp_path):
    model = worker.tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = worker.trainer(model, tmp_path, steps=6)
    run.train()

    opt = run.optimizer.optimizer  # accelerate wraps ours
    assert isinstance(opt, SubspaceAdamW)
    names, decay = _names(model), set(run.get_decay_parameter_names(model))
    targeted = {f"{n}.weight" for n, _ in target_modules(model, "all-linear")}
    projected = {names[id(p)] for g in opt.param_groups if g.get("rank") == worker.RANK for p in g["params"]}
    assert projected == targeted  # every linear weight but lm_head, and nothing else
    assert any("bias" in n for n in names.values()) and any("norm" in n for n in names.values())
    for group in opt.param_groups:
        assert group["projector"] == "golore" and group["lr"] == 1e-2
        for p in group["params"]:
            assert group["weight_decay"] == (WD if names[id(p)] in decay else 0.0), names[id(p)]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)

    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if names[id(p)] in projected:  # r x D moments, D = the larger side
                assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (worker.RANK, max(p.shape))
            else:
                assert state["exp_avg"].shape == p.shape

    losses = [h["loss"] for h in run.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("projector,rule", [("golore", "adamw"), ("hybrid", "sgd")])
def test_trainer_optimizer_is_the_hand_built_one(tmp_path, projector, rule):
    """Trainer's optimizer takes the steps of the optimizer built by hand on Trainer's decay / no-decay groups,
    split into dense and projected parts (bitwise, over a refresh: GoLore's seeds depend on parameter order)."""
    settings = {"update_gap": 2, "scale": 0.25, "lr": 1e-2,
                **({"total_steps": 4, "random_fraction": 0.5} if projector == "hybrid" else {})}
    model = worker.tiny_llama()
    opt = worker.trainer(model, tmp_path, steps=1, projector=projector, rule=rule, **settings).create_optimizer()
    twin = copy.deepcopy(model)

    decay = set(worker.trainer(twin, tmp_path, steps=1).get_decay_parameter_names(twin))
    targeted = {f"{n}.weight" for n, _ in target_modules(twin, "all-linear")}
    named = list(twin.named_parameters())
    part = lambda wd, proj: [p for n, p in named if (n in decay) == wd and (n in targeted) == proj]  # noqa: E731
    groups = [{"params": part(True, False), "weight_decay": WD},
              {"params": part(True, True), "weight_decay": WD, "rank": worker.RANK},
              {"params": part(False, False), "weight_decay": 0.0}]
    assert not part(False, True)
    cls = {"adamw": SubspaceAdamW, "sgd": SubspaceSGD}[rule]
    hand = cls(groups, projector=projector, **settings)

    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for (_, p), (_, q) in zip(model.named_parameters(), named):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        hand.step()
    for (n, p), (_, q) in zip(model.named_parameters(), named):
        assert torch.equal(p, q), n


def test_bad_names_and_wrong_model_are_clear_errors():
    model = worker.tiny_llama()
    with pytest.raises(ValueError, match="projector.*'bogus'.*golore"):
        optimizer_cls_and_kwargs(model, projector="bogus")
    with pytest.raises(ValueError, match="rule.*'adam'.*adamw"):
        optimizer_cls_and_kwargs(model, rule="adam")
    with pytest.raises(ValueError, match="total_steps"):
        optimizer_cls_and_kwargs(model, projector="hybrid")
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        optimizer_cls_and_kwargs(model, target=r"nothing\.here")
    cls, kwargs = optimizer_cls_and_kwargs(model, rank=worker.RANK, lr=1e-2)
    with pytest.raises(ValueError, match="pass the model that Trainer trains"):
        cls(worker.tiny_llama().parameters(), **kwargs)


def test_import_subspace_optim_does_not_import_transformers():
    code = ("import sys, subspace_optim; assert subspace_optim.hf.optimizer_cls_and_kwargs; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------- torchrun, 2 processes
@pytest.fixture(scope="module")
def torchrun(tmp_path_factory):
    """Each rank's results of DDP and FSDP2 runs (2 x 2 samples per step), and one process's run on 4."""
    folder = tmp_path_factory.mktemp("hf")
    launch(Path(worker.__file__), folder, timeout=300)
    model = worker.tiny_llama()
    worker.trainer(model, folder / "one", steps=worker.STEPS, projector="galore").train()
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return ranks, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["ddp", "fsdp2"])
def test_two_processes_train_alike_and_take_the_steps_of_one(torchrun, case):
    """Trainer under torchrun (gloo, CPU). DDP: ``process_group`` is set, so each rank computes half of GaLore's
    SVDs and broadcasts them. FSDP2 (accelerate's prepare, switched on by hand on CPU): the optimizer is built on
    plain parameters and stepped on the DTensors accelerate swaps in."""
    ranks, one = torchrun
    first, second = ranks[0][case], ranks[1][case]
    assert ranks[0]["world"] == 2
    assert first["ddp_group"] and first["dtensors"] == (case == "fsdp2")
    assert first["losses"][-1] < first["losses"][0]
    for name, weight in first["weights"].items():
        assert torch.equal(weight, second["weights"][name]), name
        assert (weight - one[name]).abs().max() < 1e-4, name
