"""Saved state: the checks and conversions of ``load_state_dict``, the bases a state_dict leaves out, and the
state torch.distributed.checkpoint's template step creates."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor

from .. import lowbit
from ..distributed import is_dtensor, local
from ..projectors import PROJECTORS, reset_steps
from ..rules import FIRST_MOMENTS, get_rule
from . import step
from .settings import PRECISION_SETTINGS, STATE_SETTINGS, basis_dtype
from .subspace import Subspace, held


def check_settings(saved_groups: list[dict], live_groups: list[dict]) -> None:
    """Refuse a checkpoint whose groups were saved with other STATE_SETTINGS: its state means something else."""
    for i, (saved, live) in enumerate(zip(saved_groups, live_groups)):
        dense = saved.get("rank") is None and live.get("rank") is None  # its state depends on the rule only
        for key in ("rule",) if dense else STATE_SETTINGS:
            # A missing "rank" means a dense group; any other missing key, a checkpoint older than the setting.
            if (key in saved or key == "rank") and saved.get(key) != live.get(key):
                raise ValueError(
                    f"the checkpoint's param group {i} was saved with {key}={saved.get(key)!r}, this optimizer "
                    f"has {key}={live.get(key)!r}: its state belongs to another {key}. Build the optimizer "
                    f"with the saved settings, or adopt them with load_state_dict(state_dict, strict=False)"
                )


def precision_of(groups: list[dict]) -> list[dict]:
    """The PRECISION_SETTINGS of each group: this optimizer's, whatever the checkpoint says."""
    return [{k: g[k] for k in PRECISION_SETTINGS} for g in groups]


def adopt(optimizer, state_dict: dict, precision: list[dict]) -> None:
    """After torch.optim's load: this optimizer's precision settings back in its groups, each loaded state
    tensor in its saved dtype (a quantized one as it is), checked against its parameter, converted to this
    optimizer's precision (one warning), and a regenerable basis released."""
    for group, own in zip(optimizer.param_groups, precision):
        group.update(own)
        optimizer._validate(group)
    converted = set()
    saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
    id_map = dict(zip(saved_ids, (p for g in optimizer.param_groups for p in g["params"])))
    for idx, saved in state_dict["state"].items():
        p = id_map.get(idx)
        if p is not None and isinstance(saved, dict):  # a user's hook may have added other entries
            state, space = optimizer.state[p], optimizer._spaces[p]
            for key in [k for k, v in state.items() if isinstance(v, dict) and not v]:
                del state[key]  # DCP's flattened loader gives {} for a key the checkpoint lacks (a random basis)
            _restore_dtypes(state, saved, p.device)
            _check_loaded(space, state)
            converted |= _convert_precision(space, state)
            space.release(state)
    if converted:
        warnings.warn(f"the checkpoint's state was saved at another precision; converted: "
                      f"{', '.join(sorted(converted))} (lossy where it narrows)", stacklevel=3)


def _restore_dtypes(live: dict, saved: dict, device) -> None:
    for k, v in saved.items():
        if isinstance(v, Tensor) and (live[k].dtype != v.dtype or lowbit.is_quantized(v)):
            live[k] = lowbit.moved_to(v, device)
        elif isinstance(v, dict) and k in live:
            _restore_dtypes(live[k], v, device)


def _check_loaded(space: Subspace, state: dict) -> None:
    if not space.projects:
        if "basis" in state or "proj_step" in state:
            raise ValueError(f"saved state of parameter #{space.index} is projected but its group is dense")
        return
    (d, big), rank = space.dims, space.group["rank"]
    if "basis" in state and tuple(state["basis"].shape) != (d, rank):
        raise ValueError(
            f"saved basis of parameter #{space.index} has shape {tuple(state['basis'].shape)}, expected "
            f"{(d, rank)}: the checkpoint was made with another rank, side or model"
        )
    for k in FIRST_MOMENTS & state.keys():
        if state[k].shape[-1] != big and state.get("refreshes"):
            raise ValueError(f"saved {k} of parameter #{space.index} does not fit its shape")


def _convert_precision(space: Subspace, state: dict) -> set[str]:
    """Re-encode loaded moments for the group's state_bits and its basis for its basis_dtype; what changed."""
    group, changed = space.group, set()
    # what 32 bits means: the dtype the rule sees, R's (float32 or wider) or the dense parameter's
    p = space.param
    full = torch.promote_types(p.dtype, torch.float32) if space.projects else p.dtype
    for k in get_rule(group["rule"]).low_bit & state.keys():
        new = lowbit.convert(state[k], group["state_bits"], k in FIRST_MOMENTS, full)
        if new is not None:
            changed.add(f"{k} from {lowbit.bits_of(state[k])} to {group['state_bits']} bits")
            state[k] = new
    if "basis" in state and (state["basis"].dtype == torch.bfloat16) != (basis_dtype(group) == torch.bfloat16):
        changed.add(f"basis from {state['basis'].dtype} to {basis_dtype(group)}")
        state["basis"] = state["basis"].to(basis_dtype(group))
    return changed


def drop_regenerable_bases(optimizer, state_dict: dict) -> dict:
    """A state_dict post-hook. The bases of an always-random projector (GoLore) are regenerated from (seed,
    parameter index, refresh count): do not save them. Other projectors save their current basis, random or not,
    so that the keys of a saved state do not depend on when a switch happened: one that random_basis="regenerate"
    does not hold is drawn for the checkpoint (which is then the one "keep" saves)."""
    packed = state_dict["state"]
    always_random = {i for g in state_dict["param_groups"] if PROJECTORS.get(g.get("projector")) is not None
                     and PROJECTORS[g["projector"]].random for i in g["params"]}
    placed = [p for g in optimizer.param_groups for p in g["params"]]  # state_dict's indices, in this order
    for k, s in list(packed.items()):
        if not isinstance(s, dict):  # a user's hook may add other entries
            continue
        if k in always_random and "basis" in s:
            packed[k] = {kk: v for kk, v in s.items() if kk != "basis"}
        elif k not in always_random and "basis" not in s and s.get("random_basis"):
            if placed[k] not in optimizer._spaces:
                optimizer._reindex()  # the groups hold other parameters now (accelerate's FSDP2 swap)
            packed[k] = {**s, "basis": optimizer._spaces[placed[k]].basis(dict(s))}
    return state_dict


def init_state(space: Subspace, state: dict) -> None:
    """Create the state as it is before any step, without stepping (no SVD of zeros, no moment update).

    torch.distributed.checkpoint builds its load template by one ``step()`` at lr 0 on zero gradients; the
    state it finds must hold every key and shape the saved one has, and a real first step after it must be
    exactly the first step of a fresh optimizer.
    """
    group, p = space.group, space.param
    rule = get_rule(group["rule"])
    if not space.projects:
        rule.direction([torch.zeros_like(p)], [state], group)
        reset_steps(state)
        return
    space.start(state)
    layout, (d, big), projector = space.layout, space.dims, space.projector
    device = local(p).device
    if not projector.random:  # a placeholder, replaced at the first refresh (no moments to carry yet)
        state["basis"] = held(torch.zeros(d, group["rank"], device=device), group)
    state["random_basis"] = projector.random
    lowrank = torch.zeros(group["rank"], layout.local_cols(big), device=device)
    rule.direction([layout.wrap(lowrank)], [state], group)
    reset_steps(state)
    projector.init_state(state, group, lowrank, layout)


def is_template_step(live: list[tuple[Tensor, dict]], has_state: bool, groups: list[dict]) -> bool:
    """torch.distributed.checkpoint's state initialisation: no state yet, lr 0 everywhere, all gradients zero.

    Only a fresh optimizer at lr 0 pays for the check (one host read); a real first step at lr 0 (a warm-up
    from 0) has nonzero gradients and is taken as torch.optim takes it.
    """
    if not live or has_state or not all(_is_zero(group["lr"]) for group in groups):
        return False
    norms = torch._foreach_norm([local(p.grad) for p, _ in live])
    largest = torch.stack([n.float() for n in norms]).max().reshape(1)
    if any(is_dtensor(p) for p, _ in live):
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return step.read_host(largest)[0] == 0


def _is_zero(lr) -> bool:
    """Whether an lr is 0, without a device synchronisation: DCP's state initialisation sets a tensor lr to a new
    host tensor of 0, so a tensor lr on an accelerator is never its lr and is not read."""
    if isinstance(lr, Tensor):
        return lr.device.type == "cpu" and lr.reshape(()).tolist() == 0  # a host read, not a device sync
    return lr == 0
