"""What a checkpoint keeps and refuses, and the life of the layer-wise hooks."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from subspace_optim import OnlineSubspaceAdamW, SubspaceAdamW, SubspaceSGD, subspace_param_groups


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10))


def _opt(model, cls=SubspaceAdamW, rank=4, **kwargs):
    return cls(subspace_param_groups(model, rank=rank), **{"lr": 1e-2, "update_gap": 2, "projector": "golore",
                                                           **kwargs})


def _step(model, opt, seed, nan=False, micro=1):
    gen = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    for _ in range(micro):
        loss = model(torch.randn(4, 12, generator=gen)).square().mean() / micro
        (loss * float("nan") if nan else loss).backward()
    opt.step()


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("route", ["state_dict", "dcp", "dcp-flat"])
def test_skipped_steps_survive_a_checkpoint(route, layerwise):
    """skipped_steps lives in the param groups: DCP's get/set_optimizer_state_dict keep only those and "state"."""
    model = _model()
    opt = _opt(model, layerwise=layerwise)
    for seed, nan in ((0, False), (1, True), (2, False)):
        _step(model, opt, seed, nan)
    assert opt.skipped_steps == 1
    model2 = copy.deepcopy(model)
    opt2 = _opt(model2, layerwise=layerwise)
    # (deep copies: a loaded state would share its step tensors with the original, as torch.optim's does)
    if route == "state_dict":
        sd = copy.deepcopy(opt.state_dict())
        assert set(sd) == {"state", "param_groups"}
        opt2.load_state_dict(sd)
    else:
        options = StateDictOptions(flatten_optimizer_state_dict=route == "dcp-flat")
        saved = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))
        set_optimizer_state_dict(model2, opt2, saved, options=options)
    assert opt2.skipped_steps == 1
    for seed in (3, 4, 5):
        _step(model, opt, seed)
        _step(model2, opt2, seed)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "saved, live, setting",
    [
        (dict(rank=4), dict(rank=8), "rank=4"),
        (dict(projector="golore"), dict(cls=OnlineSubspaceAdamW, projector="online_pca"), "projector='golore'"),
        (dict(side="std"), dict(side="left"), "side='std'"),
        (dict(seed=0), dict(seed=1), "seed=0"),
        (dict(), dict(cls=SubspaceSGD), "rule='adamw'"),
        (dict(rank=None), dict(), "rank=None"),
    ],
)
def test_a_checkpoint_saved_with_other_settings_is_refused(saved, live, setting):
    model = _model()
    saved = dict(saved)
    rank = saved.pop("rank", 4)
    groups = subspace_param_groups(model, rank=4)
    if rank is None:  # the same groups, the second one dense
        groups[1].pop("rank")
    opt = SubspaceAdamW(groups, **{"lr": 1e-2, "update_gap": 2, "projector": "golore", **saved})
    _step(model, opt, 0)
    sd = opt.state_dict()
    other = _opt(copy.deepcopy(model), **live)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=f"saved with {setting}, this optimizer has .*strict=False"):
        other.load_state_dict(sd)
    assert other.state_dict() == before  # refused before anything was loaded


def test_dense_groups_are_checked_for_their_rule_only():
    model = _model()
    opt = SubspaceAdamW(model.parameters(), lr=1e-2, projector="galore")
    _step(model, opt, 0)
    SubspaceAdamW(model.parameters(), lr=1e-2, projector="golore", seed=3).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="rule='adamw'"):
        SubspaceSGD(model.parameters()).load_state_dict(opt.state_dict())


def test_strict_false_adopts_the_saved_settings():
    model = _model()
    opt = _opt(model, rank=4)
    _step(model, opt, 0)
    model8 = copy.deepcopy(model)
    opt8 = _opt(model8, rank=8)
    opt8.load_state_dict(copy.deepcopy(opt.state_dict()), strict=False)
    assert opt8.param_groups[-1]["rank"] == 4
    _step(model, opt, 1)
    _step(model8, opt8, 1)
    for a, b in zip(model.parameters(), model8.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="rule 'adamw' cannot be stepped by SubspaceSGD"):
        _opt(copy.deepcopy(model), cls=SubspaceSGD).load_state_dict(opt.state_dict(), strict=False)


def test_golore_at_x_stays_random_when_the_run_is_extended():
    """A longer --steps on --resume raises total_steps: a switch already made stays, one not made yet moves."""
    gen = torch.Generator().manual_seed(0)
    switched, pending = (nn.Parameter(torch.randn(12, 16, generator=gen)) for _ in range(2))

    def make():
        return SubspaceAdamW([{"params": [switched], "rank": 2, "total_steps": 8},
                              {"params": [pending], "rank": 2, "total_steps": 16}],
                             lr=1e-2, update_gap=2, projector="hybrid", random_fraction=0.5)

    def steps(opt, n):
        for _ in range(n):
            for p in (switched, pending):
                p.grad = torch.randn(12, 16, generator=gen)
            opt.step()

    opt = make()
    steps(opt, 6)  # refreshes at 0, 2, 4: the first switches at step 4, the second would at 8
    assert opt.switch_steps() == {0: 4}
    sd = opt.state_dict()
    opt = make()
    opt.load_state_dict(sd)
    for group in opt.param_groups:  # what train/loop.py does on --resume --steps 100
        group["total_steps"] = 100
    steps(opt, 4)  # refreshes at 6 and 8
    assert opt.state[switched]["random_basis"] and opt.switch_steps() == {0: 4}
    assert not opt.state[pending]["random_basis"]  # its switch moved to step 50


# --------------------------------------------------------------------------------------- layer-wise hooks
def test_layerwise_updates_parameters_added_later():
    model = _model()
    first, second = model[0], model[2]
    opt = SubspaceAdamW([{"params": [first.weight], "rank": 4}], lr=1e-2, layerwise=True)
    opt.add_param_group({"params": [second.weight], "rank": 4})
    before = second.weight.detach().clone()
    _step(model, opt, 0)
    assert not torch.equal(before, second.weight) and second.weight.grad is None


def test_one_layerwise_optimizer_per_parameter_until_its_hooks_go():
    model = _model()
    opt = _opt(model, layerwise=True)
    with pytest.raises(ValueError, match="another layer-wise optimizer"):
        _opt(model, layerwise=True)
    with pytest.raises(ValueError, match="another layer-wise optimizer"):
        SubspaceAdamW([nn.Parameter(torch.randn(3))], layerwise=True).add_param_group({"params": [model[0].bias]})
    opt.remove_hooks()
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 12)).sum().backward()  # no hooks: nothing moves, the gradients stay
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is not None for p in model.parameters())
    opt.step()  # which it now steps as without layerwise
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt = _opt(model, layerwise=True)  # the parameters are free again
    del opt
    gc.collect()
    opt = _opt(model, layerwise=True)  # and free once an optimizer is collected, whose hooks went with it
    reference = copy.deepcopy(model)
    ref_opt = _opt(reference, layerwise=True)
    _step(model, opt, 1)
    _step(reference, ref_opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_failed_add_param_group_leaves_the_optimizer_as_it_was():
    model = _model()
    _keep = _opt(model, layerwise=True)  # noqa: F841
    opt = SubspaceAdamW([nn.Parameter(torch.randn(3))], layerwise=True)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [model[0].weight]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("micro", [1, 2])
def test_layerwise_skipped_step_commits_no_random_refresh(micro):
    """A NaN at a refresh leaves the state as it was (the refresh drawn at micro-batch 1 is held back), so the run
    goes on exactly as the standard mode's, which skips the same step."""
    runs = []
    for layerwise in (False, True):
        model = _model()
        opt = _opt(model, layerwise=layerwise, **({"accumulation_steps": micro} if layerwise else {}))
        for seed in range(2):
            _step(model, opt, seed, micro=micro)
        state = copy.deepcopy(opt.state_dict()["state"])
        _step(model, opt, 2, nan=True, micro=micro)  # proj_step 2: a refresh
        assert opt.skipped_steps == 1
        for k, saved in state.items():
            live = opt.state_dict()["state"][k]
            assert live.keys() == saved.keys()
            assert all(torch.equal(v, live[kk]) if isinstance(v, torch.Tensor) else v == live[kk]
                       for kk, v in saved.items()), k
        for seed in (3, 4, 5):
            _step(model, opt, seed, micro=micro)
        runs.append(model)
    for a, b in zip(*(m.parameters() for m in runs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradscaler_is_refused_in_layerwise_mode_only():
    for layerwise in (False, True):
        model = _model()
        opt = _opt(model, layerwise=layerwise)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(model(torch.randn(4, 12)).square().mean()).backward()
        if layerwise:
            with pytest.raises(RuntimeError, match="GradScaler"):
                scaler.step(opt)
        else:
            scaler.step(opt)
            scaler.update()
            assert opt.state
