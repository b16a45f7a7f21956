"""The training loop, shared by `train` (causal LM) and `finetune` (classification); read it top to bottom."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from ..memory_measured import (PhasePeaks, SavedActivations, format_report, gradient_bytes, human,
                               optimizer_state_bytes, return_freed_memory, weight_bytes)
from ..optimizer import SubspaceOptimizer
from . import checkpoint, parallel
from .config import AUTO, TrainConfig, UsageError, load_config, resolve, save_config
from .finetune import classify_task
from .models import enable_checkpointing, to_device
from .optimizers import check_method, rank_for
from .pretrain import lm_task
from .runlog import MetricsLog, plot_losses, write_json
from .sft import sft_task
from .task import model_loss

TASKS = {"lm": lm_task, "classify": classify_task, "sft": sft_task}
COMMANDS = {"lm": "train", "classify": "finetune", "sft": "finetune"}


def cosine_with_warmup(warmup: int, total: int, min_ratio: float):
    """LR multiplier as in GaLore: linear warm-up, then cosine decay from 1 to ``min_ratio`` at ``total``."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # starts above 0, so the first step is not wasted
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def prepare(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, Path, Path | None]:
    """(resolved config, run folder, checkpoint to resume from or None); checks the folder before any work.

    ``--resume auto`` (the command a job restarter repeats, e.g. ``torchrun --max-restarts``): the run in --out
    from its newest readable checkpoint when it has one, else a new run there (over a start that saved none)."""
    auto = cfg.resume == AUTO
    if auto:
        if cfg.out is None:
            raise UsageError("--resume auto continues the run in --out, which every restart must name alike: "
                             "add --out DIR")
        cfg.resume = cfg.out if checkpoint.saved(Path(cfg.out)) else None
        given = given - {"out"}  # the folder is the run's wherever it was started (a copy, a moved folder)
    if cfg.resume:
        return _resumed(cfg, given, Path(cfg.resume), complete_ok=auto)
    cfg = resolve(cfg)
    name = Path(cfg.model).stem if cfg.model.endswith(".json") or "/" in cfg.model else cfg.model
    out = Path(cfg.out or f"runs/{COMMANDS[cfg.task]}-{name}-{cfg.optimizer}-{datetime.now():%Y%m%d-%H%M%S}")
    if not auto and ((out / "config.json").exists() or (out / "checkpoints").exists()):
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        hint = f" (torchrun's restart {restart} repeats the command: add --resume auto)" if restart else ""
        raise UsageError(f"--out {out} already holds a run; continue it with --resume {out} or pick another "
                         f"--out{hint}")
    cfg.out = str(out)
    return cfg, out, None


def _resumed(cfg: TrainConfig, given: set[str], run_dir: Path, complete_ok: bool) -> tuple[TrainConfig, Path, Path]:
    """``prepare`` for --resume RUN_DIR: the run's config with the changes a resumed run may make, and its newest
    readable checkpoint (at --steps, a complete run, only where ``complete_ok``)."""
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"--resume {run_dir}: not a run folder (no config.json)")
    saved = load_config(run_dir / "config.json")
    if COMMANDS[saved.task] != COMMANDS[cfg.task]:
        raise UsageError(f"--resume {run_dir}: that run was started with `{COMMANDS[saved.task]}`")
    if "task" not in given:  # finetune --resume continues the run's own --task
        cfg.task = saved.task
    for name in sorted(given - set(TrainConfig.RESUMABLE)):
        if getattr(cfg, name) != getattr(saved, name):
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} differs from the run's "
                             f"{getattr(saved, name)!r}; a resumed run keeps its config (it may change "
                             f"{', '.join('--' + n.replace('_', '-') for n in TrainConfig.RESUMABLE)})")
    for name in given & set(TrainConfig.RESUMABLE):
        setattr(saved, name, getattr(cfg, name))
    saved.resume = str(run_dir)
    cfg = resolve(saved)
    found = checkpoint.latest_readable(run_dir)  # warns about newer, damaged ones
    if found is None:
        raise UsageError(f"--resume {run_dir}: the run has no checkpoint yet")
    done = checkpoint.step_of(found)
    if cfg.steps < done or (cfg.steps == done and not complete_ok):
        raise UsageError(f"--resume {run_dir}: the checkpoint is at step {done}; pass --steps above it to "
                         "extend the run")
    return cfg, run_dir, found


def run(cfg: TrainConfig, given: set[str] = frozenset()) -> dict:
    """Train as ``cfg`` says (``given``: the fields the user set) and return the summary."""
    parallel.check_restarts(cfg.resume)
    cfg, run_dir, resume_from = prepare(cfg, set(given))
    if resume_from is not None and checkpoint.step_of(resume_from) == cfg.steps:
        return _complete(run_dir, cfg.steps)
    method = check_method(cfg)
    par = parallel.start(cfg.distributed, cfg.device, cfg.batch_size, cfg.tp)
    try:
        return _train(cfg, method, run_dir, resume_from, par)
    finally:
        par.close()


def _complete(run_dir: Path, steps: int) -> dict:
    """--resume auto on a run that has its last checkpoint (a restart after it, a requeued job that had finished):
    nothing to train, as Lightning's fit and torchtitan's trainer do at their last step; the run's summary."""
    summary = run_dir / "summary.json"
    if os.environ.get("RANK", "0") == "0":
        print(f"{run_dir}: complete at step {steps}, nothing to train (pass a larger --steps to extend it)"
              + ("" if summary.is_file() else "; it was stopped before writing summary.json"))
    return json.loads(summary.read_text()) if summary.is_file() else {}


def _train(cfg: TrainConfig, method, run_dir: Path, resume_from: Path | None, par: parallel.Parallel) -> dict:
    run_dir = par.same(run_dir)  # the default folder has a time stamp: rank 0's decides
    cfg.out = cfg.out if cfg.resume else str(run_dir)
    device = par.device
    say = (lambda *a: None) if cfg.quiet or not par.main else tqdm.write

    # Everything that can reject the user's input happens here, before the run folder is touched.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if device.type == "cpu":
        return_freed_memory()  # freed tensors leave the RSS: the peak is what is held, not glibc's high water
    peaks = PhasePeaks(device)  # where the run's memory goes, phase by phase (the report's breakdown)
    peaks.mark("runtime")
    with peaks.phase("data and model"):
        task = TASKS[cfg.task](cfg)
        if cfg.checkpointing:
            enable_checkpointing(task.model)
        if method.rank:
            cfg.rank = rank_for(cfg, task.model)
        model = to_device(task.model, device, cfg.dtype)
        if method.prepare is not None:  # RSO swaps its layers in, before DDP/FSDP2 see the parameters
            method.prepare(cfg, model)
        # what forward runs: the model, or the fused loss around it; `model` stays the bare module for saving
        trained = task.module(model)
        if par.mode == "fsdp2":  # shard first: the optimizer must hold (and key its state by) the sharded parameters
            trained = par.wrap(trained)
    with peaks.phase("optimizer"):
        setup = method.build(cfg, model)
    optimizer = setup.optimizer
    if isinstance(optimizer, SubspaceOptimizer):
        optimizer.process_group = par.optimizer_group  # DDP: each SVD refresh on one rank, broadcast
    if par.mode == "ddp":
        trained = par.wrap(trained, optimizer)
    schedule = cosine_with_warmup(cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    identity = {k: getattr(cfg, k) for k in ("task", "model", "optimizer", "rule", "rank", "target", "layerwise")}

    start, progress = 0, {"tokens": 0, "train_time": 0.0}
    if resume_from is not None:
        with peaks.phase("resume"):
            restored = checkpoint.load(resume_from, model, optimizer, scheduler, task.batches, identity, device,
                                       sharded=par.mode == "fsdp2")
        start, progress = restored["step"], restored["progress"]
        # A larger --steps stretches the schedule: recompute the current lr from the new horizon (a no-op
        # otherwise), and GoLore@x% switches at its share of the extended run.
        scheduler.last_epoch -= 1
        scheduler.step()
        for group in optimizer.param_groups:
            if group.get("total_steps") is not None:
                group["total_steps"] = cfg.steps
    metrics = ["step", "tokens", "loss", "lr", *task.summary_keys, "tokens_per_s", "peak_memory_bytes"]
    if par.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
        write_json(run_dir / "info.json", task.info)
        log = MetricsLog(run_dir, metrics, resume_step=start if resume_from else None)
    else:
        log = parallel.NoLog()
    if par.world > 1:
        task.info["processes"] = par.world
    rule = "" if cfg.optimizer == "adamw" else f" ({cfg.rule} rule)"
    say(f"{COMMANDS[cfg.task]} {cfg.model} with {cfg.optimizer}{rule} on {cfg.data} [{device}]: "
        + ", ".join(f"{k} {v}" for k, v in task.info.items() if isinstance(v, int)) + f"; run folder {run_dir}")
    if resume_from is not None:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))  # set by torchrun in every worker
        say(f"resuming from {resume_from}" + (f" (torchrun's restart {restart})" if restart else ""))

    memory = {"device": device.type, "weights_bytes": weight_bytes(model)}
    peaks.mark("training starts")
    bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=cfg.quiet or not par.main or not sys.stderr.isatty())
    model.train()
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for _ in range(cfg.grad_accum):
            # every process reads the same global batch and trains on its share of it
            batch = {k: v.to(device) for k, v in par.share(next(task.batches)).items()}
            # activations: what autograd saves during one forward (measured once, on the first micro-batch)
            measure = "activations_bytes" not in memory
            with peaks.phase("forward"), SavedActivations(model) if measure else nullcontext() as meter:
                loss = model_loss(trained, batch) / cfg.grad_accum
            if measure:
                meter.add_held(loss)
                memory["activations_bytes"] = meter.bytes
            with peaks.phase("backward"):  # layer-wise: the updates too
                loss.backward()
            loss_sum += loss.item()
            tokens += par.total(task.tokens(batch))
        loss_sum = par.mean(loss_sum)
        memory.setdefault("gradients_bytes", gradient_bytes(model))
        lr = scheduler.get_last_lr()[0]
        with peaks.phase("step"):
            if cfg.clip:
                parallel.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if setup.after_step is not None:
                setup.after_step(step)
        elapsed = time.perf_counter() - t0
        progress["tokens"] += tokens
        progress["train_time"] += elapsed

        row = {"step": step, "tokens": progress["tokens"], "loss": loss_sum, "lr": lr,
               "tokens_per_s": tokens / elapsed, "peak_memory_bytes": peaks.peak}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            model.eval()
            with peaks.phase("evaluation"):
                row.update(task.evaluate(trained))
            model.train()
            say(f"step {step}: " + ", ".join(f"{k} {row[k]:.4g}" for k in task.summary_keys))
        log.write(row)
        bar.set_postfix({"loss": f"{loss_sum:.3f}", "tokens/s": f"{row['tokens_per_s']:.0f}",
                         "peak mem": human(row["peak_memory_bytes"])})
        bar.update()
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            with peaks.phase("checkpoint"):
                checkpoint.save(run_dir, step, model, optimizer, scheduler, task.batches, progress, identity, par,
                                keep=cfg.keep_checkpoints)
    bar.close()
    log.close()

    memory["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    with peaks.phase("end"):
        pass
    memory["peak_memory_bytes"] = peaks.peak
    memory["phases"] = peaks.phases
    summary = {
        **{key: row[name] for name, key in task.summary_keys.items()},
        "peak_memory_bytes": memory["peak_memory_bytes"],
        "optimizer_state_bytes": memory["optimizer_state_bytes"],
        "tokens": progress["tokens"],
        "tokens_per_s": progress["tokens"] / max(progress["train_time"], 1e-9),
        "steps": cfg.steps,
        "final_train_loss": row["loss"],
        "memory": memory,
        **task.info,
    }
    if hasattr(optimizer, "skipped_steps"):
        summary["skipped_steps"] = optimizer.skipped_steps
    if cfg.optimizer == "auto":
        # The optimizer keys by parameter index (its param_groups order, as torch's state_dict); a reader needs names.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        names = {p: name for name, p in model.named_parameters()}
        summary["switch_steps"] = {names[params[i]]: step for i, step in optimizer.switch_steps().items()}
    if not par.main:
        return summary
    write_json(run_dir / "summary.json", summary)
    plot_losses(run_dir / "metrics.csv", run_dir / "loss.png", f"{cfg.model} · {cfg.optimizer} · {cfg.data}")
    print(f"{run_dir}: " + ", ".join(f"{key} {summary[key]:.4g}" for key in task.summary_keys.values())
          + f", {summary['tokens']} tokens at {summary['tokens_per_s']:.0f} tokens/s")
    print(format_report(memory))
    return summary
