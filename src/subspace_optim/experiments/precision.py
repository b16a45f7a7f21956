"""`subspace-optim reproduce precision`: GoLore with its weights in float32, bfloat16 (rounded to nearest or
stochastically) and int8, on the pretraining study's setting (llama-study, 1M tokens, 2 seeds).

Claims: stochastic rounding lets bf16 weights train as float32 weights do (torchao's bf16_stochastic_round; Zamirai
et al. 2020), where round-to-nearest drops every update below half a bf16 unit; int8 linear weights with
stochastic rounding cost under 5% perplexity (Q-GaLore, Zhang et al. 2024). Every precision runs at GoLore's
float32 best lr of the pretraining study (1e-2), not at a best lr of its own: a grid per precision is four
times the runs. Each run is one process with one thread.
"""

from __future__ import annotations

from pathlib import Path

from .pretrain import SCALES, Ppl, not_worse
from .report import Report, flags_to_cli, harness, table

#: The weights' precision: the harness flags that set it (the embeddings, norms and lm_head of int8 stay bf16).
PRECISIONS = {
    "float32": {},
    "bf16, nearest": dict(dtype="bfloat16"),
    "bf16, stochastic": dict(dtype="bfloat16", weight_rounding="stochastic"),
    "int8, stochastic": dict(dtype="bfloat16", weight_rounding="stochastic", weights="int8"),
}
LR = 1e-2  # GoLore's best lr in docs/results/pretrain.md (float32)
SEEDS = (0, 1)


def plan(args) -> list[tuple[str, int, dict, Path]]:
    """(precision, seed, harness flags, run folder) of every run."""
    scale = SCALES["quick" if args.quick else "cpu"]
    base = {k: v for k, v in scale.base.items() if v is not None}
    if args.quick:  # toy size: llama-tiny for 4 steps on the offline corpus
        base.update(data="bbcnews", eval_batches=2)
    runs = Path(args.runs) / ("precision-quick" if args.quick else "precision")
    return [(name, seed, {**base, "optimizer": "golore", "lr": LR, "seed": seed, **extra},
             runs / f"{name.replace(', ', '-').replace(' ', '-')}-s{seed}")
            for name, extra in PRECISIONS.items() for seed in (SEEDS[:1] if args.quick else SEEDS)]


def dry_run(args) -> list[str]:
    return [flags_to_cli("train", {**flags, "out": out}) for _, _, flags, out in plan(args)]


def main(args) -> Path:
    report = Report("precision", args.out, args.argv)
    ppl: dict[str, list[float]] = {}
    for name, _, flags, out in plan(args):
        ppl.setdefault(name, []).append(harness("train", flags, out)["final_val_ppl"])
    results = {name: Ppl(values) for name, values in ppl.items()}
    fp32 = results["float32"]
    rows = [[name, str(p), f"{p.mean / fp32.mean:.3f}"] for name, p in results.items()]
    verdicts = [
        ["bf16 weights with stochastic rounding train as float32 weights do (torchao's bf16_stochastic_round; "
         "Zamirai et al. 2020)", not_worse(results["bf16, stochastic"], fp32, 0.05),
         f"GoLore val ppl fp32 {fp32}, bf16 nearest {results['bf16, nearest']}, bf16 stochastic "
         f"{results['bf16, stochastic']}", "bf16-SR within 5% of fp32"],
        ["int8 linear weights, stochastically rounded, cost under 5% perplexity (Q-GaLore, Zhang et al. 2024)",
         not_worse(results["int8, stochastic"], fp32, 0.05),
         f"GoLore val ppl fp32 {fp32}, int8 {results['int8, stochastic']} "
         f"({results['int8, stochastic'].mean / fp32.mean:.3f} x fp32)", "int8 within 5% of fp32"]]
    commands = "\n".join(f"    {flags_to_cli('train', flags)}" for _, seed, flags, _ in plan(args) if seed == 0)
    body = f"""
GoLore on the pretraining study's setting (llama-study, 512 steps of 8 x 256 tokens, rank 64, gap 32, scale
0.25, lr {LR:g}: GoLore's float32 best), with its weights held in four precisions.
"bf16, nearest" is pure bf16 training as GaLore's LLaMA runs do it; "stochastic" rounds every update into the
bf16 weights stochastically (`--weight-rounding stochastic`, the projected and the dense ones); int8 holds every
projected linear weight as int8 codes with a bf16 scale per row (`--weights int8`), re-quantized with stochastic
rounding at each update, the embeddings, norms and lm_head in bf16 with stochastic rounding.

Commands (seed 0; seed 1 the same with `--seed 1`):

{commands}

{table(["weights", "val ppl (mean ± std)", "/ float32"], rows)}
"""
    return report.write("Weights in low precision: bf16 with stochastic rounding, int8", body,
                        seeds=", ".join(map(str, sorted({seed for _, seed, _, _ in plan(args)}))),
                        verdicts=verdicts)
