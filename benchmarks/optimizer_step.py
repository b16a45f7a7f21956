"""Optimizer step time and state memory on LLaMA-60M-shaped weights, side by side in one process.

    python benchmarks/optimizer_step.py [--rank 128] [--gap 200] [--repeats 10] [--projected-only] [--dtype bfloat16]

Weights: two 32000 x 512 embeddings (dense), 8 layers of q/k/v/o 512x512, gate/up 1376x512, down 512x1376 (projected
at rank r), norms (dense). Gradients are fixed random tensors: only the optimizer is timed.

Amortized step time over a refresh period of ``gap`` steps = (t_refresh + (gap - 1) * t_regular) / gap, from the
fastest of ``repeats`` regular steps (optimizers with the real gap) and of ``refresh-repeats`` refresh steps
(optimizers refreshing every 2 steps, so that a refresh is timed without running a whole period). The optimizers
are stepped round-robin, so that other load on the machine affects them alike. torch.optim.AdamW runs with
foreach=True and with fused=True; torchao's AdamW8bit / AdamW4bit (optional: pip install torchao) and galore-torch's
GaLoreAdamW (optional: pip install galore-torch bitsandbytes, same rank, gap and scale) beside ours, also with
bf16 projections and with 16-, 8- and 4-bit moments. Then the cost of one refresh per projector on GaLore's layer
shapes. ``--projected-only`` drops the dense embeddings and norms (what every optimizer pays alike), so that the
ratios are those of the projected weights alone; ``--dtype bfloat16`` holds weights and gradients in bf16 (GaLore's
pure-bf16 training).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from subspace_optim import SubspaceAdamW
from subspace_optim.lowbit import stored_bytes
from subspace_optim.memory_measured import optimizer_state_bytes
from subspace_optim.experiments.refresh_cost import refresh_costs

HIDDEN, INTER, LAYERS, VOCAB = 512, 1376, 8, 32000


def llama60m_params(projected_only: bool = False, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    dense = [torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02 for _ in range(2)]
    dense += [torch.ones(HIDDEN) for _ in range(2 * LAYERS + 1)]
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(INTER, HIDDEN)] * 2 + [(HIDDEN, INTER)]
    projected = [torch.randn(s, generator=gen) * 0.02 for _ in range(LAYERS) for s in shapes]
    dense = [] if projected_only else [torch.nn.Parameter(t.to(dtype)) for t in dense]
    projected = [torch.nn.Parameter(t.to(dtype)) for t in projected]
    for p in dense + projected:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(dtype)
    return dense, projected


def analytic_minimum(dense, projected, rank, basis=True, state_bits=32) -> int:
    """Adam: 2 moments per dense weight; 2 r max(m, n) (+ r min(m, n) float32 numbers for the basis) per projected
    weight; one float32 step count per parameter (as torch.optim.AdamW keeps). A moment of n numbers is stored in
    lowbit.stored_bytes(n, state_bits): 4n bytes at 32 bits, 2n at 16, codes + a scale per block + its table at
    8 and 4 (tensors under 4096 numbers stay float32)."""
    moments = [p.numel() for p in dense] + [rank * max(p.shape) for p in projected]
    nbytes = sum(2 * stored_bytes(n, state_bits) for n in moments) + 4 * (len(dense) + len(projected))
    return nbytes + (4 * sum(rank * min(p.shape) for p in projected) if basis else 0)


def interleaved_times(optimizers: list, rounds: int, timed: set[int]) -> list[float]:
    """Step every optimizer in turn, ``rounds`` times; the fastest timed round of each.

    Round-robin with the minimum, so that load from other processes affects every optimizer alike and the
    ratios stay meaningful on a shared machine.
    """
    best = [float("inf")] * len(optimizers)
    for step in range(rounds):
        for i, opt in enumerate(optimizers):
            t0 = time.perf_counter()
            opt.step()
            if step in timed:
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def make_optimizers(dense, projected, args):
    """(label, make(gap) -> optimizer, projector name or None, state_bits)."""
    common = dict(lr=1e-3, weight_decay=0.0)
    groups = lambda **kw: [{"params": dense}] * bool(dense) + [{"params": projected, "rank": args.rank, **kw}]  # noqa: E731
    yield "torch AdamW (foreach)", lambda gap: torch.optim.AdamW(dense + projected, foreach=True, **common), None, 0
    yield "torch AdamW (fused)", lambda gap: torch.optim.AdamW(dense + projected, fused=True, **common), None, 0
    try:
        from torchao.optim import AdamW4bit, AdamW8bit

        yield "torchao AdamW8bit", lambda gap: AdamW8bit(dense + projected, **common), None, 0
        yield "torchao AdamW4bit", lambda gap: AdamW4bit(dense + projected, **common), None, 0
    except ImportError as err:
        print(f"(torchao not available: {err}; pip install torchao)")
    try:
        from galore_torch import GaLoreAdamW as ReferenceGaLore

        yield "galore-torch GaLoreAdamW", lambda gap: ReferenceGaLore(
            [{"params": dense}] * bool(dense) + [{"params": projected, "rank": args.rank, "update_proj_gap": gap,
                                                  "scale": 0.25, "proj_type": "std"}], **common), None, 0
    except ImportError as err:
        print(f"(galore-torch not available: {err}; pip install galore-torch bitsandbytes)")
    bf16 = {"projection_dtype": "bfloat16"}
    for label, name, extra in [
        ("galore", "galore", {}),
        ("galore (randomized SVD)", "galore", {"svd": "randomized"}),
        ("golore", "golore", {}),
        ("golore, bf16 projections", "golore", bf16),
        ("golore, 16-bit moments", "golore", {"state_bits": 16}),
        ("golore, 8-bit moments", "golore", {"state_bits": 8}),
        ("golore, 4-bit moments", "golore", {"state_bits": 4}),
        ("golore, 8-bit, bf16 projections", "golore", {"state_bits": 8, **bf16}),
        ("hybrid", "hybrid", {"total_steps": 10 * args.gap}),
        ("online_pca", "online_pca", {}),
        ("auto", "auto", {}),
    ]:
        yield f"ours {label}", lambda gap, name=name, extra=extra: SubspaceAdamW(
            groups(), projector=name, update_gap=gap, scale=0.25, **extra, **common), name, extra.get("state_bits", 32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10, help="timed regular steps per optimizer")
    parser.add_argument("--refresh-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's). On a loaded machine, 1 avoids the "
                             "oversubscription that makes multi-threaded SVDs 10-100x slower")
    parser.add_argument("--projected-only", action="store_true", help="only the projected weights (no embeddings "
                        "or norms, whose dense update every optimizer pays alike)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and gradients (bfloat16: GaLore's pure-bf16 training)")
    parser.add_argument("--only", default=None, help="comma-separated substrings: time only the optimizers whose "
                        "label contains one (torch's AdamW rows are always kept: the ratios need them)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; rank {args.rank}, gap {args.gap}")

    dense, projected = llama60m_params(args.projected_only, getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in dense + projected)
    print(f"{n_params / 1e6:.1f}M parameters ({sum(p.numel() for p in projected) / 1e6:.1f}M projected)\n")
    entries = [e for e in make_optimizers(dense, projected, args) if args.only is None or e[0].startswith("torch AdamW")
               or any(k in e[0] for k in args.only.split(","))]
    # Regular steps: optimizers with the real gap, after their first (refresh) step. All share the parameters;
    # their values drift but do not matter for timing.
    optimizers = [make(args.gap) for _, make, _, _ in entries]
    regular = interleaved_times(optimizers, args.repeats + 1, set(range(1, args.repeats + 1)))
    nbytes = [optimizer_state_bytes(opt) for opt in optimizers]
    del optimizers
    # Refresh steps: the same optimizers refreshing every 2 steps; steps 2, 4, ... are refreshes.
    optimizers = [make(2) if projector or "galore" in label else None for label, make, projector, _ in entries]
    live = [opt for opt in optimizers if opt is not None]
    times = iter(interleaved_times(live, 2 * args.refresh_repeats + 1, set(range(2, 2 * args.refresh_repeats + 1, 2))))
    refresh = [next(times) if opt is not None else reg for opt, reg in zip(optimizers, regular)]
    del optimizers, live
    rows = []
    for (label, _, projector, bits), reg, ref_t, size in zip(entries, regular, refresh, nbytes):
        amortized = (ref_t + (args.gap - 1) * reg) / args.gap
        minimum = None
        if projector is not None and args.dtype == "float32":  # (bf16 weights: dense moments are bf16 too)
            minimum = analytic_minimum(dense, projected, args.rank, basis=True, state_bits=bits)
            if projector == "online_pca":
                # Adam on P: exp_avg, exp_avg_sq (d x r) and a step count
                minimum += sum(4 * (2 * args.rank * min(p.shape) + 1) for p in projected)
            if projector == "auto":
                minimum = None  # + one r x D statistic per parameter until it switches
        rows.append((label, reg, ref_t, amortized, size, minimum))
    base, fused = rows[0], rows[1]
    ref = next((r for r in rows if r[0].startswith("galore-torch")), None)
    print("| optimizer | regular step (s) | refresh step (s) | amortized step (s) | x AdamW | x fused AdamW "
          "| x galore-torch | state (MB) | x AdamW state | = analytic minimum |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, regular, refresh, amortized, nbytes, minimum in rows:
        vs_ref = f"{amortized / ref[3]:.2f}" if ref else "n/a"
        exact = "n/a" if minimum is None else ("yes" if minimum == nbytes else f"no ({minimum / 2**20:.1f} MB)")
        print(f"| {label} | {regular:.4f} | {refresh:.4f} | {amortized:.4f} | {amortized / base[3]:.2f} "
              f"| {amortized / fused[3]:.2f} | {vs_ref} | {nbytes / 2**20:.1f} | {nbytes / base[4]:.2f} | {exact} |")

    print(f"\nOne refresh at rank {args.rank} (median of {args.refresh_repeats}), and as a fraction of a full SVD:")
    print("| shape | full SVD (s) | randomized SVD | GoLore (Haar-Stiefel) | online PCA step |")
    print("|---|---|---|---|---|")
    for (m, n), costs in refresh_costs(args.rank, args.refresh_repeats):
        svd = costs["full SVD"]
        cells = " | ".join(f"{costs[k]:.4f} s ({costs[k] / svd:.3f}x)" for k in list(costs)[1:])
        print(f"| {m}x{n} | {svd:.3f} | {cells} |")


if __name__ == "__main__":
    main()
