"""torchtitan's own components around SubspaceOptimizersContainer: its llama3 debug model (built on the CPU, with
torchtitan's SDPA inner attention in place of FlexAttention, which has no CPU backward), its OptimizersContainer
config, its LR schedulers and its DCP CheckpointManager.

Run under torchrun (2 gloo processes, the model under FSDP2's ``fully_shard`` per block and at the root) it writes
every case's results to a JSON file; tests/test_torchtitan.py reads them and imports the helpers for its
single-process tests.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.optimizer import LRSchedulersContainer, ParamGroupConfig
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
from torchtitan.models.llama3 import model_registry

from subspace_optim.integrations.torchtitan import SubspaceOptimizersContainer
from torchrun import write_results

#: Refreshes at steps 1 and 3 (update_gap 2); the step after the save (4) uses the loaded or regenerated basis.
STEPS, SAVE_AT, BATCH, SEQ = 4, 3, 4, 16
#: Every projected weight of the blocks (fused wqkv, wo, w1, w2, w3): torchtitan FQNs, matched by a regex.
PROJECTED = r"^layers\.\d+\.(attention|feed_forward)\.\S+\.weight$"
COUNTERS = ("proj_step", "refreshes", "auto_count")


def debug_model(seed: int = 0, blocks: int | None = None) -> nn.Module:
    """torchtitan's llama3 "debugmodel" (6 blocks, or its first ``blocks``; dim 256, vocab 2048), built and
    initialised as its trainer does (on the meta device, then ``init_weights``), with causal SDPA attention so that
    it trains on the CPU."""
    config = model_registry("debugmodel").model
    config.layers = config.layers[:blocks]
    for _, _, parent, attr in list(config.traverse(FlexAttention.Config)):
        setattr(parent, attr, ScaledDotProductAttention.Config())
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model


def optimizer_config(name: str = "SubspaceAdamW", **settings) -> SubspaceOptimizersContainer.Config:
    """The blocks' matrices projected at rank 8 with a refresh every 2 steps; embeddings, norms and lm_head dense."""
    return SubspaceOptimizersContainer.Config(param_groups=[
        ParamGroupConfig(pattern=PROJECTED, optimizer_name=name,
                         optimizer_kwargs={"lr": 1e-2, "rank": 8, "update_gap": 2, **settings}),
        ParamGroupConfig(pattern=r".*", optimizer_name=name, optimizer_kwargs={"lr": 1e-2}),
    ])


def build(model: nn.Module, config: SubspaceOptimizersContainer.Config):
    """The container and torchtitan's LR schedulers (2 warm-up steps, then linear decay), as its trainer builds
    them: ``config.build(model_parts=...)``."""
    optimizers = config.build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_type="linear").build(
        optimizers=optimizers, training_steps=STEPS)
    return optimizers, schedulers


def batch(step: int) -> torch.Tensor:
    """This rank's share of step ``step``'s global batch (the whole batch in one process)."""
    tokens = torch.randint(0, 2048, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
    if dist.is_initialized():
        return tokens.chunk(dist.get_world_size())[dist.get_rank()]
    return tokens


def train(model: nn.Module, optimizers, schedulers, steps: range) -> None:
    """torchtitan's step: zero_grad, forward/backward, optimizers.step(), lr_schedulers.step()."""
    for step in steps:
        optimizers.zero_grad()
        tokens = batch(step)
        logits = model(tokens)
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        optimizers.step()
        schedulers.step()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p).detach().clone() for n, p in model.named_parameters()}


def max_error(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def template_step(model: nn.Module, optimizers) -> dict:
    """What the first ``state_dict()`` of a fresh container (torchtitan's ``init_optim_state``: one step at lr 0
    on zero gradients) changed: the weights, any counter, any refresh (an SVD basis left at its zero placeholder),
    the learning rates and the gradients it set."""
    before, lrs = weights(model), [g["lr"] for o in optimizers for g in o.param_groups]
    flat = optimizers.state_dict()
    states = [s for o in optimizers for s in o.state.values()]
    bases = [full(s["basis"]) for s in states if "basis" in s]
    return {
        "weights_unchanged": max_error(before, weights(model)) == 0.0,
        "state_created": len(states) == len(list(model.parameters())),
        "counters_zero": all(s.get(k, 0) == 0 for s in states for k in COUNTERS)
        and all(full(s["step"]).item() == 0 for s in states if "step" in s),
        "no_refresh": all(b.count_nonzero().item() == 0 for b in bases),
        "no_skip": all(g["skipped_steps"] == 0 for o in optimizers for g in o.param_groups),
        "lrs_restored": lrs == [g["lr"] for o in optimizers for g in o.param_groups],
        "grads_cleared": all(p.grad is None for p in model.parameters()),
        "fqn_keyed": all(k.startswith(("state.", "param_groups.")) for k in flat),
    }


def checkpointer(folder: Path, model: nn.Module, optimizers, schedulers) -> CheckpointManager:
    """torchtitan's DCP CheckpointManager as its trainer builds it (model, optimizers, LR schedulers)."""
    config = CheckpointManager.Config(enable=True, folder="checkpoint", interval=1, keep_latest_k=0,
                                      last_save_model_only=False, initial_load_model_only=False)
    return config.build(dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
                        states={}, sd_adapter=None, base_folder=str(folder))


def shard(model: nn.Module) -> nn.Module:
    for block in model.layers.values():
        fully_shard(block)
    return fully_shard(model)


def case_resume(projector: str, folder: Path, sharded: bool = True, blocks: int | None = None, **settings) -> dict:
    """Train STEPS steps straight; train SAVE_AT steps after a template step (as a seed checkpoint's state_dict
    makes it), save with torchtitan's CheckpointManager, load into a fresh model (other weights) and container,
    train the rest. ``sharded``: every model under FSDP2. The resumed run must equal the straight one bitwise."""
    config = optimizer_config(projector=projector, **settings)

    def model(seed: int = 0) -> nn.Module:
        net = debug_model(seed, blocks)
        return shard(net) if sharded else net

    straight = model()
    opt, sched = build(straight, config)
    train(straight, opt, sched, range(1, SAVE_AT + 1))
    at_save = weights(straight)
    train(straight, opt, sched, range(SAVE_AT + 1, STEPS + 1))

    first = model()
    opt, sched = build(first, config)
    template = template_step(first, opt)
    train(first, opt, sched, range(1, SAVE_AT + 1))
    template["same_trajectory"] = max_error(at_save, weights(first)) == 0.0
    checkpointer(folder, first, opt, sched).save(curr_step=SAVE_AT)

    resumed = model(seed=1)
    opt, sched = build(resumed, config)
    loaded = checkpointer(folder, resumed, opt, sched).load()
    train(resumed, opt, sched, range(SAVE_AT + 1, STEPS + 1))
    error = max_error(weights(straight), weights(resumed))
    return {"template": template, "loaded": loaded, "error": error, "lr_steps": sched.schedulers[0].last_epoch}


def main(out: str, folder: str) -> None:
    dist.init_process_group("gloo")
    results, t0 = {}, time.perf_counter()
    for projector in ("golore", "galore"):  # a basis regenerated from its FQN; one saved (each rank owns half)
        results[projector] = case_resume(projector, Path(folder) / projector)
    results["seconds"] = time.perf_counter() - t0
    write_results(out, results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp())
