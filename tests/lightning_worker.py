"""Lightning's Trainer with our optimizers, against a plain torch loop: the module, data and cases that
tests/test_lightning.py runs in one process, and (run under torchrun, 2 processes, gloo) the DDP cases, whose
results it writes to a JSON file.

An MLP 12 -> 16 -> 6 (both weights projected at rank 3, the biases dense) regresses random targets; 6 steps of a
global batch of 8, a refresh every 2 steps. Under DDP rank r takes the samples r, r + 2, ...: together the ranks'
batches are the single process's batch.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning.pytorch as pl
import subspace_optim as so
from lightning.pytorch.strategies import DDPStrategy
from subspace_optim.integrations.lightning import SubspaceCallback, SubspaceDDPStrategy
from torchrun import write_results

warnings.filterwarnings("ignore", ".*(num_workers|does not have many workers|LeafSpec|sync_dist).*")
BATCH, STEPS, GAP, RANK = 8, 6, 2, 3
OPTIMIZERS = {"golore": so.GoLoreAdamW, "galore": so.GaLoreAdamW}


class Regression(pl.LightningModule):
    """``configure_optimizers`` returns ``optimizer(subspace_param_groups(self, rank=3), lr=1e-2, ...)``; with
    ``manual``, training_step does manual_backward and step itself."""

    def __init__(self, optimizer: str = "golore", manual: bool = False, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))
        self.optimizer, self.kw = optimizer, kw
        self.automatic_optimization = not manual

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad()

    def configure_optimizers(self):
        return make_optimizer(self, self.optimizer, **self.kw)


def make_optimizer(model: nn.Module, name: str, **kw):
    return OPTIMIZERS[name](so.subspace_param_groups(model, rank=RANK), lr=1e-2, update_gap=GAP, **kw)


def data(batches: int = STEPS):
    gen = torch.Generator().manual_seed(7)
    n = batches * BATCH
    return TensorDataset(torch.randn(n, 12, generator=gen), torch.randn(n, 6, generator=gen))


def fit(module: Regression, batch: int = BATCH, batches: int = STEPS, **trainer_kw) -> Regression:
    """One epoch of ``batches`` global batches under a Trainer on the CPU (``batch``: each process's micro-batch)."""
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         use_distributed_sampler=False, **{"devices": 1, **trainer_kw})
    dataset = data(batches)
    # Lightning's own DistributedSampler shuffles training data; this one gives rank r the samples r, r + world, ...
    world = trainer.world_size
    sampler = DistributedSampler(dataset, world, trainer.global_rank, shuffle=False) if world > 1 else None
    trainer.fit(module, DataLoader(dataset, batch_size=batch, sampler=sampler))
    return module


def reference(optimizer: str = "golore", **kw) -> nn.Module:
    """The same steps in a plain torch loop, one process, the whole batch at once."""
    model = Regression().net
    opt = make_optimizer(model, optimizer, **kw)
    for x, y in DataLoader(data(), batch_size=BATCH):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model


def max_error(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


#: DDP cases: (optimizer, its keywords (and manual=), the micro-batch per process, accumulate_grad_batches)
DDP_CASES = {
    "ddp/full/golore": ("golore", {}, BATCH // 2, 1),
    "ddp/subspace/golore": ("golore", {"grad_comm": "subspace"}, BATCH // 2, 1),
    "ddp/subspace-layerwise/golore": ("golore", {"grad_comm": "subspace", "layerwise": True}, BATCH // 2, 1),
    "ddp/subspace-layerwise-accumulate/golore": (
        "golore", {"grad_comm": "subspace", "layerwise": True, "accumulation_steps": 2}, BATCH // 4, 2),
    "ddp/subspace-layerwise-accumulate/galore": (
        "galore", {"grad_comm": "subspace", "layerwise": True, "accumulation_steps": 2}, BATCH // 4, 2),
    "ddp/subspace-layerwise-manual/golore": (
        "golore", {"grad_comm": "subspace", "layerwise": True, "manual": True}, BATCH // 2, 1),
}


def ddp_case(name: str) -> float:
    optimizer, kw, batch, accumulate = DDP_CASES[name]
    module = Regression(optimizer, **kw)
    if os.environ["RANK"] == "1":  # a replica that starts elsewhere: DDP (or the strategy, for what it leaves) syncs it
        with torch.no_grad():
            for p in module.parameters():
                p.add_(1.0)
    strategy = SubspaceDDPStrategy() if kw.get("grad_comm") == "subspace" else DDPStrategy()
    fit(module, batch, devices=2, strategy=strategy, accumulate_grad_batches=accumulate)
    error = torch.tensor(max_error(module.net, reference(optimizer)))  # standard steps on the whole batch
    dist.all_reduce(error, op=dist.ReduceOp.MAX)  # every replica
    return error.item()


def plain_ddp_refused() -> str:
    """grad_comm="subspace" under Lightning's own DDPStrategy (which would reduce the projected weights too)."""
    try:
        fit(Regression(grad_comm="subspace"), BATCH // 2, devices=2, strategy=DDPStrategy(),
            callbacks=[SubspaceCallback()])
    except ValueError as error:
        return str(error)
    return ""


def fit_again() -> str:
    """One module fit by two Trainers: the first strategy removed its optimizer's hooks at the end of fit, so the
    second optimizer can take the parameters ("" or the error)."""
    module = Regression(grad_comm="subspace", layerwise=True)
    try:
        for _ in range(2):
            fit(module, BATCH // 2, devices=2, strategy=SubspaceDDPStrategy())
    except ValueError as error:
        return str(error)
    return ""


def main(out: str) -> None:
    results = {name: ddp_case(name) for name in DDP_CASES}
    results["plain-ddp-refused"] = plain_ddp_refused()
    results["fit-again"] = fit_again()
    results["world"] = dist.get_world_size()
    write_results(out, results)


if __name__ == "__main__":
    main(sys.argv[1])
