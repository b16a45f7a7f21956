"""--optimizer NAME -> (model, optimizer, per-step callback): the one place a method plugs into the harness.

A builder takes (config, model) and returns a Setup. It may transform the model (RSO swaps linear layers) and
may return a callback that the loop calls after every optimizer step (RSO merges and resamples every K steps).
Register a new method by adding a builder to OPTIMIZERS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig, UsageError, golore_fraction, target_spec


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    after_step: Callable[[int], None] | None = None  # called with the finished step's number


def _rule_class(rule: str):
    from subspace_optim.optimizer import RULE_CLASSES

    return RULE_CLASSES[rule]


def default_rank(model: nn.Module) -> int:
    """hidden_size // 4: GaLore's rank 128 for llama-60m (hidden 512), 32 for llama-tiny."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    return max(1, hidden // 4) if hidden else 8


def projected_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """subspace_param_groups, with a clear error for a bad --target or a --rank larger than a targeted layer."""
    from subspace_optim import subspace_param_groups

    rank = cfg.rank or default_rank(model)
    try:
        groups = subspace_param_groups(model, rank=rank, target=target_spec(cfg.target))
    except ValueError as err:
        raise UsageError(f"--target {cfg.target}: {err}") from None
    groups = [dict(group, side=cfg.side) if "rank" in group else group for group in groups]
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"] if "rank" in group else ():
            if rank > min(p.shape[0], p[0].numel()):
                raise UsageError(f"--rank {rank} is larger than layer {names[id(p)]} "
                                 f"({'x'.join(map(str, p.shape))}); lower --rank or narrow --target")
    return groups


def _ours(cfg: TrainConfig, model: nn.Module, params, **settings) -> Setup:
    extra = {"moments": cfg.moments} if cfg.moments else {}
    optimizer = _rule_class(cfg.rule)(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, update_gap=cfg.update_gap, scale=cfg.scale,
        seed=cfg.seed, layerwise=cfg.layerwise, accumulation_steps=cfg.grad_accum, **extra, **settings)
    return Setup(model, optimizer)


def _adamw(cfg: TrainConfig, model: nn.Module) -> Setup:
    """The baseline: plain torch AdamW over every parameter."""
    return Setup(model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay))


def _full(cfg: TrainConfig, model: nn.Module) -> Setup:
    """Our optimizer with every parameter dense: the full-rank baseline of any --rule."""
    return _ours(cfg, model, [{"params": [p for p in model.parameters() if p.requires_grad]}])


def _projector(name: str):
    def build(cfg: TrainConfig, model: nn.Module) -> Setup:
        return _ours(cfg, model, projected_groups(cfg, model), projector=name)

    build.__doc__ = f"Projected training with the {name!r} projector."
    return build


def _golore_at(cfg: TrainConfig, model: nn.Module) -> Setup:
    """GoLore@x%: GaLore, then random projections for the last x% of --steps."""
    return _ours(cfg, model, projected_groups(cfg, model), projector="hybrid",
                 random_fraction=golore_fraction(cfg.optimizer), total_steps=cfg.steps)


def _rso(cfg: TrainConfig, model: nn.Module) -> Setup:
    """RSO (Chen et al. 2025): targeted linear layers become W (frozen) + B P with a random orthonormal P; the
    --rule trains B and the untargeted parameters at full rank; every --update-gap steps W <- W + B P and P is
    redrawn. B's lr is --lr x --scale: with P = Qᵀ an inner step on B is then exactly the GoLore optimizer's
    step with the same --lr and --scale, so the two share one recipe. --moments reset (default, the paper: the
    subproblem restarts) or project (first moments carried into the new subspace, as GoLore's default)."""
    from subspace_optim.layers import RSOController, apply_rso, rso_layers

    if cfg.layerwise:
        raise UsageError("--optimizer rso cannot be used with --layerwise")
    try:
        apply_rso(model, rank=cfg.rank or default_rank(model), target=target_spec(cfg.target), seed=cfg.seed)
    except ValueError as err:
        raise UsageError(f"--optimizer rso: {err}") from None
    subspace = {id(layer.B): layer.B for layer in rso_layers(model).values()}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in subspace]
    groups = [{"params": dense}, {"params": list(subspace.values()), "lr": cfg.lr * cfg.scale}]
    setup = _ours(cfg, model, [g for g in groups if g["params"]])
    # attaches as the optimizer's step hooks
    RSOController(model, setup.optimizer, update_gap=cfg.update_gap, eta=cfg.rso_eta, moments=cfg.moments or "reset")
    return setup


def _galore_torch(cfg: TrainConfig, model: nn.Module) -> Setup:
    """The GaLore authors' GaLoreAdamW (pip install galore-torch bitsandbytes) on the same groups, rank, gap and
    scale, for side-by-side comparisons. Its state holds Python objects: such a run cannot be resumed."""
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as err:
        raise UsageError(f"--optimizer galore-torch needs: pip install galore-torch bitsandbytes ({err})") from None
    if cfg.rule != "adamw" or cfg.layerwise:
        raise UsageError("--optimizer galore-torch is AdamW only, without --layerwise")
    groups = [dict(g, update_proj_gap=cfg.update_gap, scale=cfg.scale, proj_type=cfg.side) if "rank" in g else g
              for g in projected_groups(cfg, model)]
    return Setup(model, GaLoreAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay))


OPTIMIZERS: dict[str, Callable[[TrainConfig, nn.Module], Setup]] = {
    "adamw": _adamw,
    "full": _full,
    "galore": _projector("galore"),
    "golore": _projector("golore"),
    "online_pca": _projector("online_pca"),
    "auto": _projector("auto"),
    "rso": _rso,
    "galore-torch": _galore_torch,
}


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> Setup:
    if golore_fraction(cfg.optimizer) is not None:
        return _golore_at(cfg, model)
    if cfg.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {cfg.optimizer!r}")
    return OPTIMIZERS[cfg.optimizer](cfg, model)
