"""The standard step, as functions over named records: ``prepare`` each weight's share (changing nothing),
``resolve`` refreshes and project (R = Pᵀ G), ``decide`` with the step's one host read whether every gradient is
finite, then ``commit``: install refreshes, run the inner rule (U), write back (W <- W - lr (scale P U + wd W)).
Layer-wise updates (layerwise.py) share ``resolve`` and ``commit``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import precision
from ..distributed import OwnedRefresh, is_dtensor, local, run_owned
from ..rules import decays_after_update, get_rule, scalar
from .subspace import Subspace, held, with_contiguous


@dataclass
class Refresh:
    """A new basis, committed with the step that uses it."""

    basis: Tensor
    random: bool | Tensor  # a 0-d bool tensor (auto's choice) until the step's host read


@dataclass
class Work:
    """One parameter's share of a step, prepared before anything is changed (so a step can be skipped)."""

    space: Subspace
    state: dict
    grad: Tensor | None  # what the rule sees: the full gradient (dense) or R (projected, this rank's part)
    full: Tensor | None = None  # oriented gradient (d x D, this rank's part, its own dtype): for refreshes/tracking
    refresh: Refresh | None = None
    owned: OwnedRefresh | None = None  # a data-dependent refresh waiting for its owner rank
    key: int = 0
    mask: Tensor | None = None  # a guarded (layer-wise) update: 1 where the gradient was not finite

    @property
    def projected(self) -> bool:
        return self.space.projects

    @property
    def param(self) -> Tensor:
        return self.space.param


def read_host(flags: Tensor) -> list:
    """The step's one host synchronisation: every data-dependent decision of a step, read at once."""
    return flags.tolist()


def prepare(space: Subspace, state: dict, grad: Tensor) -> Work:
    """What the step needs of one parameter, changing nothing yet: a random refresh's basis is drawn, a
    data-dependent one is queued for its owner rank (see ``resolve``), the basis of a refresh is held back until
    the step is known to be taken."""
    if not space.projects:
        space.check_dense(grad)
        return Work(space, state, grad)
    space.start(state)
    work = Work(space, state, None, space.oriented(grad))
    projector = space.projector
    if projector.refresh_due(state, space.group):
        work.key = space.key(state, state["refreshes"])
        if projector.is_random(state, space.group):
            work.refresh = Refresh(space.random_basis(work.key), True)
        else:
            work.owned = space.owned_refresh(state, work.key, grad)
    return work


def resolve(works: list[Work]) -> None:
    """Finish the data-dependent refreshes (one owner rank per SVD) and project every gradient, R = Pᵀ G."""
    owned = [w for w in works if w.owned is not None]
    run_owned([w.owned for w in owned])
    for w in owned:
        basis, random = w.space.projector.settle(w.owned.basis, w.state, w.space.group, w.key, w.space.layout)
        w.refresh = Refresh(held(basis, w.space.group), random)  # projected with as it will be held
        w.owned = None
    for w in works:
        if not w.projected or w.grad is not None:
            continue
        w.grad = w.space.project(w.refresh.basis if w.refresh is not None else w.space.basis(w.state), w.full)
        if not w.space.projector.tracks_gradient:
            w.full = None  # no full-size copy outlives its projection


def found(works: list[Work]) -> tuple[Tensor, Tensor]:
    """(1 if any gradient of ``works`` is non-finite, on every rank; the per-gradient flags), on the device.

    One fused pass: a NaN/inf anywhere makes that gradient's norm non-finite (R = Pᵀ G inherits G's NaN/inf,
    so projected gradients are checked in the small space). As in clip_grad_norm_, a norm that overflows
    float32 also counts as non-finite.
    """
    norms = torch._foreach_norm([local(w.grad) for w in works])
    bad = torch.stack([(~torch.isfinite(n)).to(torch.float32) for n in norms])
    found_any = bad.max().reshape(1)
    if any(w.space.layout.sharded or is_dtensor(w.param) for w in works):  # shards differ: all ranks must agree
        dist.all_reduce(found_any, op=dist.ReduceOp.MAX)
    return found_any, bad


def decide(works: list[Work], nonfinite: str) -> bool:
    """Whether every gradient is finite (all ranks agree), with the step's single host synchronisation; the
    random/SVD choices of ``auto`` refreshes are read in the same transfer."""
    if not works:
        return True
    found_any, bad = found(works)
    pending = [w for w in works if w.refresh is not None and isinstance(w.refresh.random, Tensor)]
    flags = read_host(torch.cat([found_any, *[w.refresh.random.reshape(1).to(found_any) for w in pending]]))
    for w, random in zip(pending, flags[1:]):
        w.refresh.random = bool(random)
    if flags[0]:
        if nonfinite == "raise":
            which = [w.space.index for w, b in zip(works, bad.tolist()) if b]
            raise FloatingPointError(f"non-finite gradient in parameter(s) #{which or '(on another rank)'}")
        return False
    return True


def take(works: list[Work], nonfinite: str) -> bool:
    """Take the step for ``works`` if every gradient is finite; return whether it was taken."""
    resolve(works)
    if not decide(works, nonfinite):
        for w in works:
            if w.projected:
                w.space.release(w.state)
        return False
    commit(works)
    return True


def commit(works: list[Work]) -> None:
    """Apply ``works``, group by group (each group's hyper-parameters, one batched rule call per group)."""
    by_group: dict[int, list[Work]] = {}
    for w in works:
        by_group.setdefault(id(w.space.group), []).append(w)
    for group_works in by_group.values():
        group = group_works[0].space.group
        for w in group_works:
            if w.refresh is not None:
                w.space.install(w.state, w.refresh.basis, w.refresh.random)
        _step_dense([w for w in group_works if not w.projected], group)
        _step_projected([w for w in group_works if w.projected], group)


def _step_dense(works: list[Work], group: dict) -> None:
    """torch.optim's contract: the rule updates the parameters itself (fused kernel for AdamW); weights that round
    exactly (bfloat16 with weight_rounding="stochastic", int8) get the rule's direction U, then
    W <- W·(1 - lr·wd) - lr·U rounded once into W (precision.update_rows)."""
    rule, rounded, plain = get_rule(group["rule"]), [], []
    for w in works:  # one pass: whether a weight rounds exactly is asked once
        (rounded if precision.writes_exactly(local(w.param), group["weight_rounding"]) else plain).append(w)
    if plain:
        rule([w.param for w in plain], [w.grad for w in plain], [w.state for w in plain], group)
    if not rounded:
        return
    lr, weight_decay = scalar(group["lr"]), group["weight_decay"]
    for w, direction in zip(rounded, rule.direction([w.grad for w in rounded], [w.state for w in rounded], group)):
        rows = precision.as_rows(direction)
        with_contiguous(local(w.param), lambda weight: precision.update_rows(
            weight, lambda block: rows[block], lr, decay=lr * weight_decay, decay_after=decays_after_update(group)))


def _step_projected(works: list[Work], group: dict) -> None:
    """U = rule(R) for every projected weight of ``group`` at once, then each written back and tracked."""
    if not works:
        return
    # The rule sees R as the DTensor its state should be (sharded like W, or replicated), so that
    # torch.distributed.checkpoint can save and reshard the state; the projection works on the local parts.
    directions = get_rule(group["rule"]).direction([w.space.layout.wrap(w.grad) for w in works],
                                                   [w.state for w in works], group)
    for w, direction in zip(works, directions):
        _write_back(w, local(direction), group)
        new = w.space.projector.track(w.full, w.grad, w.state, group, w.space.layout)
        if new is not None:
            # A learned basis moves a little every step; like the paper, keep the moments as they are
            # (T = P_newᵀ P_old is not orthogonal for a non-orthonormal P, and applying it every step compounds).
            w.state["basis"] = held(new, group)
        w.state["proj_step"] += 1
        w.space.release(w.state)


def _write_back(w: Work, direction: Tensor, group: dict) -> None:
    """W <- W - lr (scale P U + wd W), the decay before or after the update as the rule's arithmetic says; a
    guarded update moves nothing where its gradient was not finite."""
    lr, weight_decay = scalar(group["lr"]), group["weight_decay"]
    decay, keep = lr * weight_decay, None
    if w.mask is not None:
        keep = w.mask.reshape(()).bool()
        direction = torch.where(keep, torch.zeros((), dtype=direction.dtype), direction)
        decay = torch.where(keep, 0.0, decay) if weight_decay else decay
    basis = w.space.layout.basis_rows(w.state["basis"])
    alpha = lr * group["scale"]
    if precision.writes_exactly(local(w.param), group["weight_rounding"]):  # the decay in the same rounding
        w.space.apply_back(basis, direction, alpha, decay=decay, keep=keep)  # lr·0 = 0.0 without decay
        return
    if weight_decay and not decays_after_update(group):
        local(w.param).mul_(1.0 - decay)
    w.space.apply_back(basis, direction, alpha)
    if weight_decay and decays_after_update(group):
        local(w.param).mul_(1.0 - decay)
