"""The harness under torchrun: DDP or FSDP2 over N processes, the same global batch as one process.

    torchrun --nproc_per_node N -m subspace_optim train ... --distributed ddp|fsdp2

Every process builds the same model from the same seed and reads the same stream of global batches; each trains
on its contiguous share (``--batch-size`` / N sequences). DDP averages the gradients, FSDP2 reduce-scatters their
average, so a step equals one process's step on the whole batch. Rank 0 alone writes the run folder, the logs and
the progress bar. Checkpoints: DDP (whose model and optimizer state are replicated) writes rank 0's copy in the
single-process format; FSDP2 writes its sharded weights and optimizer state with torch.distributed.checkpoint,
which can be resumed at another number of processes.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import AUTO, UsageError

MODES = ("none", "ddp", "fsdp2")
#: torch's tensor-parallel plan for a LLaMA block (Megatron's): the projections into the heads and the MLP's
#: hidden units split by output rows, the projections out of them by input columns, so that each block needs one
#: all-reduce of its activations in forward and one in backward. The embeddings, norms and lm_head stay whole.
LLAMA_TP_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
                 "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
                 "mlp.down_proj": "rowwise"}


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the modules of the classes an HF model names in ``_no_split_modules``, also when
    ``model`` wraps one (the fused loss)."""
    names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
    return [module for module in model.modules() if type(module).__name__ in names]


def tensor_parallel(model: nn.Module, mesh) -> nn.Module:
    """Apply :data:`LLAMA_TP_PLAN` with torch's ``ColwiseParallel``/``RowwiseParallel`` to every block of an HF
    LLaMA-family model on the 1-D device ``mesh``; the heads must divide among its ranks."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    size = mesh.size()
    config = next(m.config for m in model.modules() if hasattr(getattr(m, "config", None), "num_attention_heads"))
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % size or kv_heads % size:
        raise UsageError(f"--tp {size}: the model's {heads} attention heads and {kv_heads} key/value heads must "
                         f"divide among the {size} tensor-parallel ranks")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for block in blocks(model):
        parallelize_module(block, mesh, {name: styles[style]() for name, style in LLAMA_TP_PLAN.items()})
    return model


def clip_grad_norm_(parameters, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients on several device meshes (under --tp the blocks' weights
    live on the 2-D mesh, the embeddings and norms on its "dp" row; torch's stacks their norms, which DTensor
    refuses): each mesh's norm is reduced over it once (``full_tensor``), the total is their 2-norm, and every
    gradient is scaled by torch's own ``clip_grads_with_norm_``. Returns the total norm, as torch's does."""
    by_mesh: dict = {}
    for p in parameters:
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    if not by_mesh:
        return torch.zeros(())
    norms = []
    for params in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]
    for params in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


@dataclass
class Parallel:
    """Where this process stands in the job: ``mode``, ``rank`` of ``world``, its ``device``; with tensor
    parallelism (``tp`` > 1) the processes form a ``mesh`` of (world / tp data-parallel) x (tp) ranks, and the
    ``tp`` processes of a row take the same share of the batch."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    tp: int = 1
    mesh: object = None

    @property
    def dp(self) -> int:
        """Data-parallel replicas: the number of shares of a global batch."""
        return self.world // self.tp

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def optimizer_group(self):
        """The group our optimizer shares SVD refreshes over: DDP's (FSDP2's DTensors carry their own mesh)."""
        return dist.group.WORLD if self.mode == "ddp" else None

    def share(self, batch: dict) -> dict:
        """This process's contiguous share of a global batch (every tensor split along its first dimension)."""
        if self.dp == 1:
            return batch
        return {k: v.chunk(self.dp)[self.rank // self.tp] for k, v in batch.items()}

    def mean(self, value: float) -> float:
        """The mean of a number over the processes (the global batch's loss from the shares' losses)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def total(self, value: int) -> int:
        """A count over the global batch from this process's share."""
        return value * self.dp

    def wrap(self, model: nn.Module, optimizer=None) -> nn.Module:
        """The model to train: DDP around it (leaving the projected weights to an ``optimizer`` that reduces
        their gradients in the subspace), or FSDP2 applied in place (each transformer block, then the root; with
        ``tp`` > 1 over the mesh's "dp" dimension, after tensor parallelism over its "tp" dimension). With the fused
        loss the root is the wrapper, whose forward unshards the root's parameters, lm_head's too."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            from ..engine.comm import subspace_ddp

            ids = [self.device.index] if self.device.type == "cuda" else None
            if getattr(optimizer, "grad_comm", "full") == "subspace":
                return subspace_ddp(model, optimizer, device_ids=ids)
            return DistributedDataParallel(model, device_ids=ids)
        if self.mode == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            if self.tp > 1:  # TP within a mesh row first, then FSDP2 across the rows (torch's 2-D composition)
                tensor_parallel(model, self.mesh["tp"])
            dp = self.mesh["dp"] if self.mesh is not None else None
            for module in blocks(model):
                fully_shard(module, mesh=dp)
            fully_shard(model, mesh=dp)
        return model

    def same(self, value):
        """Rank 0's ``value`` on every process (e.g. a default run folder, named by the time)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.mode != "none" and dist.is_initialized():
            dist.destroy_process_group()


def start(mode: str, device: str, batch_size: int, tp: int = 1) -> Parallel:
    """Join the torchrun job (clear errors outside one, or for a batch or a tensor-parallel degree that does not
    divide it)."""
    if mode not in MODES:
        raise UsageError(f"--distributed {mode}: choose one of {', '.join(MODES)}")
    if mode == "none":
        name = device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        return Parallel(device=torch.device(name))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UsageError(f"--distributed {mode} runs under torchrun: torchrun --nproc_per_node N -m subspace_optim "
                         f"train ... --distributed {mode}")
    world = int(os.environ["WORLD_SIZE"])
    if world % tp:
        raise UsageError(f"--tp {tp} must divide the {world} processes")
    if batch_size % (world // tp):
        among = f"{world // tp} data-parallel rows of --tp {tp} processes" if tp > 1 else f"{world} processes"
        raise UsageError(f"--batch-size {batch_size} is the global batch and must divide among the {among}")
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    where = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mesh = None
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(where.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return Parallel(mode, dist.get_rank(), world, where, tp, mesh)


def check_restarts(resume: str | None) -> None:
    """Under ``torchrun --max-restarts N``, warn (rank 0, at every attempt's start) about what would make a restart
    fail, before the failure: torchrun repeats the command, so only ``--resume auto`` continues the run; and torch's
    torchrun shares its rendezvous TCPStore with the processes and keeps a killed attempt's keys there, so the
    restarted process group can read a dead process's address and fail to connect (pytorch/pytorch#135712; here,
    with torch 2.13 and gloo, none of 5 restarts of a minimal 2-process job connected, and 2 of 5 restarts of the
    harness failed or hung), unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each attempt a store of its own."""
    if not int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) or os.environ.get("RANK") != "0":
        return
    if resume != AUTO:
        warnings.warn("torchrun --max-restarts repeats this command: add --resume auto, or a restart stops on the "
                      "run folder it finds instead of continuing the run from its checkpoint")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        warnings.warn("torchrun --max-restarts with its rendezvous store shared (torch's default): a restart can read "
                      "the killed attempt's addresses and fail to connect (pytorch/pytorch#135712); start torchrun "
                      "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")


class NoLog:
    """The metrics log of a process other than rank 0: writes nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass
