"""galore-torch's AdamW arithmetic (``arithmetic="galore-torch"``): our GaLore reproduces galore-torch's GaLoreAdamW."""

from __future__ import annotations

import math

import pytest
import torch

from subspace_optim import SubspaceAdamW
from subspace_optim.rules import adamw

SHAPES = [(24, 16), (16, 40), (32, 32)]  # galore-torch projects the right side, the left side, the right side


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]
    dense = [torch.nn.Parameter(torch.randn(n, generator=gen) * 0.1) for n in (16, 40)]
    return weights, dense


def _run(make, steps=7, seed=0):
    weights, dense = _params()
    opt = make(weights, dense)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in weights + dense:
            p.grad = torch.randn(p.shape, generator=gen) * 0.01
        opt.step()
    return [p.detach() for p in weights + dense]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_our_galore_with_galore_torch_arithmetic_reproduces_galore_adamw(weight_decay):
    galore_torch = pytest.importorskip("galore_torch")
    settings = dict(lr=1e-2, eps=1e-6, weight_decay=weight_decay)
    reference = _run(lambda w, d: galore_torch.GaLoreAdamW(
        [{"params": d}, {"params": w, "rank": 4, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"}],
        no_deprecation_warning=True, **settings))
    ours = _run(lambda w, d: SubspaceAdamW(
        [{"params": d}, {"params": w, "rank": 4}], projector="galore", update_gap=2, scale=0.25, moments="keep",
        arithmetic="galore-torch", **settings))
    torch_arithmetic = _run(lambda w, d: SubspaceAdamW(
        [{"params": d}, {"params": w, "rank": 4}], projector="galore", update_gap=2, scale=0.25, moments="keep",
        **settings))
    gap = max((a - b).abs().max().item() for a, b in zip(ours, reference))
    assert gap < 1e-6  # 4 SVD refreshes in 7 steps; weights move about 1e-2 each step
    # torch's arithmetic (eps after the bias correction) is measurably another trajectory
    assert max((a - b).abs().max().item() for a, b in zip(torch_arithmetic, reference)) > 100 * max(gap, 1e-9)


def test_the_arithmetic_is_an_effective_eps_of_eps_over_sqrt_bias_correction():
    """One step of each: galore-torch's U equals torch's U with eps / sqrt(1 - b2^t) (31.6x at t = 1)."""
    g = torch.tensor([1e-7, 1e-4, 1.0])
    out = {}
    for arithmetic, eps in (("galore-torch", 1e-6), ("torch", 1e-6 / math.sqrt(1 - 0.999))):
        p, state = torch.zeros(3), {}
        adamw([p], [g], [state], lr=1.0, weight_decay=0.0, betas=(0.9, 0.999), eps=eps, arithmetic=arithmetic)
        out[arithmetic] = p
    torch.testing.assert_close(out["galore-torch"], out["torch"], rtol=1e-6, atol=0)
    assert out["torch"][0].abs() < 0.01 * out["torch"][2].abs()  # a tiny gradient gets a tiny step, not a full one


def test_an_unknown_arithmetic_is_refused():
    with pytest.raises(ValueError, match="arithmetic.*torch, galore-torch"):
        SubspaceAdamW([torch.nn.Parameter(torch.zeros(2))], arithmetic="bnb")


def test_the_harness_flag_reaches_the_optimizer_and_is_refused_where_it_cannot_apply():
    from subspace_optim.train.config import TrainConfig, UsageError, resolve
    from subspace_optim.train.models import build_causal_lm, causal_lm_config
    from subspace_optim.train.optimizers import build_optimizer

    model = build_causal_lm(causal_lm_config("llama-tiny", 64, None, None))
    cfg = resolve(TrainConfig(optimizer="galore", adam_arithmetic="galore-torch", steps=4))
    groups = build_optimizer(cfg, model).optimizer.param_groups
    assert all(g["arithmetic"] == "galore-torch" and g["eps"] == 1e-6 for g in groups)
    for optimizer, rule in (("adamw", "adamw"), ("galore", "sgd")):
        with pytest.raises(UsageError, match="--adam-arithmetic"):
            build_optimizer(resolve(TrainConfig(optimizer=optimizer, rule=rule, adam_arithmetic="galore-torch",
                                                steps=4)), model)
