"""Run under ``torchrun --nproc_per_node 4`` (gloo, CPU) by tests/test_tensor_parallel.py; writes one JSON.

FSDP2 x tensor parallelism on a 2 x 2 mesh ("dp", "tp"): torch's ColwiseParallel / RowwiseParallel plan on a tiny
LLaMA's blocks (train.parallel.tensor_parallel), then ``fully_shard`` over "dp". Its projected weights cover every
layout: q/gate/up (colwise, FSDP2's _StridedShard over TP's rows: right projection), k/v (colwise, left),
o_proj (rowwise: rows over dp, columns over tp; right) and down_proj (rowwise, left), with rows that do not divide
evenly. Every case trains one process on the whole batch (the reference, on every rank) and the 2 x 2 job, each
dp rank on its half of the batch.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import subspace_optim as so
from subspace_optim.train.parallel import tensor_parallel
from distributed_worker import full, load_checkpoint, max_error
from torchrun import write_results

RULES = {"adamw": (so.SubspaceAdamW, {"lr": 1e-2}), "sgd": (so.SubspaceSGD, {"lr": 5e-2}),
         "adafactor": (so.SubspaceAdafactor, {"lr": 1e-2}), "lion": (so.SubspaceLion, {"lr": 1e-3})}
PROJECTORS = ("galore", "golore", "hybrid", "online_pca", "auto")
BATCH, SEQ, VOCAB, STEPS, GAP, RANK = 4, 6, 40, 5, 2, 3


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=22, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


def settings(projector: str) -> dict:
    extra = {"total_steps": 3, "random_fraction": 0.5} if projector == "hybrid" else {}
    if projector == "auto":  # every weight switches at its first decision (step 3), so both branches are compared
        extra.update(auto_threshold=-1e9, update_gap=3)
    return {"projector": projector, "update_gap": GAP} | extra


def make_optimizer(rule: str, model, layerwise: bool = False, named: bool = False, **kw):
    cls, hyper = RULES[rule]
    groups = so.subspace_param_groups(model, rank=RANK, target="all-linear", named=named, **kw)
    return cls(groups, **hyper, layerwise=layerwise)


def batch(step: int, dp_rank: int = 0, dp: int = 1):
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))
    return tokens.chunk(dp)[dp_rank]


def train(model, opt, steps, first: int = 1, dp_rank: int = 0, dp: int = 1):
    for step in range(first, first + steps):
        tokens = batch(step, dp_rank, dp)
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def parallelize(model, mesh):
    """TP over mesh["tp"] on every block, then FSDP2 over mesh["dp"] (each block, then the root)."""
    if "tp" in mesh.mesh_dim_names and mesh["tp"].size() > 1:
        tensor_parallel(model, mesh["tp"])
    dp = mesh["dp"]
    for block in model.model.layers:
        fully_shard(block, mesh=dp)
    return fully_shard(model, mesh=dp)


def case_equivalence(base, mesh, rule: str, projector: str, **extra) -> float:
    ref = copy.deepcopy(base)
    train(ref, make_optimizer(rule, ref, named=extra.get("named", False), **settings(projector)), STEPS)
    model = parallelize(copy.deepcopy(base), mesh)
    opt = make_optimizer(rule, model, **settings(projector), **extra)
    train(model, opt, STEPS, dp_rank=mesh["dp"].get_local_rank(), dp=mesh["dp"].size())
    return max_error(model, ref)


def layouts(base, mesh) -> list:
    """(name, side, what splits d, what splits D) of every projected weight: the cases the run covered."""
    model = parallelize(copy.deepcopy(base), mesh)
    opt = make_optimizer("adamw", model, **settings("golore"))
    names = {p: n for n, p in model.named_parameters()}
    found = []
    for space in opt._spaces.values():
        if space.projects:
            lay = space.layout
            found.append([names[space.param], "left" if space.left else "right", lay.rows.split, lay.cols.split,
                          lay.world])
    return found


def case_checkpoint(base, mesh, rule: str, projector: str, folder: Path, named: bool = False) -> dict:
    """Save at step 3 of the 2 x 2 job with DCP; resume at 4 x 1 (FSDP2 alone over the 4 ranks) and, in the test
    process, at 1 x 1; the uninterrupted 2 x 2 run is the reference."""
    dp_rank, dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
    straight = parallelize(copy.deepcopy(base), mesh)
    train(straight, make_optimizer(rule, straight, named=named, **settings(projector)), STEPS, dp_rank=dp_rank,
          dp=dp)
    first = parallelize(copy.deepcopy(base), mesh)
    opt = make_optimizer(rule, first, named=named, **settings(projector))
    train(first, opt, 3, dp_rank=dp_rank, dp=dp)
    dcp.save({"model": get_model_state_dict(first), "optim": get_optimizer_state_dict(first, opt)},
             checkpoint_id=str(folder))
    final = [full(p).detach() for p in straight.parameters()]  # a collective: every rank
    if dist.get_rank() == 0:
        torch.save(final, folder / "straight.pt")
    wide = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    resumed = parallelize(copy.deepcopy(base), wide)
    opt = make_optimizer(rule, resumed, named=named, **settings(projector))
    load_checkpoint(resumed, opt, folder)
    train(resumed, opt, STEPS - 3, first=4, dp_rank=dist.get_rank(), dp=4)
    return {"error_4x1": max_error(resumed, straight)}


def say(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def main(out: str, folder: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    base = tiny_llama()
    results, t0 = {"layouts": layouts(base, mesh)}, time.perf_counter()
    say("layouts", results["layouts"])
    for rule in RULES:
        for projector in PROJECTORS:
            results[f"tp/{rule}/{projector}"] = case_equivalence(base, mesh, rule, projector)
            say(rule, projector, results[f"tp/{rule}/{projector}"])
    for projector in ("galore", "golore", "online_pca"):
        results[f"tp-layerwise/adamw/{projector}"] = case_equivalence(base, mesh, "adamw", projector,
                                                                     layerwise=True)
        say("layerwise", projector, results[f"tp-layerwise/adamw/{projector}"])
    for rule, projector in (("adamw", "galore"), ("adamw", "golore"), ("adafactor", "auto")):
        sub = Path(folder) / f"{rule}-{projector}"
        results[f"dcp/{rule}/{projector}"] = case_checkpoint(base, mesh, rule, projector, sub)
        say("dcp", rule, projector, results[f"dcp/{rule}/{projector}"])
    # bases keyed by the parameters' names (FQNs): the steps of one process with the same names, through DCP too
    results["tp-named/adamw/golore"] = case_equivalence(base, mesh, "adamw", "golore", named=True)
    results["dcp-named/adamw/golore"] = case_checkpoint(base, mesh, "adamw", "golore", Path(folder) / "named",
                                                        named=True)
    results["seconds"] = time.perf_counter() - t0
    write_results(out, results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp())
