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
from torch import nn

from .config import AUTO, UsageError

MODES = ("none", "ddp", "fsdp2")
#: torch's tensor-parallel plan for a LLaMA block (Megatron's): the projections into the heads and the MLP's
#: hidden units split by output rows, the projections out of them by input columns, so that each block needs one
#: all-reduce of its activations in forward and one in backward. The embeddings, norms and lm_head stay whole.
LLAMA_TP_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
                 "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
                 "mlp.down_proj": "rowwise"}


def tensor_parallel(model: nn.Module, mesh) -> nn.Module:
    """Apply :data:`LLAMA_TP_PLAN` with torch's ``ColwiseParallel``/``RowwiseParallel`` to every block of an HF
    LLaMA-family model (``model.model.layers``) on the 1-D device ``mesh``; the heads must divide among its ranks."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    size, config = mesh.size(), model.config
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or \
        config.num_attention_heads
    if heads % size or kv_heads % size:
        raise UsageError(f"--tp {size}: the model's {heads} attention heads and {kv_heads} key/value heads must "
                         f"divide among the {size} tensor-parallel ranks")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {name: styles[style]() for name, style in LLAMA_TP_PLAN.items()}
    for block in model.model.layers:
        parallelize_module(block, mesh, plan)
    return model


@dataclass
class Parallel:
    """Where this process stands in the job: ``mode``, ``rank`` of ``world``, its ``device``."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def optimizer_group(self):
        """The group our optimizer shares SVD refreshes over: DDP's (FSDP2's DTensors carry their own mesh)."""
        return dist.group.WORLD if self.mode == "ddp" else None

    def share(self, batch: dict) -> dict:
        """This process's contiguous share of a global batch (every tensor split along its first dimension)."""
        if self.world == 1:
            return batch
        return {k: v.chunk(self.world)[self.rank] for k, v in batch.items()}

    def mean(self, value: float) -> float:
        """The mean of a number over the processes (the global batch's loss from the shares' losses)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def total(self, value: int) -> int:
        return value * self.world

    def wrap(self, model: nn.Module, optimizer=None) -> nn.Module:
        """The model to train: DDP around it (leaving the projected weights to an ``optimizer`` that reduces
        their gradients in the subspace), or FSDP2 applied in place (each transformer block, then the root). The
        blocks are the classes an HF model names in ``_no_split_modules``, also when ``model`` wraps one (the
        fused loss): the root is then the wrapper, whose forward unshards the root's parameters, lm_head's too."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            from ..engine.comm import subspace_ddp

            ids = [self.device.index] if self.device.type == "cuda" else None
            if getattr(optimizer, "grad_comm", "full") == "subspace":
                return subspace_ddp(model, optimizer, device_ids=ids)
            return DistributedDataParallel(model, device_ids=ids)
        if self.mode == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            blocks = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
            for module in model.modules():
                if type(module).__name__ in blocks:
                    fully_shard(module)
            fully_shard(model)
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


def start(mode: str, device: str, batch_size: int) -> Parallel:
    """Join the torchrun job (clear errors outside one, or for a batch that does not split)."""
    if mode not in MODES:
        raise UsageError(f"--distributed {mode}: choose one of {', '.join(MODES)}")
    if mode == "none":
        name = device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        return Parallel(device=torch.device(name))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UsageError(f"--distributed {mode} runs under torchrun: torchrun --nproc_per_node N -m subspace_optim "
                         f"train ... --distributed {mode}")
    world = int(os.environ["WORLD_SIZE"])
    if batch_size % world:
        raise UsageError(f"--batch-size {batch_size} is the global batch and must divide among the {world} "
                         "processes")
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    where = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Parallel(mode, dist.get_rank(), world, where)


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
