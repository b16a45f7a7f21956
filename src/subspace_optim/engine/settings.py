"""The settings of a param group: one typed, frozen record (``GroupSettings``) from which the defaults
(``SETTINGS``), the choice lists the harness offers and the checks are generated (torchtitan's style)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args, get_origin, get_type_hints

import torch
from torch import Tensor

from .. import lowbit, precision
from ..projectors import PROJECTORS
from ..rules import RULES, get_rule

Moments = Literal["keep", "project", "rotate", "reset"]
Side = Literal["std", "left", "right"]
Svd = Literal["exact", "randomized"]
StateBits = Literal[lowbit.STATE_BITS]  # (32, 16, 8, 4)
Precision = Literal[tuple(lowbit.DTYPES)]  # ("float32", "bfloat16")
RandomBasis = Literal["keep", "regenerate"]
WeightRounding = Literal[precision.WEIGHT_ROUNDINGS]  # ("nearest", "stochastic")
Nonfinite = Literal["skip", "raise"]
GradComm = Literal["full", "subspace"]


@dataclass(frozen=True)
class GroupSettings:
    """What every param group may set (the rule's hyper-parameters, lr and weight_decay besides)."""

    #: steps between refreshes of the basis (GaLore's T, tau)
    update_gap: int = 200
    #: alpha: the projected update is W <- W - lr * scale * P U
    scale: float = 1.0
    #: how the basis is chosen: galore (SVD), golore (random Stiefel), hybrid (GoLore@x%), online_pca, auto, or a
    #: registered one (projectors.register_projector)
    projector: str = "galore"
    #: the moments at a refresh: keep (GaLore), project (M <- T M, T = P_newᵀ P_old: GoLore), rotate (also
    #: V <- (T∘T) V), reset
    moments: Moments = "project"
    #: the random bases' key: (seed, parameter index, refresh count)
    seed: int = 0
    #: which side is reduced: std (the smaller, GaLore's rule), left (rows) or right (columns)
    side: Side = "std"
    #: the SVD of data-dependent refreshes: exact, or randomized (Halko et al.)
    svd: Svd = "exact"
    #: hybrid: the last fraction of total_steps that is random
    random_fraction: float = 0.2
    #: hybrid: the run's length, which places the switch
    total_steps: int | None = None
    #: auto: the z-score a switch to random needs (None: 2)
    auto_threshold: float | None = None
    #: online_pca: the learning rate of P (None: 1 / update_gap)
    pca_lr: float | None = None
    #: online_pca: the weight of the orthonormality penalty
    pca_lambda: float = 0.0
    #: online_pca: the rule that steps P
    pca_rule: str = "adamw"
    #: layer-wise mode: micro-batches accumulated (in the subspace) per update
    accumulation_steps: int = 1
    #: how moments are held: 32 (float32), 16 (bfloat16), 8 or 4 (block-wise quantized, torchao's); lowbit.py
    state_bits: StateBits = 32
    #: the dtype a basis is held and saved in (fp32 / bf16 spellings are taken too)
    basis_dtype: Precision = "float32"
    #: the dtype of R = Pᵀ G and P U (bfloat16: the matmul accumulates in float32 and rounds once)
    projection_dtype: Precision = "float32"
    #: whether a random basis (GoLore's; hybrid's and auto's after their switch) is held between steps (keep), or
    #: deleted after its weight's update and drawn again from its key when needed (regenerate): the same bits, for
    #: one QR of a d x r Gaussian per weight per step (13% of the two projections' flops at LLaMA-7B's shapes,
    #: r = 1024), drawn on the CPU generator so that every device draws the same basis; it saves the bases
    #: between steps (1.9 GB at 7B, r = 1024, bf16)
    random_basis: RandomBasis = "keep"
    #: how an update is rounded into a bfloat16 weight: nearest, or stochastic (unbiased); int8 is always stochastic
    weight_rounding: WeightRounding = "nearest"


#: Every setting's default.
SETTINGS = asdict(GroupSettings())
_TYPES = get_type_hints(GroupSettings)


def choices(name: str) -> tuple:
    """The values a Literal-typed setting takes, in order (what the harness offers as --flag choices)."""
    return get_args(_TYPES[name])


MOMENTS, SIDES, SVD_METHODS = choices("moments"), choices("side"), choices("svd")
STATE_BITS, RANDOM_BASES, WEIGHT_ROUNDINGS = choices("state_bits"), choices("random_basis"), choices("weight_rounding")
PRECISIONS = choices("projection_dtype")
NONFINITE, GRAD_COMMS = get_args(Nonfinite), get_args(GradComm)
#: The inner rules, one optimizer class each (optimizer.RULE_CLASSES).
RULE_NAMES = tuple(RULES)
#: Settings that give the saved state its meaning (moments live in the subspace they pick, random bases are
#: regenerated from the seed, the rule and pca_rule name the state's keys): load_state_dict refuses a checkpoint
#: saved with other values unless told to adopt them (strict=False).
STATE_SETTINGS = ("rule", "rank", "projector", "side", "seed", "pca_rule")
#: How the state is held and the projections computed, not what it means: load_state_dict keeps this optimizer's
#: values and converts a checkpoint saved with others (with a warning where a number changes).
PRECISION_SETTINGS = ("state_bits", "basis_dtype", "projection_dtype", "random_basis", "weight_rounding")
#: String choices checked against a registry (which may grow) rather than a Literal.
_REGISTRIES = {"projector": PROJECTORS, "pca_rule": RULES}
#: Literal settings checked by their own function (they accept other spellings, or carry their own message).
_OWN_CHECKS = {"state_bits": lowbit.check_state_bits,
               "basis_dtype": lambda v: lowbit.dtype_of("basis_dtype", v),
               "projection_dtype": lambda v: lowbit.dtype_of("projection_dtype", v)}


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r}; choose one of {list(allowed)}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r}; expected a positive int")


def check_group(group: dict, rule_name: str, layerwise: bool, owner: str) -> None:
    """Every setting of ``group`` (a param group of ``owner``, an optimizer of rule ``rule_name``), or ValueError."""
    if group.get("rank") is not None:
        check_positive_int("rank", group["rank"])
    check_positive_int("update_gap", group["update_gap"])
    check_positive_int("accumulation_steps", group["accumulation_steps"])
    if group["accumulation_steps"] > 1 and not layerwise:
        raise ValueError(
            f"accumulation_steps={group['accumulation_steps']} needs layerwise=True; otherwise accumulate as "
            "with torch.optim: call backward() on each micro-batch's loss / k, then step() once"
        )
    if group["rule"] != rule_name:
        raise ValueError(f"a param group of rule {group['rule']!r} cannot be stepped by {owner}")
    for name, registry in _REGISTRIES.items():
        check_choice(name, group[name], registry)
    for f in fields(GroupSettings):
        if f.name in _OWN_CHECKS:
            _OWN_CHECKS[f.name](group[f.name])
        elif get_origin(_TYPES[f.name]) is Literal:
            check_choice(f.name, group[f.name], choices(f.name))
    _check_numbers(group)
    get_rule(rule_name).check(group)
    _check_low_bit(group, rule_name)
    if group.get("rank") is not None:
        _check_not_flattened(group["params"])
    for p in group["params"]:
        if p.is_complex():
            raise ValueError(f"complex parameters are not supported (shape {tuple(p.shape)})")


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


def _check_numbers(group: dict) -> None:
    if isinstance(group["lr"], torch.Tensor) and group["lr"].numel() != 1:
        raise ValueError("Tensor lr must be 1-element")  # torch.optim's rule and message
    if not group["lr"] >= 0.0:
        raise ValueError(f"Invalid lr: {group['lr']!r}; expected >= 0")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"Invalid weight_decay: {group['weight_decay']!r}; expected >= 0")
    if group["projector"] == "hybrid":
        check_positive_int("total_steps (required by projector='hybrid')", group["total_steps"])
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


def _check_low_bit(group: dict, rule_name: str) -> None:
    if group["state_bits"] < 32:
        if not get_rule(rule_name).low_bit:
            raise ValueError(f"rule {rule_name!r} has no low-precision form (state_bits="
                             f"{group['state_bits']}): use state_bits=32")
        if group["state_bits"] in lowbit.BLOCK:
            lowbit.torchao_states()  # a clear ImportError now, rather than at the first step


def basis_dtype(group: dict) -> torch.dtype:
    return lowbit.dtype_of("basis_dtype", group["basis_dtype"])


def projection_dtype(group: dict) -> torch.dtype:
    return lowbit.dtype_of("projection_dtype", group["projection_dtype"])
