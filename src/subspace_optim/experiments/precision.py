"""`subspace-optim reproduce precision`: GoLore with its weights in float32, bfloat16 (rounded to nearest or
stochastically) and int8, on the pretraining study's setting (llama-study, 1M tokens, 2 seeds).

Claims: stochastic rounding lets bf16 weights train as float32 weights do (torchao's bf16_stochastic_round; Zamirai
et al. 2020), where round-to-nearest drops every update below half a bf16 unit; int8 linear weights with
stochastic rounding cost under 5% perplexity (Q-GaLore, Zhang et al. 2024). Every precision runs at GoLore's
float32 best lr of the pretraining study (1e-2), not at a best lr of its own: a grid per precision is four
times the runs. Each run is one process with one thread.
"""

from __future__ import annotations

import json
from pathlib import Path

from .pretrain import SCALES, Ppl, not_worse
from .report import Report, flags_to_cli, harness, same_config, table

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
            for seed in (SEEDS[:1] if args.quick else SEEDS) for name, extra in PRECISIONS.items()]


def dry_run(args) -> list[str]:
    return [flags_to_cli("train", {**flags, "out": out}) for _, _, flags, out in plan(args)]


def stored(flags: dict, out_dir: Path) -> dict | None:
    """The pretraining study's stored run with these flags (its float32 GoLore runs at lr 1e-2 are this study's
    float32 rows: the float32 path is the one it ran), or None."""
    folder = Path(out_dir) / "pretrain-runs" / f"golore-lr{LR:g}-s{flags['seed']}"
    try:
        config = json.loads((folder / "config.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if same_config(config, flags) else None


def main(args) -> Path:
    report = Report("precision", args.out, args.argv)
    ppl: dict[str, list[float]] = {}
    started, reused, missing = 0, [], []
    for name, seed, flags, out in plan(args):
        summary = stored(flags, args.out) if name == "float32" else None
        if summary is not None:
            reused.append(seed)
        elif (out / "summary.json").is_file() or args.max_runs is None or started < args.max_runs:
            started += not (out / "summary.json").is_file()
            summary = harness("train", flags, out)
        else:
            missing.append(f"{name} seed {seed}")
            continue
        ppl.setdefault(name, []).append(summary["final_val_ppl"])
    results = {name: Ppl(values) for name, values in ppl.items()}
    fp32 = results["float32"]
    rows = [[name, str(p), len(p.values), f"{p.mean / fp32.mean:.3f}"] for name, p in results.items()]
    seeds = len(plan(args)) // len(PRECISIONS)

    def verdict(x: Ppl) -> str:
        if len(x.values) < seeds or len(fp32.values) < seeds:
            return f"pending ({min(len(x.values), len(fp32.values))} of {seeds} seeds; so far: {not_worse(x, fp32, 0.05)})"
        return not_worse(x, fp32, 0.05)

    verdicts = [
        ["bf16 weights with stochastic rounding train as float32 weights do (torchao's bf16_stochastic_round; "
         "Zamirai et al. 2020)", verdict(results["bf16, stochastic"]),
         f"GoLore val ppl fp32 {fp32}, bf16 nearest {results['bf16, nearest']}, bf16 stochastic "
         f"{results['bf16, stochastic']}", "bf16-SR within 5% of fp32"],
        ["int8 linear weights, stochastically rounded, cost under 5% perplexity (Q-GaLore, Zhang et al. 2024)",
         verdict(results["int8, stochastic"]),
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

{table(["weights", "val ppl (mean ± std)", "seeds", "/ float32"], rows)}
""" + (f"""
The float32 rows are the pretraining study's stored GoLore runs at lr {LR:g} (seeds {", ".join(map(str, reused))}:
`pretrain-runs/golore-lr{LR:g}-s*`, the same flags; the float32 path is unchanged since). """ if reused else "") + (
        f"Not run yet (`--max-runs`): {', '.join(missing)}; a mean over fewer seeds is no verdict on the spread."
        if missing else "")
    return report.write("Weights in low precision: bf16 with stochastic rounding, int8", body,
                        seeds=", ".join(map(str, sorted({seed for _, seed, _, _ in plan(args)}))),
                        verdicts=verdicts)
