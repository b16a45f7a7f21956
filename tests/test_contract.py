"""torch.optim's contract, for every class and alias of optim_db.CONTRACT (dense, projected, layer-wise).

The checks follow torch's generic optimizer tests (torch/testing/_internal/common_optimizers.py and
test/test_optim.py): copies that step, state_dict hooks, non-contiguous parameters and gradients, tensor learning
rates, checkpoints with a plain-number step, bare-tensor params, zero gradients.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from optim_db import CONTRACT, assert_same_state
from subspace_optim import SubspaceAdamW

SHAPES = [(10, 6), (4, 9), (10,)]  # right-projected, left-projected, dense (1-D)
STANDARD = [c for c in CONTRACT if not c.kwargs.get("layerwise")]


def _values():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _params(layout="contiguous"):
    """Parameters of SHAPES: contiguous, strided (not dense, as a slice) or transposed (as one made from w.t())."""
    values = _values()
    if layout == "strided":
        return [nn.Parameter(torch.stack([v, v], -1)[..., 0]) for v in values]
    if layout == "transposed":
        return [nn.Parameter(v.T.contiguous().T if v.dim() == 2 else v) for v in values]
    return [nn.Parameter(v) for v in values]


def _grads(step, layout="contiguous"):
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    if layout == "transposed":
        return [g.T.contiguous().T if g.dim() == 2 else g for g in grads]
    if layout == "strided":
        return [torch.stack([g, g], -1)[..., 0] for g in grads]
    return grads


def _backward(params, grads):
    """Gradients through autograd, so that layer-wise hooks see them as in training."""
    torch.autograd.backward([(p * g).sum() for p, g in zip(params, grads)])


def _train(opt, params, steps, start=0, scheduler=None):
    for step in range(start, start + steps):
        opt.zero_grad()
        _backward(params, _grads(step))
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _make(config, params, **extra):
    return config.cls(params, **{**config.kwargs, **extra})


def _params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _assert_same_params(a, b, exact=True):
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("config", CONTRACT, ids=repr)
def test_copy_then_step(config, how):
    """A copy steps like the original, on its own parameters (a layer-wise copy hooks its own, not the original's)."""
    params = _params()
    opt = _make(config, params)
    _train(opt, params, 3)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    public = lambda o: {k for k in vars(o) if not k.startswith("_")}  # noqa: E731 (torch's deepcopy test)
    assert public(twin) == public(opt) and twin.layerwise == opt.layerwise and twin.nonfinite == opt.nonfinite
    twin_params = _params_of(twin)
    assert not any(a is b for a, b in zip(params, twin_params))
    before = [p.detach().clone() for p in params]
    _train(twin, twin_params, 3, start=3)
    _assert_same_params(before, params)  # the copy's backward and step left the original alone
    _train(opt, params, 3, start=3)
    _assert_same_params(params, twin_params)
    for p, q in zip(params, twin_params):
        assert_same_state(opt.state[p], twin.state[q])


@pytest.mark.parametrize("config", CONTRACT, ids=repr)
def test_state_dict_hooks(config):
    """torch's hook tests: hooks may put non-state entries into optimizer.state and the state dict."""
    params = _params()
    opt = _make(config, params)
    _train(opt, params, 3)

    def pre_hook(optimizer):
        optimizer.state["test"] = 1

    def post_hook(optimizer, state_dict):
        state_dict["ran_pre_hook"] = state_dict["state"].pop("test", None) == 1
        return state_dict

    def load_pre_hook(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.003
        return state_dict

    def load_post_hook(optimizer):
        optimizer.state["ran_load_post_hook"] = optimizer.param_groups[0]["lr"] == 0.003

    opt.register_state_dict_pre_hook(pre_hook)
    opt.register_state_dict_post_hook(post_hook)
    sd = opt.state_dict()
    assert sd["ran_pre_hook"] and "test" not in sd["state"]
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = _make(config, twin_params)
    twin.register_load_state_dict_pre_hook(load_pre_hook)
    twin.register_load_state_dict_post_hook(load_post_hook)
    twin.load_state_dict(sd)
    assert twin.state["ran_load_post_hook"] is True
    _train(twin, twin_params, 2, start=3)
    twin.state_dict()
    twin.state_bytes(), twin.switch_steps()


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("config", CONTRACT, ids=repr)
def test_non_contiguous_parameters(config, layout):
    """Same steps as on contiguous parameters (torch's fused AdamW alone moved them by 0.2 the wrong way)."""
    reference = _params()
    opt = _make(config, reference)
    _train(opt, reference, 5)
    params = _params(layout)
    assert not params[0].is_contiguous() and not params[1].is_contiguous()
    opt = _make(config, params)
    _train(opt, params, 5)
    _assert_same_params(reference, params, exact=False)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("config", STANDARD, ids=repr)
def test_non_contiguous_gradients(config, layout):
    results = []
    for grad_layout in ("contiguous", layout):
        params = _params()
        opt = _make(config, params)
        for step in range(5):
            for p, g in zip(params, _grads(step, grad_layout)):
                p.grad = g
            opt.step()
        results.append(params)
    _assert_same_params(*results, exact=False)


def test_dense_adamw_on_a_strided_parameter_matches_torch():
    values = _values()[0]
    ours = nn.Parameter(torch.stack([values, values], -1)[..., 0])
    theirs = nn.Parameter(values.clone())
    opts = [SubspaceAdamW([ours], lr=0.1), torch.optim.AdamW([theirs], lr=0.1, foreach=True)]
    for step in range(3):
        for p, opt in ((ours, opts[0]), (theirs, opts[1])):
            p.grad = _grads(step)[0]
            opt.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


class _HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value on the host (item(), bool(), float(), a tensor passed where a number is
    expected): on a GPU each one stalls the step."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dims", [0, 1, 2])
@pytest.mark.parametrize("config", CONTRACT, ids=repr)
def test_tensor_lr(config, dims):
    """A 1-element tensor lr of any shape (torch accepts them) steps as the number does, under a schedule, and
    reads nothing more on the host than the number does."""
    results, reads = [], []
    for lr in (config.kwargs["lr"], torch.tensor(config.kwargs["lr"]).reshape([1] * dims)):
        params = _params()
        opt = _make(config, params, lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.7**step)
        counter = _HostReads()
        for step in range(5):
            opt.zero_grad()
            with counter:  # around backward too: layer-wise steps happen there
                _backward(params, _grads(step))
                opt.step()
            scheduler.step()
        results.append(params)
        reads.append(counter.count)
    _assert_same_params(*results, exact=False)
    assert reads[1] == reads[0]


@pytest.mark.parametrize("config", CONTRACT, ids=repr)
def test_tensor_lr_of_several_elements_is_refused(config):
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        _make(config, _params(), lr=torch.tensor([0.01, 0.01]))


@pytest.mark.parametrize("config", CONTRACT, ids=repr)
def test_checkpoint_with_number_steps_loads_and_steps(config):
    """Older torch checkpoints hold ``step`` as a plain number; loading converts it as torch.optim.Adam does."""
    params = _params()
    opt = _make(config, params)
    _train(opt, params, 3)
    sd = opt.state_dict()
    legacy = copy.deepcopy(sd)

    def to_numbers(state):
        for k, v in state.items():
            if isinstance(v, dict):
                to_numbers(v)
            elif k == "step" and isinstance(v, torch.Tensor):
                state[k] = v.item()

    for state in legacy["state"].values():
        to_numbers(state)
    results = []
    for saved in (sd, legacy):
        twin_params = [p.detach().clone().requires_grad_() for p in params]
        twin = _make(config, twin_params)
        twin.load_state_dict(saved)
        _train(twin, twin_params, 2, start=3)
        results.append(twin_params)
    _assert_same_params(*results)


@pytest.mark.parametrize("config", CONTRACT, ids=repr)
def test_bare_tensor_params_are_torchs_type_error(config):
    for params in (torch.randn(3, 4), nn.Parameter(torch.randn(3, 4))):
        with pytest.raises(TypeError, match="should be an iterable of Tensors or dicts"):
            _make(config, params)


@pytest.mark.parametrize("config", CONTRACT, ids=repr)
def test_zero_gradients_leave_parameters_unchanged(config):
    """As in DCP's state initialisation: a step on zero gradients without weight decay changes nothing."""
    params = _params()
    opt = _make(config, params, weight_decay=0.0)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        opt.zero_grad()
        _backward(params, [torch.zeros(s) for s in SHAPES])
        opt.step()
    _assert_same_params(before, params)
    assert opt.state  # the steps did run


@pytest.mark.parametrize("config", CONTRACT, ids=repr)
def test_loaded_state_dict_reads_back_unchanged(config):
    """torch's state-dict determinism: loading adds nothing (no key of torch's own, like "differentiable"), and a
    checkpoint from before the groups carried "rule" and "skipped_steps" loads and steps."""
    params = _params()
    opt = _make(config, params)
    _train(opt, params, 3)
    sd = copy.deepcopy(opt.state_dict())
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = _make(config, twin_params)
    twin.load_state_dict(copy.deepcopy(sd))
    assert_same_state(twin.state_dict(), sd)
    for group in sd["param_groups"]:
        del group["rule"], group["skipped_steps"]
    twin.load_state_dict(sd)
    assert all(g["rule"] == twin.rule_name and g["skipped_steps"] == 0 for g in twin.param_groups)
    _train(twin, twin_params, 2, start=3)
