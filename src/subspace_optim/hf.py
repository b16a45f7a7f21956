"""HF ``transformers.Trainer``: ``Trainer(..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, ...))``.

Trainer builds the optimizer itself, as ``optimizer_cls(groups, **kwargs)`` with *its own* param groups (decay
and no-decay, split by name, ``weight_decay`` set per group). So the class returned here takes those groups and
splits each into the weights that ``target`` selects on ``model`` (they get ``rank``: projected) and the rest
(dense): Trainer's weight-decay split holds for both. This module does not import transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import nn

from .distributed import is_dtensor
from .groups import subspace_param_groups
from .engine.settings import check_choice
from .optimizer import RULE_CLASSES, SubspaceOptimizer
from .projectors import PROJECTORS

__all__ = ["optimizer_cls_and_kwargs"]


def optimizer_cls_and_kwargs(
    model: nn.Module,
    projector: str = "golore",
    rank: int = 128,
    target: str | Sequence[str] = "all-linear",
    rule: str = "adamw",
    *,
    include_embeddings: bool = False,
    **kw,
) -> tuple[type[SubspaceOptimizer], dict]:
    """The ``(optimizer_class, kwargs)`` pair for ``transformers.Trainer(optimizer_cls_and_kwargs=...)``.

    ``projector``: galore | golore | hybrid (needs ``total_steps``) | online_pca | auto; ``rule``: adamw | sgd |
    adafactor | lion; ``target`` and ``include_embeddings`` select the projected weights as in
    :func:`subspace_param_groups`. ``kw`` goes to the optimizer (``lr``, ``update_gap``, ``scale``, ``betas``, ...).
    Pass ``lr``: Trainer does not apply its ``learning_rate`` to an ``optimizer_cls_and_kwargs`` optimizer (its LR
    scheduler scales the ``lr`` given here). Weight decay comes from Trainer's groups.

    The projected weights are looked up on ``model`` when Trainer builds the optimizer, by parameter object, so a
    model whose parameters were replaced before that (e.g. by ``fully_shard``) still matches; parameters that
    accelerate's FSDP2 ``prepare`` swaps in afterwards are followed by the optimizer itself. Under DDP
    (``torch.distributed`` initialized, world size > 1, no DTensor parameters) ``process_group`` defaults to the
    world group, so each rank computes 1/N of the SVD refreshes.
    """
    check_choice("projector", projector, PROJECTORS)
    check_choice("rule", rule, RULE_CLASSES)
    if projector == "hybrid" and kw.get("total_steps") is None:
        raise ValueError("projector='hybrid' needs total_steps= (e.g. the Trainer's max_steps)")
    subspace_param_groups(model, rank, target, include_embeddings=include_embeddings)  # a bad target fails here
    base = RULE_CLASSES[rule]

    class TrainerSubspaceOptimizer(base):
        __doc__ = f"{base.__name__} on Trainer's param groups, {target!r} of the model projected at rank {rank}."

        def __init__(self, params, **kwargs):
            groups = _split(params, model, rank, target, include_embeddings)
            if "process_group" not in kwargs:
                kwargs["process_group"] = _data_parallel_group(groups)
            super().__init__(groups, **kwargs)

    TrainerSubspaceOptimizer.__name__ = TrainerSubspaceOptimizer.__qualname__ = f"Trainer{base.__name__}"
    return TrainerSubspaceOptimizer, {"projector": projector, **kw}


def _split(params, model: nn.Module, rank: int, target, include_embeddings: bool) -> list[dict]:
    """Each given group as its dense part and its projected part (with ``rank``), empty parts dropped."""
    params = list(params)
    if not all(isinstance(p, dict) for p in params):
        params = [{"params": params}]
    chosen = [g for g in subspace_param_groups(model, rank, target, include_embeddings=include_embeddings)
              if "rank" in g]
    projected = {id(p) for g in chosen for p in g["params"]}
    groups, matched = [], False
    for group in params:
        members = list(group["params"])
        mine = [p for p in members if id(p) in projected]
        rest = [p for p in members if id(p) not in projected]
        matched = matched or bool(mine)
        if rest:
            groups.append({**group, "params": rest})
        if mine:
            groups.append({**group, "params": mine, "rank": rank})
    if projected and not matched:
        raise ValueError("none of the optimizer's parameters is a targeted weight of the model given to "
                         "optimizer_cls_and_kwargs: pass the model that Trainer trains")
    return groups


def _data_parallel_group(groups: list[dict]):
    """The world group under DDP (plain parameters, several ranks), else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    if any(is_dtensor(p) for g in groups for p in g["params"]):
        return None
    return dist.group.WORLD
