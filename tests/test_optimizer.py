"""Generic tests: every configuration of optim_db.CONFIGS goes through each of them."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from optim_db import CONFIGS, EXACT_ONLY, GAP, RANK, STEPS, TinyNet, assert_same_state, batch, train

ALL = CONFIGS + EXACT_ONLY


def _fresh(config, dtype=torch.float32, **extra):
    torch.manual_seed(0)
    model = TinyNet(dtype)
    return model, config.make(model, **extra)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("config", ALL, ids=repr)
def test_trains(config):
    model, opt = _fresh(config)
    losses = train(model, opt, 3 * STEPS)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("config", ALL, ids=repr)
def test_state_shapes_per_side(config):
    model, opt = _fresh(config)
    train(model, opt, GAP + 1)
    # (d, D): right.weight 24 x 10 is right-projected (d = 10), the others are left-projected.
    expected = {model.right.weight: (10, 24), model.left.weight: (6, 24), model.conv.weight: (6, 12)}
    for p, (d, big) in expected.items():
        state = opt.state[p]
        assert state["basis"].shape == (d, RANK) and state["basis"].dtype == torch.float32
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in state:
                assert state[key].shape == (RANK, big), key
        if "exp_avg_sq_row" in state:
            assert state["exp_avg_sq_row"].shape == (RANK,) and state["exp_avg_sq_col"].shape == (big,)
    # Dense parameters keep full-size state, like torch.optim (Adafactor: its row and column factors).
    embed = model.embed.weight
    moments = {k: v for k, v in opt.state[embed].items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    assert moments, "a dense parameter keeps some full-size state"
    for k, v in moments.items():
        assert v.shape == {"exp_avg_sq_row": (16,), "exp_avg_sq_col": (10,)}.get(k, embed.shape), k


@pytest.mark.parametrize("config", ALL, ids=repr)
def test_state_dict_weights_only_round_trip(config):
    model, opt = _fresh(config)
    train(model, opt, GAP + 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    model2 = copy.deepcopy(model)
    opt2 = config.make(model2)
    opt2.load_state_dict(loaded)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        s, s2 = opt.state[p], opt2.state[p2]
        assert s.keys() - {"basis"} <= s2.keys()
        for k, v in s2.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, s[k]), k


@pytest.mark.parametrize("config", ALL, ids=repr)
def test_bitwise_resume_mid_gap(config):
    half = GAP + 2  # not a refresh boundary
    model, opt = _fresh(config)
    train(model, opt, 2 * half)
    reference = _params(model)

    model, opt = _fresh(config)
    train(model, opt, half)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, opt2 = _fresh(config)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    train(model2, opt2, half, start=half)
    for a, b in zip(reference, model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.kwargs["layerwise"]], ids=repr)
def test_layerwise_equals_standard(config):
    model, opt = _fresh(config)
    train(model, opt, STEPS)
    model2, opt2 = _fresh(config, layerwise=True)
    train(model2, opt2, STEPS)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model2.parameters())  # layer-wise mode frees every gradient


@pytest.mark.parametrize(
    "config", [c for c in CONFIGS if c.kwargs["moments"] == "project" and c.kwargs["layerwise"]], ids=repr
)
def test_accumulation_equals_big_batch(config):
    """Layer-wise mode accumulates the projected gradient over k backward passes (outside it, autograd does)."""
    k = 3
    model, opt = _fresh(config)
    for step in range(STEPS):
        opt.zero_grad()
        model(*batch(step, size=8 * k)).backward()
        opt.step()
    model2, opt2 = _fresh(config, accumulation_steps=k)
    for step in range(STEPS):
        opt2.zero_grad()
        tokens, signal = batch(step, size=8 * k)
        for i in range(k):
            part = slice(8 * i, 8 * (i + 1))
            (model2(tokens[part], signal[part]) / k).backward()
        opt2.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("config", CONFIGS[::4], ids=repr)
def test_closure(config):
    model, opt = _fresh(config)
    train(model, opt, 2)
    model2, opt2 = _fresh(config)
    for step in range(2):
        def closure():
            opt2.zero_grad()
            loss = model2(*batch(step))
            loss.backward()
            return loss

        loss = opt2.step(closure)
        assert isinstance(loss, torch.Tensor)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("config", CONFIGS[::3], ids=repr)
def test_bfloat16(config):
    model, opt = _fresh(config, dtype=torch.bfloat16)
    losses = train(model, opt, 2 * GAP + 1, dtype=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(losses)))
    state = opt.state[model.left.weight]
    assert state["basis"].dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # load_state_dict keeps the projector state at full precision even though the parameter is bf16.
    model2 = copy.deepcopy(model)
    opt2 = config.make(model2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    state2 = opt2.state[model2.left.weight]
    for k, v in state2.items():
        if isinstance(v, torch.Tensor) and k != "step":
            assert v.dtype == state[k].dtype, k
    train(model2, opt2, 2, start=2 * GAP + 1, dtype=torch.bfloat16)


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.kwargs["layerwise"]][::3], ids=repr)
def test_nan_gradient_skips_whole_step(config):
    model, opt = _fresh(config)
    train(model, opt, GAP - 1)  # the next step is a refresh: a NaN must not reach the SVD
    before_params = _params(model)
    before_state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    model(*batch(99)).backward()
    model.left.weight.grad[0, 0] = float("nan")
    model.right.bias.grad[0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 1
    for a, b in zip(before_params, model.parameters()):
        assert torch.equal(a, b)
    assert_same_state(before_state["state"], opt.state_dict()["state"])
    train(model, opt, 2, start=GAP)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.kwargs["layerwise"]][::4], ids=repr)
def test_layerwise_nan_skips_that_parameter(config):
    model, opt = _fresh(config)
    train(model, opt, GAP - 1)
    before = model.left.weight.detach().clone()
    before_state = copy.deepcopy(opt.state[model.left.weight])
    handle = model.left.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    opt.zero_grad()
    model(*batch(99)).backward()
    opt.step()
    handle.remove()
    assert opt.skipped_steps == 1
    assert torch.equal(before, model.left.weight)
    assert_same_state(before_state, opt.state[model.left.weight])
    train(model, opt, 2, start=GAP)
    assert all(torch.isfinite(p).all() for p in model.parameters())
