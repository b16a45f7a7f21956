"""Mathematical properties of the projectors."""

from __future__ import annotations

import io

import pytest
import torch

from subspace_optim import SubspaceAdamW, SubspaceSGD, haar_stiefel, top_singular
from subspace_optim.projectors import derive_seed


def _orthonormal(p):
    torch.testing.assert_close(p.T @ p, torch.eye(p.shape[1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("d,r", [(8, 2), (64, 16), (10, 10)])
def test_haar_stiefel_orthonormal_and_deterministic(d, r):
    p = haar_stiefel(d, r, seed=3)
    assert p.shape == (d, r) and p.dtype == torch.float32
    _orthonormal(p)
    assert torch.equal(p, haar_stiefel(d, r, seed=3))
    assert not torch.equal(p, haar_stiefel(d, r, seed=4))


def test_haar_stiefel_expectations():
    """E[P Pᵀ] = (r/d) I and E‖P Pᵀ G - G‖² = (1 - r/d)‖G‖² (GoLore, Lemma 1); E[P] = 0 needs the sign fix."""
    d, r, n = 8, 3, 6000
    g = torch.randn(d, 5, generator=torch.Generator().manual_seed(0))
    samples = torch.stack([haar_stiefel(d, r, seed=derive_seed(1, i)) for i in range(n)])
    proj = samples @ samples.transpose(1, 2)
    torch.testing.assert_close(proj.mean(0), (r / d) * torch.eye(d), atol=0.02, rtol=0)
    residual = (proj @ g - g).square().sum((1, 2)).mean()
    assert abs(residual / g.square().sum() - (1 - r / d)) < 0.02
    # Without folding sign(diag R) into Q, QR's convention biases the first column: E[P] != 0.
    assert samples.mean(0).abs().max() < 0.04


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_top_singular_spans_the_top_subspace(method):
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(60, 40, generator=gen))
    s = torch.tensor([10.0, 8.0, 6.0, 4.0] + [0.1] * 36)
    g = u @ torch.diag(s) @ v.T
    state_before = torch.get_rng_state()
    p = top_singular(g, 4, method, seed=5)
    assert torch.equal(state_before, torch.get_rng_state())  # the global RNG is neither read nor advanced
    _orthonormal(p)
    top = u[:, :4]
    torch.testing.assert_close(p @ p.T, top @ top.T, atol=1e-3, rtol=0)


def _train(opt, weight, steps, start=0):
    gen = torch.Generator().manual_seed(start)
    bases = []
    for _ in range(steps):
        weight.grad = torch.randn(weight.shape, generator=gen)
        opt.step()
        bases.append(opt.state[weight]["basis"].clone())
    return bases


@pytest.mark.parametrize("projector", ["galore", "golore"])
def test_refresh_cadence(projector):
    weight = torch.nn.Parameter(torch.zeros(12, 20))
    opt = SubspaceSGD([weight], lr=0.1, rank=3, update_gap=5, projector=projector)
    bases = _train(opt, weight, 16)
    changed = [t for t in range(1, 16) if not torch.equal(bases[t], bases[t - 1])]
    assert changed == [5, 10, 15]
    assert opt.state[weight]["refreshes"] == 4


def test_golore_basis_is_regenerated_not_saved():
    weight = torch.nn.Parameter(torch.zeros(12, 20))
    make = lambda: SubspaceAdamW([weight], lr=0.1, rank=3, update_gap=4, projector="golore", seed=11)  # noqa: E731
    opt = make()
    _train(opt, weight, 6)
    saved = opt.state_dict()
    assert "basis" not in saved["state"][0]
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    opt2 = make()
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    regenerated = opt2._basis(weight, opt2.state[weight], opt2.param_groups[0])
    assert torch.equal(regenerated, opt.state[weight]["basis"])
    # Different seeds and different parameters get different subspaces.
    other = SubspaceAdamW([weight], lr=0.1, rank=3, update_gap=4, projector="golore", seed=12)
    _train(other, weight, 1)
    assert not torch.equal(other.state[weight]["basis"], _train(make(), weight, 1)[0])


def test_hybrid_switches_at_the_right_refresh():
    """GoLore@40% of 20 steps with gap 3: SVD while step < 12, random from the first refresh at step >= 12."""
    weight = torch.nn.Parameter(torch.zeros(12, 20))
    opt = SubspaceAdamW(
        [weight], lr=0.1, rank=3, update_gap=3, projector="hybrid", total_steps=20, random_fraction=0.4
    )
    gen = torch.Generator().manual_seed(0)
    kinds = []
    for _ in range(20):
        weight.grad = torch.randn(weight.shape, generator=gen)
        opt.step()
        kinds.append(bool(opt.state[weight]["random_basis"]))
    assert kinds == [False] * 12 + [True] * 8


def test_online_pca_learns_the_dominant_subspace():
    """With a fixed gradient whose top subspace rotates away from the initial SVD, P follows it."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(24, 16, generator=gen))
    first = u @ torch.diag(torch.tensor([5.0, 4.0] + [0.01] * 14)) @ v.T
    later = u @ torch.diag(torch.tensor([0.01, 0.01, 5.0, 4.0] + [0.01] * 12)) @ v.T
    weight = torch.nn.Parameter(torch.zeros(16, 24))
    opt = SubspaceSGD([weight], lr=0.0, rank=2, projector="online_pca", pca_rule="sgd", pca_lr=0.2)
    weight.grad = first
    opt.step()
    target = u[:, 2:4] @ u[:, 2:4].T
    start_error = (opt.state[weight]["basis"] @ opt.state[weight]["basis"].T - target).norm()
    for _ in range(300):
        weight.grad = later
        opt.step()
    basis = opt.state[weight]["basis"]
    assert (basis @ torch.linalg.pinv(basis) - target).norm() < 0.05 < start_error


def test_moments_policies_on_a_refresh():
    """project: M <- P_newᵀ P_old M; rotate: also V <- (T∘T) V; keep: unchanged; reset: cleared."""
    results = {}
    for policy in ("keep", "project", "rotate", "reset"):
        weight = torch.nn.Parameter(torch.zeros(6, 20))
        opt = SubspaceAdamW([weight], lr=0.1, rank=2, update_gap=2, projector="golore", moments=policy)
        gen = torch.Generator().manual_seed(0)
        weight.grad = torch.randn(6, 20, generator=gen)
        opt.step()
        weight.grad = torch.randn(6, 20, generator=gen)
        opt.step()
        state = opt.state[weight]
        before = {k: state[k].clone() for k in ("basis", "exp_avg", "exp_avg_sq")}
        weight.grad = torch.zeros(6, 20)  # a zero gradient isolates the transport from the new update
        opt.step()
        results[policy] = (before, state)
    for policy, (before, state) in results.items():
        t = state["basis"].T @ before["basis"]
        m = state["exp_avg"] / 0.9
        if policy == "keep":
            torch.testing.assert_close(m, before["exp_avg"])
        elif policy in ("project", "rotate"):
            torch.testing.assert_close(m, t @ before["exp_avg"])
        if policy == "rotate":
            torch.testing.assert_close(state["exp_avg_sq"] / 0.999, t.square() @ before["exp_avg_sq"])
        if policy == "reset":
            assert state["step"] == 1 and torch.equal(state["exp_avg"], torch.zeros_like(m))


@pytest.mark.parametrize("pca_lambda", [0.0, 0.3])
def test_online_pca_gradient_matches_autograd(pca_lambda):
    from subspace_optim.projectors import OnlinePCA

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(12, 30, generator=gen, dtype=torch.float64)
    p = torch.randn(12, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    g_hat = g / g.norm()
    loss = (p @ (p.T @ g_hat) - g_hat).square().sum() + pca_lambda * (p.T @ p - torch.eye(4)).square().sum()
    (expected,) = torch.autograd.grad(loss, p)
    got = OnlinePCA.pca_gradient(g, p.detach().T @ g, p.detach(), pca_lambda)
    torch.testing.assert_close(got, expected)


def _weights_after_perturbed_steps(projector: str, perturb: float, **kw) -> torch.Tensor:
    """W after 6 steps (refresh gap 2) on gradients scaled entry-wise by (1 + perturb * noise)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 96) * 0.1)
    opt = SubspaceAdamW([weight], lr=1e-2, rank=8, update_gap=2, projector=projector, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        signal = torch.randn(64, 96, generator=gen) + torch.randn(64, 1, generator=gen) @ torch.randn(1, 96, generator=gen)
        weight.grad = signal * (1 + perturb * torch.randn(64, 96, generator=gen))
        opt.step()
    return weight.detach()


def test_online_pca_is_as_stable_as_galore_under_rounding_level_perturbations():
    """P starts as the SVD of the first gradient, where the PCA loss is at its minimum: its gradient there is
    rounding noise, and a step of Adam on it (a full pca_lr step in a random direction) turned 1e-7 perturbations
    of G into 7e-2 in W within 6 steps. P now learns from the second gradient on: within 10x GaLore's spread."""
    def spread(projector, **kw):
        a = _weights_after_perturbed_steps(projector, 0.0, **kw)
        return (a - _weights_after_perturbed_steps(projector, 1e-7, **kw)).abs().max().item()

    galore = spread("galore")
    assert 0 < spread("online_pca") < 10 * galore  # default: Adam on P at pca_lr = 1 / update_gap
    assert spread("online_pca", pca_rule="sgd") < 10 * galore


def test_online_pca_first_step_keeps_the_svd_basis():
    """The first step installs the SVD of its gradient and does not move it (P's own optimizer state is created,
    at step 0); the second step moves P."""
    weight = torch.nn.Parameter(torch.zeros(12, 20))
    opt = SubspaceAdamW([weight], lr=1e-2, rank=3, projector="online_pca")
    gen = torch.Generator().manual_seed(0)
    weight.grad = torch.randn(12, 20, generator=gen)
    opt.step()
    state = opt.state[weight]
    svd = torch.linalg.svd(weight.grad)[0][:, :3]
    torch.testing.assert_close(state["basis"] @ state["basis"].T, svd @ svd.T)
    assert int(state["pca"]["step"]) == 0
    before = state["basis"].clone()
    weight.grad = torch.randn(12, 20, generator=gen)
    opt.step()
    assert int(state["pca"]["step"]) == 1 and not torch.equal(before, state["basis"])
