"""Equivalence with torch.optim, param groups, bad input, state accounting."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import subspace_optim as so
from subspace_optim import Projector, SubspaceAdamW, SubspaceSGD, register_projector, subspace_param_groups


class _Identity(Projector):
    """P = the first r coordinates. When the gradient lives in those coordinates, P Pᵀ G = G."""

    name = "test_identity"

    def refresh(self, grad, state, group, key):
        return torch.eye(grad.shape[0], group["rank"], device=grad.device), False


register_projector(_Identity())


@pytest.mark.parametrize("side", ["left", "right"])
def test_identity_projection_matches_torch_adamw(side):
    """Projection, back-projection, bias correction and decoupled weight decay agree with torch.optim.AdamW."""
    r = 3
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(8, 12, generator=gen)
    target = torch.randn(8, 12, generator=gen)
    mask = torch.zeros(8, 12)
    if side == "left":
        mask[:r] = 1  # gradient confined to the first r rows
    else:
        mask[:, :r] = 1
    results = []
    for make in (
        lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
        lambda p: SubspaceAdamW(p, lr=0.05, weight_decay=0.1, rank=r, side=side, projector="test_identity",
                                update_gap=4),
    ):
        w = nn.Parameter(w0.clone())
        opt = make([w])
        for _ in range(25):
            opt.zero_grad()
            (((w - target) * mask).square().sum()).backward()
            opt.step()
        results.append(w.detach())
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-6)


def test_full_rank_falls_back_to_dense_with_one_warning_and_matches_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    ref = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    ref.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="full rank") as record:
        opt = SubspaceAdamW(subspace_param_groups(model, rank=5), lr=1e-2)
    assert len(record) == 1
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    x = torch.randn(16, 6)
    for _ in range(10):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_sgd_without_projection_matches_torch_sgd():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5))
    w2 = nn.Parameter(w.detach().clone())
    opt, ref = SubspaceSGD([w], lr=0.1, momentum=0.9, nesterov=True), torch.optim.SGD([w2], lr=0.1, momentum=0.9,
                                                                                     nesterov=True)
    for _ in range(10):
        for p, o in ((w, opt), (w2, ref)):
            o.zero_grad()
            (p.square().sum() + p.sum()).backward()
            o.step()
    torch.testing.assert_close(w, w2)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.up_proj = nn.Linear(16, 40)
        self.norm = nn.LayerNorm(16)


class _LM(nn.Module):
    def __init__(self, tied=False):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(16, 50, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight


def test_param_groups_targets():
    model = _LM()
    dense, projected = subspace_param_groups(model, rank=4, update_gap=50)
    assert projected["rank"] == 4 and projected["update_gap"] == 50
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in projected["params"]) == [
        f"layers.{i}.{m}.weight" for i in range(2) for m in ("q_proj", "up_proj")
    ]
    assert len(dense["params"]) + len(projected["params"]) == len(list(model.parameters()))
    _, only_q = subspace_param_groups(model, rank=4, target=["q_proj"])
    assert len(only_q["params"]) == 2
    _, regex = subspace_param_groups(model, rank=4, target=r"layers\.0\..*")
    assert len(regex["params"]) == 2
    _, with_emb = subspace_param_groups(_LM(tied=True), rank=4, include_embeddings=True)
    assert len(with_emb["params"]) == 5  # 4 linear + the tied embedding/lm_head counted once
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        subspace_param_groups(model, rank=4, target=["nothing_like_this"])


def test_per_group_overrides():
    model = _LM()
    groups = [
        {"params": [model.layers[0].up_proj.weight], "rank": 2, "projector": "golore", "update_gap": 3},
        {"params": [model.layers[1].up_proj.weight], "rank": 5, "projector": "galore", "scale": 0.5},
        {"params": [model.embed.weight], "lr": 0.0},
    ]
    opt = SubspaceAdamW(groups, lr=1e-2)
    x = torch.randint(0, 50, (4, 7))
    emb_before = model.embed.weight.detach().clone()
    for _ in range(4):
        opt.zero_grad()
        h = model.embed(x)
        (model.layers[0].up_proj(h).square().mean() + model.layers[1].up_proj(h).square().mean()).backward()
        opt.step()
    s0, s1 = opt.state[model.layers[0].up_proj.weight], opt.state[model.layers[1].up_proj.weight]
    assert s0["basis"].shape == (16, 2) and s0["exp_avg"].shape == (2, 40) and s0["refreshes"] == 2
    assert s1["basis"].shape == (16, 5) and s1["refreshes"] == 1 and not s1["random_basis"]
    assert torch.equal(model.embed.weight, emb_before)


def test_state_bytes_equal_the_analytic_minimum():
    m, n, r = 40, 16, 4  # right-projected: basis n x r, moments r x m
    w = nn.Parameter(torch.randn(m, n))
    b = nn.Parameter(torch.randn(m))
    opt = SubspaceAdamW([{"params": [w], "rank": r}, {"params": [b]}], lr=1e-3, projector="golore")
    w.grad, b.grad = torch.randn(m, n), torch.randn(m)
    opt.step()
    # Adam moments r x m for the weight, 2 x m for the bias, the basis n x r, and one float32 step per parameter.
    assert opt.state_bytes() == 4 * (2 * r * m + n * r + 2 * m + 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": 2, "update_gap": 0}, "update_gap"),
        ({"rank": 2, "projector": "svd"}, "projector.*galore"),
        ({"rank": 2, "moments": "carry"}, "moments.*project"),
        ({"rank": 2, "side": "up"}, "side"),
        ({"rank": 2, "svd": "fast"}, "svd"),
        ({"rank": 2, "projector": "hybrid"}, "total_steps"),
        ({"rank": 2, "projector": "hybrid", "total_steps": 10, "random_fraction": 1.5}, "random_fraction"),
        ({"rank": 2, "lr": -1.0}, "lr"),
        ({"rank": 2, "betas": (0.9, 1.0)}, "betas"),
        ({"rank": 2, "pca_rule": "rmsprop"}, "pca_rule"),
        ({"rank": 2, "projector": "auto", "auto_threshold": float("nan")}, "auto_threshold.*finite number"),
        ({"rank": 2, "projector": "auto", "auto_threshold": True}, "auto_threshold.*finite number"),
        ({"rank": 2, "projector": "auto", "auto_threshold": "2"}, "auto_threshold.*finite number"),
        ({"rank": 2, "nonfinite": "ignore"}, "nonfinite"),
        ({"rank": 2, "grad_comm": "lowrank"}, "grad_comm.*subspace"),
        ({"rank": 2, "accumulation_steps": 2}, "accumulation_steps=2 needs layerwise=True"),
    ],
)
def test_bad_settings_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubspaceAdamW([nn.Parameter(torch.randn(6, 8))], **kwargs)


def test_subspace_gradient_reduction_needs_a_process_group_and_its_own_ddp(monkeypatch):
    """grad_comm="subspace" outside torchrun, subspace_ddp around an optimizer that reduces nothing itself, and a
    name-keyed state in an optimizer without names: each one clear error."""
    import torch.distributed as dist

    from subspace_optim import subspace_ddp

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="initialized process group.*torchrun"):
        SubspaceAdamW([nn.Parameter(torch.randn(6, 8))], rank=2, grad_comm="subspace")
    w = nn.Parameter(torch.randn(6, 8))
    opt = SubspaceAdamW([w], rank=2, projector="golore")
    with pytest.raises(ValueError, match="grad_comm='subspace'"):
        subspace_ddp(nn.Linear(8, 6), opt)
    with pytest.raises(RuntimeError, match="keys its random bases by name.*named parameters"):
        opt._spaces[w].key({"basis_key": 1}, 0)


def test_unknown_keyword_and_rank_with_groups():
    with pytest.raises(TypeError, match="momentum"):
        SubspaceAdamW([nn.Parameter(torch.randn(3, 3))], momentum=0.9)
    with pytest.raises(ValueError, match="param groups"):
        SubspaceAdamW([{"params": [nn.Parameter(torch.randn(3, 3))]}], rank=2)


def test_sparse_gradient_is_a_clear_error():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = SubspaceAdamW([{"params": emb.parameters(), "rank": 2}], lr=1e-2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_nonfinite_raise_mode():
    w = nn.Parameter(torch.randn(6, 8))
    opt = SubspaceAdamW([w], lr=1e-2, rank=2, nonfinite="raise")
    w.grad = torch.full((6, 8), float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()


def test_loading_a_mismatched_checkpoint_is_a_clear_error():
    w = nn.Parameter(torch.randn(6, 8))
    opt = SubspaceAdamW([w], lr=1e-2, rank=2, projector="galore")
    w.grad = torch.randn(6, 8)
    opt.step()
    other = SubspaceAdamW([w], lr=1e-2, rank=2)
    sd = opt.state_dict()
    sd["param_groups"][0]["rank"] = 3
    with pytest.raises(ValueError, match="another rank"):
        other.load_state_dict(sd)


def test_public_names():
    for name in ("SubspaceAdamW", "SubspaceSGD", "SubspaceAdafactor", "SubspaceLion", "GaLoreAdamW", "GoLoreAdamW",
                 "GoLoreSGD", "OnlineSubspaceAdamW", "subspace_param_groups"):
        assert hasattr(so, name)
    w = nn.Parameter(torch.randn(6, 8))
    assert so.GaLoreAdamW([w], rank=2).defaults["projector"] == "galore"
    assert so.GoLoreSGD([w], rank=2).defaults["dampening"] == 0.9
    assert so.GoLoreAdamW([w], rank=2, update_gap=7).defaults["update_gap"] == 7


def test_lr_scheduler_counts_one_step_in_layerwise_mode():
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 4))
    opt = SubspaceAdamW(subspace_param_groups(model, rank=2), lr=1.0, layerwise=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        for _ in range(3):
            model(torch.randn(5, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    assert all(g["lr"] == 0.125 for g in opt.param_groups)


@pytest.mark.parametrize("projector", ["galore", "golore", "online_pca", "auto"])
def test_float64_weights_keep_float64_precision(projector):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10, dtype=torch.float64))
    opt = SubspaceAdamW([w], lr=1e-2, rank=2, update_gap=2, projector=projector)
    start = float(w.detach().square().sum())
    for _ in range(5):
        opt.zero_grad()
        (w.square().sum()).backward()
        opt.step()
    assert w.dtype == torch.float64 and opt.state[w]["exp_avg"].dtype == torch.float64
    assert torch.isfinite(w).all() and w.square().sum() < start


def test_sparse_gradient_in_layerwise_mode_is_a_clear_error():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = SubspaceAdamW([{"params": emb.parameters(), "rank": 2}], lr=1e-2, layerwise=True)  # noqa: F841 (kept)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        emb(torch.tensor([1, 2])).sum().backward()
