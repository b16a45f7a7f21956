"""The subspace optimizer: project the gradient, step an inner rule in the subspace, project back.

For a projected weight W (m x n, trailing dims flattened) with basis P (d x r, d = the side being reduced):
    R = Pᵀ G                      low-rank gradient (r x D), the only thing the inner rule ever sees
    U = rule(R, state)            AdamW / SGD / Adafactor / Lion; state is r x D
    W <- W - lr * (scale * P U + weight_decay * W)
Right-projected weights (m >= n under GaLore's "std" rule) are handled as Wᵀ, so every state is r x D.
Every ``update_gap`` steps the projector picks a new basis and the moments follow the ``moments`` policy:
``keep`` (GaLore as published), ``project`` (M <- T M with T = P_newᵀ P_old, as GoLore), ``rotate`` (also
V <- (T∘T) V, assuming independent coordinates, as SubTrack++/LDAdam do) or ``reset``.

Parameters of groups without ``rank`` (and 1-D ones) take the same rule at full rank.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from . import lowbit, precision
from .distributed import LOCAL, Layout, OwnedRefresh, is_dtensor, layout_of, local, run_owned
from .memory_measured import state_tensors, tensor_bytes
from .projectors import PROJECTORS, derive_seed, get_projector, haar_stiefel, reset_steps
from .rules import FIRST_MOMENTS, RULES, SECOND_MOMENTS, decays_after_update, get_rule, scalar

__all__ = ["SubspaceOptimizer", "SubspaceAdamW", "SubspaceSGD", "SubspaceAdafactor", "SubspaceLion"]

#: Settings every param group may override, with their defaults.
SETTINGS = {
    "update_gap": 200,
    "scale": 1.0,
    "projector": "galore",
    "moments": "project",
    "seed": 0,
    "side": "std",
    "svd": "exact",
    "random_fraction": 0.2,
    "total_steps": None,
    "auto_threshold": None,
    "pca_lr": None,
    "pca_lambda": 0.0,
    "pca_rule": "adamw",
    "accumulation_steps": 1,
    "state_bits": 32,
    "basis_dtype": "float32",
    "projection_dtype": "float32",
    "random_basis": "keep",
    "weight_rounding": "nearest",
}
MOMENTS = ("keep", "project", "rotate", "reset")
SIDES = ("std", "left", "right")
SVD_METHODS = ("exact", "randomized")
NONFINITE = ("skip", "raise")
RANDOM_BASES = ("keep", "regenerate")
#: State entries owned by the projection machinery; everything else belongs to the inner rule.
PROJECTION_KEYS = frozenset(
    {"basis", "random_basis", "proj_step", "refreshes", "switched_at", "auto_sum", "auto_sketch",
     "auto_sketch_sum", "auto_test", "auto_count", "snr_sum", "snr_sq", "snr_count", "pca",
     "acc", "micro", "pending_basis"}
)
#: Group settings that give the saved state its meaning (moments live in the subspace they pick, random bases
#: are regenerated from the seed, the rule and pca_rule name the state's keys): load_state_dict refuses a
#: checkpoint saved with other values unless told to adopt them (strict=False).
STATE_SETTINGS = ("rule", "rank", "projector", "side", "seed", "pca_rule")
#: How the state is held (its precision, whether random bases are held between steps) and the projections computed,
#: not what it means: load_state_dict keeps this optimizer's values and converts a checkpoint saved with others
#: (with a warning where a number changes).
PRECISION_SETTINGS = ("state_bits", "basis_dtype", "projection_dtype", "random_basis", "weight_rounding")
#: Parameter -> weak reference to the live layer-wise optimizer whose hooks update it: two would both update it.
_HOOK_OWNERS = WeakIdKeyDictionary()


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; choose one of {list(choices)}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r}; expected a positive int")


@dataclass
class _Work:
    """One parameter's share of a step, prepared before anything is changed (so a step can be skipped)."""

    param: Tensor
    group: dict
    state: dict
    grad: Tensor | None  # what the rule sees: the full gradient (dense) or R (projected, this rank's part)
    projected: bool = False
    full: Tensor | None = None  # oriented gradient (d x D, this rank's part, its own dtype): for refreshes/tracking
    refresh: tuple[Tensor, object] | None = None  # (new basis, is random: a bool or a 0-d bool tensor) to commit
    layout: Layout = LOCAL
    owned: OwnedRefresh | None = None  # a data-dependent refresh waiting for its owner rank
    key: int = 0
    mask: Tensor | None = None  # a guarded (layer-wise) update: 1 where the gradient was not finite


def _tensors(state: dict, prefix: tuple = ()):
    """(path, tensor) for every tensor in a state dict, nested dicts (online PCA's "pca") included."""
    for key, value in state.items():
        if isinstance(value, Tensor):
            yield prefix + (key,), value
        elif isinstance(value, dict):
            yield from _tensors(value, prefix + (key,))


def _lookup(state: dict, path: tuple):
    for key in path:
        if not isinstance(state, dict) or key not in state:
            return None
        state = state[key]
    return state


class _Guard:
    """One layer-wise update taken before its gradient is known to be finite (see ``_update_guarded``): what it
    may change, as it was. Tensors are copied only for the update (one parameter's state, and a dense weight), the
    host values (counters, flags) and the keys until ``step()``. A basis that random_basis="regenerate" draws again
    is neither copied nor kept: an undone update leaves it to be drawn from the restored refresh count."""

    def __init__(self, found: Tensor, works: list[_Work]):
        self.found = found
        self.switches: list = []  # (state, its group, auto's device flag, the step it would record)
        self.saved = []
        for w in works:
            drawn = _regenerable(w.state, w.group)
            tensors = {path: t.detach().clone() for path, t in _tensors(w.state) if not (drawn and path == ("basis",))}
            host = _host_copy(w.state)
            if drawn:
                host.pop("basis", None)
            weight = None if w.projected else local(w.param).detach().clone()
            self.saved.append((w.state, host, w.param, (tensors, weight)))

    def put_back_tensors(self) -> None:
        """Where the gradient was not finite, every changed tensor takes its old value again (on the device)."""
        keep = self.found.reshape(()).bool()
        for i, (state, host, param, (tensors, weight)) in enumerate(self.saved):
            for path, old in tensors.items():
                now = _lookup(state, path)
                if isinstance(now, Tensor) and now.shape == old.shape:
                    lowbit.put_back_(now, old, keep)
            if weight is not None:
                local(param).copy_(torch.where(keep, weight, local(param)))
            self.saved[i] = (state, host, param, None)  # the copies go now; the host side waits for step()

    def undo_host(self) -> None:
        for state, host, _, _ in self.saved:
            _restore_host(state, host)


def _host_copy(state: dict) -> dict:
    """The state's keys and host values; tensors by reference (their values are put back on the device)."""
    return {k: _host_copy(v) if isinstance(v, dict) else v for k, v in state.items()}


def _regenerable(state: dict, group: dict) -> bool:
    """Whether the current basis is random and random_basis="regenerate" draws it again when needed."""
    flag = state.get("random_basis")  # a bool once committed (auto's switch is read at step())
    return group.get("random_basis") == "regenerate" and not isinstance(flag, Tensor) and bool(flag)


def _restore_host(state: dict, saved: dict) -> None:
    for key in [k for k in state if k not in saved]:
        del state[key]  # created by the undone update (first moments, a first basis, a pending refresh)
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(state.get(key), dict):
            _restore_host(state[key], value)
        elif not isinstance(value, Tensor) or key not in state:
            state[key] = value  # counters, flags; a tensor the update removed (moments="reset") comes back
        elif state[key] is not value:
            state[key] = value  # a replaced tensor (a new basis): the old object, which holds the old values


def _check_not_flattened(params: list[Tensor]) -> None:
    """Projection needs each weight's matrix shape. FSDP1 (use_orig_params=False) and DeepSpeed ZeRO hand the
    optimizer flattened 1-D buffers instead, which would silently be trained dense: refuse them."""
    for p in params:
        cause = ("an FSDP1 FlatParameter" if type(p).__name__ == "FlatParameter"
                 else "a DeepSpeed ZeRO partition" if hasattr(p, "ds_numel") or hasattr(p, "ds_id") else None)
        if cause:
            raise ValueError(f"a projected group holds {cause} (shape {tuple(p.shape)}): subspace projection needs "
                             "each weight's matrix shape; use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP")
    if params and all(p.dim() < 2 for p in params):
        raise ValueError(f"a projected group (one with 'rank') holds only 1-D parameters {[tuple(p.shape) for p in params][:4]}: "
                         "nothing to project. Flattened parameters (FSDP1 use_orig_params=False, DeepSpeed ZeRO) "
                         "cannot be projected; use FSDP2 (fully_shard) or DDP, or drop 'rank' from this group")


def _check_layerwise_reduced(p: Tensor) -> None:
    """A post-accumulate-grad hook under DDP sees this rank's local, unreduced gradient (DDP averages it later):
    a layer-wise update from it would silently differ between ranks. FSDP2 fires the hook on the reduced shard."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and not is_dtensor(p):
        raise RuntimeError(
            "layerwise=True with a plain (non-DTensor) parameter in a multi-process job: under DDP its hook sees "
            "the local, unreduced gradient. Shard the model with FSDP2 (fully_shard), whose hooks see the reduced "
            "gradient, or use layerwise=False"
        )


def _read(flags: Tensor) -> list:
    """The step's one host synchronisation: every data-dependent decision of a step, read at once."""
    return flags.tolist()


def _is_zero(lr) -> bool:
    """Whether an lr is 0, without a device synchronisation: DCP's state initialisation sets a tensor lr to a new
    host tensor of 0, so a tensor lr on an accelerator is never its lr and is not read."""
    if isinstance(lr, Tensor):
        return lr.device.type == "cpu" and lr.reshape(()).tolist() == 0  # a host read, not a device sync
    return lr == 0


def _data_basis(projector, state: dict, group: dict, key: int, right: bool, grad: Tensor) -> Tensor:
    """A data-dependent basis of the whole oriented gradient; NaN/inf entries are zeroed first so that an SVD
    never sees them (such a step is skipped anyway: R inherits the NaN/inf and the step's check catches it)."""
    # G as the weight stores it, contiguous whatever the gradient's layout: for a right-projected weight the
    # oriented G is then a transposed view, whose SVD top_singular takes of G itself (galore-torch's signs)
    stored = (grad.T if right else grad).contiguous()
    clean = torch.where(torch.isfinite(stored), stored, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return projector.refresh(clean.T if right else clean, state, group, key)[0]


#: rows x columns of the float32 block in a narrow-dtype write-back (16 MiB)
_WRITE_BACK_BLOCK = 1 << 22


class SubspaceOptimizer(Optimizer):
    """Base class: one optimizer for projected and dense parameters; subclasses pick the inner rule.

    Keyword arguments (all per-group overridable, except ``layerwise`` and ``nonfinite``):
      rank: projects every parameter when ``params`` are plain tensors; param-group dicts opt in by
        carrying ``"rank"``. A rank >= min(m, n) trains that parameter at full rank (one warning).
      update_gap (tau), scale (alpha), projector, moments, seed, side ("std" | "left" | "right"),
      svd ("exact" | "randomized"), random_fraction and total_steps (hybrid), auto_threshold (auto),
      pca_lr (default 1/update_gap), pca_lambda, pca_rule (online_pca).
      state_bits (32 | 16 | 8 | 4): the moments in float32 (as torch.optim), bfloat16, or block-wise quantized
        (torchao's 8-bit / 4-bit optimizer states); see lowbit.py. The rule still computes in float32.
      basis_dtype ("float32" | "bfloat16"): the dtype a basis is held (and saved) in.
      projection_dtype ("float32" | "bfloat16"): the dtype of R = Pᵀ G and P U (bfloat16: the backend's matmul
        accumulates in float32 and rounds the product once; R is then used in float32).
      random_basis ("keep" | "regenerate"): whether a random basis (GoLore's; hybrid's and auto's after their
        switch) is held between steps. "regenerate" deletes it after its weight's update and draws it again from
        its key (seed, parameter index, refresh count) when next needed, for the projection or, at a refresh,
        for the transport T = P_newᵀ P_old: the same bits, so the trajectory and the checkpoints are those of
        "keep". The cost is one QR of a d x r Gaussian per weight per step, O(d r²) (about 4dr² flops with Q
        formed): at LLaMA-7B's shapes (r = 1024, d = 4096) 13% of the two projections' 4·r·m·n flops. The
        Gaussian is drawn on the CPU generator (so every device draws the same basis) and copied to the device:
        on a GPU that is a host-side draw and a host-to-device copy of d x r float32 per weight per step. It
        saves the bases between steps (1.9 GB at 7B, r = 1024, bf16); at the peak, layer-wise mode holds one
        basis at a time (with accumulation_steps > 1, from a weight's first micro-batch to its update), standard
        mode all of them, but only inside step(), which draws each before it updates any weight.
      layerwise: update each parameter from its post-accumulate-grad hook during backward and free its
        gradient at once; with ``accumulation_steps = k`` the *projected* gradient is accumulated over k
        micro-batches (full gradients are kept only when a data-dependent refresh needs them). Outside
        layer-wise mode accumulate as with torch.optim (k backward passes, then step()): accumulation_steps > 1
        is refused there. The hooks hold the optimizer weakly: they go with it, or with ``remove_hooks()``;
        a parameter takes one live layer-wise optimizer at a time. A GradScaler is refused (the hooks would
        see scaled gradients): use bf16 autocast, which needs none.
      nonfinite: ``"skip"`` (default) leaves every parameter and state untouched when any gradient has a
        NaN/inf and counts it in ``skipped_steps``; ``"raise"`` raises FloatingPointError. In layer-wise mode the
        decision is per parameter, since earlier parameters were already updated when a later gradient arrives;
        it is applied on the device and read once, at ``step()`` (which raises there for ``"raise"``).
    """

    rule_name = ""

    def __init__(
        self,
        params,
        *,
        lr: float,
        weight_decay: float = 0.0,
        rank: int | None = None,
        layerwise: bool = False,
        nonfinite: str = "skip",
        process_group=None,
        **settings,
    ):
        rule = get_rule(self.rule_name)
        unknown = set(settings) - set(SETTINGS) - set(rule.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(unknown)}")
        _choice("nonfinite", nonfinite, NONFINITE)
        if rank is not None and not isinstance(params, Tensor):  # a bare tensor gets torch's TypeError below
            params = list(params)
            if any(isinstance(p, dict) for p in params):
                raise ValueError("rank= applies to plain parameters; with param groups, put 'rank' in the groups")
            params = [{"params": params, "rank": rank}]
        self.layerwise = bool(layerwise)
        self.nonfinite = nonfinite
        self.process_group = process_group
        self._init_transient()
        # The rule's name and the skip counter live in every group, so that state_dict (and DCP, which keeps only
        # "state" and "param_groups") saves them.
        defaults = {"lr": lr, "weight_decay": weight_decay, **SETTINGS, **rule.defaults, **settings,
                    "rule": self.rule_name, "skipped_steps": 0}
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(_drop_regenerable_bases)

    def _init_transient(self) -> None:
        """What is not state: the parameter maps (rebuilt from param_groups) and the layer-wise hooks."""
        self._guards: list[_Guard] = []
        self._index: dict[Tensor, int] = {}
        self._group_of: dict[Tensor, dict] = {}
        self._layouts: dict[Tensor, Layout] = {}
        self._hooks: list = []
        weakref.finalize(self, _remove_handles, self._hooks)

    # ------------------------------------------------------------------------------------- copies
    def __getstate__(self) -> dict:
        # torch.optim copies only defaults, state and param_groups: add the constructor flags, so that a deepcopy
        # or a pickle round trip gives an optimizer that steps.
        return {**super().__getstate__(), "layerwise": self.layerwise, "nonfinite": self.nonfinite}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        own = SETTINGS.keys() | get_rule(self.rule_name).defaults.keys() | {"rule", "skipped_steps"}
        own &= self.defaults.keys()  # not torch's own additions ("differentiable")
        for group in self.param_groups:  # a checkpoint from before a setting existed takes its default
            for key in own:
                group.setdefault(key, self.defaults[key])
        if "layerwise" in state:  # a copy (pickle, deepcopy); load_state_dict passes only state and param_groups
            self.process_group = None  # not copyable: a copy computes its SVD refreshes itself
            self._init_transient()
            self.register_state_dict_post_hook(_drop_regenerable_bases)
            if self.layerwise:
                self._hook_params([p for g in self.param_groups for p in g["params"]])
        self._reindex()

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was NaN/inf (counted in every param group, so checkpoints keep it)."""
        return max((g["skipped_steps"] for g in self.param_groups), default=0)

    def _count_skipped(self) -> None:
        for group in self.param_groups:
            group["skipped_steps"] += 1

    # ----------------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate(group)
            if self.layerwise:
                self._hook_params(group["params"])
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            raise
        self._reindex()
        if group.get("rank") is not None:
            full = [tuple(p.shape) for p in group["params"] if p.dim() >= 2 and not self._projects(p, group)]
            if full:
                warnings.warn(
                    f"rank {group['rank']} >= min(m, n) for {len(full)} parameter(s) {full[:4]}: "
                    "they are trained at full rank",
                    stacklevel=3,
                )

    def _reindex(self) -> None:
        """Key the per-parameter maps by the parameters the groups hold now: accelerate's FSDP2 ``prepare`` (HF
        Trainer's too) swaps them for DTensors after the optimizer is built, ``load_state_dict`` replaces the
        groups. Indices stay positional, so seeds and refresh owners do not change."""
        self._index, self._group_of, self._layouts = {}, {}, {}
        for group in self.param_groups:
            for p in group["params"]:
                self._index.setdefault(p, len(self._index))
                self._group_of[p] = group

    def _validate(self, group: dict) -> None:
        if group.get("rank") is not None:
            _positive_int("rank", group["rank"])
        _positive_int("update_gap", group["update_gap"])
        _positive_int("accumulation_steps", group["accumulation_steps"])
        if group["accumulation_steps"] > 1 and not self.layerwise:
            raise ValueError(
                f"accumulation_steps={group['accumulation_steps']} needs layerwise=True; otherwise accumulate as "
                "with torch.optim: call backward() on each micro-batch's loss / k, then step() once"
            )
        if group["rule"] != self.rule_name:
            raise ValueError(f"a param group of rule {group['rule']!r} cannot be stepped by {type(self).__name__}")
        _choice("projector", group["projector"], PROJECTORS)
        _choice("moments", group["moments"], MOMENTS)
        _choice("side", group["side"], SIDES)
        _choice("svd", group["svd"], SVD_METHODS)
        _choice("pca_rule", group["pca_rule"], RULES)
        _choice("random_basis", group["random_basis"], RANDOM_BASES)
        _choice("weight_rounding", group["weight_rounding"], precision.WEIGHT_ROUNDINGS)
        if isinstance(group["lr"], Tensor) and group["lr"].numel() != 1:
            raise ValueError("Tensor lr must be 1-element")  # torch.optim's rule and message
        if not group["lr"] >= 0.0:
            raise ValueError(f"Invalid lr: {group['lr']!r}; expected >= 0")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"Invalid weight_decay: {group['weight_decay']!r}; expected >= 0")
        if group["projector"] == "hybrid":
            _positive_int("total_steps (required by projector='hybrid')", group["total_steps"])
            if not 0.0 <= group["random_fraction"] <= 1.0:
                raise ValueError(f"Invalid random_fraction: {group['random_fraction']!r}; expected in [0, 1]")
        threshold = group["auto_threshold"]
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not math.isfinite(threshold)):
            raise ValueError(f"Invalid auto_threshold: {threshold!r}; expected a finite number (the z-score a "
                             "switch needs; default 2) or None")
        if group["pca_lr"] is not None and not group["pca_lr"] >= 0:
            raise ValueError(f"Invalid pca_lr: {group['pca_lr']!r}; expected >= 0 or None")
        if not group["pca_lambda"] >= 0:
            raise ValueError(f"Invalid pca_lambda: {group['pca_lambda']!r}; expected >= 0")
        get_rule(self.rule_name).check(group)
        if group.get("rank") is not None:
            _check_not_flattened(group["params"])
        self._check_precision(group)
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(f"complex parameters are not supported (shape {tuple(p.shape)})")

    def _check_precision(self, group: dict) -> None:
        lowbit.check_state_bits(group["state_bits"])
        lowbit.dtype_of("basis_dtype", group["basis_dtype"])
        lowbit.dtype_of("projection_dtype", group["projection_dtype"])
        if group["state_bits"] < 32:
            if not get_rule(self.rule_name).low_bit:
                raise ValueError(f"rule {self.rule_name!r} has no low-precision form (state_bits="
                                 f"{group['state_bits']}): use state_bits=32")
            if group["state_bits"] in lowbit.BLOCK:
                lowbit.torchao_states()  # a clear ImportError now, rather than at the first step

    @staticmethod
    def _projects(p: Tensor, group: dict) -> bool:
        rank = group.get("rank")
        return rank is not None and p.dim() >= 2 and rank < min(p.shape[0], math.prod(p.shape[1:]))

    @staticmethod
    def _left(p: Tensor, group: dict) -> bool:
        """GaLore's "std" rule: reduce the smaller dimension (left if m < n)."""
        side = group["side"]
        return side == "left" or (side == "std" and p.shape[0] < math.prod(p.shape[1:]))

    @staticmethod
    def _dims(p: Tensor, group: dict) -> tuple[int, int]:
        """(d, D) of the oriented matrix: the reduced side first (global sizes, also for a shard)."""
        m, n = p.shape[0], math.prod(p.shape[1:])
        return (m, n) if SubspaceOptimizer._left(p, group) else (n, m)

    def _check_dense(self, p: Tensor, grad: Tensor) -> None:
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients (parameter #{self._index[p]}, "
                f"shape {tuple(p.shape)}); use a dense embedding (sparse=False)"
            )

    def _layout(self, p: Tensor, group: dict) -> Layout:
        layout = self._layouts.get(p)
        if layout is None:
            layout = self._layouts[p] = layout_of(p, self._left(p, group), self.process_group)
        return layout

    def _oriented(self, p: Tensor, grad: Tensor, group: dict) -> Tensor:
        """This rank's part of the gradient as a d x D matrix (a view, in the gradient's own dtype)."""
        self._check_dense(p, grad)
        g = local(grad)
        g = g.reshape(g.shape[0], -1)
        return g if self._left(p, group) else g.T

    # ------------------------------------------------------------------------------------ the basis
    def _basis(self, p: Tensor, state: dict, group: dict) -> Tensor:
        """The current basis; a random one that was not saved is regenerated from its key."""
        if "basis" not in state:
            if not state.get("random_basis"):
                raise RuntimeError(f"optimizer state of parameter #{self._index[p]} has no basis")
            state["basis"] = self._random_basis(p, group, self._key(p, group, state["refreshes"] - 1))
        return state["basis"]

    def _random_basis(self, p: Tensor, group: dict, key: int) -> Tensor:
        """The Haar basis of ``key``, held in the group's basis_dtype."""
        d = self._dims(p, group)[0]
        return _held(haar_stiefel(d, group["rank"], key, local(p).device), group)

    def _key(self, p: Tensor, group: dict, refresh: int) -> int:
        """The seed of a parameter's ``refresh``-th basis: (seed, parameter index, refresh count)."""
        return derive_seed(group["seed"], self._index[p], refresh)

    @staticmethod
    def _release(state: dict, group: dict) -> None:
        """random_basis="regenerate": a random basis is not held once its weight is updated (``_basis`` draws it
        again from its key)."""
        if _regenerable(state, group):
            state.pop("basis", None)

    def _install(self, p: Tensor, state: dict, group: dict, basis: Tensor, random: bool) -> None:
        """Commit a refresh: the new basis (moments carried over), the projector's bookkeeping, the count."""
        self._set_basis(p, state, group, basis, random)
        get_projector(group["projector"]).commit(state, group, random)
        state["refreshes"] += 1

    def _set_basis(self, p: Tensor, state: dict, group: dict, new: Tensor, random: bool) -> None:
        """Install a new basis (in the group's basis_dtype) and carry the moments over by the ``moments`` policy.

        Moments held in low precision are decoded, transformed in float32 and encoded again (second moments
        stay >= 0: T∘T and V are)."""
        policy = group["moments"]
        new = _held(new, group)
        if state.get("refreshes", 0) and policy != "keep":
            rule_keys = [k for k in state if k not in PROJECTION_KEYS and k != "step"]
            if policy == "reset":
                for k in rule_keys + ["step"]:
                    del state[k]
            else:
                old = self._basis(p, state, group)
                wide = torch.promote_types(torch.promote_types(new.dtype, old.dtype), torch.float32)
                transfer = new.T.to(wide) @ old.to(wide)  # T = P_newᵀ P_old, r x r
                for k in rule_keys:
                    moment = local(state[k])  # a sharded moment transforms shard by shard (T acts on rows)
                    dtype = torch.promote_types(moment.dtype, wide)
                    if k in FIRST_MOMENTS:
                        lowbit.store_(moment, transfer.to(dtype) @ lowbit.decode(moment, dtype))
                    elif k in SECOND_MOMENTS and policy == "rotate":
                        lowbit.store_(moment, transfer.square().to(dtype) @ lowbit.decode(moment, dtype))
        state["basis"] = new.contiguous()  # as a checkpoint loads it, so that a resumed run rounds alike
        state["random_basis"] = random

    # ------------------------------------------------------------------------------------- stepping
    def _prepare(self, p: Tensor, group: dict, grad: Tensor) -> _Work:
        """What the step needs of one parameter, changing nothing yet: a random refresh's basis is drawn, a
        data-dependent one is queued for its owner rank (see :meth:`_resolve`), the basis of a refresh is held
        back until the step is known to be taken."""
        state = self.state[p]
        if not self._projects(p, group):
            self._check_dense(p, grad)
            return _Work(p, group, state, grad)
        self._init_proj(state)
        layout = self._layout(p, group)
        work = _Work(p, group, state, None, True, self._oriented(p, grad, group), layout=layout)
        projector = get_projector(group["projector"])
        if projector.refresh_due(state, group):
            work.key = self._key(p, group, state["refreshes"])
            d, _ = self._dims(p, group)
            if projector.is_random(state, group):
                work.refresh = (self._random_basis(p, group, work.key), True)
            else:
                rows = local(grad).reshape(local(p).shape[0], -1)
                orient = (lambda w: w) if self._left(p, group) else (lambda w: w.T)
                compute = partial(_data_basis, projector, state, group, work.key, not self._left(p, group))
                work.owned = OwnedRefresh(layout, layout.owner(self._index[p]), rows, orient, compute,
                                          (d, group["rank"]))
        return work

    def _resolve(self, works: list[_Work]) -> None:
        """Finish the data-dependent refreshes (one owner rank per SVD) and project every gradient, R = Pᵀ G."""
        owned = [w for w in works if w.owned is not None]
        run_owned([w.owned for w in owned])
        for w in owned:
            projector = get_projector(w.group["projector"])
            basis, random = projector.settle(w.owned.basis, w.state, w.group, w.key, w.layout)
            w.refresh = (_held(basis, w.group), random)  # projected with as it will be held
            w.owned = None
        for w in works:
            if not w.projected or w.grad is not None:
                continue
            basis = w.refresh[0] if w.refresh is not None else self._basis(w.param, w.state, w.group)
            w.grad = w.layout.project(basis, w.full, _projection_dtype(w.group))
            if not get_projector(w.group["projector"]).tracks_gradient:
                w.full = None  # no full-size copy outlives its projection

    @staticmethod
    def _found(works: list[_Work]) -> tuple[Tensor, Tensor]:
        """(1 if any gradient of ``works`` is non-finite, on every rank; the per-gradient flags), on the device.

        One fused pass: a NaN/inf anywhere makes that gradient's norm non-finite (R = Pᵀ G inherits G's NaN/inf,
        so projected gradients are checked in the small space). As in clip_grad_norm_, a norm that overflows
        float32 also counts as non-finite.
        """
        norms = torch._foreach_norm([local(w.grad) for w in works])
        bad = torch.stack([(~torch.isfinite(n)).to(torch.float32) for n in norms])
        found = bad.max().reshape(1)
        if any(w.layout.sharded or is_dtensor(w.param) for w in works):  # shards differ: all ranks must agree
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return found, bad

    def _decide(self, works: list[_Work]) -> bool:
        """Whether every gradient is finite (all ranks agree), with the step's single host synchronisation; the
        random/SVD choices of ``auto`` refreshes are read in the same transfer."""
        if not works:
            return True
        found, bad = self._found(works)
        pending = [w for w in works if w.refresh is not None and isinstance(w.refresh[1], Tensor)]
        flags = _read(torch.cat([found, *[w.refresh[1].reshape(1).to(found) for w in pending]]))
        for w, random in zip(pending, flags[1:]):
            w.refresh = (w.refresh[0], bool(random))
        if flags[0]:
            if self.nonfinite == "raise":
                which = [self._index[w.param] for w, b in zip(works, bad.tolist()) if b]
                raise FloatingPointError(f"non-finite gradient in parameter(s) #{which or '(on another rank)'}")
            return False
        return True

    def _update(self, works: list[_Work]) -> bool:
        """Take the step for ``works`` if every gradient is finite; return whether it was taken."""
        self._resolve(works)
        if not self._decide(works):
            for w in works:
                if w.projected:
                    self._release(w.state, w.group)
            return False
        by_group: dict[int, list[_Work]] = {}
        for w in works:
            by_group.setdefault(id(w.group), []).append(w)
        for group_works in by_group.values():
            self._commit(group_works[0].group, group_works)
        return True

    def _update_guarded(self, works: list[_Work]) -> None:
        """A layer-wise update taken before knowing whether its gradient is finite, with no host read: a projected
        update is masked on the device, every state tensor (and a dense weight) it changed is put back where the
        gradient was not finite, and the host's counters and keys are put back at ``step()``, which reads every
        parameter's flag at once (the step's one host read)."""
        self._resolve(works)
        found, _ = self._found(works)
        guard = _Guard(found, works)
        for w in works:
            if w.projected:
                w.mask = found
            if w.refresh is not None and isinstance(w.refresh[1], Tensor):  # auto: its switch is read at step()
                guard.switches.append((w.state, w.group, w.refresh[1], w.state["proj_step"]))
                w.refresh = (w.refresh[0], False)
        by_group: dict[int, list[_Work]] = {}
        for w in works:
            by_group.setdefault(id(w.group), []).append(w)
        for group_works in by_group.values():
            self._commit(group_works[0].group, group_works)
        guard.put_back_tensors()
        self._guards.append(guard)

    def _settle_guards(self) -> bool:
        """At ``step()`` in layer-wise mode: read every guarded update's flag (and auto's switches) at once, undo
        the host side of the skipped ones; return whether all were taken."""
        guards, self._guards = self._guards, []
        if not guards:
            return True
        switches = [entry for g in guards for entry in g.switches]
        flags = _read(torch.cat([g.found for g in guards]
                                + [r.reshape(1).to(guards[0].found) for _, _, r, _ in switches]))
        skipped = [g for g, flag in zip(guards, flags) if flag]
        for guard in skipped:
            guard.undo_host()
        undone = {id(state) for g in skipped for state, *_ in g.saved}
        for (state, group, _, at), random in zip(switches, flags[len(guards):]):
            if random and id(state) not in undone:  # what Switching.commit records, known only now
                state["random_basis"] = True
                state["switched_at"] = at
                self._release(state, group)
        if skipped and self.nonfinite == "raise":
            which = sorted({self._index[p] for g in skipped for _, _, p, _ in g.saved})
            raise FloatingPointError(f"non-finite gradient in parameter(s) #{which} (their updates were undone)")
        return not skipped

    def _commit(self, group: dict, works: list[_Work]) -> None:
        projector = get_projector(group["projector"])
        for w in works:
            if w.refresh is not None:
                self._install(w.param, w.state, group, *w.refresh)
        rule = get_rule(self.rule_name)
        rounding = group["weight_rounding"]
        dense, rounded = [], []  # rounded: dense weights that an update must reach through precision.update_rows
        for w in works:
            if not w.projected:
                (rounded if precision.writes_exactly(local(w.param), rounding) else dense).append(w)
        if dense:  # torch.optim's contract: the rule updates the parameters itself (fused kernel for AdamW)
            rule([w.param for w in dense], [w.grad for w in dense], [w.state for w in dense], group)
        self._step_rounded(rounded, group)
        projected = [w for w in works if w.projected]
        if not projected:
            return
        lr, weight_decay = scalar(group["lr"]), group["weight_decay"]
        # The rule sees R as the DTensor its state should be (sharded like W, or replicated), so that
        # torch.distributed.checkpoint can save and reshard the state; the projection works on the local parts.
        directions = rule.direction([w.layout.wrap(w.grad) for w in projected], [w.state for w in projected], group)
        for w, direction in zip(projected, directions):
            direction, decay = local(direction), lr * weight_decay
            if w.mask is not None:  # a guarded update: nothing moves W where the gradient was not finite
                keep = w.mask.reshape(()).bool()
                direction = torch.where(keep, torch.zeros((), dtype=direction.dtype), direction)
                decay = torch.where(keep, 0.0, decay) if weight_decay else decay
            basis = w.layout.basis_rows(w.state["basis"])
            if precision.writes_exactly(local(w.param), rounding):  # the decay in the same rounding
                self._apply_back(w.param, group, basis, direction, lr * group["scale"],
                                 decay=decay if weight_decay else 0.0, keep=keep if w.mask is not None else None)
            else:
                if weight_decay and not decays_after_update(group):
                    local(w.param).mul_(1.0 - decay)
                self._apply_back(w.param, group, basis, direction, lr * group["scale"])
                if weight_decay and decays_after_update(group):
                    local(w.param).mul_(1.0 - decay)
            new = projector.track(w.full, w.grad, w.state, group, w.layout)
            if new is not None:
                # A learned basis moves a little every step; like the paper, keep the moments as they are
                # (T = P_newᵀ P_old is not orthogonal for a non-orthonormal P, and applying it every step compounds).
                w.state["basis"] = _held(new, group)
            w.state["proj_step"] += 1
            self._release(w.state, group)

    @staticmethod
    def _step_rounded(works: list[_Work], group: dict) -> None:
        """Dense weights that round exactly (bfloat16 with weight_rounding="stochastic", int8): the rule's
        direction U, then W <- W·(1 - lr·wd) - lr·U rounded once into W (precision.update_rows)."""
        if not works:
            return
        lr, weight_decay = scalar(group["lr"]), group["weight_decay"]
        directions = get_rule(group["rule"]).direction([w.grad for w in works], [w.state for w in works], group)
        for w, direction in zip(works, directions):
            weight = local(w.param)
            contiguous = weight if precision.is_int8(weight) else weight.contiguous()
            rows = precision.as_rows(direction)
            precision.update_rows(contiguous, lambda block: rows[block], lr, decay=lr * weight_decay,
                                  decay_after=decays_after_update(group))
            if contiguous is not weight:
                weight.copy_(contiguous)

    def _apply_back(self, p: Tensor, group: dict, basis: Tensor, update: Tensor, alpha: float | Tensor, *,
                    decay: float | Tensor = 0.0, keep: Tensor | None = None) -> None:
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
        rows_of_w = local(p)
        left = self._left(p, group)
        compute = _projection_dtype(group)
        compute = compute if compute == torch.bfloat16 else torch.promote_types(update.dtype, compute)
        if precision.writes_exactly(rows_of_w, group["weight_rounding"]):
            basis, update = basis.to(compute), update.to(compute)
            delta = (lambda rows: basis[rows] @ update) if left else (lambda rows: update[:, rows].T @ basis.T)
            contiguous = rows_of_w if precision.is_int8(rows_of_w) else rows_of_w.contiguous()
            precision.update_rows(contiguous, delta, alpha, decay=decay, decay_after=decays_after_update(group),
                                  keep=keep)
            if contiguous is not rows_of_w:
                rows_of_w.copy_(contiguous)
            return
        contiguous = rows_of_w.contiguous()
        weight = contiguous.view(rows_of_w.shape[0], -1)
        if isinstance(alpha, Tensor):
            update, alpha = update * alpha.to(update.dtype), 1.0
        basis, update = basis.to(compute), update.to(compute)
        if weight.dtype == basis.dtype:
            if left:
                weight.addmm_(basis, update, alpha=-alpha)
            else:
                weight.addmm_(update.T, basis.T, alpha=-alpha)
        else:
            rows = max(1, _WRITE_BACK_BLOCK // max(1, weight.shape[1]))
            for start in range(0, weight.shape[0], rows):
                block = slice(start, start + rows)
                delta = basis[block] @ update if left else update[:, block].T @ basis.T
                weight[block].add_(delta, alpha=-alpha)
        if contiguous is not rows_of_w:
            rows_of_w.copy_(contiguous)

    def _init_state(self, p: Tensor, group: dict) -> None:
        """Create ``p``'s state as it is before any step, without stepping (no SVD of zeros, no moment update).

        torch.distributed.checkpoint builds its load template by one ``step()`` at lr 0 on zero gradients; the
        state it finds must hold every key and shape the saved one has, and a real first step after it must be
        exactly the first step of a fresh optimizer.
        """
        state = self.state[p]
        rule = get_rule(self.rule_name)
        if not self._projects(p, group):
            rule.direction([torch.zeros_like(p)], [state], group)
            reset_steps(state)
            return
        self._init_proj(state)
        layout = self._layout(p, group)
        d, big = self._dims(p, group)
        projector = get_projector(group["projector"])
        device = local(p).device
        if not projector.random:  # a placeholder, replaced at the first refresh (no moments to carry yet)
            state["basis"] = _held(torch.zeros(d, group["rank"], device=device), group)
        state["random_basis"] = projector.random
        size = layout.size if layout.split == "cols" else big
        lowrank = torch.zeros(group["rank"], size, device=device)
        rule.direction([layout.wrap(lowrank)], [state], group)
        reset_steps(state)
        projector.init_state(state, group, lowrank, layout)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (in layer-wise mode the updates already happened in backward)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise and hasattr(self, "found_inf"):  # set by GradScaler.step, see _step_supports_amp_scaling
            raise RuntimeError(
                "layer-wise mode cannot be used with a GradScaler: its hooks updated the weights from scaled "
                "gradients during backward. Use bf16 autocast (no scaler), or layerwise=False"
            )
        # Layer-wise hooks took their gradients in backward; any left were set by hand (e.g. by DCP's zero-gradient
        # step that creates the state) and take the standard path, unless a hook is still accumulating them.
        if any(p not in self._index for group in self.param_groups for p in group["params"]):
            self._reindex()  # the groups hold other parameters now (accelerate's FSDP2 swap)
        live = [(p, group) for group in self.param_groups for p in group["params"]
                if p.grad is not None and not self.state.get(p, {}).get("micro")]
        if self._is_checkpoint_template_step(live):
            for p, group in live:
                self._init_state(p, group)
            return loss
        works = [self._prepare(p, group, p.grad) for p, group in live]
        taken = self._settle_guards()  # layer-wise updates of this step's backward
        if not self._update(works) or not taken:
            self._count_skipped()
        return loss

    def _is_checkpoint_template_step(self, live: list) -> bool:
        """torch.distributed.checkpoint's state initialisation: no state yet, lr 0 everywhere, all gradients zero.

        Only a fresh optimizer at lr 0 pays for the check (one host read); a real first step at lr 0 (a warm-up
        from 0) has nonzero gradients and is taken as torch.optim takes it.
        """
        if not live or self.state or not all(_is_zero(group["lr"]) for group in self.param_groups):
            return False
        norms = torch._foreach_norm([local(p.grad) for p, _ in live])
        largest = torch.stack([n.float() for n in norms]).max().reshape(1)
        if any(is_dtensor(p) for p, _ in live):
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return _read(largest)[0] == 0

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """In layer-wise mode, makes GradScaler.step set ``found_inf`` and call step(), which then refuses it (by
        default the scaler finds no gradients to unscale and fails with a puzzling "No inf checks" error)."""
        return self.layerwise

    # ---------------------------------------------------------------------------------- layer-wise hooks
    def _hook_params(self, params: list[Tensor]) -> None:
        """Register the layer-wise hooks on ``params``, refusing any that another live layer-wise optimizer has."""
        for p in params:
            _check_layerwise_reduced(p)
            owner = _HOOK_OWNERS.get(p, lambda: None)()
            if owner is not None and owner is not self:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is already updated by another layer-wise optimizer's "
                    "hooks: call remove_hooks() on that optimizer (or delete it) first"
                )
        ref = weakref.ref(self)
        for p in params:
            _HOOK_OWNERS[p] = ref
            self._hooks.append(p.register_post_accumulate_grad_hook(functools.partial(_run_layerwise_hook, ref)))

    def remove_hooks(self) -> None:
        """Remove the layer-wise hooks: backward no longer updates anything (step() then steps the gradients it
        finds, as without layerwise), and another layer-wise optimizer may take these parameters. Done by itself
        when the optimizer is garbage collected (the hooks hold it weakly)."""
        _remove_handles(self._hooks)
        for p in self._group_of:
            if _HOOK_OWNERS.get(p, lambda: None)() is self:
                del _HOOK_OWNERS[p]

    @torch.no_grad()
    def _layerwise_hook(self, p: Tensor) -> None:
        group, state = self._group_of[p], self.state[p]
        _check_layerwise_reduced(p)
        state["micro"] = state.get("micro", 0) + 1
        last = state["micro"] >= group["accumulation_steps"]
        projector = get_projector(group["projector"])
        projected = self._projects(p, group)
        if projected:
            self._init_proj(state)
        if not projected or projector.needs_full_gradient(state, group):
            if not last:
                return  # autograd keeps summing into p.grad
            works = [self._prepare(p, group, p.grad)]
        else:
            layout = self._layout(p, group)
            if state["micro"] == 1 and projector.refresh_due(state, group):
                # A data-independent refresh needs no gradient: draw it now and accumulate in its basis, but commit
                # it (moments transported, count advanced) only with the step, as _prepare/_commit do.
                state["pending_basis"] = self._random_basis(p, group, self._key(p, group, state["refreshes"]))
            basis = state["pending_basis"] if "pending_basis" in state else self._basis(p, state, group)
            lowrank = layout.project(basis, self._oriented(p, p.grad, group), _projection_dtype(group))
            p.grad = None
            state["acc"] = lowrank if "acc" not in state else state["acc"].add_(lowrank)
            if not last:
                return
            acc = state.pop("acc")
            pending = (state.pop("pending_basis"), True) if "pending_basis" in state else None
            works = [_Work(p, group, state, acc, True, refresh=pending, layout=layout)]
        state.pop("acc", None)
        state["micro"] = 0
        self._update_guarded(works)
        p.grad = None

    @staticmethod
    def _init_proj(state: dict) -> None:
        state.setdefault("proj_step", 0)
        state.setdefault("refreshes", 0)

    # --------------------------------------------------------------------------------- introspection
    def state_bytes(self) -> int:
        """Bytes of every optimizer-state tensor held in memory (moments, bases, statistics)."""
        return tensor_bytes(t for s in self.state.values() for t in state_tensors(s))

    def switch_steps(self) -> dict[int, int]:
        """For ``projector="auto"`` or ``"hybrid"``: {parameter index: step at which it switched to random}."""
        return {
            self._index[p]: s["switched_at"]
            for p, s in self.state.items()
            if isinstance(s, dict) and s.get("switched_at", -1) >= 0 and p in self._index
        }

    # ------------------------------------------------------------------------------ state_dict I/O
    def load_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Load as torch.optim does, but keep each state tensor's saved dtype (projector state stays float32
        for bf16 parameters) and check that the saved subspace state fits these parameters.

        ``strict`` (default, and what DCP's set_optimizer_state_dict gets): refuse a checkpoint whose groups were
        saved with other STATE_SETTINGS (rank, projector, side, seed, rule, pca_rule), whose state would be read
        in another subspace. ``strict=False`` adopts the saved settings, as torch.optim does for every
        hyper-parameter (lr, betas, ... are always taken from the checkpoint). The PRECISION_SETTINGS
        (state_bits, basis_dtype, projection_dtype) are always this optimizer's: state saved at another precision
        is converted (decoded, re-encoded) with a warning.
        """
        if strict:
            self._check_settings(state_dict["param_groups"])
        precision = [{k: g[k] for k in PRECISION_SETTINGS} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, own in zip(self.param_groups, precision):
            group.update(own)
            self._validate(group)
        converted = set()
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        id_map = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))
        for idx, saved in state_dict["state"].items():
            p = id_map.get(idx)
            if p is not None and isinstance(saved, dict):  # a user's hook may have added other entries
                state = self.state[p]
                for key in [k for k, v in state.items() if isinstance(v, dict) and not v]:
                    del state[key]  # DCP's flattened loader gives {} for a key the checkpoint lacks (a random basis)
                _restore_dtypes(state, saved, p.device)
                self._check_loaded(p, state, self._group_of[p])
                converted |= self._convert_precision(p, state, self._group_of[p])
                self._release(state, self._group_of[p])
        if converted:
            warnings.warn(f"the checkpoint's state was saved at another precision; converted: "
                          f"{', '.join(sorted(converted))} (lossy where it narrows)", stacklevel=2)

    def _convert_precision(self, p: Tensor, state: dict, group: dict) -> set[str]:
        """Re-encode loaded moments for this group's state_bits and its basis for its basis_dtype; what changed."""
        changed = set()
        # what 32 bits means: the dtype the rule sees, R's (float32 or wider) or the dense parameter's
        full = torch.promote_types(p.dtype, torch.float32) if self._projects(p, group) else p.dtype
        for k in get_rule(self.rule_name).low_bit & state.keys():
            new = lowbit.convert(state[k], group["state_bits"], k in FIRST_MOMENTS, full)
            if new is not None:
                changed.add(f"{k} from {lowbit.bits_of(state[k])} to {group['state_bits']} bits")
                state[k] = new
        if "basis" in state and (state["basis"].dtype == torch.bfloat16) != (_basis_dtype(group) == torch.bfloat16):
            changed.add(f"basis from {state['basis'].dtype} to {_basis_dtype(group)}")
            state["basis"] = state["basis"].to(_basis_dtype(group))
        return changed

    def _check_settings(self, saved_groups: list[dict]) -> None:
        for i, (saved, live) in enumerate(zip(saved_groups, self.param_groups)):
            dense = saved.get("rank") is None and live.get("rank") is None  # its state depends on the rule only
            for key in ("rule",) if dense else STATE_SETTINGS:
                # A missing "rank" means a dense group; any other missing key, a checkpoint older than the setting.
                if (key in saved or key == "rank") and saved.get(key) != live.get(key):
                    raise ValueError(
                        f"the checkpoint's param group {i} was saved with {key}={saved.get(key)!r}, this optimizer "
                        f"has {key}={live.get(key)!r}: its state belongs to another {key}. Build the optimizer "
                        f"with the saved settings, or adopt them with load_state_dict(state_dict, strict=False)"
                    )

    def _check_loaded(self, p: Tensor, state: dict, group: dict) -> None:
        if not self._projects(p, group):
            if "basis" in state or "proj_step" in state:
                raise ValueError(f"saved state of parameter #{self._index[p]} is projected but its group is dense")
            return
        d, big = self._dims(p, group)
        if "basis" in state and tuple(state["basis"].shape) != (d, group["rank"]):
            raise ValueError(
                f"saved basis of parameter #{self._index[p]} has shape {tuple(state['basis'].shape)}, expected "
                f"{(d, group['rank'])}: the checkpoint was made with another rank, side or model"
            )
        for k in FIRST_MOMENTS & state.keys():
            if state[k].shape[-1] != big and state.get("refreshes"):
                raise ValueError(f"saved {k} of parameter #{self._index[p]} does not fit its shape")


def _basis_dtype(group: dict) -> torch.dtype:
    return lowbit.dtype_of("basis_dtype", group["basis_dtype"])


def _held(basis: Tensor, group: dict) -> Tensor:
    """A basis as the group holds it: bfloat16 if basis_dtype says so, else as computed (float32, or float64 for
    float64 gradients)."""
    return basis.to(torch.bfloat16) if _basis_dtype(group) == torch.bfloat16 else basis


def _projection_dtype(group: dict) -> torch.dtype:
    return lowbit.dtype_of("projection_dtype", group["projection_dtype"])


def _run_layerwise_hook(optimizer: weakref.ref, p: Tensor) -> None:
    """A layer-wise hook holds its optimizer weakly, so that dropping the optimizer drops its hooks too."""
    live = optimizer()
    if live is not None:
        live._layerwise_hook(p)


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _restore_dtypes(live: dict, saved: dict, device) -> None:
    for k, v in saved.items():
        if isinstance(v, Tensor) and (live[k].dtype != v.dtype or lowbit.is_quantized(v)):
            live[k] = lowbit.moved_to(v, device)
        elif isinstance(v, dict) and k in live:
            _restore_dtypes(live[k], v, device)


def _drop_regenerable_bases(optimizer: Optimizer, state_dict: dict) -> dict:
    """The bases of an always-random projector (GoLore) are regenerated from (seed, parameter index, refresh
    count): do not save them. Other projectors save their current basis, random or not, so that the keys of a
    saved state do not depend on when a switch happened: one that random_basis="regenerate" does not hold is
    drawn for the checkpoint (which is then the one "keep" saves)."""
    packed = state_dict["state"]
    always_random = {i for g in state_dict["param_groups"] if PROJECTORS.get(g.get("projector")) is not None
                     and PROJECTORS[g["projector"]].random for i in g["params"]}
    placed = [(p, g) for g in optimizer.param_groups for p in g["params"]]  # state_dict's indices, in this order
    for k, s in list(packed.items()):
        if not isinstance(s, dict):  # a user's hook may add other entries
            continue
        if k in always_random and "basis" in s:
            packed[k] = {kk: v for kk, v in s.items() if kk != "basis"}
        elif k not in always_random and "basis" not in s and s.get("random_basis"):
            p, group = placed[k]
            if p not in optimizer._index:
                optimizer._reindex()  # the groups hold other parameters now (accelerate's FSDP2 swap)
            packed[k] = {**s, "basis": optimizer._basis(p, dict(s), group)}
    return state_dict


# ------------------------------------------------------------------------------------------ rules
class SubspaceAdamW(SubspaceOptimizer):
    """AdamW in a low-rank subspace (GaLore / GoLore / ... as chosen by ``projector``). See SubspaceOptimizer."""

    rule_name = "adamw"

    def __init__(self, params, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kwargs):
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kwargs)


class SubspaceSGD(SubspaceOptimizer):
    """Momentum SGD in a low-rank subspace (torch.optim.SGD's momentum conventions, decoupled weight decay)."""

    rule_name = "sgd"

    def __init__(self, params, *, lr=1e-2, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, **kwargs):
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
            **kwargs,
        )


class SubspaceAdafactor(SubspaceOptimizer):
    """Adafactor (factored second moment, explicit lr) in a low-rank subspace."""

    rule_name = "adafactor"

    def __init__(
        self, params, *, lr=1e-2, beta2_decay=-0.8, eps=(1e-30, 1e-3), clip_threshold=1.0, beta1=None,
        weight_decay=0.0, **kwargs,
    ):
        super().__init__(
            params, lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), clip_threshold=clip_threshold, beta1=beta1,
            weight_decay=weight_decay, **kwargs,
        )


class SubspaceLion(SubspaceOptimizer):
    """Lion in a low-rank subspace."""

    rule_name = "lion"

    def __init__(self, params, *, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, **kwargs):
        super().__init__(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **kwargs)


#: The inner rule's name -> its optimizer class.
RULE_CLASSES = {"adamw": SubspaceAdamW, "sgd": SubspaceSGD, "adafactor": SubspaceAdafactor, "lion": SubspaceLion}


def _with_defaults(base: type, name: str, doc: str, **paper_defaults) -> type:
    """A subclass of ``base`` whose keyword defaults are a paper's settings (any can still be overridden)."""

    def __init__(self, params, **kwargs):
        base.__init__(self, params, **{**paper_defaults, **kwargs})

    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


GaLoreAdamW = _with_defaults(
    SubspaceAdamW, "GaLoreAdamW",
    "GaLore (Zhao et al. 2024): SVD projector, moments kept across refreshes, alpha=0.25, tau=200, no weight decay.",
    projector="galore", moments="keep", scale=0.25, update_gap=200, weight_decay=0.0,
)
GoLoreAdamW = _with_defaults(
    SubspaceAdamW, "GoLoreAdamW",
    "GoLore (He et al. 2024): random Stiefel projector, momentum projected on refresh, alpha=0.25, tau=200.",
    projector="golore", moments="project", scale=0.25, update_gap=200, weight_decay=0.0,
)
GoLoreSGD = _with_defaults(
    SubspaceSGD, "GoLoreSGD",
    "GoLore with the paper's MSGD: M <- (1-b) M + b R (momentum=dampening=0.9), momentum projected on refresh.",
    projector="golore", moments="project", momentum=0.9, dampening=0.9, update_gap=200,
)
OnlineSubspaceAdamW = _with_defaults(
    SubspaceAdamW, "OnlineSubspaceAdamW",
    "Online Subspace Descent (Liang et al. 2024): P learned by online PCA each step, moments kept.",
    projector="online_pca", moments="keep", scale=0.25, update_gap=200, weight_decay=0.0,
)
