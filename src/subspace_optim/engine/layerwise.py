"""Layer-wise mode: each parameter is updated from its post-accumulate-grad hook during backward and its gradient
freed at once (GaLore's per-layer weight updates). With ``accumulation_steps = k`` the projected gradient is
accumulated over k micro-batches (a full one only where a data-dependent refresh needs it).

An update is taken before anyone knows whether its gradient is finite, with no host read: it is masked on the
device, and a ``Guard`` keeps what it may change, to put the tensors back at once and the host's counters and keys
at ``step()``, which reads every parameter's flag together (the step's one host read).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .. import lowbit
from ..distributed import is_dtensor, local
from . import step
from .step import Refresh, Work
from .subspace import Subspace, regenerable

#: Parameter -> weak reference to the live layer-wise optimizer whose hooks update it: two would both update it.
_HOOK_OWNERS = WeakIdKeyDictionary()


def check_reduced(p: Tensor) -> None:
    """A post-accumulate-grad hook under DDP sees this rank's local, unreduced gradient (DDP averages it later):
    a layer-wise update from it would silently differ between ranks. FSDP2 fires the hook on the reduced shard."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and not is_dtensor(p):
        raise RuntimeError(
            "layerwise=True with a plain (non-DTensor) parameter in a multi-process job: under DDP its hook sees "
            "the local, unreduced gradient. Shard the model with FSDP2 (fully_shard), whose hooks see the reduced "
            "gradient, or use layerwise=False"
        )


def hook(optimizer, params: list[Tensor], on_grad=None) -> None:
    """Register the layer-wise hooks (``on_grad``: another hook body, comm.py's) on ``params``, refusing any that
    another live optimizer's hooks have. The hooks hold the optimizer weakly, so that dropping it drops them."""
    for p in params:
        if on_grad is None:
            check_reduced(p)
        owner = _HOOK_OWNERS.get(p, lambda: None)()
        if owner is not None and owner is not optimizer:
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} is already updated by another layer-wise optimizer's "
                "hooks: call remove_hooks() on that optimizer (or delete it) first"
            )
    ref = weakref.ref(optimizer)
    for p in params:
        _HOOK_OWNERS[p] = ref
        optimizer._hooks.append(p.register_post_accumulate_grad_hook(
            functools.partial(_run_hook, ref, on_grad or on_gradient)))


def unhook(optimizer, params) -> None:
    remove_handles(optimizer._hooks)
    for p in params:
        if _HOOK_OWNERS.get(p, lambda: None)() is optimizer:
            del _HOOK_OWNERS[p]


def remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _run_hook(optimizer: weakref.ref, on_grad, p: Tensor) -> None:
    live = optimizer()
    if live is not None:
        on_grad(live, p)


@torch.no_grad()
def on_gradient(optimizer, p: Tensor) -> None:
    """The hook: count the micro-batch, accumulate, and on the last one update ``p`` (guarded) and free its
    gradient."""
    space, state = optimizer._spaces[p], optimizer.state[p]
    check_reduced(p)
    last = space.count_micro(state)
    if space.projects:
        space.start(state)
    if not space.projects or space.projector.needs_full_gradient(state, space.group):
        if not last:
            return  # autograd keeps summing into p.grad
        works = [step.prepare(space, state, p.grad)]
    else:
        works = accumulate_lowrank(space, state, last)
        if works is None:
            return
    state.pop("acc", None)
    state["micro"] = 0
    _update_guarded(optimizer, works)
    p.grad = None


def accumulate_lowrank(space: Subspace, state: dict, last: bool) -> list[Work] | None:
    """Add this micro-batch's R = Pᵀ G to the accumulator and free G; on the last, the update's work."""
    if state["micro"] == 1 and space.projector.refresh_due(state, space.group):
        # A data-independent refresh needs no gradient: draw it now and accumulate in its basis, but commit it
        # (moments transported, count advanced) only with the step, as a standard step does.
        state["pending_basis"] = space.random_basis(space.key(state, state["refreshes"]))
    basis = state["pending_basis"] if "pending_basis" in state else space.basis(state)
    lowrank = space.project(basis, space.oriented(space.param.grad))
    space.param.grad = None
    state["acc"] = lowrank if "acc" not in state else state["acc"].add_(lowrank)
    if not last:
        return None
    acc = state.pop("acc")
    pending = Refresh(state.pop("pending_basis"), True) if "pending_basis" in state else None
    return [Work(space, state, acc, refresh=pending)]


@dataclass
class Saved:
    """What one guarded update may change, as it was: the state's host side (keys, counters, flags; tensors by
    reference) and copies of its tensors and of a dense weight, until the flag is known."""

    state: dict
    host: dict
    space: Subspace
    tensors: dict = field(default_factory=dict)
    weight: Tensor | None = None


@dataclass
class Switch:
    """auto's switch to random at a guarded refresh: its flag is read at step()."""

    state: dict
    space: Subspace
    flag: Tensor
    at: int  # the step it would record


class Guard:
    """One layer-wise update taken before its gradient is known to be finite: what it may change, as it was.
    Tensors are copied only for the update (one parameter's state, and a dense weight), the host values until
    ``step()``. A basis that random_basis="regenerate" draws again is neither copied nor kept: an undone update
    leaves it to be drawn from the restored refresh count."""

    def __init__(self, found: Tensor, works: list[Work]):
        self.found = found
        self.switches: list[Switch] = []
        self.saved: list[Saved] = []
        for w in works:
            drawn = regenerable(w.state, w.space.group)
            tensors = {path: t.detach().clone() for path, t in _tensors(w.state) if not (drawn and path == ("basis",))}
            host = _host_copy(w.state)
            if drawn:
                host.pop("basis", None)
            weight = None if w.projected else local(w.param).detach().clone()
            self.saved.append(Saved(w.state, host, w.space, tensors, weight))

    def put_back_tensors(self) -> None:
        """Where the gradient was not finite, every changed tensor takes its old value again (on the device)."""
        keep = self.found.reshape(()).bool()
        for saved in self.saved:
            for path, old in saved.tensors.items():
                now = _lookup(saved.state, path)
                if isinstance(now, Tensor) and now.shape == old.shape:
                    lowbit.put_back_(now, old, keep)
            if saved.weight is not None:
                local(saved.space.param).copy_(torch.where(keep, saved.weight, local(saved.space.param)))
            saved.tensors, saved.weight = {}, None  # the copies go now; the host side waits for step()

    def undo_host(self) -> None:
        for saved in self.saved:
            _restore_host(saved.state, saved.host)


def _update_guarded(optimizer, works: list[Work]) -> None:
    step.resolve(works)
    found, _ = step.found(works)
    guard = Guard(found, works)
    for w in works:
        if w.projected:
            w.mask = found
        if w.refresh is not None and isinstance(w.refresh.random, Tensor):  # auto: its switch is read at step()
            guard.switches.append(Switch(w.state, w.space, w.refresh.random, w.state["proj_step"]))
            w.refresh = Refresh(w.refresh.basis, False)
    step.commit(works)
    guard.put_back_tensors()
    optimizer._guards.append(guard)


def settle(optimizer) -> bool:
    """At ``step()``: read every guarded update's flag (and auto's switches) at once, undo the host side of the
    skipped ones; return whether all were taken."""
    guards, optimizer._guards = optimizer._guards, []
    if not guards:
        return True
    switches = [s for g in guards for s in g.switches]
    flags = step.read_host(torch.cat([g.found for g in guards] + [s.flag.reshape(1).to(guards[0].found)
                                                                   for s in switches]))
    skipped = [g for g, flag in zip(guards, flags) if flag]
    for guard in skipped:
        guard.undo_host()
    undone = {id(saved.state) for g in skipped for saved in g.saved}
    for switch, random in zip(switches, flags[len(guards):]):
        if random and id(switch.state) not in undone:  # what Switching.commit records, known only now
            switch.state["random_basis"] = True
            switch.state["switched_at"] = switch.at
            switch.space.release(switch.state)
    if skipped and optimizer.nonfinite == "raise":
        which = sorted({saved.space.index for g in skipped for saved in g.saved})
        raise FloatingPointError(f"non-finite gradient in parameter(s) #{which} (their updates were undone)")
    return not skipped


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


def _host_copy(state: dict) -> dict:
    """The state's keys and host values; tensors by reference (their values are put back on the device)."""
    return {k: _host_copy(v) if isinstance(v, dict) else v for k, v in state.items()}


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
