"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU) by tests/test_distributed.py; writes one JSON of results.

Every case trains the same model twice: on one process with the whole batch (the reference, computed on every
rank), and distributed (FSDP2 ``fully_shard`` or DDP) with each rank taking its share of the same global batch.
The model has weights whose rows do not divide among 2 ranks, on both projection sides, and a flattened 3-D one.
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
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import subspace_optim as so
from subspace_optim import lowbit
from torchrun import write_results

RULES = {"adamw": (so.SubspaceAdamW, {"lr": 1e-2}), "sgd": (so.SubspaceSGD, {"lr": 5e-2}),
         "adafactor": (so.SubspaceAdafactor, {"lr": 1e-2}), "lion": (so.SubspaceLion, {"lr": 1e-3})}
PROJECTORS = ("galore", "golore", "hybrid", "online_pca", "auto")
BATCH, STEPS, GAP, RANK = 8, 7, 2, 3


class Net(nn.Module):
    """right: 25 x 10 (right projection, 25 rows: uneven over 2), left: 7 x 25 (left, uneven), conv 6 x 3 x 4."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(15, 10)
        self.right = nn.Linear(10, 25)
        self.left = nn.Linear(25, 7)
        self.conv = nn.Conv1d(3, 6, 4)

    def forward(self, tokens, signal):
        h = torch.tanh(self.right(self.embed(tokens).mean(1)))
        return self.left(h).square().mean() + self.conv(signal).square().mean()


def batch(step: int, size: int = BATCH):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 15, (size, 5), generator=gen), torch.randn(size, 3, 9, generator=gen)


def groups(model: nn.Module, **settings):
    projected = [model.right.weight, model.left.weight, model.conv.weight]
    ids = {id(p) for p in projected}
    return [{"params": [p for p in model.parameters() if id(p) not in ids]},
            {"params": projected, "rank": RANK, **settings}]


def settings(projector: str) -> dict:
    extra = {"total_steps": 4, "random_fraction": 0.5} if projector == "hybrid" else {}
    if projector == "auto":
        # z far below any: every weight switches at its first decision (step 3; a decision needs 2 steps after
        # a refresh), so both branches are compared
        extra.update(auto_threshold=-1e9, update_gap=3)
    return {"projector": projector, "update_gap": GAP} | extra


def make_optimizer(rule: str, model: nn.Module, **kw):
    cls, hyper = RULES[rule]
    proj = {k: kw.pop(k) for k in list(kw) if k in ("projector", "update_gap", "total_steps", "random_fraction",
                                                     "auto_threshold", "pca_rule")}
    return cls(groups(model, **proj), **hyper, **kw)


def local_batch(step: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens, signal = batch(step)
    share = BATCH // world
    return tokens[rank * share:(rank + 1) * share], signal[rank * share:(rank + 1) * share]


def train(model, opt, steps, micro: int = 1, per_rank: bool = False, first: int = 1):
    for step in range(first, first + steps):
        for k in range(micro):
            data = local_batch(step * 10 + k) if per_rank else batch(step * 10 + k)
            (model(*data) / micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def max_error(a: nn.Module, b: nn.Module) -> float:
    return max((full(p).detach() - full(q).detach()).abs().max().item()
               for p, q in zip(a.parameters(), b.parameters()))


def shard(model: nn.Module) -> nn.Module:
    for module in (model.right, model.left, model.conv, model.embed):
        fully_shard(module)
    return fully_shard(model)


def reference(base, rule, steps=STEPS, micro=1, **kw):
    model = copy.deepcopy(base)
    train(model, make_optimizer(rule, model, **kw), steps, micro)
    return model


def case_equivalence(base, wrap: str, rule: str, projector: str, **extra) -> float:
    ref = reference(base, rule, **settings(projector), **extra)
    model = copy.deepcopy(base)
    if wrap == "fsdp2":
        model = shard(model)
        opt = make_optimizer(rule, model, **settings(projector), **extra)
        train(model, opt, STEPS, per_rank=True)
    else:
        ddp = DDP(model)
        opt = make_optimizer(rule, model, process_group=dist.group.WORLD, **settings(projector), **extra)
        train(ddp, opt, STEPS, per_rank=True)
    return max_error(model, ref)


def case_regenerate(base, projector: str, layerwise: bool) -> float:
    """random_basis="regenerate" under FSDP2 against "keep" under FSDP2: 0.0 (bitwise)."""
    models = []
    for mode in ("keep", "regenerate"):
        model = shard(copy.deepcopy(base))
        opt = make_optimizer("adamw", model, layerwise=layerwise, random_basis=mode, **settings(projector))
        train(model, opt, STEPS, per_rank=True)
        models.append(model)
    return max_error(*models)


def case_layerwise(base, rule: str, projector: str, micro: int) -> float:
    """Layer-wise updates under FSDP2 (hooks fire on the reduced shard) against standard single-process steps."""
    ref = reference(base, rule, micro=micro, **settings(projector))
    model = shard(copy.deepcopy(base))
    opt = make_optimizer(rule, model, layerwise=True, accumulation_steps=micro, **settings(projector))
    train(model, opt, STEPS, micro=micro, per_rank=True)
    return max_error(model, ref)


def case_subspace(base, projector: str, layerwise: bool, micro: int) -> dict:
    """grad_comm="subspace" under DDP against standard single-process steps on the whole batch, and what the
    optimizer's own group reduced: numbers per step, against the projected weights' whole gradients."""
    ref = reference(base, "adamw", micro=micro, **settings(projector))
    model = copy.deepcopy(base)
    opt = make_optimizer("adamw", model, grad_comm="subspace", layerwise=layerwise, accumulation_steps=micro,
                         **settings(projector))
    sent, original = [], dist.all_reduce

    def counted(tensor, *args, group=None, **kwargs):
        if group is opt._comm_group:
            sent.append(tensor.numel())
        return original(tensor, *args, group=group, **kwargs)

    dist.all_reduce = counted
    try:
        train(so.subspace_ddp(model, opt), opt, STEPS, micro=micro, per_rank=True)
    finally:
        dist.all_reduce = original
    projected = groups(model)[1]["params"]
    error, per_step = max_error(model, ref), sum(sent) / STEPS
    for k in range(micro):  # one more step (8: no refresh due), looked at between backward and step()
        model(*local_batch(80 + k)).backward()
    freed = all(p.grad is None for p in projected)  # R alone was kept (and sent) where no whole G is needed
    opt.step()
    return {"error": error, "sent_per_step": per_step, "whole": sum(p.numel() for p in projected),
            "freed_in_backward": freed}


def subspace_refusals(base) -> dict:
    """grad_comm="subspace" refuses sharded (FSDP2) parameters, and a GradScaler (its hooks reduce scaled
    gradients in backward), each with a clear error."""
    found = {}
    try:
        make_optimizer("adamw", shard(copy.deepcopy(base)), grad_comm="subspace", **settings("golore"))
        found["subspace-dtensor-refused"] = False
    except ValueError as err:
        found["subspace-dtensor-refused"] = "FSDP2 reduce-scatters" in str(err)
    model = copy.deepcopy(base)
    opt = make_optimizer("adamw", model, grad_comm="subspace", **settings("golore"))
    ddp, scaler = so.subspace_ddp(model, opt), torch.amp.GradScaler("cpu")
    scaler.scale(ddp(*local_batch(1))).backward()
    try:
        scaler.step(opt)
        found["subspace-scaler-refused"] = False
    except RuntimeError as err:
        found["subspace-scaler-refused"] = "cannot be used with a GradScaler" in str(err)
    for flight in opt._in_flight:  # the reductions the hooks started (both ranks did) are finished
        flight.handle.wait()
    return found


def load_checkpoint(model: nn.Module, opt, folder) -> None:
    """A DCP checkpoint of a model and its optimizer loaded into ``model`` and ``opt``, at any layout (DCP
    reshards; the optimizer's state template is built by its lr-0 step)."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def error_to_saved(model: nn.Module, path) -> float:
    """The largest difference between ``model``'s weights and those saved (whole tensors) at ``path``."""
    saved = torch.load(path, weights_only=True)
    return max((full(p).detach() - q).abs().max().item() for p, q in zip(model.parameters(), saved))


def case_checkpoint(base, rule: str, projector: str, folder: Path, **extra) -> dict:
    """Save at step 3 with DCP, resume in a fresh model and optimizer: bitwise equal to never stopping."""
    cfg = {**settings(projector), **extra}
    straight = shard(copy.deepcopy(base))
    opt = make_optimizer(rule, straight, **cfg)
    train(straight, opt, STEPS, per_rank=True)

    first = shard(copy.deepcopy(base))
    opt = make_optimizer(rule, first, **cfg)
    train(first, opt, 3, per_rank=True)
    dcp.save({"model": get_model_state_dict(first), "optim": get_optimizer_state_dict(first, opt)},
             checkpoint_id=str(folder))
    resumed = shard(copy.deepcopy(base))
    with torch.no_grad():  # a different starting point, so that only the checkpoint can make them equal
        for p in resumed.parameters():
            p.add_(1.0)
    opt2 = make_optimizer(rule, resumed, **cfg)
    state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, opt2)}
    template_untouched = all(full(p).detach().ne(full(q).detach()).any().item()
                             for p, q in zip(resumed.parameters(), first.parameters()))
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, opt2, state["optim"])
    train(resumed, opt2, STEPS - 3, per_rank=True, first=4)
    final = [full(p).detach() for p in straight.parameters()]
    if dist.get_rank() == 0:  # the uninterrupted run's weights, for the test that resumes on one process
        torch.save(final, folder / "straight.pt")
    return {"bitwise": max_error(resumed, straight) == 0.0, "error": max_error(resumed, straight),
            "template_untouched": template_untouched}


def main(out: str, folder: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    base = Net()
    results, t0 = {}, time.perf_counter()
    for rule in RULES:
        for projector in PROJECTORS:
            results[f"fsdp2/{rule}/{projector}"] = case_equivalence(base, "fsdp2", rule, projector)
    for projector in PROJECTORS:
        results[f"ddp/adamw/{projector}"] = case_equivalence(base, "ddp", "adamw", projector)
    results["ddp/sgd/galore"] = case_equivalence(base, "ddp", "sgd", "galore")
    try:  # under DDP a hook would see the local, unreduced gradient: refused, never silently used
        make_optimizer("adamw", DDP(copy.deepcopy(base)).module, layerwise=True, **settings("golore"))
        results["ddp-layerwise-refused"] = False
    except RuntimeError as err:
        results["ddp-layerwise-refused"] = "unreduced" in str(err)
    for projector in ("galore", "golore", "online_pca"):
        results[f"fsdp2-layerwise/adamw/{projector}"] = case_layerwise(base, "adamw", projector, 1)
        results[f"fsdp2-layerwise-accumulate/adamw/{projector}"] = case_layerwise(base, "adamw", projector, 2)
    for rule, projector in (("adamw", "galore"), ("adamw", "golore"), ("sgd", "hybrid"), ("adamw", "auto"),
                            ("adamw", "online_pca")):
        sub = Path(folder) / f"{rule}-{projector}"
        results[f"dcp/{rule}/{projector}"] = case_checkpoint(base, rule, projector, sub)
    for projector in ("golore", "hybrid"):  # random bases regenerated: the same bits, and DCP's template fits
        for layerwise in (False, True):
            name = f"fsdp2{'-layerwise' if layerwise else ''}-regenerate/adamw/{projector}"
            results[name] = case_regenerate(base, projector, layerwise)
        results[f"dcp-regenerate/adamw/{projector}"] = case_checkpoint(
            base, "adamw", projector, Path(folder) / f"regenerate-{projector}", random_basis="regenerate")
    results.update(subspace_refusals(base))
    for projector in PROJECTORS:  # gradients reduced in the subspace, standard and layer-wise, with accumulation
        for layerwise, micro in ((False, 1), (True, 1), (True, 2)):
            mode = "-layerwise" * layerwise + "-accumulate" * (micro > 1)
            results[f"ddp-subspace{mode}/adamw/{projector}"] = case_subspace(base, projector, layerwise, micro)
    # Low-precision moments. bf16 rounds each number alone: the sharded run matches one process as fp32 does. The
    # worker's tensors are far below the 4096-number threshold, so 8-bit quantizes here every local moment of a
    # whole number of 3-number blocks: a right projection's column shard (r x D_i) groups its numbers into other
    # blocks than one process's whole r x D, so it agrees only to quantization error.
    for projector in ("galore", "golore"):
        results[f"fsdp2-bits16/adamw/{projector}"] = case_equivalence(base, "fsdp2", "adamw", projector, state_bits=16)
    lowbit.MIN_QUANTIZED, lowbit.BLOCK = 1, {8: 3, 4: 2}
    for projector in ("galore", "golore"):
        results[f"fsdp2-bits8/adamw/{projector}"] = case_equivalence(base, "fsdp2", "adamw", projector, state_bits=8)
        results[f"dcp-bits8/adamw/{projector}"] = case_checkpoint(base, "adamw", projector,
                                                                  Path(folder) / f"bits8-{projector}", state_bits=8)
    results["seconds"] = time.perf_counter() - t0
    write_results(out, results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp())
