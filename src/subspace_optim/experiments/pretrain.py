"""`subspace-optim reproduce pretrain`: LLaMA pretraining at equal tokens and seed through the harness.

Three studies, each run in its own process (`subspace-optim train`), so every run's peak RSS is its own:
methods (AdamW, galore-torch, our GaLore, GoLore, GoLore@20%, online PCA, auto, RSO) at rank d/4; a rank
ablation (d/8, d/4, d/2) for GaLore; GaLore vs GoLore at a small and a large batch (same steps).
``--scale paper`` is GaLore's C4 recipe (llama-60m to llama-1b) for machines with GPUs and a network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..train.runlog import read_metrics
from .report import Report, flags_to_cli, harness, table

#: GaLore (Zhao et al. 2024), Table 2: validation perplexity on C4 (full-rank Adam vs GaLore, ranks 128/256/256/512).
PAPER = {"llama-60m": (34.06, 34.88, 128), "llama-130m": (25.08, 25.36, 256), "llama-350m": (18.80, 18.95, 256),
         "llama-1b": (15.56, 15.64, 512)}
PAPER_STEPS = {"llama-60m": 10_000, "llama-130m": 20_000, "llama-350m": 60_000, "llama-1b": 100_000}
METHODS = ("adamw", "galore-torch", "galore", "golore", "golore@20", "online_pca", "auto", "rso")
#: GaLore's recipe: Adam at 1e-3; projected methods (RSO too) at 1e-2 with scale 0.25 (only the projected update
#: is scaled: RSO steps its B at lr x scale, which makes its steps GoLore's).
LR = {"adamw": 1e-3}
SUBSPACE_LR = 1e-2


@dataclass
class Run:
    study: str
    label: str
    flags: dict

    @property
    def key(self) -> str:
        return f"{self.study}-{self.label}".replace("@", "at").replace("/", "_").replace(" ", "_")


def plan(scale: str, quick: bool) -> list[Run]:
    if scale == "paper":
        runs = []
        for model, (_, _, rank) in PAPER.items():
            steps = PAPER_STEPS[model]
            base = dict(model=model, data="allenai/c4", rank=rank, update_gap=200, scale=0.25, batch_size=128,
                        grad_accum=4, seq_len=256, steps=steps, warmup=steps // 10, dtype="bfloat16",
                        eval_every=1000, eval_batches=80, seed=0)
            for method in METHODS:
                runs.append(Run(model, method, dict(base, optimizer=method, lr=LR.get(method, SUBSPACE_LR))))
        return runs
    steps, batch, seq, gap = (4, 2, 32, 2) if quick else (120, 4, 64, 24)
    base = dict(model="llama-tiny", steps=steps, batch_size=batch, seq_len=seq, update_gap=gap, scale=0.25,
                warmup=steps // 10, eval_every=steps // 2, eval_batches=2 if quick else 8, seed=0)
    methods = ("adamw", "galore") if quick else METHODS
    runs = [Run("methods", m, dict(base, optimizer=m, lr=LR.get(m, SUBSPACE_LR))) for m in methods]
    # Controls: AdamW at the projected methods' lr, so a difference of lr is not read as one of method; RSO at
    # AdamW's; and GoLore with its moments reset at every refresh, which is what RSO's steps equal (up to which
    # layers share a random subspace: RSO draws one P per shared input, GoLore one basis per weight).
    if not quick:
        runs += [Run("methods", f"adamw (lr {SUBSPACE_LR:g})", dict(base, optimizer="adamw", lr=SUBSPACE_LR)),
                 Run("methods", f"rso (lr {LR['adamw']:g})", dict(base, optimizer="rso", lr=LR["adamw"])),
                 Run("methods", "golore (moments reset)", dict(base, optimizer="golore", moments="reset",
                                                              lr=SUBSPACE_LR)),
                 Run("methods", "rso (moments project)", dict(base, optimizer="rso", moments="project",
                                                             lr=SUBSPACE_LR))]
    for rank in () if quick else (16, 64):  # d/8 and d/2; d/4 = 32 is the methods study's run
        runs.append(Run("rank", f"galore r={rank}", dict(base, optimizer="galore", rank=rank, lr=SUBSPACE_LR)))
    # Batches 1 and 8 at the same steps: 4x less and 2x more gradient averaging than the methods' 4.
    # Equal *tokens* per validation set: --eval-batches x --batch-size sequences.
    val_seqs = base["eval_batches"] * batch
    for b in (1,) if quick else (1, 8):
        for m in ("golore",) if quick else ("galore", "golore"):
            runs.append(Run("batch", f"{m} b={b}", dict(base, optimizer=m, batch_size=b, lr=SUBSPACE_LR,
                                                       eval_batches=max(1, val_seqs // b))))
    # RSO against GoLore on a 3x wider model (llama-small: hidden 384, rank d/4 = 96), with the same controls
    if not quick:
        small = dict(base, model="llama-small", rank=96, lr=SUBSPACE_LR)
        dense = {k: v for k, v in small.items() if k != "rank"}
        runs += [Run("size", "llama-small adamw", dict(dense, optimizer="adamw", lr=LR["adamw"])),
                 Run("size", "llama-small golore", dict(small, optimizer="golore")),
                 Run("size", "llama-small golore (moments reset)", dict(small, optimizer="golore", moments="reset")),
                 # GoLore reducing every weight's input side, as RSO must (down_proj: 96 of 1024 columns instead
                 # of 96 of 384 rows)
                 Run("size", "llama-small golore (side right)", dict(small, optimizer="golore", side="right")),
                 Run("size", "llama-small rso", dict(small, optimizer="rso")),
                 Run("size", "llama-small rso (moments project)", dict(small, optimizer="rso", moments="project"))]
    # RSO against GoLore at two more seeds (seed 0 is the methods study's): is the gap larger than seed noise?
    for seed in () if quick else (1, 2):
        for m in ("golore", "rso"):
            runs.append(Run("seeds", f"{m} seed={seed}", dict(base, optimizer=m, lr=SUBSPACE_LR, seed=seed)))
    return runs


def _curve(run_dir: Path, column: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[column])) for r in read_metrics(run_dir / "metrics.csv") if r.get(column)]


def _smooth(points: list[tuple[int, float]], beta: float = 0.9) -> list[tuple[int, float]]:
    out, avg = [], None
    for step, value in points:
        avg = value if avg is None else beta * avg + (1 - beta) * value
        out.append((step, avg))
    return out


def _plot(report: Report, suffix: str, title: str, runs: list[Run], dirs: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        xs, ys = zip(*_smooth(_curve(dirs[run.key], "loss")))
        ax1.plot(xs, ys, label=run.label, lw=1.1)
        val = _curve(dirs[run.key], "val_loss")
        ax2.plot([s for s, _ in val], [math.exp(v) for _, v in val], marker="o", ms=3, label=run.label, lw=1.1)
    ax1.set(xlabel="step", ylabel="training loss (EMA 0.9)", title=title)
    ax2.set(xlabel="step", ylabel="validation perplexity", yscale="log", title="validation")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = report.figure(suffix)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _row(run: Run, s: dict, baseline: dict | None) -> list:
    mib = 2**20
    rel = f"{s['final_val_ppl'] / baseline['final_val_ppl']:.3f}" if baseline else ""
    rank = run.flags.get("rank", 32)
    return [run.label, "—" if run.flags["optimizer"] == "adamw" else rank, f"{run.flags['lr']:g}",
            f"{s['tokens']:,}", f"{s['final_val_ppl']:.2f}", rel, f"{s['memory']['optimizer_state_bytes'] / mib:.1f}",
            f"{s['memory']['gradients_bytes'] / mib:.1f}", f"{s['memory']['activations_bytes'] / mib:.1f}",
            f"{s['peak_memory_bytes'] / mib:.0f}", f"{s['tokens_per_s']:.0f}"]


HEADER = ["method", "rank", "lr", "tokens", "val ppl", "× AdamW ppl", "optimizer state (MiB)", "gradients (MiB)",
          "activations (MiB)", "peak RSS (MiB)", "tokens/s"]


def run_dirs(args) -> tuple[list[Run], dict[str, Path]]:
    """The planned runs and each one's folder under --runs (by Run.key)."""
    runs = plan(args.scale, args.quick)
    root = Path(args.runs) / ("pretrain-quick" if args.quick else f"pretrain-{args.scale}")
    return runs, {run.key: root / run.key for run in runs}


def dry_run(args) -> list[str]:
    """The training runs main(args) starts, in order."""
    runs, dirs = run_dirs(args)
    return [flags_to_cli("train", {**run.flags, "out": dirs[run.key]}) for run in runs]


def main(args) -> Path:
    runs, dirs = run_dirs(args)
    report = Report("pretrain", args.out, args.argv)
    results = {run.key: harness("train", run.flags, dirs[run.key]) for run in runs}

    def study(name):
        return [r for r in runs if r.study == name]

    methods, ranks, batches, seeds, sizes = (study(n) for n in ("methods", "rank", "batch", "seeds", "size"))
    base_run = next((r for r in methods if r.label == "adamw"), None)
    base = results[base_run.key] if base_run else None
    fig1 = _plot(report, "", "methods (equal tokens, seed 0)", methods, dirs)
    fig2 = _plot(report, "batch", "GaLore vs GoLore at two batch sizes", batches, dirs)
    galore_main = next((r for r in methods if r.label == "galore"), None)
    rank_rows = [_row(r, results[r.key], base) for r in ranks]
    if galore_main:
        rank_rows.append(_row(galore_main, results[galore_main.key], base))
    rank_rows.sort(key=lambda row: int(row[1]))
    switch = {r.label: _switch_summary(results[r.key]) for r in methods if r.label == "auto"}
    first = methods[0].flags
    paper_rows = [[m, f"{full:.2f}", f"{ga:.2f}", f"{ga / full:.3f}", r] for m, (full, ga, r) in PAPER.items()]
    commands = "\n".join(dry_run(args))
    body = f"""
Claims: GaLore (Zhao et al. 2024, Table 2) pretrains LLaMA 60M–1B on C4 to within 0.5–2.4% of full-rank Adam's
validation perplexity with less optimizer memory; GoLore (He et al. 2024) and GoLore@20% match or beat GaLore;
Online Subspace Descent (Liang et al. 2024) and RSO (Chen et al. 2025) reach comparable perplexity with less
memory (RSO: also less activation memory and time per step). This CPU run checks the *direction* of these claims
on `{first['model']}` (hidden 128, 6 layers; 9.4M parameters, 8.2M of them the dense 32k embedding and lm_head)
trained on the offline BBC News corpus; it cannot check the papers' numbers.

Setup: every run {first['steps']} steps, batch {first['batch_size']} x {first['seq_len']} tokens (methods and rank
studies: equal tokens), seed 0 (model init, data order, random projections), cosine schedule with
{first['warmup']} warm-up steps, gradient clipping 1.0, fp32, rank 32 = d/4 unless stated, refresh gap
{first['update_gap']} (GoLore@20% switches to random projections at step {int(first['steps'] * 0.8)}), scale
0.25. Learning rates follow GaLore's recipe: AdamW 1e-3, the projected methods and RSO 1e-2 (their linear layers
move by scale x lr: RSO steps its B at lr x scale, which with its orthonormal P makes its steps GoLore's with the
moments reset at every merge; embeddings, norms and lm_head are trained densely at lr). Controls: `adamw (lr 0.01)`
and `rso (lr 0.001)` swap the two learning rates, since in a short run the lr of the dense embeddings (most of
llama-tiny's parameters) moves the perplexity a lot; `golore (moments reset)` is the GoLore run that RSO's steps
equal, up to which layers share a random subspace (RSO: one P per shared input, q/k/v and gate/up; GoLore: one
basis per weight), and `rso (moments project)` carries B's first moments across merges, as default GoLore does. Validation: the same
{first['eval_batches'] * first['batch_size']} held-out sequences for every run. Memory columns are the harness's
measured report (optimizer state: `opt.state_bytes()` for ours, the state's tensors for torch's AdamW and
galore-torch — which leaves out galore-torch's projection matrices, held in a Python object; peak RSS: the
whole process, including Python, torch and the data). tokens/s: wall clock on 2 shared CPU cores, so only rough.

## Methods at equal tokens

![methods]({fig1.name})

{table(HEADER, [_row(r, results[r.key], base) for r in methods])}

auto: {switch.get('auto', 'not run')}.

## Rank ablation (GaLore)

{table(HEADER, rank_rows)}

## GaLore vs GoLore at a small and a large batch (same steps, so the large batch sees more tokens)

![batch]({fig2.name})

{table(HEADER, [_row(r, results[r.key], base) for r in batches])}

## RSO against GoLore across seeds (seed 0: the methods study)

{seed_table(methods + seeds, results)}

## RSO against GoLore on llama-small (hidden 384, 8 layers; rank 96 = d/4; seed 0; else as above)

{table(HEADER, [_row(r, results[r.key], results[sizes[0].key]) for r in sizes]) if sizes else "(not run)"}

## The papers' numbers (GaLore Table 2, C4, validation perplexity)

{table(["model", "full-rank Adam", "GaLore", "GaLore / full", "rank"], paper_rows)}

VERDICT

## Commands

Each run, as `subspace-optim train` (what `reproduce pretrain` ran, in this order):

```
{commands}
```

`subspace-optim reproduce pretrain --scale paper --dry-run` prints the same studies at GaLore's sizes and recipe
(llama-60m to llama-1b on C4, ranks 128/256/256/512, gap 200, scale 0.25, batch 512 = 128 x 4, 256 tokens,
10k–100k steps, bf16); they need GPUs and a network and were not run here.
"""
    body = body.replace("VERDICT", verdict(runs, results))
    return report.write("Pretraining LLaMA: methods, rank and batch at equal tokens", body, seeds="0 for every run; 1 and 2 as well for GoLore and RSO (the seed study)")


def seed_table(runs: list[Run], results: dict) -> str:
    """seed | GoLore ppl | RSO ppl | RSO / GoLore, one row per seed that has both, and their means."""
    ppl = {(r.flags["optimizer"], r.flags["seed"]): results[r.key]["final_val_ppl"] for r in runs
           if r.flags["optimizer"] in ("golore", "rso") and r.flags["lr"] == SUBSPACE_LR and "moments" not in r.flags}
    seeds = sorted(s for (m, s) in ppl if m == "rso" and ("golore", s) in ppl)
    if not seeds:
        return "(not run)"
    rows = [[s, f"{ppl['golore', s]:.2f}", f"{ppl['rso', s]:.2f}", f"{ppl['rso', s] / ppl['golore', s]:.3f}"]
            for s in seeds]
    mean = lambda m: sum(ppl[m, s] for s in seeds) / len(seeds)  # noqa: E731
    rows.append(["mean", f"{mean('golore'):.2f}", f"{mean('rso'):.2f}", f"{mean('rso') / mean('golore'):.3f}"])
    return table(["seed", "GoLore val ppl", "RSO val ppl", "RSO / GoLore"], rows)


def _switch_summary(summary: dict) -> str:
    """'N parameters switched to random projections: at step s (count), ...' from summary.json's switch_steps."""
    steps = list((summary.get("switch_steps") or {}).values())
    if not steps:
        return "no parameter switched to random projections"
    counts = {s: steps.count(s) for s in sorted(set(steps))}
    return (f"{len(steps)} projected parameters switched to random projections, at step "
            + ", ".join(f"{s} ({n})" for s, n in counts.items()))


def verdict(runs: list[Run], results: dict) -> str:
    """Plain statements of what the numbers show, computed from them."""
    by = {r.label: results[r.key] for r in runs if r.study == "methods"}
    lines = ["## What matched and what did not", ""]
    if "adamw" in by:
        ppl0 = by["adamw"]["final_val_ppl"]
        for label, s in by.items():
            if label != "adamw":
                lines.append(f"- {label}: val ppl {s['final_val_ppl']:.2f} = {s['final_val_ppl'] / ppl0:.3f} x AdamW's "
                             f"{ppl0:.2f}; optimizer state {s['optimizer_state_bytes'] / by['adamw']['optimizer_state_bytes']:.2f}"
                             f" x AdamW's; peak RSS {s['peak_memory_bytes'] / by['adamw']['peak_memory_bytes']:.2f} x.")
    size = {r.label.removeprefix("llama-small "): results[r.key] for r in runs if r.study == "size"}
    pairs = (("rso", "golore"), ("rso", "golore (moments reset)"), ("rso (moments project)", "golore"),
             ("rso (moments project)", "golore (side right)"))
    for model, group in (("llama-tiny", by), ("llama-small", size)):
        for mine, theirs in pairs:
            if mine in group and theirs in group:
                a, b = group[mine]["final_val_ppl"], group[theirs]["final_val_ppl"]
                lines.append(f"- {model}, {mine} against {theirs}: val ppl {a:.2f} vs {b:.2f} (ratio {a / b:.3f}).")
    batch = {r.label: results[r.key] for r in runs if r.study == "batch"}
    for b in sorted({int(k.split("b=")[1]) for k in batch}):
        ga, go = batch.get(f"galore b={b}"), batch.get(f"golore b={b}")
        if ga and go:
            lines.append(f"- batch {b}: GaLore {ga['final_val_ppl']:.2f}, GoLore {go['final_val_ppl']:.2f} "
                         f"(GoLore / GaLore = {go['final_val_ppl'] / ga['final_val_ppl']:.3f}).")
    return "\n".join(lines)
