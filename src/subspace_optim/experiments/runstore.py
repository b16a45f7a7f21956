"""A study's training runs, kept as small files and reused for as long as the code that made them is unchanged.

A run trains in its scratch folder (SCRATCH/KEY, under --runs, ignored by git), with checkpoints so that an
interrupted run resumes where it stopped. Once finished, its config.json, summary.json and metrics.csv are copied
with a provenance.json into the store (STORE/KEY; committed for the full study, so a clone has every number).

A stored run is reused when its config matches the planned flags and its provenance's ``identity`` equals the
current one: the digest of the training code (``code_digest``) and whatever else the study says determines the
numbers (its tokenizer's key). Otherwise it is run again, and replaced when the new run finishes.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..train import checkpoint
from ..train.config import UsageError
from ..train.runlog import read_metrics, write_json
from .report import _flag_args, _git, flags_to_cli, same_config

PACKAGE = Path(__file__).resolve().parents[1]
#: The stored files of a finished run (plus provenance.json). Small: no checkpoint, no TensorBoard events.
KEPT = ("config.json", "summary.json", "metrics.csv")
#: Optimizers whose checkpoints cannot be loaded again (galore-torch keeps Python objects in its state).
NOT_RESUMABLE = ("galore-torch",)


def training_code() -> list[Path]:
    """The files that determine a run's numbers: the whole package but the experiments and the command line."""
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if "experiments" not in p.relative_to(PACKAGE).parts and p.name not in ("cli.py", "__main__.py"))


def _code_only(source: str) -> str:
    """The module's syntax tree without docstrings: comments, docstrings and layout do not change a number."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def code_digest(files: list[Path] | None = None) -> str:
    """SHA-256 over the training code's syntax trees (``training_code()``), keyed by path in the package."""
    digest = hashlib.sha256()
    for path in files if files is not None else training_code():
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0")
        digest.update(_code_only(path.read_text()).encode() + b"\0")
    return digest.hexdigest()


def code_provenance() -> dict:
    """The commit checked out and the training-code files that differ from it (empty: clean)."""
    paths = [str(p) for p in training_code()]
    dirty = [line[3:] for line in _git("status", "--porcelain", "--", *paths).splitlines()]
    return {"commit": _git("rev-parse", "HEAD").strip() or "unknown", "dirty": dirty}


@dataclass(frozen=True)
class Planned:
    """One training run a study needs: ``subspace-optim train`` with ``flags``, known by ``key``."""

    key: str
    flags: dict = field(hash=False)


@dataclass
class Stored:
    """A finished run as the store keeps it."""

    summary: dict
    config: dict
    provenance: dict
    folder: Path

    def metrics(self) -> list[dict]:
        return read_metrics(self.folder / "metrics.csv")


class RunStore:
    """Decides for each planned run whether to reuse, resume or (re)run it, and does so (``execute``)."""

    def __init__(self, store: Path, scratch: Path, identity: dict, fresh_process: bool = True):
        self.store, self.scratch = Path(store), Path(scratch)
        self.identity = {"code": code_digest(), **identity}
        self.fresh_process = fresh_process

    # ------------------------------------------------------------ what is there

    def _read(self, folder: Path) -> Stored | None:
        try:
            return Stored(*(json.loads((folder / name).read_text())
                            for name in ("summary.json", "config.json", "provenance.json")), folder)
        except (OSError, ValueError):
            return None

    def stored(self, run: Planned) -> Stored | None:
        """The stored result of ``run`` if it may be reused, else None."""
        found = self._read(self.store / run.key)
        return found if found is not None and self._stale(found, run) is None else None

    def _stale(self, found: Stored, run: Planned) -> str | None:
        """Why a stored run may not stand for ``run`` (None: it may)."""
        if not same_config(found.config, run.flags):
            return "its settings differ"
        changed = [k for k in self.identity if found.provenance.get("identity", {}).get(k) != self.identity[k]]
        if changed:
            return f"its {' and '.join(changed)} changed since {found.provenance.get('commit', '?')[:10]}"
        return None

    def _resumable(self, run: Planned) -> Path | None:
        """The checkpoint an interrupted scratch run of ``run`` continues from, if it was started by this code."""
        folder = self.scratch / run.key
        if run.flags.get("optimizer") in NOT_RESUMABLE or (folder / "summary.json").exists():
            return None
        try:
            started = json.loads((folder / "started.json").read_text())
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
        if started.get("identity") != self.identity or not same_config(config, run.flags):
            return None
        try:
            return checkpoint.latest_readable(folder)
        except UsageError:  # none readable: start the run again
            return None

    def status(self, run: Planned) -> str:
        """'reuse', 'resume from step N', 'run', or 'rerun: WHY' (a stored run that no longer stands)."""
        found = self._read(self.store / run.key)
        if found is not None:
            why = self._stale(found, run)
            if why is None:
                return "reuse"
        resume = self._resumable(run)
        if resume is not None:
            return f"resume from step {int(resume.name.removeprefix('step_'))}"
        return "run" if found is None else f"rerun: {why}"

    def command(self, run: Planned) -> str:
        return flags_to_cli("train", {**run.flags, "out": self.scratch / run.key})

    # ------------------------------------------------------------ doing it

    def execute(self, run: Planned) -> Stored:
        """Train ``run`` (resuming its interrupted scratch run when there is one) and store the result."""
        folder = self.scratch / run.key
        resume = self._resumable(run)
        if resume is None:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            write_json(folder / "started.json", {"identity": self.identity, **code_provenance(),
                                                 "started": _now(), "segments": []})
            argv = ["train", *_flag_args(run.flags), "--out", str(folder), "--quiet"]
        else:
            argv = ["train", "--resume", str(folder), "--quiet"]
        print(f"$ {'(resuming) ' if resume else ''}{self.command(run)}", flush=True)
        t0, finished = time.time(), False
        try:
            self._launch(argv, folder.parent / f"{run.key}.log")
            finished = True
        finally:  # every segment's time and commit, an interrupted one's too
            started = json.loads((folder / "started.json").read_text())
            started["segments"].append({"wall_s": round(time.time() - t0, 1), "finished": finished,
                                        **code_provenance()})
            write_json(folder / "started.json", started)
        return self._keep(run, folder, started)

    def _launch(self, argv: list[str], log: Path) -> None:
        """``subspace-optim ARGV``: in a fresh process with one thread (each run's peak RSS its own; two OpenMP
        threads per process on the shared machine spin-wait on each other), or in this one (toy runs: a fresh
        Python spends seconds importing)."""
        with open(log, "a") as sink:
            if self.fresh_process:
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                code = subprocess.run([sys.executable, "-m", "subspace_optim", *argv], stdout=sink,
                                      stderr=subprocess.STDOUT, env=env).returncode
            else:
                from ..cli import main

                with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                    code = main(argv)
        if code == 130:
            raise KeyboardInterrupt
        if code != 0:
            raise RuntimeError(f"run failed ({code}): subspace-optim {' '.join(argv)}; see {log}")

    def _keep(self, run: Planned, folder: Path, started: dict) -> Stored:
        """Copy the finished run's small files and its provenance into the store (replacing a stale one), and
        drop its checkpoints, which only an unfinished run needs."""
        last = started["segments"][-1]
        provenance = {
            "identity": self.identity, "commit": last["commit"], "dirty": last["dirty"],
            "started": started["started"], "finished": _now(), "segments": started["segments"],
            "wall_s": round(sum(s["wall_s"] for s in started["segments"]), 1),
            "command": self.command(run), "python": platform.python_version(), "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "threads": 1 if self.fresh_process else torch.get_num_threads(),
        }
        if len({s["commit"] for s in started["segments"]}) > 1:
            provenance["note"] = "resumed at another commit with the same training code"
        tmp = self.store / f".{run.key}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name in KEPT:
            shutil.copy2(folder / name, tmp / name)
        write_json(tmp / "provenance.json", provenance)
        if (self.store / run.key).exists():
            shutil.rmtree(self.store / run.key)
        os.replace(tmp, self.store / run.key)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        return self._read(self.store / run.key)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
