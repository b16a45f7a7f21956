"""Checkpoints: weights as safetensors, everything else (optimizer, scheduler, RNG, data position) in state.pt.

A checkpoint is a folder ``checkpoints/step_NNNNNNNN`` written under a temporary name, verified (every record
of state.pt against the CRC-32 torch computed while writing it, the safetensors file against its own header),
given a SHA-256 manifest and renamed into place with os.replace; then all but the last ``keep`` checkpoints are
removed. A crash mid-write never leaves a half checkpoint, a bad write never replaces a good one, and a
checkpoint damaged later (truncated, garbled) is recognised on --resume, which falls back to an older one.

Under torchrun a DDP run (model and optimizer replicated) is checkpointed by rank 0 alone, in this format; an
FSDP2 run writes the weights and optimizer state of every shard with torch.distributed.checkpoint into ``dcp/``
instead of model.safetensors (and state.pt holds the rest): that resumes at any number of processes, or at one.
Every rank writes its shards into the same temporary folder; DCP's save returns only after rank 0 has gathered
every rank's write results and written ``dcp/.metadata``, so rank 0 then commits the folder as above. The name
``step_N`` is the completion marker: only whole checkpoints carry it (a checkpoint being replaced or deleted is
first renamed away), the temporary folders a killed write leaves are never read, and the next save removes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..precision import int8_parts, is_int8
from .config import UsageError

FORMAT = 1
WEIGHTS, STATE, SUMS, SHARDS = "model.safetensors", "state.pt", "sha256.json", "dcp"


class Unreadable(Exception):
    """A checkpoint file is missing, truncated or garbled (the message names it and says how)."""


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (zero-padded step numbers sort as text)."""
    return sorted((run_dir / "checkpoints").glob("step_*"))


def step_of(folder: Path) -> int:
    """The step a checkpoint folder ``step_NNNNNNNN`` holds."""
    return int(folder.name.removeprefix("step_"))


def saved(run_dir: Path) -> bool:
    """Whether the run has written a checkpoint (readable or not)."""
    return bool(_checkpoints(run_dir))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _header(f) -> tuple[dict, int]:
    """(a safetensors file's header without its metadata, the offset where the tensors' bytes begin); Unreadable
    where the file is too short for its 8-byte header size or the header is not JSON."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise Unreadable(f"{f.name} is truncated ({len(prefix)} bytes)")
    (size,) = struct.unpack("<Q", prefix)
    try:
        header = json.loads(f.read(size))
    except (ValueError, MemoryError):
        raise Unreadable(f"{f.name} has no valid safetensors header") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def _check_safetensors(path: Path) -> None:
    """The file is as long as its header says (8-byte header size, JSON header, then the tensors' bytes)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        header, start = _header(f)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if size != start + end:
        raise Unreadable(f"{path} is {size} bytes where its header says {start + end}")


def _check_state(path: Path) -> None:
    """Every record of the zip archive that torch.save writes matches the CRC-32 computed as it was written."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise Unreadable(f"{path} is truncated or not a torch.save archive ({err})") from None
    if bad is not None:
        raise Unreadable(f"{path} is corrupt (record {bad} fails its CRC check)")


def _files(folder: Path) -> list[str]:
    """The checkpoint's files, relative to it: the weights (one file, or DCP's shards) and state.pt."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != SUMS)


def verify(folder: Path) -> None:
    """Raise Unreadable unless the checkpoint ``folder`` is whole: every file's SHA-256 when the folder has a
    manifest (checkpoints written before it existed have none), then the files' own structure."""
    sharded = (folder / SHARDS).is_dir()
    for name in (STATE, f"{SHARDS}/.metadata" if sharded else WEIGHTS):
        if not (folder / name).is_file():
            raise Unreadable(f"{folder / name} is missing")
    if (folder / SUMS).is_file():
        try:
            sums = json.loads((folder / SUMS).read_text())
        except ValueError:
            raise Unreadable(f"{folder / SUMS} is garbled") from None
        for name in sums.keys() | set(_files(folder)):
            if not (folder / name).is_file() or sums.get(name) != _sha256(folder / name):
                raise Unreadable(f"{folder / name} does not match its SHA-256 in {SUMS} (truncated or garbled)")
    if not sharded:
        _check_safetensors(folder / WEIGHTS)
    _check_state(folder / STATE)


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_folder(path: Path) -> None:
    """Make a rename in ``path`` durable (a power loss, not only a killed process, then keeps it)."""
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _discard(path: Path) -> None:
    """Remove a checkpoint folder in a way that a kill cannot leave half of it under its ``step_N`` name: one
    rename out of the way (into a temporary folder, which the next save removes if this one is killed), then the
    deletion."""
    trash = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def latest_readable(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes ``verify``, with one warning per newer one that does not; None when the
    run has none; UsageError when it has some and none is readable."""
    found, problems = _checkpoints(run_dir), []
    for folder in reversed(found):
        try:
            verify(folder)
        except Unreadable as err:
            problems.append(str(err))
            continue
        for problem in problems:
            warnings.warn(f"{problem}; resuming from the older checkpoint {folder}")
        return folder
    if found:
        raise UsageError(f"--resume {run_dir}: no readable checkpoint ({'; '.join(problems)})")
    return None


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
         par=None, keep: int = 2) -> Path:
    """Write and verify the checkpoint of ``step``, then keep only the last ``keep`` checkpoints up to it.
    ``progress`` holds counters (tokens, time), ``identity`` what must match on resume (task, model, ...).
    Under torchrun (``par``) every process calls it: DDP's rank 0 writes; FSDP2's ranks all write their shards."""
    folder = run_dir / "checkpoints"
    final = folder / f"step_{step:08d}"
    sharded = par is not None and par.mode == "fsdp2"
    main = par is None or par.main
    state = {"format": FORMAT, "step": step, "identity": identity, "progress": progress,
             "scheduler": scheduler.state_dict(), "data": batches.state_dict(), "rng": rng_state()}
    try:
        if sharded:
            tmp = folder / f".tmp-step_{step:08d}"  # the same name on every process
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            par.barrier()
            _save_shards(tmp / SHARDS, model, optimizer)  # returns on every rank once the metadata is written
        elif main:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
            save_file(flat_weights(model), str(tmp / WEIGHTS))
            state["optimizer"] = optimizer.state_dict()
        if main:
            _commit(tmp, final, folder, state, step, keep, run_dir)
    finally:
        if par is not None:
            par.barrier()  # nobody goes on (or resumes) before the checkpoint is in place
    return final


def _commit(tmp: Path, final: Path, folder: Path, state: dict, step: int, keep: int, run_dir: Path) -> None:
    torch.save(state, tmp / STATE)
    for name in _files(tmp):
        _fsync(tmp / name)
    try:
        verify(tmp)
    except Unreadable as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"the checkpoint of step {step} failed verification after writing, so the older "
                         f"checkpoints were kept (is the disk full?): {err}") from None
    (tmp / SUMS).write_text(json.dumps({name: _sha256(tmp / name) for name in _files(tmp)}, indent=1) + "\n")
    if final.exists():  # a damaged checkpoint of this step that the resume skipped
        _discard(final)
    os.replace(tmp, final)
    _fsync_folder(folder)
    # Older checkpoints beyond `keep`, and any of later steps (left by the run this one resumed), go; so do
    # temporary folders of interrupted writes.
    kept = [p for p in _checkpoints(run_dir) if p <= final][-keep:]
    for old in list(folder.iterdir()):  # listed first: a discard adds and removes a folder in it
        if old in kept:
            continue
        if old.name.startswith("step_"):
            _discard(old)
        else:
            shutil.rmtree(old, ignore_errors=True)


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


def flat_weights(model, contiguous: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict as safetensors stores it: a tied weight once (under its first name), an int8
    weight as its codes and row scales (``NAME.int_data``, ``NAME.scale``). safetensors (>= 0.6) writes each
    tensor from its own memory, so saving never holds a second copy of the weights. ``contiguous=False``: the
    live tensors themselves, to load into."""
    flat, seen = {}, set()
    for name, tensor in model.state_dict().items():
        parts = {f"{name}.{k}": v for k, v in int8_parts(tensor).items()} if is_int8(tensor) else {name: tensor}
        if any(v.data_ptr() in seen for v in parts.values()):
            continue
        seen.update(v.data_ptr() for v in parts.values())
        flat.update({k: v.detach().contiguous() if contiguous else v for k, v in parts.items()})
    return flat


def _weights_mismatch(saved: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
    """One line on how the saved weights differ in shape from the model's, or None if they do not."""
    differ = sorted(name for name in saved.keys() & expected.keys() if saved[name] != expected[name])
    if not differ:
        return None
    shape = lambda s: "x".join(map(str, s)) or "scalar"  # noqa: E731
    name = differ[0]
    return (f"{len(differ)} tensor(s) differ in shape, e.g. {name}: {shape(saved[name])} in the checkpoint, "
            f"{shape(expected[name])} in the model (another model size?)")


def _first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def load(path: Path, model, optimizer, scheduler, batches, identity: dict, device: torch.device,
         sharded: bool = False) -> dict:
    """Restore everything ``save`` wrote into live objects; returns {"step", "progress"}.

    Any failure (wrong model shape, different optimizer, a file that is not a checkpoint) is a one-line
    UsageError naming the checkpoint. A checkpoint of FSDP2 shards (``dcp/``) resumes at any number of processes,
    sharded or not; one written by a single process or DDP resumes without FSDP2 (``sharded`` False).
    """
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise UsageError(f"checkpoint {path / STATE} is unreadable (corrupt or not a checkpoint): "
                         f"{_first_line(err)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"checkpoint {path} has an unknown format")
    different = {k: (state["identity"].get(k), v) for k, v in identity.items() if state["identity"].get(k) != v}
    if different:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in different.items())
        raise UsageError(f"checkpoint {path} does not match this run ({detail})")
    if (path / SHARDS).is_dir():  # FSDP2 shards: weights and optimizer state through DCP, resharded
        restore = lambda: _load_shards(path / SHARDS, model, optimizer)  # noqa: E731
    elif sharded:
        raise UsageError(f"checkpoint {path} was written by a single process or DDP: resume it with "
                         "--distributed none or ddp")
    else:
        _load_weights(path / WEIGHTS, model, device)
        restore = lambda: optimizer.load_state_dict(state["optimizer"])  # noqa: E731
    try:
        restore()
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"])
    except Exception as err:
        raise UsageError(f"checkpoint {path} does not match this run's optimizer or data: {_first_line(err)}") from None
    set_rng_state(state["rng"])
    return {"step": state["step"], "progress": state["progress"]}


#: safetensors' dtype names
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _read_into(f, entry: dict, start: int, target: torch.Tensor) -> None:
    """One tensor's bytes read from the file straight into ``target``'s memory where it is a contiguous CPU tensor
    of the saved dtype (else through one temporary of that tensor): no mapping of the file, whose pages would count
    in the process's resident memory, and no second copy of the weights."""
    begin, end = entry["data_offsets"]
    dtype = _DTYPES[entry["dtype"]]
    direct = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
    buffer = target if direct else torch.empty(entry["shape"], dtype=dtype)
    f.seek(start + begin)
    if end > begin and f.readinto(memoryview(buffer.reshape(-1).view(torch.uint8).numpy())) != end - begin:
        raise Unreadable(f"{f.name} ends inside its tensors")
    if not direct:
        target.copy_(buffer)


def _load_weights(path: Path, model, device: torch.device) -> None:
    """model.safetensors into ``model`` one tensor at a time, read into the weights' own memory (never a second
    copy of the weights), or a one-line UsageError saying how it does not fit."""
    expected = flat_weights(model, contiguous=False)
    tied = {name for name in model.state_dict() if name not in expected and not any(
        key.startswith(name + ".") for key in expected)}  # a tied weight's other names
    try:
        with path.open("rb") as f:
            header, start = _header(f)
            saved = {name: tuple(entry["shape"]) for name, entry in header.items()}
            mismatch = _weights_mismatch(saved, {k: tuple(v.shape) for k, v in expected.items()})
            missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys() - tied)
            if mismatch is None and not missing and not unexpected:
                with torch.no_grad():
                    for name, target in expected.items():
                        _read_into(f, header[name], start, target)
                # the modules' load hooks (RSO regenerates P from its loaded key): a load of the model's own
                # tensors, each copied onto itself, no memory added
                model.load_state_dict(model.state_dict())
    except Exception as err:
        raise UsageError(f"checkpoint weights {path} are unreadable or do not fit the model: "
                         f"{_first_line(err)}") from None
    if mismatch is not None:
        raise UsageError(f"checkpoint weights {path} do not fit the model: {mismatch}")
    if missing or unexpected:
        raise UsageError(f"checkpoint weights {path} do not fit the model: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
