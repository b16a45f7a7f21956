"""Checkpoints: weights as safetensors, everything else (optimizer, scheduler, RNG, data position) in state.pt.

A checkpoint is a folder ``checkpoints/step_NNNNNNNN`` written under a temporary name and renamed into place
with os.replace, so a crash mid-write never leaves a half checkpoint; older ones are removed after.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .config import UsageError

FORMAT = 1
WEIGHTS, STATE, SHARDS = "model.safetensors", "state.pt", "dcp"


def latest(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state  # numpy's generator is not used by the harness, so it is not saved


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, model, optimizer, scheduler, batches, progress: dict, identity: dict,
         par=None) -> Path:
    """Write the checkpoint of ``step``; ``progress`` holds counters (tokens, time), ``identity`` what must
    match on resume (task, model, optimizer, ...). Under torchrun (``par``): DDP's replicated model and optimizer
    are written by rank 0; FSDP2's shards by every process, with torch.distributed.checkpoint (``dcp/``)."""
    folder = run_dir / "checkpoints"
    final = folder / f"step_{step:08d}"
    sharded = par is not None and par.mode == "fsdp2"
    if par is not None and not par.main and not sharded:
        par.barrier()
        return final
    state = {"format": FORMAT, "step": step, "identity": identity, "progress": progress,
             "scheduler": scheduler.state_dict(), "data": batches.state_dict(), "rng": rng_state()}
    if sharded:
        tmp = folder / f".tmp-step_{step:08d}"  # the same name on every process
        if par.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        par.barrier()
        _save_shards(tmp / SHARDS, model, optimizer)
        if not par.main:
            par.barrier()
            return final
    else:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
        save_model(model, str(tmp / WEIGHTS))  # drops duplicate names of tied weights; load_model restores them
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, tmp / STATE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in folder.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    if par is not None:
        par.barrier()
    return final


def _save_shards(path: Path, model, optimizer) -> None:
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp_save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(path))


def _load_shards(path: Path, model, optimizer) -> None:
    """Load a torch.distributed.checkpoint written at any number of processes into this one's model/optimizer
    (sharded or not): DCP reshards every tensor to the live placements."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp_load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load(path: Path, model, optimizer, scheduler, batches, identity: dict, device: torch.device,
         sharded: bool = False) -> dict:
    """Restore everything ``save`` wrote into live objects; returns {"step", "progress"}.

    Any failure (truncated file, wrong model shape, different optimizer) is a UsageError naming the checkpoint.
    A checkpoint of FSDP2 shards (``dcp/``) resumes at any number of processes, sharded or not; one written by
    a single process or DDP resumes without FSDP2 (``sharded`` False).
    """
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise UsageError(f"checkpoint {path / STATE} is unreadable (corrupt or not a checkpoint): {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"checkpoint {path} has an unknown format")
    different = {k: (state["identity"].get(k), v) for k, v in identity.items() if state["identity"].get(k) != v}
    if different:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in different.items())
        raise UsageError(f"checkpoint {path} does not match this run ({detail})")
    if (path / SHARDS).is_dir():
        try:
            _load_shards(path / SHARDS, model, optimizer)
            scheduler.load_state_dict(state["scheduler"])
            batches.load_state_dict(state["data"])
        except Exception as err:
            raise UsageError(f"checkpoint {path / SHARDS} does not match this run: {err}") from None
        set_rng_state(state["rng"])
        return {"step": state["step"], "progress": state["progress"]}
    if sharded:
        raise UsageError(f"checkpoint {path} was written by a single process or DDP: resume it with "
                         "--distributed none or ddp")
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False, device=str(device))
    except Exception as err:
        raise UsageError(f"checkpoint weights {path / WEIGHTS} are unreadable or do not fit the model: {err}") from None
    if missing or unexpected:
        raise UsageError(f"checkpoint weights {path / WEIGHTS} do not fit the model: missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"])
    except Exception as err:
        raise UsageError(f"checkpoint {path} does not match this run's optimizer or data: {err}") from None
    set_rng_state(state["rng"])
    return {"step": state["step"], "progress": state["progress"]}
