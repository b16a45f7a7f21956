"""The optimizer's own communication and step time under DDP and FSDP2, 2 processes, LLaMA-60M shapes.

    python benchmarks/distributed.py [--rank 128] [--gap 200] [--repeats 5] [--nproc 2]

(re-launches itself under torchrun with gloo on the CPU). Weights as benchmarks/optimizer_step.py: two 32000 x 512
embeddings and norms (dense), 8 layers of q/k/v/o 512 x 512, gate/up 1376 x 512, down 512 x 1376 (projected at rank
r; GaLore's "std" rule reduces down's 512 rows on the left, the others' 512 columns on the right). Gradients are
fixed random tensors, so only ``optimizer.step()`` is measured: the bytes this rank hands to collectives inside it
(all_reduce, gather, broadcast: tensor sizes, not wire traffic) and its time. A regular step and a refresh step
are measured separately (after a first, untimed step that allocates the state) and amortized over a period of
``gap`` steps, as in the README.

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


def worker(args) -> None:
    dist.init_process_group("gloo")
    world, me = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    rows = []
    for wrap in ("ddp", "fsdp2"):
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
    if me == 0:
        mib = lambda b: f"{b / 2**20:.3f}"  # noqa: E731
        print(f"\n{world} processes (gloo, CPU), LLaMA-60M shapes, rank {args.rank}, gap {args.gap}; per rank:\n")
        print("| wrap | optimizer | regular step ms | refresh step ms | amortized ms | optimizer collectives MiB/step "
              "(measured) | at a refresh (measured) | expected: regular / refresh | DDP gradient all-reduce MiB |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for wrap, method, reg, ref, amo, rb, fb, (er, ef), grad in rows:
            print(f"| {wrap} | {method} | {reg:.1f} | {ref:.1f} | {amo:.1f} | {mib(rb)} | {mib(fb)} | "
                  f"{mib(er)} / {mib(ef)} | {mib(grad) if wrap == 'ddp' else '—'} |")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    if "RANK" not in os.environ:  # not under torchrun yet: launch it
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(args.nproc), __file__, *sys.argv[1:]]
        raise SystemExit(subprocess.call(command))
    worker(args)


if __name__ == "__main__":
    main()
