"""random_basis="regenerate": random bases are not held between steps, and nothing else changes (bitwise)."""

from __future__ import annotations

import copy
import gc
import importlib.util
import io
import weakref

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import subspace_optim as so
from subspace_optim.engine.subspace import Subspace
from subspace_optim.memory_measured import state_tensors, tensor_bytes

RANK, GAP, STEPS = 16, 3, 11  # refreshes at 0, 3, 6, 9 (each after the first transports the moments)
#: the step at which each projector's bases turn random (auto: at its first decision, its z-score threshold being
#: far below any), so that a later refresh transports the moments out of a regenerated random basis
SWITCH = {"golore": 0, "hybrid": 6, "auto": 3}
#: 8-bit moments where torchao is importable (as tests/test_lowbit.py skips them)
BITS = (32, 8) if importlib.util.find_spec("torchao") is not None else (32,)


class Net(nn.Module):
    """R of 16 x 256 on either side (4096 numbers: quantized at 8 bits), a partial-block one and a dense bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.left = nn.Parameter(torch.randn(48, 256) * 0.1)
        self.right = nn.Parameter(torch.randn(256, 48) * 0.1)
        self.odd = nn.Parameter(torch.randn(40, 300) * 0.1)
        self.bias = nn.Parameter(torch.zeros(10))

    def groups(self):
        return [{"params": [self.bias]}, {"params": [self.left, self.right, self.odd], "rank": RANK}]

    def loss(self, step, nan=False):
        """sum ||W - W*||² / 2 + <noise, W>: gradient W - W* + noise, through autograd (layer-wise hooks fire);
        ``nan``: the left weight's gradient is NaN."""
        gen = torch.Generator().manual_seed(step)
        total = self.left.sum() * float("nan") if nan else 0.0
        for i, p in enumerate(self.parameters()):
            target = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i))
            total = total + (p - target).square().sum() / 2 + (0.1 * torch.randn(p.shape, generator=gen) * p).sum()
        return total


def make(net, projector, random_basis, **kwargs):
    kwargs = {"lr": 1e-2, "update_gap": GAP, "moments": "project", "total_steps": 12, "random_fraction": 0.5,
              "auto_threshold": -1e9, **kwargs}
    return so.SubspaceAdamW(net.groups(), projector=projector, random_basis=random_basis, **kwargs)


def run(net, opt, start, steps):
    for step in range(start, start + steps):
        opt.zero_grad()
        net.loss(step).backward()
        opt.step()


def assert_same_state(a: dict, b: dict) -> None:
    """Two saved states hold the same keys and bitwise the same values (quantized ones: codes, scales, table)."""
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, (dict, torch.Tensor)):
            pairs = list(zip(state_tensors(v), state_tensors(b[k]), strict=True))
            assert pairs and all(torch.equal(x, y) for x, y in pairs), k
        else:
            assert v == b[k], k


def basis_bytes(opt):
    return tensor_bytes(s["basis"] for s in opt.state.values() if "basis" in s)


def test_a_bad_value_gets_a_value_error_naming_the_choices():
    for bad in ("drop", None, True):
        with pytest.raises(ValueError, match=r"random_basis.*\['keep', 'regenerate'\]"):
            make(Net(), "golore", bad)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("layerwise", [False, True], ids=["standard", "layerwise"])
@pytest.mark.parametrize("projector", SWITCH)
def test_the_trajectory_and_the_checkpoints_are_those_of_keep(projector, layerwise, bits):
    """Every step's weights, and the state dicts, bitwise; between steps no random basis is held (state_bytes)."""
    nets = Net(), Net()
    keep, regen = (make(n, projector, mode, layerwise=layerwise, state_bits=bits)
                   for n, mode in zip(nets, ("keep", "regenerate")))
    for step in range(STEPS):
        run(nets[0], keep, step, 1)
        run(nets[1], regen, step, 1)
        for a, b in zip(*(n.parameters() for n in nets)):
            assert torch.equal(a, b), step
        random = [(a, b) for a, b in zip(*(n.parameters() for n in nets)) if keep.state[a].get("random_basis")]
        assert len(random) == (3 if step >= SWITCH[projector] else 0)
        assert all("basis" not in regen.state[b] for _, b in random)
        assert regen.state_bytes() == keep.state_bytes() - tensor_bytes(keep.state[a]["basis"] for a, _ in random)
        if step in (4, STEPS - 1):  # a mid-gap checkpoint, and the last (just after a random refresh)
            for i, saved in keep.state_dict()["state"].items():
                assert_same_state(saved, regen.state_dict()["state"][i])
    if projector != "golore":
        assert regen.switch_steps() == keep.switch_steps() == dict.fromkeys((1, 2, 3), SWITCH[projector])


@pytest.mark.parametrize("layerwise", [False, True], ids=["standard", "layerwise"])
@pytest.mark.parametrize("projector", SWITCH)
def test_no_drawn_basis_outlives_its_update(projector, layerwise, monkeypatch):
    """Layer-wise, nothing keeps a drawn basis alive after its weight's update in backward: not the state, not the
    guard that can undo the update until step() reads its gradient's finiteness (it is drawn again instead).
    In standard mode, none outlives step()."""
    net = Net()
    opt = make(net, projector, "regenerate", layerwise=layerwise)
    drawn, draw = [], Subspace.random_basis

    def tracked(space, key):
        basis = draw(space, key)
        drawn.append(weakref.ref(basis))
        return basis

    monkeypatch.setattr(Subspace, "random_basis", tracked)
    for step in range(STEPS):
        drawn.clear()
        opt.zero_grad()
        net.loss(step).backward()  # layer-wise, every update happens here; step() only reads the flags
        if not layerwise:
            opt.step()
        gc.collect()
        assert all(ref() is None for ref in drawn), step
        if step != SWITCH[projector]:  # (auto's switch draws its basis in settle, and it is known only at step())
            assert (len(drawn) > 0) == (step > SWITCH[projector]), step
        if layerwise:
            opt.step()


@pytest.mark.parametrize("layerwise", [False, True], ids=["standard", "layerwise"])
@pytest.mark.parametrize("projector", SWITCH)
def test_skipped_steps_are_those_of_keep(projector, layerwise):
    """A NaN gradient at a refresh (hybrid's switch among them) and mid-gap: the undone updates leave a basis to
    be drawn again from the restored refresh count."""
    nets = Net(), Net()
    opts = [make(n, projector, mode, layerwise=layerwise) for n, mode in zip(nets, ("keep", "regenerate"))]
    for step in range(STEPS):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net.loss(step, nan=step in (4, 6)).backward()
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(*(n.parameters() for n in nets))), step
    assert opts[0].skipped_steps == opts[1].skipped_steps == 2
    assert opts[0].switch_steps() == opts[1].switch_steps()


@pytest.mark.parametrize("projector", SWITCH)
def test_layerwise_accumulation_is_that_of_keep(projector):
    """accumulation_steps=2: the basis is drawn at a weight's first micro-batch and dropped after its update."""
    nets = Net(), Net()
    opts = [make(n, projector, mode, layerwise=True, accumulation_steps=2)
            for n, mode in zip(nets, ("keep", "regenerate"))]
    for step in range(STEPS):
        for net, opt in zip(nets, opts):
            for micro in range(2):
                (net.loss(10 * step + micro) / 2).backward()
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(*(n.parameters() for n in nets))), step
    assert basis_bytes(opts[1]) == 0 < basis_bytes(opts[0])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("layerwise", [False, True], ids=["standard", "layerwise"])
@pytest.mark.parametrize("projector", SWITCH)
def test_save_weights_only_load_continue_is_bitwise(projector, layerwise, bits):
    """Saved mid-gap after the switch, resumed across a refresh that transports the moments by T = P_newᵀ P_old
    (P_old regenerated): equal to an uninterrupted run with random_basis="keep"."""
    reference = Net()
    run(reference, make(reference, projector, "keep", layerwise=layerwise, state_bits=bits), 0, STEPS)
    net = Net()
    opt = make(net, projector, "regenerate", layerwise=layerwise, state_bits=bits)
    run(net, opt, 0, 7)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    net2 = Net()
    net2.load_state_dict(saved["model"])
    opt2 = make(net2, projector, "regenerate", layerwise=layerwise, state_bits=bits)
    opt2.load_state_dict(saved["opt"])
    assert basis_bytes(opt2) == 0  # a loaded random basis (hybrid and auto save it) is not held either
    run(net2, opt2, 7, STEPS - 7)
    for a, b in zip(reference.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_the_setting_is_this_optimizers_when_loading_a_checkpoint_of_the_other():
    """Like the precision settings, random_basis says how state is held: a load keeps this optimizer's value."""
    net = Net()
    opt = make(net, "golore", "keep")
    run(net, opt, 0, 4)
    net2 = copy.deepcopy(net)
    opt2 = make(net2, "golore", "regenerate")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[1]["random_basis"] == "regenerate"
    run(net, opt, 4, 4)
    run(net2, opt2, 4, 4)
    assert basis_bytes(opt2) == 0 < basis_bytes(opt)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("flat", [False, True], ids=["dcp", "dcp-flat"])
@pytest.mark.parametrize("projector", ["golore", "hybrid"])
def test_torch_distributed_checkpoint_round_trip(projector, flat):
    """DCP builds its load template by an lr-0 step (``_init_state``): its keys must fit the saved state's."""

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10))

    def opt_of(m):
        return so.SubspaceAdamW(so.subspace_param_groups(m, rank=4), lr=1e-2, update_gap=2, projector=projector,
                                total_steps=4, random_fraction=0.5, random_basis="regenerate")

    def step(m, opt, seed):
        gen = torch.Generator().manual_seed(seed)
        opt.zero_grad()
        m(torch.randn(4, 12, generator=gen)).square().mean().backward()
        opt.step()

    m, m2 = model(), model()
    opt, opt2 = opt_of(m), opt_of(m2)
    for seed in range(3):  # refreshes at 0 and 2; hybrid's switch at 2
        step(m, opt, seed)
    m2.load_state_dict(m.state_dict())
    options = StateDictOptions(flatten_optimizer_state_dict=flat)
    saved = copy.deepcopy(get_optimizer_state_dict(m, opt, options=options))
    set_optimizer_state_dict(m2, opt2, saved, options=options)
    for seed in range(3, 6):
        step(m, opt, seed)
        step(m2, opt2, seed)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert basis_bytes(opt2) == 0


def _named_run(order, named=True, steps=5, start=None):
    """GoLore on two weights listed in ``order``; each gradient a fixed function of its weight."""
    torch.manual_seed(0)
    weights = {"a.weight": torch.randn(6, 12), "b.weight": torch.randn(7, 10)}
    params = {k: nn.Parameter(v.clone()) for k, v in weights.items()}
    listed = [(k, params[k]) if named else params[k] for k in order]
    opt = so.SubspaceAdamW([{"params": listed, "rank": 2}], lr=1e-2, projector="golore", update_gap=2)
    if start is not None:
        opt.load_state_dict(start["optimizer"])
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(start["weights"][k])
    for _ in range(steps):
        for p in params.values():
            p.grad = (p.detach() - 0.5).sin()
        opt.step()
    return params, opt


def test_named_parameters_key_their_random_bases_by_name_not_by_order():
    """The same weight gets the same bases however the parameters are listed (pipeline stages, torchtitan's model
    parts, a reordered module); by index, as unnamed parameters are keyed, the order changes them."""
    ab, _ = _named_run(["a.weight", "b.weight"])
    ba, opt = _named_run(["b.weight", "a.weight"])
    assert all(torch.equal(ab[k], ba[k]) for k in ab)
    assert opt.param_groups[0]["param_names"] == ["b.weight", "a.weight"]
    assert all(s["basis_key"] == 1 for s in opt.state.values())
    unnamed_ab, _ = _named_run(["a.weight", "b.weight"], named=False)
    unnamed_ba, _ = _named_run(["b.weight", "a.weight"], named=False)
    assert not torch.equal(unnamed_ab["a.weight"], unnamed_ba["a.weight"])
    assert not torch.equal(unnamed_ab["a.weight"], ab["a.weight"])  # names are other keys than indices


def test_a_checkpoint_keyed_by_index_keeps_its_keys_in_a_named_optimizer_and_names_survive_saving():
    """A state saved before names (or by unnamed parameters) has no basis_key: loaded into an optimizer of named
    parameters it goes on with index keys, bitwise as if never saved; a name-keyed one resumes bitwise too."""
    for named in (False, True):
        params, opt = _named_run(["a.weight", "b.weight"], named=named, steps=3)
        buffer = io.BytesIO()
        torch.save({"optimizer": opt.state_dict(), "weights": {k: p.detach() for k, p in params.items()}}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        straight, _ = _named_run(["a.weight", "b.weight"], named=named, steps=6)
        resumed, opt2 = _named_run(["a.weight", "b.weight"], named=True, steps=3, start=saved)
        assert all(torch.equal(straight[k], resumed[k]) for k in straight)
        assert all(("basis_key" in s) == named for s in opt2.state.values())


def test_subspace_param_groups_can_name_the_parameters():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    groups = so.subspace_param_groups(model, rank=2, named=True)
    assert [n for n, _ in groups[1]["params"]] == ["0.weight", "2.weight"]
    opt = so.SubspaceAdamW(groups, lr=1e-2, projector="golore")
    assert opt.param_groups[1]["param_names"] == ["0.weight", "2.weight"]
    assert opt._spaces[model[2].weight].name == "2.weight"
