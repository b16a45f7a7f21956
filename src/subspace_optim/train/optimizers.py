"""--optimizer NAME: every training method of the harness, one ``Method`` entry each in OPTIMIZERS.

An entry holds the method's builder, what it accepts (rules, --layerwise, --side, --moments, its own flags) and
its defaults; `--help`, the checks before a run and the loop all read them from here, so a new method is one
entry. A method may first transform the model in place (``prepare``: RSO swaps linear layers in), before DDP or
FSDP2 wrap it; its builder then takes (config, model) and returns a Setup, which may hold a callback that the loop
calls after every optimizer step.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import MOMENTS, RULE_NAMES, TrainConfig, UsageError, target_spec
from .models import default_rank


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    after_step: Callable[[int], None] | None = None  # called with the finished step's number


@dataclass(frozen=True)
class Method:
    """One --optimizer value: how to build it, what it accepts, its defaults."""

    help: str  # one line for --help
    build: Callable[[TrainConfig, nn.Module], Setup]
    rules: tuple[str, ...] = RULE_NAMES  # the --rule values it takes
    layerwise: bool = True  # takes --layerwise
    rank: bool = True  # trains targeted weights in a rank --rank subspace (else --rank is unused)
    side: bool = True  # takes --side (it reduces either side of a weight)
    moments: tuple[str, ...] = MOMENTS  # the --moments values it takes
    default_moments: str | None = None  # None: the optimizer's own default
    flags: tuple[str, ...] = ()  # config fields that only this method takes (e.g. rso_eta)
    state_bits: bool = True  # takes --state-bits (ours; torch's AdamW and galore-torch hold float32 moments)
    random_basis: bool = True  # takes --random-basis regenerate (ours, with projected weights)
    subspace: bool = True  # our optimizer projecting weights: takes --weights int8 and --projection-dtype
    weight_rounding: bool = True  # takes --weight-rounding stochastic (ours)
    # transforms the model in place before DDP/FSDP2 wrap it (FSDP2 shards the parameters that exist then)
    prepare: Callable[[TrainConfig, nn.Module], None] | None = None


def _rule_class(rule: str):
    from subspace_optim.optimizer import RULE_CLASSES

    return RULE_CLASSES[rule]


def rank_for(cfg: TrainConfig, model: nn.Module) -> int:
    """--rank, or the default rank of ``model``."""
    return cfg.rank or default_rank(getattr(getattr(model, "config", None), "hidden_size", None))


def projected_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """subspace_param_groups at --rank and --side, with a clear error for a --target that selects nothing. A
    weight not larger than the rank on its smaller side is trained at full rank by the optimizer, which warns."""
    from subspace_optim import subspace_param_groups

    try:
        groups = subspace_param_groups(model, rank=rank_for(cfg, model), target=target_spec(cfg.target))
    except ValueError as err:
        raise UsageError(f"--target {cfg.target}: {err}") from None
    return [dict(group, side=cfg.side) if "rank" in group else group for group in groups]


def _ours(cfg: TrainConfig, model: nn.Module, params, **settings) -> Setup:
    extra = {"moments": cfg.moments} if cfg.moments else {}
    if cfg.adam_arithmetic != "torch":  # galore-torch's AdamW, with its default eps
        extra.update(arithmetic=cfg.adam_arithmetic, eps=1e-6)
    optimizer = _rule_class(cfg.rule)(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, update_gap=cfg.update_gap, scale=cfg.scale,
        seed=cfg.seed, layerwise=cfg.layerwise, state_bits=cfg.state_bits, random_basis=cfg.random_basis,
        weight_rounding=cfg.weight_rounding, projection_dtype=cfg.projection_dtype, **extra, **settings,
        grad_comm=cfg.grad_comm,
        # the hooks must know when a step's micro-batches are in; otherwise autograd sums them into .grad
        accumulation_steps=cfg.grad_accum if cfg.layerwise or cfg.grad_comm == "subspace" else 1)
    return Setup(model, optimizer)


def _adamw(cfg: TrainConfig, model: nn.Module) -> Setup:
    return Setup(model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay))


def _full(cfg: TrainConfig, model: nn.Module) -> Setup:
    return _ours(cfg, model, [{"params": [p for p in model.parameters() if p.requires_grad]}])


def _full_scaled(cfg: TrainConfig, model: nn.Module) -> Setup:
    """Every parameter dense, with the subspace methods' step-size rule: the linear weights they would project step
    at --lr x --scale, the rest at --lr. Against the projected methods this removes the step-size difference and
    leaves only the projection."""
    groups = [{"params": g["params"], "lr": cfg.lr * cfg.scale} if "rank" in g else g
              for g in projected_groups(cfg, model)]
    return _ours(cfg, model, [g for g in groups if g["params"]])


def _projector(name: str):
    def build(cfg: TrainConfig, model: nn.Module) -> Setup:
        return _ours(cfg, model, projected_groups(cfg, model), projector=name)

    return build


def _golore_at(cfg: TrainConfig, model: nn.Module) -> Setup:
    return _ours(cfg, model, projected_groups(cfg, model), projector="hybrid",
                 random_fraction=golore_fraction(cfg.optimizer), total_steps=cfg.steps)


def _rso_layers(cfg: TrainConfig, model: nn.Module) -> None:
    """RSO's layers in place of the targeted linear layers (``prepare``: FSDP2 then shards their B's too)."""
    from subspace_optim.rso import apply_rso

    try:
        apply_rso(model, rank=rank_for(cfg, model), target=target_spec(cfg.target), seed=cfg.seed)
    except ValueError as err:
        raise UsageError(f"--optimizer rso: {err}") from None


def _rso(cfg: TrainConfig, model: nn.Module) -> Setup:
    """RSO (Chen et al. 2025): targeted linear layers are W (frozen) + B P with a random orthonormal P
    (``_rso_layers``); the --rule trains B and the untargeted parameters at full rank; every --update-gap steps
    W <- W + B P and P is redrawn. B's lr is --lr x --scale: with P = Qᵀ an inner step on B is then exactly the
    GoLore optimizer's step with the same --lr and --scale, so the two share one recipe. --moments reset
    (default, the paper: the subproblem restarts) or project (first moments carried into the new subspace, as
    GoLore's default)."""
    from subspace_optim.rso import RSOController, rso_layers

    subspace = {id(layer.B): layer.B for layer in rso_layers(model).values()}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in subspace]
    groups = [{"params": dense}, {"params": list(subspace.values()), "lr": cfg.lr * cfg.scale}]
    setup = _ours(cfg, model, [g for g in groups if g["params"]])
    try:  # attaches as the optimizer's step hooks
        RSOController(model, setup.optimizer, update_gap=cfg.update_gap, eta=cfg.rso_eta, moments=cfg.moments)
    except ValueError as err:  # e.g. every targeted layer too narrow for the rank
        raise UsageError(f"--optimizer rso: {err}") from None
    return setup


def _galore_torch(cfg: TrainConfig, model: nn.Module) -> Setup:
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as err:
        raise UsageError(f"--optimizer galore-torch needs: pip install galore-torch bitsandbytes ({err})") from None
    groups = [dict(g, update_proj_gap=cfg.update_gap, scale=cfg.scale, proj_type=cfg.side) if "rank" in g else g
              for g in projected_groups(cfg, model)]
    return Setup(model, GaLoreAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay))


def _lora(cfg: TrainConfig, model: nn.Module) -> Setup:
    """LoRA adapters on the targets (train/lora.py), torch AdamW over what is trainable. --lora-rank defaults to the
    rank the subspace methods would use, --lora-alpha to 2 x rank (LLaMA-Factory's); both land in config.json."""
    from .lora import wrap  # peft is imported only for LoRA runs

    cfg.lora_rank = cfg.lora_rank or rank_for(cfg, model)
    cfg.lora_alpha = cfg.lora_alpha or 2.0 * cfg.lora_rank
    bare = wrap(cfg, model).get_base_model()  # the model itself, with peft's layers inside
    trainable = [p for p in bare.parameters() if p.requires_grad]
    return Setup(bare, torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay))


OPTIMIZERS: dict[str, Method] = {
    "adamw": Method("plain torch.optim.AdamW over every parameter: the baseline", _adamw, rules=("adamw",),
                    layerwise=False, rank=False, side=False, moments=(), state_bits=False, random_basis=False,
                    subspace=False, weight_rounding=False),
    "full": Method("our optimizer with every parameter dense: the full-rank baseline of any --rule", _full,
                   rank=False, side=False, moments=(), random_basis=False, subspace=False),
    "full-scaled": Method("like full, but the linear weights that the projected methods project step at --lr x "
                          "--scale (the rest at --lr): the full-rank baseline at their step sizes", _full_scaled,
                          rank=False, side=False, moments=(), random_basis=False, subspace=False),
    "galore": Method("projector galore: top-r singular vectors of the gradient, refreshed every --update-gap "
                     "steps", _projector("galore"), random_basis=False),
    "golore": Method("projector golore: a uniformly random orthonormal basis", _projector("golore")),
    "golore@X": Method("projector hybrid: GaLore, then GoLore for the last X% of --steps", _golore_at),
    "online_pca": Method("Online Subspace Descent: the basis is trained every step", _projector("online_pca"),
                         random_basis=False),
    "auto": Method("GaLore per weight until its SVD subspace captures measurably less than a random one, then "
                   "GoLore", _projector("auto")),
    "rso": Method("RSO layers: targeted linear layers train B in W + B P (B at --lr x --scale), merged every "
                  "--update-gap steps", _rso, layerwise=False, side=False, moments=("reset", "project"),
                  default_moments="reset", flags=("rso_eta",), random_basis=False, subspace=False,
                  prepare=_rso_layers),
    "galore-torch": Method("the GaLore authors' GaLoreAdamW (pip install galore-torch bitsandbytes) on the same "
                           "groups; cannot be resumed", _galore_torch, rules=("adamw",), layerwise=False,
                           moments=(), state_bits=False, random_basis=False, subspace=False,
                           weight_rounding=False),
    "lora": Method("LoRA through peft (the baseline): rank --lora-rank adapters on the --target layers, which are "
                   "frozen; the rest trained densely by torch AdamW", _lora,
                   rules=("adamw",), layerwise=False, rank=False, side=False, moments=(), state_bits=False,
                   random_basis=False, flags=("lora_rank", "lora_alpha"), subspace=False, weight_rounding=False),
}


_GOLORE_AT = re.compile(r"golore@(\d+(?:\.\d+)?)")


def golore_fraction(name: str) -> float | None:
    """x/100 for 'golore@x', else None."""
    match = _GOLORE_AT.fullmatch(name)
    return float(match.group(1)) / 100 if match else None


def method_of(name: str) -> Method:
    """The entry of an --optimizer value ('golore@20' is 'golore@X'); UsageError for an unknown one."""
    fraction = golore_fraction(name)
    if fraction is not None:
        if not 0 <= fraction <= 1:
            raise UsageError(f"--optimizer {name}: x must be between 0 and 100")
        return OPTIMIZERS["golore@X"]
    if name not in OPTIMIZERS or name == "golore@X":
        raise UsageError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def check_method(cfg: TrainConfig) -> Method:
    """Check a resolved config against its method's entry, fill the method's defaults (--moments), return it."""
    method, name = method_of(cfg.optimizer), cfg.optimizer
    if cfg.rule not in method.rules:
        raise UsageError(f"--rule {cfg.rule}: --optimizer {name} runs only {', '.join(method.rules)}; use "
                         f"--optimizer full for a dense {cfg.rule} baseline, or a projected one (galore, golore, ...)")
    if cfg.layerwise and not method.layerwise:
        raise UsageError(f"--layerwise: --optimizer {name} cannot update weights inside backward; "
                         "use one of ours that can (e.g. full, galore, golore)")
    if cfg.side != "std" and not method.side:
        raise UsageError(f"--side {cfg.side}: --optimizer {name} does not choose a side (only the projected "
                         "optimizers do; rso always reduces the input side)")
    if cfg.state_bits != 32 and not method.state_bits:
        raise UsageError(f"--state-bits {cfg.state_bits}: --optimizer {name} holds float32 moments; use --optimizer "
                         "full for a dense baseline with low-precision moments")
    if cfg.random_basis != "keep" and not method.random_basis:
        raise UsageError(f"--random-basis {cfg.random_basis}: --optimizer {name} has no random bases; use a projected "
                         "one (golore, golore@X, auto)")
    if cfg.weights == "int8" and not method.subspace:
        raise UsageError(f"--weights int8: --optimizer {name} does not hold its weights as int8; use a projected "
                         "one of ours (galore, golore, golore@X, online_pca, auto)")
    if cfg.projection_dtype != "float32" and not method.subspace:
        raise UsageError(f"--projection-dtype {cfg.projection_dtype}: --optimizer {name} computes no projections "
                         "of ours; use galore, golore, golore@X, online_pca or auto")
    if cfg.grad_comm != "full" and not method.subspace:
        raise UsageError(f"--grad-comm {cfg.grad_comm}: --optimizer {name} projects no gradients of ours; use "
                         "galore, golore, golore@X, online_pca or auto")
    if cfg.weight_rounding != "nearest" and not method.weight_rounding:
        raise UsageError(f"--weight-rounding {cfg.weight_rounding}: --optimizer {name} rounds to nearest; use one "
                         "of ours (e.g. full for a dense baseline)")
    if cfg.adam_arithmetic != "torch" and (cfg.rule != "adamw" or name in ("adamw", "galore-torch")):
        raise UsageError(f"--adam-arithmetic {cfg.adam_arithmetic}: only our optimizers with --rule adamw take it "
                         f"(not --optimizer {name} --rule {cfg.rule}; for a dense baseline use --optimizer full)")
    if cfg.moments is not None and cfg.moments not in method.moments:
        takes = f"takes {' or '.join(method.moments)}" if method.moments else "has no subspace moments"
        raise UsageError(f"--moments {cfg.moments}: --optimizer {name} {takes}")
    for flag in {f for m in OPTIMIZERS.values() for f in m.flags} - set(method.flags):
        if getattr(cfg, flag) is not None:
            owners = [n for n, m in OPTIMIZERS.items() if flag in m.flags]
            raise UsageError(f"--{flag.replace('_', '-')} needs --optimizer {' or '.join(owners)}, not {name}")
    if cfg.moments is None:
        cfg.moments = method.default_moments
    return method


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> Setup:
    """The method of ``cfg`` prepared on ``model`` and built, as the loop does without DDP or FSDP2."""
    method = check_method(cfg)
    if method.prepare is not None:
        method.prepare(cfg, model)
    return method.build(cfg, model)
