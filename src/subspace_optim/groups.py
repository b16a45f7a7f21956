"""Param groups: which weights are projected and which are trained densely."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return out if out is not None else getattr(model, "lm_head", None)


def target_modules(
    model: nn.Module, target: str | Sequence[str] = "all-linear", *, include_embeddings: bool = False
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs that ``target`` selects, like HF's ``optim_target_modules``.

    ``"all-linear"``: every ``nn.Linear`` except the output layer (lm_head). A string: a regular expression
    that must match a module's full dotted name. A list: names that contain any entry. Only ``nn.Linear``
    modules are selected, plus ``nn.Embedding`` modules and the output layer when ``include_embeddings``.
    """
    output = _output_layer(model)
    if isinstance(target, str) and target != "all-linear":
        pattern = re.compile(target)
        selects = lambda name: pattern.fullmatch(name) is not None  # noqa: E731
    elif isinstance(target, str):
        selects = lambda name: True  # noqa: E731
    elif isinstance(target, Sequence) and target and all(isinstance(t, str) for t in target):
        selects = lambda name: any(t in name for t in target)  # noqa: E731
    else:
        raise ValueError(f"Invalid target {target!r}; expected 'all-linear', a regex string or a list of names")

    chosen = []
    for name, module in model.named_modules():
        if include_embeddings and (isinstance(module, nn.Embedding) or module is output):
            chosen.append((name, module))
        elif isinstance(module, nn.Linear) and selects(name) and (target != "all-linear" or module is not output):
            chosen.append((name, module))
    if not chosen:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:5]
        raise ValueError(f"target {target!r} selects no nn.Linear module; linear modules include {linear}")
    return chosen


def subspace_param_groups(
    model: nn.Module,
    rank: int,
    target: str | Sequence[str] = "all-linear",
    *,
    include_embeddings: bool = False,
    named: bool = False,
    **overrides,
) -> list[dict]:
    """Split a model's trainable parameters into a projected group and a dense group.

    The weights of the targeted modules go to a group that carries ``rank`` (and ``overrides``, e.g.
    ``update_gap=200, scale=0.25``); everything else (norms, biases, embeddings and lm_head unless
    ``include_embeddings``) goes to a dense group trained by the same rule at full rank. Tied weights count once.
    ``named``: the parameters as (name, tensor) pairs, so that the optimizer keys their random bases by name
    (the same bases however the model is split or its modules ordered) and saves the names in its state_dict.
    """
    names = {}
    for name, param in model.named_parameters():
        names.setdefault(id(param), name)
    projected: dict[int, nn.Parameter] = {}
    for _, module in target_modules(model, target, include_embeddings=include_embeddings):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.requires_grad:
            projected[id(weight)] = weight
    dense: dict[int, nn.Parameter] = {}
    for param in model.parameters():
        if param.requires_grad and id(param) not in projected:
            dense[id(param)] = param

    def listed(params: dict[int, nn.Parameter]) -> list:
        return [(names[id(p)], p) for p in params.values()] if named else list(params.values())

    groups = []
    if dense:
        groups.append({"params": listed(dense)})
    if projected:
        groups.append({"params": listed(projected), "rank": rank, **overrides})
    return groups
