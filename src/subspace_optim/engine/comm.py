"""Subspace data parallelism (``grad_comm="subspace"``): a projected weight's gradient crosses the network as
R = Pᵀ G (r x D), not as G (m x n).

Under DDP every rank holds the same basis P (a random one is drawn from its key on every rank, an SVD one is
computed on its owner rank and broadcast), so Pᵀ(mean_i G_i) = mean_i Pᵀ G_i: averaging R is exact, which is
what the RSO paper's communication saving rests on. DDP is told to ignore the projected weights
(``subspace_ddp``). Their post-accumulate-grad hooks project each micro-batch's gradient, accumulate R (and free
G), and on the last micro-batch start an asynchronous all-reduce of R on the optimizer's own process group, which
overlaps the rest of backward; ``step()`` waits for them. A step that needs the whole gradient (a data-dependent
refresh: GaLore's SVD once per gap, online PCA every step, auto until its switch) all-reduces G instead, on that
step only. Dense parameters are DDP's, reduced as DDP reduces them.

Not bucketed: one all-reduce per projected weight (R is already the large, contiguous piece).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import is_dtensor
from . import layerwise
from .step import Work


@dataclass
class InFlight:
    """A reduction started by a hook: R (``work``) or the whole gradient (``work`` is None), and its handle."""

    param: Tensor
    handle: object
    work: Work | None = None


def comm_group(process_group=None):
    """The optimizer's own group over the ranks of ``process_group`` (default: the world): its asynchronous
    reductions never interleave with DDP's on one group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("grad_comm='subspace' needs an initialized process group: run under torchrun and call "
                           "torch.distributed.init_process_group first")
    return dist.new_group(dist.get_process_group_ranks(process_group or dist.group.WORLD))


def hook(optimizer, params: list[Tensor]) -> None:
    """Register the reduction hooks on the projected ``params`` (the others stay DDP's)."""
    projected = [p for p in params if optimizer._spaces[p].projects]
    for p in projected:
        if is_dtensor(p):
            raise ValueError("grad_comm='subspace' is data parallelism for replicated parameters (DDP); a DTensor "
                             "parameter is sharded, and FSDP2 reduce-scatters its gradient itself")
    layerwise.hook(optimizer, projected, on_gradient)


@torch.no_grad()
def on_gradient(optimizer, p: Tensor) -> None:
    """Count the micro-batch, project and accumulate (or let G accumulate where the step needs it whole); on the
    last micro-batch, start the reduction."""
    space, state = optimizer._spaces[p], optimizer.state[p]
    space.start(state)
    last = space.count_micro(state)
    if space.projector.needs_full_gradient(state, space.group):
        if last:
            handle = dist.all_reduce(p.grad, group=optimizer._comm_group, async_op=True)
            optimizer._in_flight.append(InFlight(p, handle))
    else:
        works = layerwise.accumulate_lowrank(space, state, last)
        if works:
            handle = dist.all_reduce(works[0].grad, group=optimizer._comm_group, async_op=True)
            optimizer._in_flight.append(InFlight(p, handle, works[0]))
    if last:
        state["micro"] = 0


def settle(optimizer) -> list[Work]:
    """At ``step()``: wait for every reduction and average it; the works of the reduced R (the parameters whose
    whole gradient was reduced have it in ``.grad`` again and take the standard path)."""
    in_flight, optimizer._in_flight = optimizer._in_flight, []
    world = dist.get_world_size(optimizer._comm_group) if in_flight else 1
    works = []
    for job in in_flight:
        job.handle.wait()
        if job.work is None:
            job.param.grad.div_(world)
        else:
            job.work.grad.div_(world)
            works.append(job.work)
    return works


def subspace_ddp(model: nn.Module, optimizer, **ddp_kwargs) -> nn.Module:
    """``DistributedDataParallel(model, **ddp_kwargs)`` that leaves the weights ``optimizer`` projects (built
    with ``grad_comm="subspace"``) to the optimizer, which reduces their gradients in the subspace."""
    from torch.nn.parallel import DistributedDataParallel

    leave_to_optimizers(model, [optimizer])
    return DistributedDataParallel(model, **ddp_kwargs)


@torch.no_grad()
def leave_to_optimizers(model: nn.Module, optimizers: list) -> None:
    """Before DDP wraps ``model``: tell it to ignore the weights that ``optimizers`` (each built with
    ``grad_comm="subspace"``) project, and broadcast those weights from the first rank, as DDP does at construction
    for the weights it keeps (a rank whose replica started elsewhere would otherwise stay elsewhere)."""
    from torch.nn.parallel import DistributedDataParallel

    for optimizer in optimizers:
        if getattr(optimizer, "grad_comm", None) != "subspace":
            raise ValueError("DDP can leave the projected weights only to an optimizer built with grad_comm='subspace'")
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    for name, p in model.named_parameters():
        owner = next((opt for opt in optimizers if p in opt._spaces and opt._spaces[p].projects), None)
        if owner is not None:
            ignored.add(name)
            dist.broadcast(p, group_src=0, group=owner.process_group)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored))
