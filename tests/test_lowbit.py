"""Low precision where it is safe: quantized / bf16 moments (state_bits), bf16 bases and bf16 projections."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import subspace_optim as so
from subspace_optim import lowbit
from subspace_optim.engine import step as step_module
from subspace_optim import rules
from subspace_optim.distributed import LOCAL
from subspace_optim.memory_measured import state_tensors

torchao = pytest.importorskip("torchao.optim")

BITS = (32, 16, 8, 4)
RANK = 16


class Net(nn.Module):
    """Shapes that quantize: an 8192-number dense weight, R of 16 x 256 on either side (4096 numbers); R of
    16 x 300 (a partial block: kept as at 32 bits) and a 10-number bias (too small: likewise)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dense = nn.Parameter(torch.randn(64, 128) * 0.1)
        self.left = nn.Parameter(torch.randn(48, 256) * 0.1)
        self.right = nn.Parameter(torch.randn(256, 48) * 0.1)
        self.odd = nn.Parameter(torch.randn(40, 300) * 0.1)
        self.bias = nn.Parameter(torch.zeros(10))

    def groups(self):
        return [{"params": [self.dense, self.bias]}, {"params": [self.left, self.right, self.odd], "rank": RANK}]


def make(net, cls=so.SubspaceAdamW, **kwargs):
    kwargs = {"lr": 1e-2, "update_gap": 3, "projector": "golore", **kwargs}
    return cls(net.groups(), **kwargs)


def set_grads(net, step, nan=False):
    """Gradients of sum ||W - W*||² / 2 with fixed targets, plus noise: the loss falls under any sane optimizer."""
    gen = torch.Generator().manual_seed(step)
    for i, p in enumerate(net.parameters()):
        target = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i))
        p.grad = ((p.detach() - target) + 0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype)
    if nan:
        net.left.grad[3, 5] = float("nan")


def run(net, opt, start, steps):
    for step in range(start, start + steps):
        set_grads(net, step)
        opt.step()


def loss(net):
    return sum(((p.detach() - torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i))) ** 2).sum()
               for i, p in enumerate(net.parameters())).item()


def stored(opt, net):
    return {name: opt.state[p] for name, p in net.named_parameters()}


def test_bad_settings_get_a_value_error_naming_the_choices():
    net = Net()
    for bits in (12, True, "8", 0):
        with pytest.raises(ValueError, match=r"Invalid state_bits: .*choose one of \[32, 16, 8, 4\]"):
            make(net, state_bits=bits)
    for name in ("basis_dtype", "projection_dtype"):
        with pytest.raises(ValueError, match=rf"Invalid {name}: .*choose one of \['float32', 'bfloat16'\]"):
            make(net, **{name: "float16"})
    with pytest.raises(ValueError, match="Invalid state_bits"):  # also per group
        so.SubspaceAdamW([{"params": [net.dense], "state_bits": 5}])


def test_a_rule_without_a_low_precision_form_is_refused(monkeypatch):
    bare = rules.Rule("bare", rules.sgd, rules.RULES["sgd"].defaults, rules.RULES["sgd"].check)
    monkeypatch.setitem(rules.RULES, "bare", bare)

    class Bare(so.SubspaceSGD):
        rule_name = "bare"

    Bare(Net().groups(), lr=1e-2)  # fine at 32 bits
    for bits in (16, 8, 4):
        with pytest.raises(ValueError, match=f"rule 'bare' has no low-precision form \\(state_bits={bits}\\)"):
            Bare(Net().groups(), lr=1e-2, state_bits=bits)


@pytest.mark.parametrize("bits", BITS)
def test_moments_are_stored_as_chosen_and_counted_exactly(bits):
    net = Net()
    opt = make(net, state_bits=bits)
    run(net, opt, 0, 4)
    states = stored(opt, net)
    expected_class = {32: torch.Tensor, 16: torch.Tensor, 8: torchao.subclass_8bit.OptimState8bit,
                      4: torchao.subclass_4bit.OptimState4bit}[bits]
    for name in ("dense", "left", "right"):
        for key in ("exp_avg", "exp_avg_sq"):
            assert type(states[name][key]) is expected_class, (name, key)
            assert lowbit.bits_of(states[name][key]) == bits
    for name in ("odd", "bias"):  # a partial block / too small: as at 32 bits
        assert states[name]["exp_avg"].dtype == (torch.bfloat16 if bits == 16 else torch.float32)
    moments = sum(lowbit.stored_bytes(s["exp_avg"].numel(), bits) * 2 for s in states.values())
    other = sum(4 * s[k].numel() for s in states.values() for k in ("basis", "step") if k in s)
    assert opt.state_bytes() == moments + other


def test_per_group_state_bits():
    net = Net()
    groups = net.groups()
    groups[0]["state_bits"] = 32
    opt = so.SubspaceAdamW(groups, lr=1e-2, state_bits=4, projector="golore")
    run(net, opt, 0, 1)
    assert opt.state[net.dense]["exp_avg"].dtype == torch.float32 and not lowbit.is_quantized(opt.state[net.dense]["exp_avg"])
    assert lowbit.bits_of(opt.state[net.left]["exp_avg"]) == 4


@pytest.mark.parametrize("bits", (8, 4))
def test_quantization_error_is_blockwise_small_and_second_moments_stay_nonnegative(bits):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=gen) * torch.logspace(-6, 0, 64)[:, None]  # blocks of very different scale
    for signed, value in ((True, x), (False, x.square())):
        q = lowbit.encode(value, bits, signed)
        back = lowbit.decode(q)
        blocks = value.reshape(-1, lowbit.BLOCK[bits]).abs().amax(-1, keepdim=True)
        err = ((back - value).reshape(-1, lowbit.BLOCK[bits]).abs() / blocks).max().item()
        # relative to each block's absmax: the maps' largest half-gap (8-bit dynamic map near 1: ~0.016; 4-bit: ~0.16)
        assert err < {8: 0.02, 4: 0.2}[bits], err
        if not signed:
            assert back.min() >= 0


@pytest.mark.parametrize("moments", ("project", "rotate"))
@pytest.mark.parametrize("bits", (16, 8, 4))
def test_a_refresh_transports_moments_by_decoding_transforming_and_encoding(bits, moments, monkeypatch):
    net = Net()
    opt = make(net, state_bits=bits, moments=moments, update_gap=2)
    run(net, opt, 0, 2)  # the next step refreshes
    state = opt.state[net.left]
    old_basis = state["basis"].clone()
    before = {k: lowbit.decode(state[k]) for k in ("exp_avg", "exp_avg_sq")}
    space = opt._spaces[net.left]
    new_basis = space.random_basis(space.key(opt.state[net.left], 1))
    transfer = new_basis.T @ old_basis
    expected_m = lowbit.decode(lowbit.encode(transfer @ before["exp_avg"], bits, True))
    v = transfer.square() @ before["exp_avg_sq"] if moments == "rotate" else before["exp_avg_sq"]
    expected_v = lowbit.decode(lowbit.encode(v, bits, False))
    seen = {}
    original = rules.Rule.__call__

    def spy(self, params, grads, states, group, **kw):  # the moments as the rule gets them, after the transport
        for s in states:
            if s is state:
                seen.update({k: lowbit.decode(s[k]) for k in ("exp_avg", "exp_avg_sq")})
        return original(self, params, grads, states, group, **kw)

    monkeypatch.setattr(rules.Rule, "__call__", spy)
    run(net, opt, 2, 1)
    assert torch.equal(seen["exp_avg"], expected_m)
    assert torch.equal(seen["exp_avg_sq"], expected_v)
    assert seen["exp_avg_sq"].min() >= 0


@pytest.mark.parametrize("bits", (8, 4))
def test_low_bit_training_converges_like_full_precision(bits):
    finals = {}
    for b in (32, bits):
        net = Net()
        opt = make(net, state_bits=b, projector="galore", moments="rotate", update_gap=5, lr=2e-2)
        start = loss(net)
        run(net, opt, 0, 30)
        finals[b] = loss(net)
    assert finals[bits] < 0.7 * start
    # measured: 8-bit 0.01% above 32-bit, 4-bit 4.4% (its 16-level maps)
    assert abs(finals[bits] - finals[32]) < {8: 0.005, 4: 0.06}[bits] * finals[32], finals


@pytest.mark.parametrize("layerwise", (False, True))
@pytest.mark.parametrize("bits", (16, 8, 4))
def test_a_nan_gradient_never_reaches_a_low_precision_state(bits, layerwise):
    net = Net()
    opt = make(net, state_bits=bits, layerwise=layerwise)
    if layerwise:  # hooks fire in backward: drive them with a loss whose gradients are set_grads'
        def step(i, nan=False):
            set_grads(net, i, nan)
            grads = {p: p.grad for p in net.parameters()}
            for p in net.parameters():
                p.grad = None
            sum((p * grads[p]).sum() for p in net.parameters()).backward()
            opt.step()
    else:
        def step(i, nan=False):
            set_grads(net, i, nan)
            opt.step()
    for i in range(3):
        step(i)
    snapshot = copy.deepcopy(opt.state[net.left])
    weight = net.left.detach().clone()
    step(3, nan=True)
    assert torch.equal(net.left, weight)
    for key in ("exp_avg", "exp_avg_sq"):
        live, saved = opt.state[net.left][key], snapshot[key]
        if lowbit.is_quantized(live):
            assert torch.equal(live.codes, saved.codes) and torch.equal(live.scale, saved.scale)
        else:
            assert torch.equal(live, saved)
    assert opt.skipped_steps == 1
    step(4)
    assert all(torch.isfinite(lowbit.decode(s[k])).all() for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("projector", ("galore", "golore", "online_pca"))
@pytest.mark.parametrize("bits", BITS)
def test_save_load_continue_is_bitwise_at_every_state_bits(bits, projector):
    extra = {"basis_dtype": "bfloat16"} if projector != "golore" else {}
    net = Net()
    opt = make(net, state_bits=bits, projector=projector, **extra)
    run(net, opt, 0, 4)  # mid-gap
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    net2 = copy.deepcopy(net)
    opt2 = make(net2, state_bits=bits, projector=projector, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same precision: nothing to convert
        opt2.load_state_dict(torch.load(buffer, weights_only=True))
    run(net, opt, 4, 4)
    run(net2, opt2, 4, 4)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", (8, 4))
def test_a_deep_copy_holds_its_own_quantized_state_and_steps(bits):
    net = Net()
    opt = make(net, state_bits=bits)
    run(net, opt, 0, 2)
    # torch.optim's contract (torchao's tensors lack aten.clone, which lowbit registers); copied together, the
    # copy's parameters are the copied model's
    twin_net, twin = copy.deepcopy((net, opt))
    codes = opt.state[net.left]["exp_avg"].codes
    assert twin.state[twin_net.left]["exp_avg"].codes.data_ptr() != codes.data_ptr()
    run(net, opt, 2, 2)
    run(twin_net, twin, 2, 2)
    for a, b in zip(net.parameters(), twin_net.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("saved_bits, bits", [(8, 32), (32, 4), (16, 8), (4, 8)])
def test_a_checkpoint_of_another_state_bits_loads_by_conversion_with_a_warning(saved_bits, bits):
    net = Net()
    opt = make(net, state_bits=saved_bits)
    run(net, opt, 0, 4)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt2 = make(copy.deepcopy(net), state_bits=bits)
    with pytest.warns(UserWarning, match=f"exp_avg from {saved_bits} to {bits} bits"):
        opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.param_groups[1]["state_bits"] == bits  # this optimizer's precision, not the checkpoint's
    live, saved = opt2.state[opt2.param_groups[1]["params"][0]], opt.state[net.left]
    assert lowbit.bits_of(live["exp_avg"]) == bits
    wide = max(saved_bits, bits) >= 16 and min(saved_bits, bits) >= 16
    tol = 0.02 if wide else {8: 0.02, 4: 0.2}[min(saved_bits, bits)]
    for key in ("exp_avg", "exp_avg_sq"):
        a, b = lowbit.decode(live[key]), lowbit.decode(saved[key])
        assert (a - b).abs().max() <= tol * b.abs().max(), key


def test_four_graphs_in_all_and_no_recompilation_at_refreshes():
    """Quantize and dequantize at 8 and 4 bits: 4 graphs, compiled once for every shape; refreshes (moment
    transport), new shapes, dtypes of the parameters and new optimizers reuse them."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for bits in (8, 4):
        net = Net()
        opt = make(net, state_bits=bits, moments="rotate", update_gap=2)
        run(net, opt, 0, 2)  # the first step encodes new moments, the second decodes them too
    assert counters["stats"]["unique_graphs"] == 4
    for bits in (8, 4):
        net = Net()
        opt = make(net, state_bits=bits, moments="rotate", update_gap=2, projector="galore")
        run(net, opt, 0, 7)  # 4 refreshes
    lowbit.decode(lowbit.encode(torch.randn(100, 1024), 8, True))  # another shape
    assert counters["stats"]["unique_graphs"] == 4
    assert not counters["recompiles"]


# ------------------------------------------------------------------------------------------- bases
@pytest.mark.parametrize("projector", ("galore", "online_pca", "golore", "auto"))
def test_a_bf16_basis_is_held_and_saved_in_bf16_and_random_ones_stay_unsaved(projector):
    net = Net()
    opt = make(net, projector=projector, basis_dtype=torch.bfloat16)
    run(net, opt, 0, 4)
    for p in (net.left, net.right):
        assert opt.state[p]["basis"].dtype == torch.bfloat16
    saved = opt.state_dict()["state"]
    index = opt._spaces[net.left].index
    if projector == "golore":
        assert "basis" not in saved[index]
    else:
        assert saved[index]["basis"].dtype == torch.bfloat16


def test_the_reconstruction_error_a_bf16_basis_adds():
    """GaLore's SVD basis (rank 64) of a rank-32-plus-noise gradient: ‖P Pᵀ G − G‖ / ‖G‖ grows by less than 5e-4
    (absolute; measured 1.0e-4 to 1.3e-4 on 0.013 to 0.016) when P is rounded to bf16, and PᵀP stays within 2e-3
    of I (measured 7.5e-4)."""
    gen = torch.Generator().manual_seed(0)
    for d, big in ((256, 512), (512, 1376)):
        grad = torch.randn(d, 32, generator=gen) @ torch.randn(32, big, generator=gen)
        grad += 0.1 * torch.randn(d, big, generator=gen)
        basis = so.top_singular(grad, 64)
        rounded = basis.to(torch.bfloat16).float()
        error = lambda p: ((p @ (p.T @ grad) - grad).norm() / grad.norm()).item()  # noqa: E731
        assert 0 < error(rounded) - error(basis) < 5e-4, (error(rounded), error(basis))
        assert (rounded.T @ rounded - torch.eye(64)).abs().max() < 2e-3
        assert ((rounded - basis).abs() <= 2 ** -8 * basis.abs()).all()  # bf16's unit roundoff


# ------------------------------------------------------------------------------------------- projections
def test_bf16_projection_errors_in_r_and_in_the_update():
    """R = Pᵀ G and P U in bf16 (fp32 accumulation) for 128 x 512 @ 512 x 1376: each within 0.5% of fp32
    (Frobenius; measured 0.29% and 0.29%). Through AdamW the weights' displacement over 20 steps stays within 1.5%
    (measured 0.66%); a single first step differs by 5% (measured 5.4%): Adam's first direction is sign(R), which
    flips where an entry of R is near 0."""
    gen = torch.Generator().manual_seed(0)
    basis = so.haar_stiefel(512, 128, 3)
    grad = torch.randn(512, 1376, generator=gen)
    exact = basis.T @ grad
    r = LOCAL.project(basis, grad, torch.bfloat16)
    assert r.dtype == torch.float32
    assert 0 < ((r - exact).norm() / exact.norm()).item() < 5e-3
    net = nn.Linear(1376, 512, bias=False)  # left-projected: the update P U is 512 x 1376
    update = torch.randn(128, 1376, generator=gen)
    for dtype in ("float32", "bfloat16"):
        opt = so.SubspaceAdamW([{"params": [net.weight], "rank": 128, "projection_dtype": dtype}], lr=1e-2)
        with torch.no_grad():
            net.weight.zero_()
            opt._spaces[net.weight].apply_back(basis, update, -1.0)
        if dtype == "float32":
            reference = net.weight.detach().clone()
    assert torch.allclose(reference, basis @ update)
    assert 0 < ((net.weight - reference).norm() / reference.norm()).item() < 5e-3
    deltas = {}
    for dtype in ("float32", "bfloat16"):
        net = Net()
        before = net.left.detach().clone()
        opt = make(net, projection_dtype=dtype)
        run(net, opt, 0, 20)
        deltas[dtype] = net.left.detach() - before
    assert 0 < ((deltas["bfloat16"] - deltas["float32"]).norm() / deltas["float32"].norm()).item() < 1.5e-2


def test_bf16_weights_with_bf16_projections_train():
    net = Net().to(torch.bfloat16)
    opt = make(net, projection_dtype="bfloat16", basis_dtype="bfloat16", state_bits=16, projector="galore")
    start = loss(net)
    for step in range(10):
        set_grads(net, step)
        opt.step()
    assert loss(net) < 0.95 * start and all(p.dtype == torch.bfloat16 for p in net.parameters())
    assert opt.state[net.left]["basis"].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- GPU readiness
@pytest.mark.parametrize("bits", (16, 8, 4))
def test_a_low_bit_step_reads_the_host_once(bits, monkeypatch):
    """On meta tensors (the kernels run eagerly there): no host sync but the step's one read, state on the device."""
    from test_gpu_ready import CountSyncs

    monkeypatch.setattr(lowbit, "MIN_QUANTIZED", 1)
    monkeypatch.setattr(lowbit, "BLOCK", {8: 8, 4: 8})
    calls = []
    monkeypatch.setattr(step_module, "read_host", lambda t: calls.append(1) or [0.0] * t.numel())
    monkeypatch.setattr(rules, "_FUSED_DEVICES", rules._FUSED_DEVICES | {"meta"})
    left = nn.Parameter(torch.empty(8, 32, device="meta"))
    dense = nn.Parameter(torch.empty(16, 8, device="meta"))
    opt = so.SubspaceAdamW([{"params": [left], "rank": 4}, {"params": [dense]}], lr=1e-2, state_bits=bits,
                           update_gap=2, moments="rotate", projector="golore")
    with CountSyncs() as mode:
        for _ in range(3):
            for p in (left, dense):
                p.grad = torch.empty_like(p)
            opt.step()
    assert mode.syncs == 0 and len(calls) == 3
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            assert lowbit.bits_of(state[key]) == bits
            assert all(t.device.type == "meta" for t in state_tensors(state[key]))
