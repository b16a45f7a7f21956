"""One weight's subspace: which side is reduced, the basis's key, the basis's life (drawn, held, released,
installed with the moments carried over), the projection R = Pᵀ G and the write-back W <- W - alpha P U.

A weight W (m x n, trailing dims flattened) is handled as the oriented matrix d x D, the reduced side first:
W itself (left) or Wᵀ (right, m >= n under GaLore's "std" rule), so every low-rank state is r x D.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from .. import lowbit, precision
from ..distributed import Layout, OwnedRefresh, layout_of, local
from ..projectors import Projector, derive_seed, get_projector, haar_stiefel
from ..rules import FIRST_MOMENTS, SECOND_MOMENTS, decays_after_update
from .settings import basis_dtype, projection_dtype

#: State entries owned by the projection machinery; everything else belongs to the inner rule.
PROJECTION_KEYS = frozenset(
    {"basis", "random_basis", "proj_step", "refreshes", "switched_at", "auto_sum", "auto_sketch",
     "auto_sketch_sum", "auto_test", "auto_count", "snr_sum", "snr_sq", "snr_count", "pca",
     "acc", "micro", "pending_basis", "basis_key"}
)
#: ``state["basis_key"]`` of a weight whose random bases are keyed by its name: (seed, a hash of the name, refresh
#: count), which pipeline stages, torchtitan's model parts and a reordered module share. Absent (every state saved
#: before names, and every unnamed parameter's): (seed, parameter index, refresh count).
BY_NAME = 1
#: rows x columns of the float32 block in a narrow-dtype write-back (16 MiB)
WRITE_BACK_BLOCK = 1 << 22


def held(basis: Tensor, group: dict) -> Tensor:
    """A basis as the group holds it: bfloat16 if basis_dtype says so, else as computed (float32, or float64 for
    float64 gradients)."""
    return basis.to(torch.bfloat16) if basis_dtype(group) == torch.bfloat16 else basis


def regenerable(state: dict, group: dict) -> bool:
    """Whether the current basis is random and random_basis="regenerate" draws it again when needed."""
    flag = state.get("random_basis")  # a bool once committed (auto's switch is read at step())
    return group.get("random_basis") == "regenerate" and not isinstance(flag, Tensor) and bool(flag)


def name_id(name: str) -> int:
    """A parameter's name as a 64-bit number, the same in every process and Python (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


class Subspace:
    """The subspace of parameter ``param`` (number ``index`` in its optimizer) under its param ``group``; its state
    (basis, counters, moments) stays in the optimizer's ``state[param]``, passed in. ``owner`` names the optimizer
    in errors; ``name``, its name where the optimizer was given named parameters."""

    def __init__(self, param: Tensor, index: int, group: dict, owner: str, process_group=None,
                 name: str | None = None):
        self.param, self.index, self.group, self.owner = param, index, group, owner
        self.process_group, self.name = process_group, name
        self._layout: Layout | None = None

    # --------------------------------------------------------------------------------------- geometry
    @property
    def projects(self) -> bool:
        rank, p = self.group.get("rank"), self.param
        return rank is not None and p.dim() >= 2 and rank < min(p.shape[0], math.prod(p.shape[1:]))

    @property
    def left(self) -> bool:
        """GaLore's "std" rule: reduce the smaller dimension (left if m < n)."""
        side, p = self.group["side"], self.param
        return side == "left" or (side == "std" and p.shape[0] < math.prod(p.shape[1:]))

    @property
    def dims(self) -> tuple[int, int]:
        """(d, D) of the oriented matrix: the reduced side first (global sizes, also for a shard)."""
        m, n = self.param.shape[0], math.prod(self.param.shape[1:])
        return (m, n) if self.left else (n, m)

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = layout_of(self.param, self.left, self.process_group)
        return self._layout

    @property
    def projector(self) -> Projector:
        return get_projector(self.group["projector"])

    def check_dense(self, grad: Tensor) -> None:
        if grad.is_sparse:
            raise RuntimeError(
                f"{self.owner} does not support sparse gradients (parameter #{self.index}, "
                f"shape {tuple(self.param.shape)}); use a dense embedding (sparse=False)"
            )

    def oriented(self, grad: Tensor) -> Tensor:
        """This rank's part of the gradient as a d x D matrix (a view, in the gradient's own dtype)."""
        self.check_dense(grad)
        g = local(grad)
        g = g.reshape(g.shape[0], -1)
        return g if self.left else g.T

    # ------------------------------------------------------------------------------------- the basis
    def start(self, state: dict) -> None:
        """The counters of a fresh projected state, and how it keys its random bases (by name where known)."""
        if "proj_step" not in state:
            state["proj_step"], state["refreshes"] = 0, 0
            if self.name is not None:
                state["basis_key"] = BY_NAME

    def count_micro(self, state: dict) -> bool:
        """Count a micro-batch's gradient (a hook's); whether it is the step's last (``accumulation_steps``)."""
        state["micro"] = state.get("micro", 0) + 1
        return state["micro"] >= self.group["accumulation_steps"]

    def key(self, state: dict, refresh: int) -> int:
        """The seed of the ``refresh``-th basis: (seed, the parameter's name or index, refresh count)."""
        by_name = state.get("basis_key") == BY_NAME
        if by_name and self.name is None:
            raise RuntimeError(f"the state of parameter #{self.index} keys its random bases by name and this "
                               "optimizer has no names: build it from named parameters (model.named_parameters())")
        return derive_seed(self.group["seed"], name_id(self.name) if by_name else self.index, refresh)

    def random_basis(self, key: int) -> Tensor:
        """The Haar basis of ``key``, held in the group's basis_dtype."""
        return held(haar_stiefel(self.dims[0], self.group["rank"], key, local(self.param).device), self.group)

    def basis(self, state: dict) -> Tensor:
        """The current basis; a random one that was not held is regenerated from its key."""
        if "basis" not in state:
            if not state.get("random_basis"):
                raise RuntimeError(f"optimizer state of parameter #{self.index} has no basis")
            state["basis"] = self.random_basis(self.key(state, state["refreshes"] - 1))
        return state["basis"]

    def release(self, state: dict) -> None:
        """random_basis="regenerate": a random basis is not held once its weight is updated (``basis`` draws it
        again from its key)."""
        if regenerable(state, self.group):
            state.pop("basis", None)

    def owned_refresh(self, state: dict, key: int, grad: Tensor) -> OwnedRefresh:
        """A data-dependent refresh of the whole gradient, computed on its owner rank (distributed.run_owned)."""
        part = local(grad).reshape(local(self.param).shape[0], -1)
        orient = (lambda w: w) if self.left else (lambda w: w.T)
        return OwnedRefresh(self.layout, self.layout.owner(self.index), part, orient,
                            lambda whole: self._data_basis(state, key, whole), (self.dims[0], self.group["rank"]))

    def _data_basis(self, state: dict, key: int, grad: Tensor) -> Tensor:
        """The projector's basis of the whole oriented gradient; NaN/inf entries are zeroed first so that an SVD
        never sees them (such a step is skipped anyway: R inherits the NaN/inf and the step's check catches it)."""
        # G as the weight stores it, contiguous whatever the gradient's layout: for a right-projected weight the
        # oriented G is then a transposed view, whose SVD top_singular takes of G itself (galore-torch's signs)
        stored = (grad.T if not self.left else grad).contiguous()
        clean = torch.where(torch.isfinite(stored), stored, torch.zeros((), dtype=grad.dtype, device=grad.device))
        return self.projector.refresh(clean.T if not self.left else clean, state, self.group, key)[0]

    def install(self, state: dict, basis: Tensor, random) -> None:
        """Commit a refresh: the new basis (moments carried over), the projector's bookkeeping, the count."""
        self.carry_moments(state, basis)
        state["random_basis"] = random
        self.projector.commit(state, self.group, random)
        state["refreshes"] += 1

    def carry_moments(self, state: dict, new: Tensor) -> None:
        """Hold ``new`` (in the group's basis_dtype) as the basis and carry the moments over by the ``moments``
        policy: keep, reset, project (M <- T M, T = P_newᵀ P_old, r x r) or rotate (also V <- (T∘T) V). Moments
        held in low precision are transformed on their decodings (second moments stay >= 0: T∘T and V are)."""
        policy, new = self.group["moments"], held(new, self.group)
        if state.get("refreshes", 0) and policy != "keep":
            rule_keys = [k for k in state if k not in PROJECTION_KEYS and k != "step"]
            if policy == "reset":
                for k in rule_keys + ["step"]:
                    del state[k]
            else:
                old = self.basis(state)
                wide = torch.promote_types(torch.promote_types(new.dtype, old.dtype), torch.float32)
                transfer = new.T.to(wide) @ old.to(wide)
                for k in rule_keys:
                    moment = local(state[k])  # a sharded moment transforms shard by shard (T acts on rows)
                    dtype = torch.promote_types(moment.dtype, wide)
                    if k in FIRST_MOMENTS:
                        lowbit.transform_(moment, lambda m: transfer.to(dtype) @ m, dtype)
                    elif k in SECOND_MOMENTS and policy == "rotate":
                        lowbit.transform_(moment, lambda v: transfer.square().to(dtype) @ v, dtype)
        state["basis"] = new.contiguous()  # as a checkpoint loads it, so that a resumed run rounds alike

    # ------------------------------------------------------------------------------- the projections
    def project(self, basis: Tensor, oriented: Tensor) -> Tensor:
        """R = Pᵀ G on this rank's part, in the group's projection_dtype."""
        return self.layout.project(basis, oriented, projection_dtype(self.group))

    def apply_back(self, basis: Tensor, update: Tensor, alpha: float | Tensor, *, decay: float | Tensor = 0.0,
                   keep: Tensor | None = None) -> None:
        """W <- W - alpha * P U (left) or W <- W - alpha * (P U)ᵀ (right) on this rank's rows of W.

        P U is computed in the group's projection_dtype, widened to float32 (float64 for such an update) unless
        that is bfloat16. A weight of another dtype (a bf16 weight with float32 products, a float32 weight with
        bf16 ones) gets the product a block of rows at a time, so the write-back never holds an m x n temporary,
        and rounds once, as torch.optim does. A non-contiguous W (e.g. a parameter made from ``w.t()``) is updated
        through a contiguous copy written back with ``copy_``; a tensor alpha (tensor lr) scales the small U on the
        device instead of a host-side number. An int8 weight, or a bfloat16 one with weight_rounding="stochastic",
        is written by ``precision.update_rows``, with the weight decay (``decay``) in the same rounding and
        ``keep`` (a guarded update's flag) applied on the device.
        """
        rows_of_w = local(self.param)
        compute = projection_dtype(self.group)
        compute = compute if compute == torch.bfloat16 else torch.promote_types(update.dtype, compute)
        if precision.writes_exactly(rows_of_w, self.group["weight_rounding"]):
            basis, update = basis.to(compute), update.to(compute)
            delta = (lambda rows: basis[rows] @ update) if self.left else (lambda rows: update[:, rows].T @ basis.T)
            with_contiguous(rows_of_w, lambda w: precision.update_rows(
                w, delta, alpha, decay=decay, decay_after=decays_after_update(self.group), keep=keep))
            return
        if isinstance(alpha, Tensor):
            update, alpha = update * alpha.to(update.dtype), 1.0
        basis, update = basis.to(compute), update.to(compute)
        with_contiguous(rows_of_w, lambda w: _subtract_product(w.view(w.shape[0], -1), basis, update, alpha,
                                                               self.left))


def with_contiguous(weight: Tensor, write) -> None:
    """``write(w)`` on a contiguous ``w`` holding ``weight`` (itself where it is contiguous, or int8: its rows are
    updated in place), copied back where it is not."""
    contiguous = weight if precision.is_int8(weight) else weight.contiguous()
    write(contiguous)
    if contiguous is not weight:
        weight.copy_(contiguous)


def _subtract_product(weight: Tensor, basis: Tensor, update: Tensor, alpha: float, left: bool) -> None:
    """weight -= alpha * (P U or (P U)ᵀ): one addmm where the dtypes agree, else a block of rows at a time."""
    if weight.dtype == basis.dtype:
        if left:
            weight.addmm_(basis, update, alpha=-alpha)
        else:
            weight.addmm_(update.T, basis.T, alpha=-alpha)
        return
    rows = max(1, WRITE_BACK_BLOCK // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        block = slice(start, start + rows)
        delta = basis[block] @ update if left else update[:, block].T @ basis.T
        weight[block].add_(delta, alpha=-alpha)
