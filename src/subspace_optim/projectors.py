"""Projectors: how each parameter's subspace is chosen.

Every projected weight is handled as a matrix G (d x D) oriented so that the subspace lives in the smaller
dimension d (the optimizer transposes right-projected weights). A basis P (d x r, float32) gives the low-rank
gradient R = Pᵀ G (r x D); an update U (r x D) goes back as P U. Optimizer state lives in R's space.

A projector is a stateless object; the per-parameter state (basis, counters, statistics) is plain tensors and
numbers inside the optimizer's state dict, so ``torch.load(weights_only=True)`` and device moves just work.

- ``galore``: top-r left singular vectors of the current gradient (GaLore, Zhao et al. 2024).
- ``golore``: Haar-uniform P on the Stiefel manifold (GoLore, He et al. 2024); E[P Pᵀ] = (r/d) I, so the
  projected gradient is unbiased up to the factor r/d, which is what makes GoLore converge under noise.
  P depends only on (seed, parameter index, refresh count): it is regenerated, never saved.
- ``hybrid``: GoLore@x% — GaLore for the first (1 - x) of ``total_steps``, GoLore after (at a refresh, for good).
- ``online_pca``: Online Subspace Descent (Liang et al. 2024): P starts from the SVD of the first gradient and
  takes one step of its own optimizer on L(P) = ‖P Pᵀ Ĝ - Ĝ‖² + λ‖PᵀP - I‖², Ĝ = G/‖G‖, after every update.
- ``auto``: GaLore per parameter until its SVD subspace captures measurably less of the expected gradient than a
  random subspace would (both estimated from cross terms of a period's gradients, where noise cancels); then
  GoLore, for good.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .distributed import LOCAL, Layout, local
from .rules import get_rule, scalar

_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 mixing), so nearby keys give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 29
    return x >> 1


def haar_stiefel(d: int, r: int, seed: int, device=None) -> Tensor:
    """A d x r matrix with orthonormal columns, uniform (Haar) on the Stiefel manifold.

    QR of a Gaussian matrix with the signs of diag(R) folded into Q (Mezzadri 2007); without the sign fix the
    distribution is not uniform. The Gaussian is drawn on the CPU from ``seed``, so the same key gives the
    same basis on every device and after every reload.
    """
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(d, r, generator=gen, dtype=torch.float32).to(device)
    q, rr = torch.linalg.qr(z)
    signs = torch.sign(torch.diagonal(rr))
    signs = torch.where(signs == 0, 1.0, signs)  # not a masked assignment: that would sync a GPU
    return (q * signs).contiguous()  # row-major like a loaded checkpoint's copy, so that resumed runs round alike


def top_singular(grad: Tensor, r: int, method: str = "exact", seed: int = 0) -> Tensor:
    """The top-r left singular vectors of ``grad`` (d x D), d x r, in float32 (float64 for float64 input).

    The SVD runs on the matrix as it lies in memory: for the transposed view of a right-projected weight's
    gradient that is G as the weight stores it (m x n), whose right singular vectors are returned. The subspace is
    the same either way; the singular vectors' signs, which decide how moments kept across a refresh
    (``moments="keep"``) line up, are then those of galore-torch, which takes the SVD of G as stored.
    ``randomized`` is Halko et al.'s range finder (``torch.svd_lowrank``, 10 oversamples, 2 power iterations),
    drawn from a private generator so that it neither reads nor advances the global RNG.
    """
    g = grad.to(torch.promote_types(grad.dtype, torch.float32))
    stored = g.T if not g.is_contiguous() and g.T.is_contiguous() else g
    if method == "exact":
        u, _, vh = torch.linalg.svd(stored, full_matrices=False)
        return (u[:, :r] if stored is g else vh[:r].T).contiguous()
    devices = [g.device] if g.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, _, v = torch.svd_lowrank(stored, q=min(r + 10, *g.shape), niter=2)
    return (u[:, :r] if stored is g else v[:, :r]).contiguous()


class Projector:
    """Chooses the basis of one parameter. Stateless: per-parameter state is passed in.

    At a due refresh, an ``is_random`` projector gets a Haar basis regenerated from the parameter's key (on every
    rank, never saved); otherwise ``refresh`` computes the new basis from the whole oriented gradient (on one owner
    rank when distributed) and ``settle`` may still revise it on every rank, returning (basis, random) where
    ``random`` may be a 0-d bool tensor, read with the step's one host sync. ``commit`` records a refresh in the
    state once the step is known to be taken; ``track`` sees every taken step and may return a new basis (online
    PCA). ``needs_full_gradient`` tells layer-wise accumulation whether the full gradient must be kept for this
    step (it is, for data-dependent refreshes). ``random = True`` marks a projector whose every basis is random:
    its bases are never saved (every other projector saves its current basis, so that the saved state's keys do
    not depend on when a switch happened, as torch.distributed.checkpoint's templates need).
    """

    name = ""
    random = False
    #: whether ``track`` reads the full gradient (kept until the update only for such projectors)
    tracks_gradient = False

    def refresh_due(self, state: dict, group: dict) -> bool:
        return state["proj_step"] % group["update_gap"] == 0

    def needs_full_gradient(self, state: dict, group: dict) -> bool:
        return self.refresh_due(state, group) and not self.is_random(state, group)

    def is_random(self, state: dict, group: dict) -> bool:
        return self.random

    def refresh(self, grad: Tensor, state: dict, group: dict, key: int) -> tuple[Tensor, bool]:
        raise NotImplementedError

    def settle(self, basis: Tensor, state: dict, group: dict, key: int, layout: Layout = LOCAL):
        return basis, False

    def commit(self, state: dict, group: dict, random: bool) -> None:
        pass

    def init_state(self, state: dict, group: dict, lowrank: Tensor, layout: Layout = LOCAL) -> None:
        """Create the state ``track`` will keep, as it is before any step (for checkpoint templates)."""

    def track(self, grad: Tensor, lowrank: Tensor, state: dict, group: dict, layout: Layout = LOCAL):
        return None


class GaLore(Projector):
    """Top-r singular subspace of the current stochastic gradient (exact or randomized SVD)."""

    name = "galore"

    def refresh(self, grad, state, group, key):
        return top_singular(grad, group["rank"], group["svd"], key), False


class GoLore(Projector):
    """Random subspace, Haar-uniform on the Stiefel manifold; regenerated from its key (by the optimizer)."""

    name = "golore"
    random = True

    def is_random(self, state, group):
        return True


class Switching(Projector):
    """GaLore until it switches at a refresh, GoLore from then on, for good: the switch is recorded in
    ``state["switched_at"]`` (the step), so neither a checkpoint nor a changed setting (a longer run) undoes it.
    ``switches`` is a decision known on the host before the gradient (hybrid's step count); a data-dependent one
    (auto's) is taken in ``settle``, on the device."""

    def switches(self, state: dict, group: dict) -> bool:
        return False

    def is_random(self, state, group):
        return state.get("switched_at", -1) >= 0 or self.switches(state, group)

    def refresh(self, grad, state, group, key):
        return GALORE.refresh(grad, state, group, key)

    def commit(self, state, group, random):
        if random and state.get("switched_at", -1) < 0:
            state["switched_at"] = state["proj_step"]


class Hybrid(Switching):
    """GoLore@x%: GaLore until (1 - random_fraction) * total_steps, then GoLore from the next refresh on.

    Extending a run (a larger ``total_steps``) moves a switch not yet made to the new share; one already made
    stays made."""

    name = "hybrid"

    @staticmethod
    def switch_step(group: dict) -> float:
        return (1.0 - group["random_fraction"]) * group["total_steps"]

    def switches(self, state, group):
        return state["proj_step"] >= self.switch_step(group)


class OnlinePCA(Projector):
    """Online Subspace Descent: P learned by one optimizer step per update on the online-PCA loss."""

    name = "online_pca"
    tracks_gradient = True

    def refresh_due(self, state, group):
        return state["refreshes"] == 0

    def needs_full_gradient(self, state, group):
        return True

    def refresh(self, grad, state, group, key):
        return GALORE.refresh(grad, state, group, key)

    @staticmethod
    def pca_gradient(grad: Tensor, lowrank: Tensor, basis: Tensor, pca_lambda: float = 0.0,
                     layout: Layout = LOCAL) -> Tensor:
        """∇_P of ‖P Pᵀ Ĝ - Ĝ‖² + λ‖PᵀP - I‖², Ĝ = G/‖G‖, reusing R = Pᵀ G from the step.

        With A = Pᵀ Ĝ and E = P A - Ĝ, the gradient 2(E Aᵀ + Ĝ Eᵀ P) simplifies (Eᵀ P = Aᵀ(PᵀP - I)) to
        2 (P (A Aᵀ) + Ĝ Aᵀ (PᵀP - 2I)): one d x D x r product (G Rᵀ) instead of the six of autograd. For a
        sharded G the partial sums ‖G‖², G Rᵀ (d x r) and, with split columns, R Rᵀ take one all-reduce.
        """
        wide = grad.to(lowrank.dtype)
        partial = [wide.square().sum().reshape(1), layout.embed_rows(wide @ lowrank.T)]
        gram_r = lowrank @ lowrank.T
        # R itself is split by columns: its Gram matrix is a partial sum over those shards only (R is replicated
        # over the shards of d); in the same all-reduce where they are all the shards
        if layout.cols.split and not layout.rows.split:
            partial.append(gram_r)
        summed = layout.sum_(partial)
        sq, grad_r = summed[0], summed[1]
        if layout.cols.split:
            gram_r = summed[2] if not layout.rows.split else layout.sum_([gram_r], over_cols=True)[0]
        inv_sq = 1.0 / sq.clamp_min(torch.finfo(torch.float32).tiny)
        gram = basis.T @ basis
        eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
        pca = 2 * inv_sq * (basis @ gram_r + grad_r @ (gram - 2 * eye))
        if pca_lambda:
            pca += 4 * pca_lambda * basis @ (gram - eye)
        return pca

    @staticmethod
    def _step_basis(basis: Tensor, pca_grad: Tensor, state: dict, group: dict, lr: float) -> Tensor:
        rule = get_rule(group["pca_rule"])
        basis = basis.clone()
        rule([basis], [pca_grad], [state.setdefault("pca", {})], rule.defaults, lr=lr)
        return basis

    def init_state(self, state, group, lowrank, layout=LOCAL):
        basis = _learned(state["basis"])
        self._step_basis(basis, torch.zeros_like(basis), state, group, 0.0)
        reset_steps(state["pca"])

    def track(self, grad, lowrank, state, group, layout=LOCAL):
        if state["proj_step"] == 0:
            # P was just started as the SVD of this very gradient, where the PCA loss is at its minimum: its
            # gradient is rounding noise, which Adam would scale up to a full pca_lr step in a random direction
            # (1e-7 perturbations of G grew to 6e-2 in W after 6 steps). The paper's code also learns P from the
            # second gradient on; this step only creates P's optimizer state, as a checkpoint template has it.
            if "pca" not in state:
                self.init_state(state, group, lowrank, layout)
            return None
        basis = _learned(state["basis"])
        pca_grad = self.pca_gradient(grad, lowrank, basis, group["pca_lambda"], layout)
        # The projection's step size follows the model's schedule, as in the paper's code: lr_P * lr / lr_0.
        lr = group["pca_lr"] if group["pca_lr"] is not None else 1.0 / group["update_gap"]
        initial_lr = group.get("initial_lr")
        if isinstance(initial_lr, Tensor):  # a tensor lr's schedule: no host sync; lr_0 = 0 keeps P still
            lr = lr * scalar(group["lr"]) / scalar(initial_lr).clamp_min(torch.finfo(initial_lr.dtype).tiny)
        elif initial_lr:
            lr *= scalar(group["lr"]) / initial_lr
        return self._step_basis(basis, pca_grad, state, group, lr)


def _learned(basis: Tensor) -> Tensor:
    """A learned basis as it is trained: in float32 (or float64), whatever dtype it is held in (basis_dtype)."""
    return basis.to(torch.promote_types(basis.dtype, torch.float32))


def reset_steps(state: dict) -> None:
    """Set a rule's step counter back to 0 (a tensor in place), so the next step is its first."""
    if isinstance(state.get("step"), Tensor):
        state["step"].zero_()
    elif "step" in state:
        state["step"] = 0


class Auto(Switching):
    """GaLore that switches a parameter to GoLore once its SVD subspace no longer captures more of the expected
    gradient than a random subspace would.

    GoLore's argument (He et al. 2024): a Haar subspace captures E‖Pᵀ∇f‖² = (r/d)‖∇f‖² of the expected gradient
    ∇f = E[G], whatever the noise; an SVD subspace of noisy gradients can capture far less (it follows the noise)
    or far more (it follows the signal). Over each refresh period, on the steps after the refresh (whose SVD was
    fitted to that step's own noise), both sides are estimated without bias from cross terms of different steps,
    in which zero-mean noise cancels however large or low-rank it is:

    - SVD side: with R_t = Pᵀ G_t, Σ_{s<t} ⟨R_s, R_t⟩ / C(k, 2) estimates ‖Pᵀ∇f‖²;
    - random side: the same with Z_t = Sᵀ G_t for a Gaussian sketch S (d x s, entries N(0, 1/s), s = min(d, 16),
      drawn per period) estimates ‖∇f‖², scaled by r/d.

    Each step adds D_t = (r/d)⟨Z_t, ΣZ_{<t}⟩ - ⟨R_t, ΣR_{<t}⟩, whose mean is (t - 1) δ with δ = "random minus
    SVD", so ΣD_t estimates C(k, 2) δ. Its noise terms are martingale differences, so the variance of ΣD_t is
    estimated by the residual sum of squares of D_t about the fitted trend (t - 1) δ̂ (ΣD_t², ΣD_t (t - 1) and
    the known Σ(t - 1)² suffice; with a raw ΣD_t² a strong δ would inflate its own noise estimate and cap the
    statistic at about sqrt(3k/4); below 8 steps, whose residual has too few degrees of freedom, the raw ΣD_t²
    is kept: short periods switch only on overwhelming evidence). At the next refresh the parameter switches, for
    good, when ΣD_t > z sqrt(RSS k/(k - 1)) with z = ``auto_threshold`` (default
    2; a negative z switches unless the SVD subspace is measurably better): the SVD subspace is measurably worse
    than a random one. Merely noisy gradients (both sides small, or the SVD side ahead) keep GaLore: noise alone is
    no reason to give up the SVD. ``state["switched_at"]`` records the
    step. The decision is a device tensor (``settle``) read with the step's one host sync. Until the switch it
    costs one s x D projection per step (under FSDP2 an all-reduce of s x D numbers for a row-sharded left
    projection, of two numbers for a column-sharded right one) and
    r x D + s x D + d x s numbers of state; after it, nothing. A period needs at least 2 steps after its
    refresh (update_gap >= 3) to decide.
    """

    name = "auto"
    tracks_gradient = True
    SKETCH = 16  # columns of the sketch (at most d): its estimate of ‖∇f‖² has a relative spread of about sqrt(2/s)
    DEFAULT_Z = 2.0
    DETRENDED_FROM = 8  # steps after the refresh from which the noise is estimated about the trend
    _SKETCH_STREAM = 0x5EED

    def needs_full_gradient(self, state, group):
        return state.get("switched_at", -1) < 0 or super().needs_full_gradient(state, group)

    @classmethod
    def sketch(cls, d: int, key: int, device=None) -> Tensor:
        """The period's Gaussian sketch, d x min(d, SKETCH), E[S Sᵀ] = I; drawn on the CPU generator (every rank and
        device draw the same) from the refresh's key."""
        s = min(d, cls.SKETCH)
        gen = torch.Generator().manual_seed(derive_seed(key, cls._SKETCH_STREAM))
        return (torch.randn(d, s, generator=gen) / math.sqrt(s)).to(device)

    def settle(self, basis, state, group, key, layout=LOCAL):
        k = state.get("auto_count", 0)
        noisy = None
        if k >= 2:
            total, squares, trend = state["auto_test"].unbind()
            if k >= self.DETRENDED_FROM:  # the residual about the trend (with fewer steps it has too few degrees
                # of freedom, and its heavy tails would make false switches common: keep the conservative ΣD_t²)
                weights = (k - 1) * k * (2 * k - 1) / 6  # Σ(t - 1)²
                squares = (squares - trend.square() / weights).clamp_min(0) * (k / (k - 1))
            z = self.DEFAULT_Z if group["auto_threshold"] is None else group["auto_threshold"]
            noisy = ((total > z * squares.sqrt()) & (squares > 0)).reshape(())
        # the next period's sketch (a skipped step redoes this refresh: the same key draws the same sketch)
        state["auto_sketch"] = self.sketch(basis.shape[0], key, basis.device)
        if noisy is None:
            return basis, False
        random = haar_stiefel(basis.shape[0], group["rank"], key, basis.device).to(basis.dtype)
        return torch.where(noisy, random, basis), noisy

    def commit(self, state, group, random):
        super().commit(state, group, random)
        for legacy in ("snr_sum", "snr_sq", "snr_count"):  # the statistic of earlier versions
            state.pop(legacy, None)
        if "auto_sum" in state:
            for name in ("auto_sum", "auto_sketch_sum", "auto_test"):
                local(state[name]).zero_()
            state["auto_count"] = 0

    def init_state(self, state, group, lowrank, layout=LOCAL):
        state.setdefault("switched_at", -1)
        d = state["basis"].shape[0]
        s = min(d, self.SKETCH)
        state.setdefault("auto_sketch", torch.zeros(d, s, device=lowrank.device))
        # ΣR_t (r x D) and ΣZ_t (s x D) shard like R; (ΣD_t, ΣD_t², ΣD_t (t - 1)) are whole on every rank
        state["auto_sum"] = layout.wrap(torch.zeros_like(lowrank, dtype=torch.float32))
        state["auto_sketch_sum"] = layout.wrap(torch.zeros(s, lowrank.shape[-1], device=lowrank.device))
        state["auto_test"] = torch.zeros(3, device=lowrank.device)
        state["auto_count"] = 0

    def track(self, grad, lowrank, state, group, layout=LOCAL):
        if state.get("switched_at", -1) >= 0:
            return None
        if "auto_sum" not in state:
            self.init_state(state, group, lowrank, layout)
        if state["proj_step"] % group["update_gap"] == 0:
            return None  # the refresh step: its SVD was fitted to this gradient's own noise
        sums, sketch_sums = local(state["auto_sum"]), local(state["auto_sketch_sum"])
        sketched = layout.project(state["auto_sketch"], grad)
        lowrank = lowrank.float()
        cross = torch.stack([(sketched * sketch_sums).sum(), (lowrank * sums).sum()])
        if layout.cols.split:  # partial sums over the column shards
            (cross,) = layout.sum_([cross], over_cols=True)
        diff = group["rank"] / state["auto_sketch"].shape[0] * cross[0] - cross[1]
        state["auto_test"].add_(torch.stack([diff, diff.square(), diff * state["auto_count"]]))
        sums.add_(lowrank)
        sketch_sums.add_(sketched)
        state["auto_count"] += 1
        return None


GALORE, GOLORE = GaLore(), GoLore()
PROJECTORS: dict[str, Projector] = {p.name: p for p in (GALORE, GOLORE, Hybrid(), OnlinePCA(), Auto())}


def register_projector(projector: Projector) -> None:
    """Make a custom projector available by its ``name`` (e.g. for research variants or tests)."""
    PROJECTORS[projector.name] = projector


def get_projector(name: str) -> Projector:
    if name not in PROJECTORS:
        raise ValueError(f"Unknown projector {name!r}; choose one of {sorted(PROJECTORS)}")
    return PROJECTORS[name]
