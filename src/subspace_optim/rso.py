"""Randomized-subspace linear layers: RSO and GoLore's compressed-gradient form.

RSO ("A Memory Efficient Randomized Subspace Optimization Method for Training Large Language Models",
Chen, Zhang, Liu, Yuan, Wen, ICML 2025) trains, for each linear layer y = x Wᵀ, only B ∈ R^{out×r} in

    y = x Wᵀ + (x Pᵀ) Bᵀ,        W frozen, B = 0 at the start, P ∈ R^{r×in} random and fixed,

and every K steps folds the subproblem's solution into the weight: W ← W + B P, B ← 0, new P.
The backward pass needs z = x Pᵀ (tokens×r), never x (tokens×in):

    ∂L/∂B = (∂L/∂y)ᵀ z = (∂L/∂W_eff) Pᵀ,        ∂L/∂x = (∂L/∂y) W + ((∂L/∂y) B) P = (∂L/∂y) W_eff,

with W_eff = W + B P, so the saved activations of linear inputs shrink by in/r and no out×in weight gradient
is ever formed (a custom autograd Function, ``_SubspaceLinear``, makes this explicit).

P has orthonormal rows (P Pᵀ = I_r), drawn uniformly (Haar) on the Stiefel manifold by GoLore's own generator:
P = Qᵀ with Q the GoLore optimizer's basis for the same key. Then the layer *is* GoLore's compressed-gradient
("ReLoRA-like") form (He et al. 2024, "Subspace Optimization for Large Language Models with Convergence
Guarantees"): ∂L/∂B = G Q is GoLore's projected gradient R, and an inner step ΔB moves the weight by ΔB Qᵀ, so
any inner rule stepping B with lr·α takes GoLore's steps with scale α (moments reset at each merge; weight
decay, if any, decays B rather than W); the compressed gradient is formed directly, with no out×in gradient.
Orthonormal rows also make ‖B P‖ = ‖B‖, so the proximal term 1/(2η)‖B‖² of the subproblem penalises exactly the weight change. The paper's Gaussian
P ~ N(0, 1/r) has E[Pᵀ P] = I instead of (r/in)·I; the factor √(in/r) between the two only rescales B, which
is a change of step size (and of η), and a Gaussian P also weighs the directions of its own subspace
unequally (at r/in = 1/4 the eigenvalues of P Pᵀ spread over a 9× range).

P is never stored: it is regenerated from (seed, group index, outer count), and only these three integers
are in the state dict (buffer ``rso_key``), so a checkpoint restores it exactly.

Layers that read the same input (q/k/v of attention, gate/up of a gated MLP) share one projection module:
z = x Pᵀ is computed once, outside autograd (it is data for ∂L/∂B; ∂L/∂x goes through W_eff), and the same
tensor is saved by every member.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import replicated_like
from .groups import target_modules
from .projectors import derive_seed, haar_stiefel
from .rules import FIRST_MOMENTS

__all__ = [
    "RSOProjection",
    "RSOLinear",
    "RSOController",
    "apply_rso",
    "merge_rso",
    "rso_layers",
    "DEFAULT_SHARED_INPUTS",
]

# Sibling layers that read the same input tensor in common architectures (HF LLaMA/Mistral/Qwen, BERT).
# Grouping layers that do not in fact share an input costs nothing but the memory saving: the projection
# cache below recomputes z for a different input, and a shared P is still a valid random subspace.
DEFAULT_SHARED_INPUTS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
)


def random_rows(rank: int, dim: int, *, seed: int, index: int, count: int,
                dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """P ∈ R^{rank×dim} with Haar-random orthonormal rows, a function of (seed, index, count) only. The draw is
    GoLore's own (``haar_stiefel`` with a ``derive_seed`` key, made on the CPU), so for the same
    (seed, index, count) P = Qᵀ with Q the optimizer's basis."""
    return haar_stiefel(dim, rank, derive_seed(seed, index, count)).T.to(dtype=dtype, device=device)


class _SubspaceLinear(torch.autograd.Function):
    """y = x (W + B P)ᵀ + b, given z = x Pᵀ (computed without autograd by ``RSOProjection``).

    Saves z (tokens×r) and the parameters W, B, P — never x. Backward, with W_eff = W + B P recomputed:
        ∂L/∂x = g W_eff  (= g W + (g B) P),    ∂L/∂B = gᵀ z  (= (∂L/∂W_eff) Pᵀ),    ∂L/∂b = Σ g,
    and no ∂L/∂W (W is frozen, checked in ``RSOLinear.forward``).
    Why W_eff rather than two low-rank terms: per layer it costs 2·out·r·in flops, independent of the number
    of tokens b, where x Wᵀ + z Bᵀ and g W + (g B) P cost 2·b·r·(out + in) more; so a step costs
    4·b·out·in + 2·b·r·(out + in/group) + 4·out·r·in instead of nn.Linear's 6·b·out·in (GoLore's
    "compressed gradient": the r-dimensional gradient directly, no out×in gradient). The price is one
    transient out×in tensor per layer call, freed at once."""

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, weight: Tensor, B: Tensor, P: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(z, weight, B, P)
        return F.linear(x, torch.addmm(weight, B, P), bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        z, weight, B, P = ctx.saved_tensors
        need_x, _, _, need_B, _, need_bias = ctx.needs_input_grad
        grad_x = grad_y @ torch.addmm(weight, B, P) if need_x else None
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_B = g2.T @ z.reshape(-1, z.shape[-1]) if need_B else None
        grad_bias = g2.sum(0) if need_bias else None
        return grad_x, None, None, grad_B, None, grad_bias


def _regenerate_after_load(module: "RSOProjection", _incompatible_keys) -> None:
    module.regenerate()


class RSOProjection(nn.Module):
    """The random projection z = x Pᵀ of one input, shared by the layers of a group.

    State: ``rso_key`` = (seed, index, outer count), persistent; ``P`` (rank×in_features) is a
    non-persistent buffer regenerated from the key (on construction, ``advance`` and ``load_state_dict``).

    Within a forward pass the members call ``forward`` with the same tensor; the first call computes z
    and caches it (weak reference to x, its version counter and the grad mode as the key), the others get
    the same z, so a single tokens×r tensor is saved for the group. The cache is dropped after
    ``members`` calls, or replaced by the next different input."""

    def __init__(self, in_features: int, rank: int, *, seed: int, index: int, members: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.rank, self.members = in_features, rank, members
        self.register_buffer("rso_key", torch.tensor([seed, index, 0], dtype=torch.int64, device=device))
        self.register_buffer("P", torch.empty(rank, in_features, dtype=dtype, device=device), persistent=False)
        self._cache: tuple | None = None
        self.regenerate()
        # Loading a checkpoint restores rso_key; P must follow it. (A module-level function, not a
        # lambda, so that torch.save(model) can pickle the hook.)
        self.register_load_state_dict_post_hook(_regenerate_after_load)

    def __getstate__(self):
        # The forward cache holds a weak reference, which neither pickles nor deep-copies (and is transient).
        return {**super().__getstate__(), "_cache": None}

    @property
    def outer_step(self) -> int:
        """How many times this projection has been redrawn (merges since the start)."""
        return int(self.rso_key[2])

    @torch.no_grad()
    def regenerate(self) -> None:
        """P ← random_rows(seed, index, count) from ``rso_key``, in place (so stale autograd graphs that
        saved the old P fail loudly on their version counter)."""
        seed, index, count = (int(v) for v in self.rso_key.tolist())
        self.P.copy_(random_rows(self.rank, self.in_features, seed=seed, index=index, count=count))
        self._cache = None

    @torch.no_grad()
    def advance(self) -> None:
        """Next outer iteration: count += 1, new P."""
        self.rso_key[2] += 1
        self.regenerate()

    def P_as(self, dtype: torch.dtype) -> Tensor:
        """P in ``dtype`` (a copy only under autocast or mixed dtypes)."""
        return self.P if self.P.dtype == dtype else self.P.to(dtype)

    def forward(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """z = x Pᵀ in ``dtype`` (default x's), as data for ∂L/∂B: no autograd graph (∂L/∂x is formed by the
        layers themselves). Under autocast the members pass their input uncast and the autocast dtype, so the
        cache, keyed by the input itself, still serves every member."""
        dtype = dtype or x.dtype
        key = (x._version, torch.is_grad_enabled(), dtype)
        cache = self._cache
        if cache is not None and cache[0]() is x and cache[1] == key:
            z, hits = cache[2], cache[3] + 1
            self._cache = None if hits >= self.members else (cache[0], key, z, hits)
            return z
        z = F.linear(x.detach().to(dtype), self.P_as(dtype))
        self._cache = (weakref.ref(x), key, z, 1) if self.members > 1 else None
        return z

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, members={self.members}"


class RSOLinear(nn.Module):
    """y = x Wᵀ + (x Pᵀ) Bᵀ + b with W frozen, B ∈ R^{out×r} trainable and zero at the start.

    ``weight`` and ``bias`` are the original ``nn.Linear``'s parameters (same state-dict keys); the bias
    keeps its ``requires_grad`` and is trained at full size (its gradient Σ ∂L/∂y needs no saved
    activation). ``projection`` is the (possibly shared) ``RSOProjection``: registered as a submodule of the
    group's first member only, so its state-dict entries appear once."""

    def __init__(self, linear: nn.Linear, projection: RSOProjection, *, owner: bool = True):
        super().__init__()
        if linear.in_features != projection.in_features:
            raise ValueError(f"projection has in_features={projection.in_features}, "
                             f"layer has {linear.in_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        w = linear.weight
        self.B = nn.Parameter(torch.zeros(self.out_features, projection.rank, dtype=w.dtype, device=w.device))
        if owner:
            self.projection = projection
        else:  # a plain attribute: moved with the owner (same object), not saved twice
            self.__dict__["projection"] = projection

    @property
    def rank(self) -> int:
        return self.projection.rank

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("RSOLinear.weight must stay frozen: its gradient needs the layer input, which "
                               "RSO does not save. Train B and fold it in with merge_rso().")
        weight, B, bias = self.weight, self.B, self.bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Cast like autocast does for nn.Linear, then run the custom ops with autocast off so that
            # forward and backward see one dtype. z is asked for with the uncast input: each member's cast is a
            # new tensor, which would make every member compute and save its own x Pᵀ.
            dtype = torch.get_autocast_dtype(device_type)
            z = self.projection(x, dtype)
            x, weight, B = x.to(dtype), weight.to(dtype), B.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
            with torch.autocast(device_type, enabled=False):
                return _SubspaceLinear.apply(x, z, weight, B, self.projection.P_as(dtype), bias)
        return _SubspaceLinear.apply(x, self.projection(x), weight, B, self.projection.P_as(weight.dtype), bias)

    @torch.no_grad()
    def fold(self) -> None:
        """W ← W + B P, B ← 0 (the model function is unchanged up to rounding). The projection is
        advanced separately, once per group, by ``merge_rso``. Under FSDP2, W and B are row shards (DTensors) and
        P, the same on every rank, joins them replicated: each rank folds its own rows."""
        self.weight.addmm_(self.B, replicated_like(self.projection.P_as(self.B.dtype), self.weight))
        self.B.zero_()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def _validate_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")


def apply_rso(model: nn.Module, rank: int, target="all-linear", seed: int = 0, *,
              shared: Sequence[Sequence[str]] = DEFAULT_SHARED_INPUTS) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers of ``model``, in place, by ``RSOLinear`` (rank ``rank``).

    target: "all-linear" | regex (full match of the dotted name) | list of substrings, selected by
    ``groups.target_modules`` exactly as for ``subspace_param_groups`` (only nn.Linear; "all-linear" skips
    the output layer); a target that selects no nn.Linear raises ValueError.
    shared: groups of sibling names that read the same input and get one projection (one P, one saved
    z = x Pᵀ); ``shared=()`` gives every layer its own. Group indices (hence the P's) follow the module
    order, so the same call on the same architecture reproduces them.
    A targeted layer with in_features <= rank stays an nn.Linear, trained at full rank, with one warning: the
    optimizers' rule for a weight whose reduced side is not wider than the rank (RSO reduces the input side;
    it would save no memory there, and P cannot have more orthonormal rows than in_features).
    Raises ValueError for rank <= 0. Returns ``model``; its function is unchanged (B = 0)."""
    _validate_rank(rank)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    targets = dict(target_modules(model, target))
    narrow = [f"{n} (in_features={m.in_features})" for n, m in targets.items() if rank >= m.in_features]
    if narrow:
        warnings.warn(f"rank {rank} >= in_features for {len(narrow)} layer(s) {narrow[:3]}"
                      f"{'...' if len(narrow) > 3 else ''}: they stay nn.Linear, trained at full rank", stacklevel=2)
        targets = {n: m for n, m in targets.items() if rank < m.in_features}
    groups_of = {name: i for i, group in enumerate(shared) for name in group}

    # Group by (parent, shared-name group, in_features); an unlisted layer is its own group.
    groups: dict[tuple, list[str]] = {}
    for name in targets:  # named_modules order: deterministic
        parent, _, local = name.rpartition(".")
        key = ((parent, groups_of[local], targets[name].in_features) if local in groups_of else (name,))
        groups.setdefault(key, []).append(name)

    for index, names in enumerate(groups.values()):
        first = targets[names[0]]
        proj = RSOProjection(first.in_features, rank, seed=seed, index=index, members=len(names),
                             dtype=first.weight.dtype, device=first.weight.device)
        for k, name in enumerate(names):
            parent_name, _, local = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, local, RSOLinear(targets[name], proj, owner=k == 0))
    return model


def rso_layers(model: nn.Module) -> dict[str, RSOLinear]:
    """{qualified name: RSOLinear} of the model, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RSOLinear)}


def _projections(layers: Iterable[RSOLinear]) -> list[RSOProjection]:
    seen: dict[int, RSOProjection] = {}
    for layer in layers:
        seen.setdefault(id(layer.projection), layer.projection)
    return list(seen.values())


@torch.no_grad()
def merge_rso(model: nn.Module) -> int:
    """End of an outer iteration: W ← W + B P and B ← 0 in every RSOLinear, then a new P per group
    (outer count + 1). The model's outputs are unchanged up to rounding. Returns the new outer count."""
    layers = list(rso_layers(model).values())
    if not layers:
        raise ValueError("merge_rso: the model has no RSOLinear layers (call apply_rso first)")
    for layer in layers:
        layer.fold()
    projections = _projections(layers)
    for proj in projections:
        proj.advance()
    return projections[0].outer_step


class RSOController:
    """The outer loop of RSO around any torch optimizer (Chen et al. 2025, Alg. 1), attached as step hooks.

    Outer iteration k approximately solves min_B f(W_k + B P_k) + 1/(2η)‖B‖² with ``update_gap`` steps of the
    inner optimizer, started at B = 0 with fresh optimizer state, then merges (``merge_rso``). Construct it once
    after the optimizer; the training loop stays ``loss.backward(); optimizer.step(); optimizer.zero_grad()``:

    - before every ``optimizer.step()`` it adds the proximal gradient B/η to each B.grad (when ``eta`` is set).
      An added gradient, once per optimizer step, rather than a loss term: independent of gradient accumulation
      and loss scaling, and no extra autograd graph. Gradient clipping, done before ``step()``, sees only the
      data gradient.
    - after every step it counts; every ``update_gap`` steps it merges, and then, with ``moments="reset"`` (the
      paper), drops the optimizer state of every B, which the optimizer recreates lazily (Adam's bias correction
      restarts with the subproblem). With ``moments="project"`` it instead carries the first moments
      (``exp_avg``, ``momentum_buffer``) into the new subspace, M ← M (P_old P_newᵀ),
      and keeps the second moments and the step count: GoLore's default policy, so the inner steps stay
      exactly the GoLore optimizer's. A step that the optimizer skipped (``skipped_steps`` grew, as ours do on
      NaN/inf) is not counted.

    Exact resume needs nothing beyond the usual checkpoint: the outer count is in the model's state dict
    (``rso_key`` buffers) and the inner step count in the optimizer's, as the entry ``rso_step`` of the param
    group holding the B's (param-group entries round-trip through ``optimizer.state_dict()``, as LR schedulers'
    ``initial_lr`` does). Make the controller before ``optimizer.load_state_dict``, or after: it reads the count
    from the optimizer at every step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, update_gap: int, *,
                 eta: float | None = None, moments: str = "reset"):
        if isinstance(update_gap, bool) or not isinstance(update_gap, int) or update_gap < 1:
            raise ValueError(f"update_gap must be a positive int, got {update_gap!r}")
        if moments not in ("reset", "project"):
            raise ValueError(f"moments must be 'reset' or 'project', got {moments!r}")
        if eta is not None and not (eta > 0 and math.isfinite(eta)):
            raise ValueError(f"eta must be a positive finite float or None, got {eta!r}")
        if eta is not None and getattr(optimizer, "layerwise", False):
            raise ValueError("eta needs the gradients at optimizer.step(), which a layer-wise optimizer has "
                             "already consumed during backward")
        self.layers = list(rso_layers(model).values())
        if not self.layers:
            raise ValueError("RSOController: the model has no RSOLinear layers (call apply_rso first)")
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, layer in rso_layers(model).items() if id(layer.B) not in in_optimizer]
        if missing:
            raise ValueError(f"the optimizer does not train B of {missing[:3]}{'...' if len(missing) > 3 else ''}")
        self.model, self.optimizer, self.update_gap, self.eta, self.moments = model, optimizer, update_gap, eta, moments
        self._group().setdefault("rso_step", 0)
        self._skipped_before = None
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]

    def _group(self) -> dict:
        """The param group that holds the first B (looked up each time: load_state_dict replaces groups)."""
        first = id(self.layers[0].B)
        return next(g for g in self.optimizer.param_groups if any(id(p) == first for p in g["params"]))

    @property
    def steps(self) -> int:
        """Optimizer steps taken under this controller (restored with the optimizer's state dict)."""
        return self._group().get("rso_step", 0)

    @property
    def outer_step(self) -> int:
        """Merges so far (restored with the model's state dict)."""
        return self.layers[0].projection.outer_step

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._skipped_before = getattr(optimizer, "skipped_steps", None)
        if self.eta is None:
            return
        for layer in self.layers:
            if layer.B.grad is not None:
                layer.B.grad.add_(layer.B, alpha=1.0 / self.eta)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._skipped_before is not None and getattr(optimizer, "skipped_steps", None) != self._skipped_before:
            return  # the optimizer skipped this step (non-finite gradient)
        group = self._group()
        group["rso_step"] = group.get("rso_step", 0) + 1
        if group["rso_step"] % self.update_gap:
            return
        projections = _projections(self.layers)
        old = [proj.P.clone() for proj in projections] if self.moments == "project" else []
        merge_rso(self.model)
        # P_old P_newᵀ (r × r), once per projection (shared by q/k/v and by gate/up)
        transfers = {id(proj): P @ proj.P.T for proj, P in zip(projections, old)}
        for layer in self.layers:
            if self.moments == "reset":
                optimizer.state.pop(layer.B, None)
                continue
            state = optimizer.state.get(layer.B, {})
            transfer = transfers[id(layer.projection)]
            for key in FIRST_MOMENTS & state.keys():  # FSDP2: a row-sharded moment times the replicated transfer
                state[key].copy_(state[key] @ replicated_like(transfer.to(state[key].dtype), state[key]))

    def remove(self) -> None:
        """Detach from the optimizer."""
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def remove_rso(model: nn.Module) -> nn.Module:
    """Fold every RSOLinear (W ← W + B P) and put a plain ``nn.Linear`` with that weight and the same bias back in
    its place, in place: the model has its original architecture again (for saving it as an HF model that
    ``from_pretrained`` loads). The model's outputs are unchanged up to rounding. Returns ``model``."""
    for name, layer in rso_layers(model).items():
        layer.fold()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(layer.weight.detach(), requires_grad=True)
        linear.bias = layer.bias
        parent_name, _, local = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, local, linear)
    return model
