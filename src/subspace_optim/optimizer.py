"""The subspace optimizer: project the gradient, step an inner rule in the subspace, project back.

For a projected weight W (m x n, trailing dims flattened) with basis P (d x r, d = the side being reduced):
    R = Pᵀ G                      low-rank gradient (r x D), the only thing the inner rule ever sees
    U = rule(R, state)            AdamW / SGD / Adafactor / Lion; state is r x D
    W <- W - lr * (scale * P U + weight_decay * W)
Right-projected weights (m >= n under GaLore's "std" rule) are handled as Wᵀ, so every state is r x D.
Every ``update_gap`` steps the projector picks a new basis and the moments follow the ``moments`` policy.
Parameters of groups without ``rank`` (and 1-D ones) take the same rule at full rank. This file is the
torch.optim face; engine/ does the work (settings, a weight's Subspace, the step, hooks, communication, state).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch.optim import Optimizer

from .engine import comm, layerwise, state_io, step
from .engine.settings import GRAD_COMMS, NONFINITE, SETTINGS, check_choice, check_group
from .engine.subspace import Subspace
from .memory_measured import state_tensors, tensor_bytes
from .rules import get_rule

__all__ = ["SubspaceOptimizer", "SubspaceAdamW", "SubspaceSGD", "SubspaceAdafactor", "SubspaceLion"]


class SubspaceOptimizer(Optimizer):
    """Base class: one optimizer for projected and dense parameters; subclasses pick the inner rule.

    Keyword arguments:
      rank: projects every parameter when ``params`` are plain tensors; param-group dicts opt in by
        carrying ``"rank"``. A rank >= min(m, n) trains that parameter at full rank (one warning). Named
        parameters ((name, tensor) pairs, as torch.optim takes them) key their random bases by name, not index.
      Every field of ``engine.settings.GroupSettings`` (update_gap, scale, projector, moments, seed, side, svd,
        state_bits, basis_dtype, projection_dtype, random_basis, weight_rounding, ...), per group overridable.
      layerwise: update each parameter from its post-accumulate-grad hook during backward and free its
        gradient at once; with ``accumulation_steps = k`` the *projected* gradient is accumulated over k
        micro-batches. Outside layer-wise mode accumulate as with torch.optim (k backward passes, then step()).
        The hooks hold the optimizer weakly: they go with it, or with ``remove_hooks()``; a parameter takes one
        live layer-wise optimizer at a time. A GradScaler is refused (the hooks would see scaled gradients): use
        bf16 autocast, which needs none.
      grad_comm: ``"full"`` (default) or ``"subspace"``: under DDP (``subspace_ddp(model, optimizer)``), each
        projected gradient is all-reduced as R = Pᵀ G from its hook, asynchronously (engine/comm.py); updates are
        taken at step(), and accumulation_steps counts the micro-batches, layer-wise or not.
      nonfinite: ``"skip"`` (default) leaves every parameter and state untouched when a gradient has a NaN/inf
        (counted in ``skipped_steps``; layer-wise: per parameter, read at step()); ``"raise"`` raises there.
    """

    rule_name = ""

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, rank: int | None = None,
                 layerwise: bool = False, nonfinite: str = "skip", process_group=None, grad_comm: str = "full",
                 **settings):
        rule = get_rule(self.rule_name)
        unknown = set(settings) - set(SETTINGS) - set(rule.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(unknown)}")
        check_choice("nonfinite", nonfinite, NONFINITE)
        check_choice("grad_comm", grad_comm, GRAD_COMMS)
        if rank is not None and not isinstance(params, torch.Tensor):  # a bare tensor gets torch's TypeError
            params = list(params)
            if any(isinstance(p, dict) for p in params):
                raise ValueError("rank= applies to plain parameters; with param groups, put 'rank' in the groups")
            params = [{"params": params, "rank": rank}]
        self.layerwise, self.nonfinite, self.process_group = bool(layerwise), nonfinite, process_group
        self.grad_comm = grad_comm
        self._init_transient()
        if grad_comm == "subspace":
            self._comm_group = comm.comm_group(process_group)
            self.process_group = process_group or torch.distributed.group.WORLD  # its SVD refreshes, shared
        # The rule's name and the skip counter live in every group, so that state_dict (and DCP, which keeps only
        # "state" and "param_groups") saves them.
        defaults = {"lr": lr, "weight_decay": weight_decay, **SETTINGS, **rule.defaults, **settings,
                    "rule": self.rule_name, "skipped_steps": 0}
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(state_io.drop_regenerable_bases)

    def _init_transient(self) -> None:
        """What is not state: each parameter's Subspace (rebuilt from param_groups) and the layer-wise hooks."""
        self._guards: list[layerwise.Guard] = []
        self._in_flight: list[comm.InFlight] = []
        self._spaces: dict[torch.Tensor, Subspace] = {}
        self._hooks: list = []
        weakref.finalize(self, layerwise.remove_handles, self._hooks)

    def __getstate__(self) -> dict:
        # torch.optim copies defaults, state and param_groups only: a deepcopy or pickle needs the flags too
        return {**super().__getstate__(), "layerwise": self.layerwise, "nonfinite": self.nonfinite}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        own = SETTINGS.keys() | get_rule(self.rule_name).defaults.keys() | {"rule", "skipped_steps"}
        own &= self.defaults.keys()  # not torch's own additions ("differentiable")
        for group in self.param_groups:  # a checkpoint from before a setting existed takes its default
            for key in own:
                group.setdefault(key, self.defaults[key])
        if "layerwise" in state:  # a copy (pickle, deepcopy); load_state_dict passes only state and param_groups
            # not copyable: a copy computes its SVD refreshes itself and reduces nothing (grad_comm="full")
            self.process_group, self.grad_comm = None, "full"
            self._init_transient()
            self.register_state_dict_post_hook(state_io.drop_regenerable_bases)
            self._reindex()
            self._hook([p for g in self.param_groups for p in g["params"]])
        self._reindex()

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was NaN/inf (counted in every param group, so checkpoints keep it)."""
        return max((g["skipped_steps"] for g in self.param_groups), default=0)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate(group)
            self._reindex()
            self._hook(group["params"])
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            self._reindex()
            raise
        full = [tuple(p.shape) for p in group["params"] if p.dim() >= 2 and not self._spaces[p].projects]
        if group.get("rank") is not None and full:
            warnings.warn(f"rank {group['rank']} >= min(m, n) for {len(full)} parameter(s) {full[:4]}: "
                          "they are trained at full rank", stacklevel=3)

    def _reindex(self) -> None:
        """Each parameter's Subspace (with its name, if named), for the parameters the groups hold now: FSDP2's
        ``prepare`` in accelerate swaps them for DTensors after the optimizer is built, ``load_state_dict`` replaces
        the groups. Indices stay positional, so seeds and refresh owners do not change."""
        self._spaces = {}
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                self._spaces[p] = Subspace(p, len(self._spaces), group, type(self).__name__, self.process_group, name)

    def _validate(self, group: dict) -> None:
        accumulates = self.layerwise or self.grad_comm == "subspace"  # hooks that count micro-batches
        check_group(group, self.rule_name, accumulates, type(self).__name__)

    def _hook(self, params: list) -> None:
        if self.grad_comm == "subspace":
            comm.hook(self, params)
        elif self.layerwise:
            layerwise.hook(self, params)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (in layer-wise mode the updates already happened in backward)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._step_supports_amp_scaling and hasattr(self, "found_inf"):  # set by GradScaler.step
            raise RuntimeError(
                "layer-wise mode cannot be used with a GradScaler: its hooks updated the weights from scaled "
                "gradients during backward. Use bf16 autocast (no scaler), or layerwise=False"
                if self.layerwise and self.grad_comm == "full" else "grad_comm='subspace' cannot be used with a "
                "GradScaler: its hooks reduced scaled gradients during backward. Use bf16 autocast (no scaler)"
            )
        # Layer-wise hooks took their gradients in backward; any left were set by hand (e.g. by DCP's zero-gradient
        # step that creates the state) and take the standard path, unless a hook is still accumulating them.
        if any(p not in self._spaces for group in self.param_groups for p in group["params"]):
            self._reindex()  # the groups hold other parameters now (accelerate's FSDP2 swap)
        reduced = comm.settle(self)  # grad_comm="subspace": the reduced R (a whole G is back in .grad)
        live = [(p, group) for group in self.param_groups for p in group["params"]
                if p.grad is not None and not self.state.get(p, {}).get("micro")]
        if state_io.is_template_step(live, bool(self.state), self.param_groups):
            for p, _ in live:
                state_io.init_state(self._spaces[p], self.state[p])
            return loss
        works = [step.prepare(self._spaces[p], self.state[p], p.grad) for p, _ in live]
        if reduced:
            works = sorted(works + reduced, key=lambda w: w.space.index)
        taken = layerwise.settle(self)  # layer-wise updates of this step's backward
        if not step.take(works, self.nonfinite) or not taken:
            for group in self.param_groups:
                group["skipped_steps"] += 1
        return loss

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """With hooks (layer-wise, subspace reductions), makes GradScaler.step set ``found_inf`` and call step(),
        which then refuses it (by default the scaler fails with a puzzling "No inf checks" error)."""
        return self.layerwise or self.grad_comm == "subspace"

    def remove_hooks(self) -> None:
        """Remove the layer-wise hooks: backward no longer updates anything (step() then steps the gradients it
        finds, as without layerwise), and another layer-wise optimizer may take these parameters. Done by itself
        when the optimizer is garbage collected (the hooks hold it weakly)."""
        layerwise.unhook(self, list(self._spaces))

    def state_bytes(self) -> int:
        """Bytes of every optimizer-state tensor held in memory (moments, bases, statistics)."""
        return tensor_bytes(t for s in self.state.values() for t in state_tensors(s))

    def switch_steps(self) -> dict[int, int]:
        """For ``projector="auto"`` or ``"hybrid"``: {parameter index: step at which it switched to random}."""
        return {self._spaces[p].index: s["switched_at"] for p, s in self.state.items()
                if isinstance(s, dict) and s.get("switched_at", -1) >= 0 and p in self._spaces}

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Load as torch.optim does, keeping each state tensor's saved dtype; check that the state fits.

        ``strict`` (default, and what DCP's set_optimizer_state_dict gets): refuse a checkpoint whose groups were
        saved with other STATE_SETTINGS (rank, projector, side, seed, rule, pca_rule), whose state would be read
        in another subspace. ``strict=False`` adopts the saved settings, as torch.optim does for every
        hyper-parameter (lr, betas, ... are always taken from the checkpoint). The PRECISION_SETTINGS
        (state_bits, basis_dtype, projection_dtype, random_basis, weight_rounding) are always this optimizer's:
        state saved at another precision is converted (decoded, re-encoded) with a warning.
        """
        if strict:
            state_io.check_settings(state_dict["param_groups"], self.param_groups)
        precision = state_io.precision_of(self.param_groups)
        super().load_state_dict(state_dict)
        state_io.adopt(self, state_dict, precision)


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
