"""The `subspace-optim` command. Each subcommand is one entry of COMMANDS: (help, add_arguments, run)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import warnings
from pathlib import Path

from .train.config import DTYPE_NAMES, TASK_DEFAULTS, TrainConfig, UsageError, dtype_name


def _methods_help() -> str:
    """Every training method of the registry, so --help never misses one."""
    from .train.optimizers import OPTIMIZERS

    return "; ".join(f"{name}: {method.help}" for name, method in OPTIMIZERS.items()).replace("%", "%%")


def _add_config_flags(parser: argparse.ArgumentParser, *tasks: str) -> None:
    """One flag per TrainConfig field of any of ``tasks`` (a command may run several: finetune --task
    classify|sft), with the field's help and each task's default (flags left out keep argparse.SUPPRESS, so the
    run knows which flags the user gave: a resumed run must not change others)."""
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        only = meta.get("only", tasks)
        mine = [t for t in tasks if t in ((only,) if isinstance(only, str) else only)]
        if meta.get("cli") is False or not mine:
            continue
        helps = [meta.get(f"help_{t}", meta["help"]) for t in mine]
        help_text = " | ".join(dict.fromkeys(helps)) if len(set(helps)) == 1 else " | ".join(
            f"{t}: {h}" for t, h in zip(mine, helps))
        if f.name == "optimizer":
            help_text += " (" + _methods_help() + ")"
        # 0 and 0.0 are defaults too; None means "derived" and False an off switch, shown by neither
        defaults = {t: TASK_DEFAULTS[t].get(f.name, f.default) for t in mine}
        shown = {t: d for t, d in defaults.items() if d is not None and d is not False}
        if len(set(map(str, shown.values()))) == 1 and len(shown) == len(mine):
            help_text += f" (default: {next(iter(shown.values()))})"
        elif shown:
            help_text += " (default: " + "; ".join(f"{t}: {d}" for t, d in shown.items()) + ")"
        kwargs = {"help": help_text, "default": argparse.SUPPRESS}
        if isinstance(f.default, bool):
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = meta.get("type", type(f.default))
            kwargs["metavar"] = {int: "N", float: "X"}.get(kwargs["type"], f.name.upper())
            if "choices" in meta:
                kwargs["choices"], kwargs["metavar"] = meta["choices"], None
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _runner(task: str):
    def run_task(args: argparse.Namespace) -> int:
        from .train.loop import run

        names = {f.name for f in dataclasses.fields(TrainConfig)}
        given = {k: v for k, v in vars(args).items() if k in names}  # finetune's --task among them
        run(TrainConfig(**{"task": task, **given}), set(given))
        return 0

    return run_task


def _add_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders to compare")


def _compare(args: argparse.Namespace) -> int:
    """A table of the runs' summary.json: quality, memory and speed side by side."""
    from .memory_measured import human

    rows = []
    for run_dir in map(Path, args.runs):
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
            config = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise UsageError(f"{run_dir}: not a finished run ({err})") from None
        quality = (f"ppl {summary['final_val_ppl']:.2f}" if "final_val_ppl" in summary
                   else f"acc {summary['final_accuracy']:.3f} F1 {summary['final_f1']:.3f}")
        rows.append([run_dir.name, config["optimizer"], str(summary["steps"]), f"{summary['final_val_loss']:.4f}",
                     quality, human(summary["optimizer_state_bytes"]), human(summary["peak_memory_bytes"]),
                     f"{summary['tokens_per_s']:.0f}"])
    header = ["run", "optimizer", "steps", "val loss", "val quality", "optim state", "peak mem", "tokens/s"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return 0


def _add_finetune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=("classify", "sft"), default=argparse.SUPPRESS,
                        help="classify: a sequence classifier on labeled text; sft: supervised fine-tuning of a "
                        "causal LM, loss on the responses only (default: classify; a resumed run keeps its own)")
    _add_config_flags(parser, "classify", "sft")


def _add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="a run folder of train or finetune (its last checkpoint)")
    parser.add_argument("out", metavar="DIR", help="the HF folder to write (must not exist or be empty)")
    parser.add_argument("--lora-adapter", action="store_true", help="--optimizer lora runs: write the peft adapter "
                        "(adapter_config.json + adapter_model.safetensors, loaded with peft over the base model) "
                        "instead of the merged model")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="dtype of the written "
                        "weights (default: the run's)")


def _export(args: argparse.Namespace) -> int:
    from .train.export import export

    print(export(Path(args.run_dir), Path(args.out), lora_adapter=args.lora_adapter, dtype=args.dtype))
    return 0


EXPERIMENTS = ("counterexample", "pretrain", "finetune", "refresh-cost", "memory", "precision")
#: Where the committed reports live. Only the full experiment writes here by default: a --quick or --scale paper run
#: writes beside its training runs, so a cheap check never replaces a committed report with toy numbers.
RESULTS = Path("docs/results")
_REPRODUCE_DEFAULTS = {"runs": "runs/reproduce", "scale": "cpu", "jobs": 1}


def _add_reproduce(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=(*EXPERIMENTS, "all", "index"), help="experiment to run, all of them in "
                        "turn (then the index), or index: rebuild the table of verdicts in OUT/README.md from the "
                        "reports in OUT")
    parser.add_argument("--quick", action="store_true", help="toy size (seconds to minutes): checks that the "
                        "experiment runs end to end; its numbers mean nothing")
    parser.add_argument("--out", help=f"folder for NAME.md and its plots (default: {RESULTS} for the full "
                        "experiment; RUNS/quick with --quick, RUNS/paper with --scale paper)")
    parser.add_argument("--runs", default=_REPRODUCE_DEFAULTS["runs"], help="folder for the training runs of "
                        "pretrain, finetune and memory; finished runs found there are reused (default: "
                        "runs/reproduce)")
    parser.add_argument("--scale", choices=("cpu", "paper"), default=_REPRODUCE_DEFAULTS["scale"],
                        help="pretrain only: cpu (llama-tiny on BBC News) or paper (GaLore's llama-60m to "
                        "llama-1b on C4; needs GPUs and a network) (default: cpu)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run and where the report "
                        "would go, and run nothing")
    parser.add_argument("--max-runs", type=int, metavar="N", help="pretrain and memory --large: start at most N "
                        "training runs (memory --large: configurations), then write the report from every finished "
                        "one (0: only the report); run again to continue")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="pretrain only: training runs at once, "
                        "each a process with one thread (default: 1)")
    parser.add_argument("--methods", metavar="A,B", help="pretrain only: start only these methods' runs (e.g. "
                        "adamw,galore); the report still shows every stored run")
    parser.add_argument("--large", action="store_true", help="memory only: train LLaMA-7B and 13B here and measure "
                        "their peaks (tens of minutes each, about 20 GiB; writes memory-large.md)")


def _is_full(args: argparse.Namespace, name: str) -> bool:
    """Whether this is the experiment a committed report comes from: the only run that may replace it."""
    return not args.quick and (name != "pretrain" or args.scale == "cpu")


def _report_dir(args: argparse.Namespace, name: str) -> Path:
    """Where experiment ``name`` writes NAME.md: --out, else docs/results for the full experiment and a folder
    under --runs for any other; a run that is not the full experiment may not write into docs/results."""
    full = _is_full(args, name)
    if args.out is None:
        return RESULTS if full else Path(args.runs) / ("quick" if args.quick else args.scale)
    from .experiments.report import REPO

    if not full and Path(args.out).resolve() in {RESULTS.resolve(), (REPO / RESULTS).resolve()}:
        raise UsageError(f"--out {args.out}: only the full experiment rewrites the committed reports; "
                         f"{'--quick' if args.quick else '--scale ' + args.scale} writes elsewhere (leave out --out)")
    return Path(args.out)


def _reproduce(args: argparse.Namespace) -> int:
    """Run experiments.<name>.main(args): each writes <args.out>/<name>.md and its plots (with --dry-run, print
    what it would run instead: experiments.<name>.dry_run(args))."""
    import importlib

    if args.scale != "cpu" and args.name not in ("pretrain", "all"):
        raise UsageError(f"--scale {args.scale}: only pretrain has a paper scale")
    if args.max_runs is not None and (args.name not in ("pretrain", "memory", "precision") or args.max_runs < 0
                                      or (args.name == "memory" and not args.large)):
        raise UsageError(f"--max-runs {args.max_runs}: only pretrain, precision and memory --large build their "
                         "report over several invocations, and N must not be negative")
    if args.jobs != 1 and (args.name != "pretrain" or args.jobs < 1):
        raise UsageError(f"--jobs {args.jobs}: only pretrain runs its training runs in parallel, and N must be at "
                         "least 1")
    if args.methods is not None and args.name != "pretrain":
        raise UsageError(f"--methods {args.methods}: pretrain only")
    if args.large and (args.name != "memory" or args.quick):
        raise UsageError("--large: memory only, and not with --quick")
    flags = []
    for key in ("quick", "out", "runs", "scale", "max_runs", "jobs", "methods", "large", "dry_run"):
        value = getattr(args, key)
        if value is not None and value is not False and value != _REPRODUCE_DEFAULTS.get(key):  # --max-runs 0 too
            flags += ["--" + key.replace("_", "-")] + ([] if value is True else [str(value)])
    names = (*EXPERIMENTS, "index") if args.name == "all" else (args.name,)
    outs = {name: _report_dir(args, name) for name in names}  # every user error before anything runs
    for name in names:
        module = importlib.import_module(f".experiments.{name.replace('-', '_')}{'_large' if args.large else ''}",
                                         __package__)
        run = argparse.Namespace(**{**vars(args), "out": outs[name],
                                    # the exact command, for the report's header
                                    "argv": ["subspace-optim", "reproduce", name, *flags]})
        if args.dry_run:
            writes, after = (("README.md's table of verdicts", "reading") if name == "index"
                             else (f"{name}{'-large' if args.large else ''}.md and its plots", "running"))
            print(f"# reproduce {name}: would write {outs[name]}/{writes}, after {after}:")
            print("\n".join(module.dry_run(run)))
        else:
            module.main(run)
    return 0


def _add_memory(parser: argparse.ArgumentParser) -> None:
    from .engine.settings import PRECISIONS, RANDOM_BASES, STATE_BITS, WEIGHT_ROUNDINGS
    from .memory_estimate import ACTIVATION_MODELS, ESTIMATE_OPTIMIZERS, WEIGHT_FORMATS, estimate_models

    parser.add_argument("--model", default="llama-7b", help="named model: " + ", ".join(estimate_models())
                        + " (default: llama-7b)")
    parser.add_argument("--optimizer", default="adamw", choices=ESTIMATE_OPTIMIZERS, help="adamw (full rank), "
                        "galore, golore (projected linear weights) or rso (default: adamw)")
    parser.add_argument("--rank", type=int, default=None, help="projection rank (default: a quarter of the hidden "
                        "size); a weight whose reduced side is not larger is counted at full rank")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default: 1)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default: 2048)")
    parser.add_argument("--dtype", default="bfloat16", type=dtype_name, choices=sorted(set(DTYPE_NAMES.values())),
                        help="bytes per number of every tensor, also spelled fp32 / bf16 / fp16 (default: bfloat16)")
    parser.add_argument("--layerwise", action="store_true", help="per-layer updates inside backward: "
                        "gradients are freed as they are used")
    parser.add_argument("--activations", default="full", choices=ACTIVATION_MODELS, help="activation model: "
                        "full (Korthikanti et al. 2022, no recomputation), flash (no s x s scores), checkpoint "
                        "(layer inputs + one layer) (default: full)")
    parser.add_argument("--state-bits", type=int, default=32, choices=STATE_BITS, help="how the moments are "
                        "stored: 32 (in --dtype), 16 (bfloat16), 8 or 4 (block-wise quantized: a code per number, "
                        "a float32 scale per block, a table per tensor) (default: 32)")
    parser.add_argument("--random-basis", default="keep", choices=RANDOM_BASES, help="golore: keep every random "
                        "basis between steps, or regenerate each from its seed when needed (layer-wise: one held at "
                        "a time; standard: all, inside step() only) (default: keep)")
    parser.add_argument("--weights", default="dense", choices=WEIGHT_FORMATS, help="dense (every weight in --dtype) "
                        "or int8 (galore/golore: each projected linear weight as int8 plus a --dtype scale per row, "
                        "as Q-GaLore and torchao's int8 quantized training; counts its dequantized copy in each "
                        "matmul as a transient) (default: dense)")
    parser.add_argument("--fused-loss", action="store_true", help="the training uses --fused-loss: no float32 "
                        "logits; lm_head's weight gradient and one chunk's logits instead")
    parser.add_argument("--weight-rounding", default="nearest", choices=WEIGHT_ROUNDINGS,
                        help="as `train`'s: stochastic adds a dense tensor's direction buffer to the update's "
                        "transients (default: nearest)")
    parser.add_argument("--projection-dtype", default="float32", choices=PRECISIONS,
                        help="as `train`'s: float32 projections of a bf16 weight hold a float32 copy of its gradient "
                        "during its update (default: float32)")
    parser.add_argument("--host", action="store_true", help="add what a CPU training process holds beyond its "
                        "tensors (Python, torch, libraries, data: measured here), to compare with a CPU run's "
                        "peak RSS; a GPU's peak has none of it")
    parser.add_argument("--fit", metavar="BUDGET", help="instead of one estimate, the GoLore settings that fit "
                        "BUDGET (24GB, 22.5GB, 24GiB; 16G is GiB) for --model, --batch, --seq and --dtype, the "
                        "other flags ignored. The knobs are tried by the quality they give up, least first: those "
                        "that give up none (layer-wise updates, regenerated bases, activation checkpointing: the "
                        "same updates for more compute, the cheapest first), then a lower rank, then 8- and 4-bit "
                        "moments, then int8 weights (rounding in every weight). Prints the first settings that fit, "
                        "their `train` flags, and AdamW's total")


def _memory_fit(args: argparse.Namespace) -> int:
    """`memory --fit BUDGET`: the rows of ``memory_estimate.fit_ladder`` (cheapest in lost quality first) up to
    the third that fits, the first marked, then its `subspace-optim train` flags and AdamW's total."""
    from .memory_estimate import estimate, fit_ladder, parse_budget

    try:
        budget = parse_budget(args.fit)
    except ValueError as err:
        raise UsageError(str(err)) from None
    common = {"batch": args.batch, "seq": args.seq, "dtype": args.dtype, "host": args.host}
    ladder = fit_ladder(args.model, batch=args.batch, seq=args.seq, dtype=args.dtype)
    # each setting with the fused loss or HF's, whichever needs less (the fused one wins at many tokens per batch)
    rows = [(c, min((estimate(args.model, "golore", **common, **c, fused_loss=f) for f in (False, True)),
                    key=lambda est: est["total"])) for c in ladder]
    fits = [i for i, (_, est) in enumerate(rows) if est["total"] <= budget]
    print(f"{args.model}, golore, batch {args.batch} x {args.seq} tokens, {args.dtype}: settings within {args.fit} "
          f"({budget / 1e9:.2f} GB), the cheapest in lost quality first")
    header = ["", "rank", "moments", "weights", "checkpointing", "layer-wise", "bases", "total GB", "fits"]
    table = [header]
    for i, (c, est) in enumerate(rows[:fits[2] + 1] if len(fits) > 2 else rows):
        table.append(["*" if fits and i == fits[0] else "", str(c["rank"]), f"{c['state_bits']}-bit",
                      args.dtype if c["weights"] == "dense" else "int8",
                      "yes" if c["activations"] == "checkpoint" else "no", "yes" if c["layerwise"] else "no",
                      c["random_basis"], f"{est['total'] / 1e9:.2f}", "yes" if i in fits else "no"])
    widths = [max(len(row[j]) for row in table) for j in range(len(header))]
    for row in table:
        print("  " + "  ".join(cell.rjust(w) if j in (1, 7) else cell.ljust(w)
                               for j, (cell, w) in enumerate(zip(row, widths))).rstrip())
    if fits:
        best = fits[0]
        print(f"* the cheapest in quality that fits: {rows[best][1]['total'] / 1e9:.2f} GB; train it with:")
    else:
        best = min(range(len(rows)), key=lambda i: rows[i][1]["total"])
        print(f"nothing fits {args.fit}: the smallest is {rows[best][1]['total'] / 1e9:.2f} GB, with:")
    c = rows[best][0]
    print(f"  subspace-optim train --model {args.model} --optimizer golore --rank {c['rank']}"
          + (" --layerwise" if c["layerwise"] else "") + f" --dtype {args.dtype} --state-bits {c['state_bits']}"
          + (" --random-basis regenerate" if c["random_basis"] == "regenerate" else "")
          + (" --checkpointing" if c["activations"] == "checkpoint" else "")
          + (" --fused-loss" if rows[best][1]["fused_loss"] else "")
          + (" --weights int8" if c["weights"] == "int8" else "") + f" --batch-size {args.batch} --seq-len {args.seq}")
    adamw = min((estimate(args.model, "adamw", activations="checkpoint", **common, fused_loss=f) for f in (False, True)),
                key=lambda est: est["total"])
    print(f"AdamW (full rank, moments in {args.dtype}, activation checkpointing) would need "
          f"{adamw['total'] / 1e9:.2f} GB for the same batch {args.batch} x {args.seq}.")
    return 0


def _memory(args: argparse.Namespace) -> int:
    """Print the analytic memory breakdown of training a model (no model is built), or with --fit the settings
    that fit a budget (``_memory_fit``)."""
    from .memory_estimate import estimate, estimate_models, format_estimate

    if args.model not in estimate_models():
        raise UsageError(f"unknown model {args.model!r}; expected one of {', '.join(estimate_models())}")
    if args.fit is not None:
        return _memory_fit(args)
    try:
        est = estimate(args.model, args.optimizer, rank=args.rank, batch=args.batch, seq=args.seq,
                       dtype=args.dtype, layerwise=args.layerwise, activations=args.activations,
                       state_bits=args.state_bits, random_basis=args.random_basis, weights=args.weights,
                       fused_loss=args.fused_loss, weight_rounding=args.weight_rounding,
                       projection_dtype=args.projection_dtype, host=args.host)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if est["full_rank_weights"]:
        warnings.warn(f"rank {est['rank']}: {est['full_rank_weights']} linear weights are not wider than the rank "
                      "on their reduced side; they are counted at full rank")
    rank = f", rank {est['rank']}" if est["rank"] else ""
    print(format_estimate(est, f"{args.model} ({est['parameters'] / 1e9:.2f}B parameters), {args.optimizer}{rank}"
                          f"{', layer-wise' if args.layerwise else ''}, batch {args.batch} x {args.seq} tokens, "
                          f"{args.dtype}, activations: {args.activations}"
                          + (f", {args.state_bits}-bit moments" if args.state_bits != 32 else "")
                          + (f", random bases: {args.random_basis}" if args.random_basis != "keep" else "")
                          + (f", {args.weights} weights" if args.weights != "dense" else "")))
    return 0


COMMANDS = {
    "train": ("pretrain a causal LM (LLaMA) on text", lambda p: _add_config_flags(p, "lm"), _runner("lm")),
    "finetune": ("fine-tune a pretrained model: a sequence classifier (--task classify) or a causal LM on "
                 "prompt/response or chat records (--task sft)", _add_finetune, _runner("classify")),
    "export": ("write a finished run as an HF model folder (from_pretrained loads it), with its tokenizer",
               _add_export, _export),
    "compare": ("compare finished runs side by side", _add_compare, _compare),
    "reproduce": ("reproduce a paper's claim at CPU scale; the full experiment writes docs/results/NAME.md",
                  _add_reproduce, _reproduce),
    "memory": ("estimate the memory of training a model (weights, gradients, optimizer state, activations)",
               _add_memory, _memory),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subspace-optim", description="Memory-efficient training by subspace "
                                     "optimization (GaLore, GoLore, GoLore@x%, online PCA, auto, RSO).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def _one_line_warning(command: str):
    """Warnings (a rank too large for some layers, a checkpoint skipped on resume, ...) as one line on stderr,
    like errors, instead of Python's two lines with a source path."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"subspace-optim {command}: warning: {message}", file=sys.stderr)

    return show


def _quiet_third_party_imports() -> None:
    """transformers imports torchao when it is installed (the 'lowbit' extra); torchao's import then logs the
    optional GPU kernels it cannot load, and torch a deprecation of its enums: neither concerns a run here."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party_imports()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return args.run(args)
    except UsageError as err:  # the user's to fix: one line, no traceback
        print(f"subspace-optim {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
