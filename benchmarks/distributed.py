"""The optimizer's own communication and step time under DDP and FSDP2, 2 processes, LLaMA-60M shapes.

    python benchmarks/distributed.py [--rank 128] [--gap 200] [--repeats 5] [--nproc 2] [--sync-only]

(re-launches itself under torchrun with gloo on the CPU). Weights as benchmarks/optimizer_step.py: two 32000 x 512
embeddings and norms (dense), 8 layers of q/k/v/o 512 x 512, gate/up 1376 x 512, down 512 x 1376 (projected at rank
r; GaLore's "std" rule reduces down's 512 rows on the left, the others' 512 columns on the right). Gradients are
fixed random tensors, so only ``optimizer.step()`` is measured: the bytes this rank hands to collectives inside it
(all_reduce, gather, broadcast: tensor sizes, not wire traffic) and its time. A regular step and a refresh step
are measured separately (after a first, untimed step that allocates the state) and amortized over a period of
``gap`` steps, as in the README.

The gradient sync, DDP's against ``grad_comm="subspace"`` (the projected gradients all-reduced as R = Pᵀ G from
their hooks): measured here at LLaMA-60M shapes through a real backward (DDP's buckets routed through torch's
default all-reduce hook, so that every byte passes the counter), and from shapes at LLaMA-60M, 1B, 7B and 13B,
with GaLore's refresh (the whole G once per gap, and its basis broadcast) amortized over the gap.

RSO trains B (m x r) beside the frozen W: its optimizer is dense AdamW on B and the dense weights, with no
communication of its own; what it saves is in the framework's gradient sync (B's gradients instead of W's), shown
in the last column from the formula.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

HIDDEN, INTER, LAYERS, VOCAB = 512, 1376, 8, 32000
SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(INTER, HIDDEN)] * 2 + [(HIDDEN, INTER)]
METHODS = ("torch AdamW", "AdamW (ours, dense)", "GaLore", "GoLore", "RSO")


class Weights(nn.Module):
    """LLaMA-60M's parameter shapes; RSO swaps each projected W for B (m x r)."""

    def __init__(self, rank: int, rso: bool):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.dense = nn.ParameterList([nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02)
                                       for _ in range(2)] + [nn.Parameter(torch.ones(HIDDEN))
                                                             for _ in range(2 * LAYERS + 1)])
        shapes = [(m, rank) if rso else (m, n) for _ in range(LAYERS) for m, n in SHAPES]
        self.projected = nn.ParameterList([nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes])


def build(method: str, wrap: str, rank: int, gap: int):
    from subspace_optim import SubspaceAdamW

    model = Weights(rank, rso=method == "RSO")
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():  # the same full gradient on every rank; under FSDP2 each keeps its rows
        g = torch.randn(p.shape, generator=gen) * 1e-3
        if wrap == "fsdp2":
            from torch.distributed.tensor import distribute_tensor

            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        else:
            p.grad = g
    dense, projected = list(model.dense), list(model.projected)
    common = dict(lr=1e-3, weight_decay=0.0)
    group = dist.group.WORLD if wrap == "ddp" else None
    if method == "torch AdamW":
        opt = torch.optim.AdamW(model.parameters(), foreach=True, **common)
    elif method in ("AdamW (ours, dense)", "RSO"):
        opt = SubspaceAdamW(model.parameters(), process_group=group, **common)
    else:
        opt = SubspaceAdamW([{"params": dense}, {"params": projected, "rank": rank}], update_gap=gap, scale=0.25,
                            projector=method.lower(), process_group=group, **common)
    return model, opt


class CountBytes:
    """Wrap the collectives the optimizer calls and add up the bytes of the tensors this rank hands them."""

    NAMES = ("all_reduce", "gather", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")

    def __init__(self):
        self.bytes = 0
        self.saved = {}

    def __enter__(self):
        for name in self.NAMES:
            original = self.saved[name] = getattr(dist, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.bytes += tensor.numel() * tensor.element_size()
                return _original(tensor, *args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(dist, name, original)


def timed_step(opt) -> tuple[float, int]:
    dist.barrier()
    with CountBytes() as counter:
        t0 = time.perf_counter()
        opt.step()
        elapsed = time.perf_counter() - t0
    return elapsed, counter.bytes


def expected_bytes(method: str, wrap: str, rank: int, world: int) -> tuple[int, int]:
    """(regular step, refresh step) bytes per rank from the formulas in src/subspace_optim/distributed.py."""
    if method in ("torch AdamW",):
        return 0, 0
    flag = 4 if wrap == "fsdp2" else 0  # the non-finite decision: one float all-reduced when shards differ
    if method in ("AdamW (ours, dense)", "RSO"):
        return flag, flag
    regular = flag
    refresh_extra = 0
    for _ in range(LAYERS):
        for m, n in SHAPES:
            left = m < n
            d, big = (m, n) if left else (n, m)
            if wrap == "fsdp2" and left:
                regular += 4 * rank * big  # R = Σ Pᵢᵀ Gᵢ: one all-reduce of r x D
            if method == "GaLore":
                refresh_extra += 4 * d * rank  # the owner's basis, broadcast
                if wrap == "fsdp2":
                    refresh_extra += 4 * -(-m // world) * n  # this rank's (padded) rows, gathered on the owner
    return regular, regular + refresh_extra


def gradient_sync_bytes(method: str, rank: int) -> int:
    """What DDP all-reduces per step for these weights (4 bytes a number): RSO syncs B, not W."""
    model = Weights(rank, rso=method == "RSO")
    return 4 * sum(p.numel() for p in model.parameters())


class Probe(nn.Module):
    """LLaMA-60M's weights with a loss whose gradient is a fixed random tensor per weight: a backward under DDP."""

    def __init__(self, rank: int):
        super().__init__()
        self.weights = Weights(rank, rso=False)
        gen = torch.Generator().manual_seed(1)
        self.directions = [torch.randn(p.shape, generator=gen) * 1e-3 for p in self.weights.parameters()]

    def forward(self):
        return sum((p * g).sum() for p, g in zip(self.weights.parameters(), self.directions))


def measured_sync(method: str, grad_comm: str, rank: int) -> tuple[int, int]:
    """(refresh step, regular step) bytes this rank hands to collectives in forward, backward and step()."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from subspace_optim import SubspaceAdamW, subspace_ddp

    probe = Probe(rank)
    dense, projected = list(probe.weights.dense), list(probe.weights.projected)
    opt = SubspaceAdamW([{"params": dense}, {"params": projected, "rank": rank}], lr=1e-3, weight_decay=0.0,
                        projector=method.lower(), update_gap=4, grad_comm=grad_comm, process_group=dist.group.WORLD)
    model = subspace_ddp(probe, opt) if grad_comm == "subspace" else DistributedDataParallel(probe)
    model.register_comm_hook(dist.group.WORLD, default_hooks.allreduce_hook)  # DDP's buckets through dist
    sent = []
    for _ in range(2):  # the first step refreshes every basis, the second is a regular one
        dist.barrier()
        with CountBytes() as counter:
            model().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sent.append(counter.bytes)
    return sent[0], sent[1]


def formula_sync(hidden: int, inter: int, layers: int, vocab: int, rank: int, world: int = 2) -> dict:
    """Bytes per step and rank (4 a number) of the gradient sync at a LLaMA's shapes: DDP's (every gradient), and
    the subspace mode's between refreshes (the dense ones and R, r x D, of each projected weight) and at a GaLore
    refresh (the whole G of each projected weight, and its r-column basis broadcast from its owner)."""
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    dense = 2 * vocab * hidden + (2 * layers + 1) * hidden
    whole = lowrank = basis = 0
    for m, n in shapes * layers:
        whole += m * n
        if rank < min(m, n):
            d, big = min(m, n), max(m, n)
            lowrank += rank * big
            basis += d * rank
        else:
            lowrank += m * n
    return {"ddp": 4 * (dense + whole), "subspace": 4 * (dense + lowrank),
            "refresh": 4 * (dense + whole) + 4 * basis}


SHAPES_AT = {"llama-60m": (512, 1376, 8, 128), "llama-1b": (2048, 5461, 24, 512), "llama-7b": (4096, 11008, 32, 1024),
             "llama-13b": (5120, 13824, 40, 1280)}


def sync_report(rows: list, gap: int, rank: int) -> None:
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    print(f"\nGradient sync per step and rank, measured (LLaMA-60M shapes, rank {rank}, 2 processes, a real "
          "backward):\n")
    print("| grad_comm | projector | regular step MiB | refresh step MiB | / DDP's (regular) |")
    print("|---|---|---:|---:|---:|")
    ddp = rows[0][3]
    for grad_comm, method, refresh, regular in rows:
        print(f"| {grad_comm} | {method} | {mib(regular)} | {mib(refresh)} | {regular / ddp:.3f} |")
    print(f"\nFrom shapes (vocabulary 32000, fp32 gradients; bf16 halves every column alike), gap {gap}:\n")
    print("| model | rank | DDP MiB/step | subspace MiB/step | / DDP | GaLore refresh step MiB | GaLore amortized / DDP |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (hidden, inter, layers, r) in SHAPES_AT.items():
        f = formula_sync(hidden, inter, layers, VOCAB, r)
        amortized = ((gap - 1) * f["subspace"] + f["refresh"]) / gap
        print(f"| {name} | {r} | {mib(f['ddp'])} | {mib(f['subspace'])} | {f['subspace'] / f['ddp']:.3f} | "
              f"{mib(f['refresh'])} | {amortized / f['ddp']:.3f} |")


def worker(args) -> None:
    dist.init_process_group("gloo")
    world, me = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    rows = []
    for wrap in () if args.sync_only else ("ddp", "fsdp2"):
        for method in METHODS:
            # a period of repeats + 1 steps: a warm-up refresh (allocations), the timed regular steps, a timed refresh
            model, opt = build(method, wrap, args.rank, args.repeats + 1)
            timed_step(opt)
            times, sent = [], []
            for _ in range(args.repeats):
                t, b = timed_step(opt)
                times.append(t)
                sent.append(b)
            refresh_time, refresh_bytes = timed_step(opt)
            regular = statistics.median(times)
            amortized = (refresh_time + (args.gap - 1) * regular) / args.gap
            regular_bytes = max(sent)
            expect = expected_bytes(method, wrap, args.rank, world)
            rows.append((wrap, method, regular * 1e3, refresh_time * 1e3, amortized * 1e3, regular_bytes,
                         refresh_bytes, expect, gradient_sync_bytes(method, args.rank)))
            del model, opt
    if me == 0 and rows:
        mib = lambda b: f"{b / 2**20:.3f}"  # noqa: E731
        print(f"\n{world} processes (gloo, CPU), LLaMA-60M shapes, rank {args.rank}, gap {args.gap}; per rank:\n")
        print("| wrap | optimizer | regular step ms | refresh step ms | amortized ms | optimizer collectives MiB/step "
              "(measured) | at a refresh (measured) | expected: regular / refresh | DDP gradient all-reduce MiB |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for wrap, method, reg, ref, amo, rb, fb, (er, ef), grad in rows:
            print(f"| {wrap} | {method} | {reg:.1f} | {ref:.1f} | {amo:.1f} | {mib(rb)} | {mib(fb)} | "
                  f"{mib(er)} / {mib(ef)} | {mib(grad) if wrap == 'ddp' else '—'} |")
    sync = [(comm, method, *measured_sync(method, comm, args.rank))
            for comm, method in (("full", "GoLore"), ("subspace", "GoLore"), ("subspace", "GaLore"))]
    if me == 0:
        sync_report(sync, args.gap, args.rank)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--sync-only", action="store_true", help="only the gradient sync tables (no step timing)")
    args = parser.parse_args()
    if "RANK" not in os.environ:  # not under torchrun yet: launch it
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(args.nproc), __file__, *sys.argv[1:]]
        raise SystemExit(subprocess.call(command))
    worker(args)


if __name__ == "__main__":
    main()
