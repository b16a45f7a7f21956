"""A study's training runs, kept as small files and reused for as long as the code that made them is unchanged.

A run trains in its scratch folder (SCRATCH/KEY, under --runs, ignored by git), with checkpoints so that an
interrupted run resumes where it stopped. Once finished, its config.json, summary.json and metrics.csv are copied
with a provenance.json into the store (STORE/KEY; committed for the full study, so a clone has every number).

A stored run is reused when its config matches the planned flags and its provenance's ``identity`` equals the
current one, which says what determines its numbers:
- ``code``: the digest of the harness's source (``harness_code``: loop, data, model, loss, RSO layers, ...);
- the run's settings as the harness resolves them now (``train/config.py``'s defaults filled in) must equal those
  its config.json recorded, on every setting both know: a flag added since, whose default keeps the old
  behaviour, does not rerun a run that could not have set it;
- ``optimizer``: the behaviour of the optimizer library (``PROBED``): a digest of the weights after a few seeded
  steps of the run's own optimizer on the run's model (``optimizer_probe``). A refactor of the library that leaves
  every number bitwise unchanged keeps the runs; one that changes a number reruns them. The library changes far
  more often than the harness, and the full study takes many hours of CPU, built up over several sessions;
- whatever else the study names (its tokenizer's key).
Otherwise it is run again, and replaced when the new run finishes.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
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
#: Not on the training path: the command line, the HF Trainer adapter, the memory estimator.
NOT_TRAINING = ("cli.py", "__main__.py", "hf.py", "memory_estimate.py")
#: The optimizer library, identified by its behaviour (``optimizer_probe``) rather than by its source.
PROBED = ("optimizer.py", *sorted(f"engine/{p.name}" for p in (PACKAGE / "engine").glob("*.py")), "projectors.py",
          "rules.py", "lowbit.py", "distributed.py", "groups.py", "train/optimizers.py")
#: The harness's settings, identified by what they resolve to (``resolved_settings``) rather than by their source.
SETTINGS_CODE = "train/config.py"
#: Settings of where a run writes and how it reports, not of what it computes.
NOT_COMPUTED = ("out", "resume", "quiet", "keep_checkpoints")
#: The probe: steps, refresh gap (and total steps, so that GoLore@x% switches inside it), vocabulary size.
PROBE_STEPS, PROBE_GAP, PROBE_VOCAB = 10, 2, 512
#: Flags that do not change which code an optimizer runs (the probe fixes its own steps, gap and data).
PROBE_IGNORES = ("lr", "seed", "steps", "update_gap", "batch_size", "seq_len", "data", "tokenizer", "eval_every",
                 "eval_batches", "save_every", "warmup")


def training_code() -> list[Path]:
    """The files a run executes: the whole package but the experiments and NOT_TRAINING."""
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if "experiments" not in p.relative_to(PACKAGE).parts and p.name not in NOT_TRAINING)


def harness_code() -> list[Path]:
    """The training code whose source is digested: all of it but the probed optimizer library and the settings."""
    return [p for p in training_code() if p.relative_to(PACKAGE).as_posix() not in (*PROBED, SETTINGS_CODE)]


def _train_config(flags: dict, **overrides):
    """The resolved TrainConfig of a run of ``flags`` (those that are settings of it), with ``overrides``."""
    from ..train.config import TrainConfig, resolve

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return resolve(TrainConfig(**{k: v for k, v in flags.items() if k in names and k not in overrides}, **overrides))


def resolved_settings(flags: dict) -> dict:
    """Every setting of a run of ``flags`` as the harness resolves it now (task defaults, warm-up, clipping...)."""
    from ..train.optimizers import check_method

    cfg = _train_config(flags)
    check_method(cfg)  # fills the method's defaults (e.g. RSO's --moments reset), as the harness does before saving
    return cfg.to_dict()


def changed_settings(config: dict, flags: dict) -> list[str]:
    """The settings (known both to ``config``, a run's config.json, and to the harness now) that differ."""
    now = resolved_settings(flags)
    return [k for k in sorted(config.keys() & now.keys()) if k not in NOT_COMPUTED and config[k] != now[k]]


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
    """SHA-256 over the harness code's syntax trees (``harness_code()``), keyed by path in the package."""
    digest = hashlib.sha256()
    for path in files if files is not None else harness_code():
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0")
        digest.update(_code_only(path.read_text()).encode() + b"\0")
    return digest.hexdigest()


def probe_key(flags: dict) -> str:
    """What of a run's flags the probe depends on (runs that differ only in lr, seed, data... share a probe)."""
    return json.dumps({k: v for k, v in flags.items() if k not in PROBE_IGNORES}, sort_keys=True)


def optimizer_probe(flags: dict) -> str:
    """SHA-256 of the weights after PROBE_STEPS steps of the optimizer that ``flags`` build, on their model (with a
    PROBE_VOCAB-token vocabulary) from seed 0, with seeded random gradients, refreshing every PROBE_GAP steps, on
    one thread as the runs are. Equal digests: the library computes the run's first steps bitwise alike."""
    kept = {k: v for k, v in flags.items() if k not in PROBE_IGNORES}
    cfg = _train_config(kept, steps=PROBE_STEPS, update_gap=PROBE_GAP, device="cpu")
    with _PROBE_LOCK:  # --jobs: one probe at a time (the thread count is global; lazy imports are not thread-safe)
        return _probe(cfg)


_PROBE_LOCK = threading.Lock()


def _probe(cfg) -> str:
    from ..train.models import build_causal_lm, causal_lm_config
    from ..train.optimizers import build_optimizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        setup = build_optimizer(cfg, build_causal_lm(causal_lm_config(cfg.model, PROBE_VOCAB, None, None)))
        noise = torch.Generator().manual_seed(0)
        for step in range(PROBE_STEPS):
            for param in setup.model.parameters():
                if param.requires_grad:
                    param.grad = torch.randn(param.shape, generator=noise).to(param.dtype)
            setup.optimizer.step()
            setup.optimizer.zero_grad()
            if setup.after_step is not None:
                setup.after_step(step + 1)
        digest = hashlib.sha256()
        for name, tensor in setup.model.state_dict().items():
            digest.update(name.encode() + b"\0" + tensor.detach().float().contiguous().numpy().tobytes())
        return digest.hexdigest()
    finally:
        torch.set_num_threads(threads)


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
        self.shared = {"code": code_digest(), **identity}
        self.fresh_process = fresh_process
        self._probes: dict[str, str] = {}
        self._library = code_digest(self._library_files())

    @staticmethod
    def _library_files() -> list[Path]:
        return [PACKAGE / f for f in PROBED]

    def refresh(self) -> None:
        """Take the code as it is now: a run launched after an edit is identified by the edited code (a training
        process imports the package afresh)."""
        self.shared["code"] = code_digest()
        library = code_digest(self._library_files())
        if library != self._library:  # the library's source changed: probe it again
            self._library, self._probes = library, {}

    def identity(self, run: Planned) -> dict:
        """What ``run``'s numbers are determined by (see the module's docstring); probes are computed once each."""
        key = probe_key(run.flags)
        if key not in self._probes:
            self._probes[key] = optimizer_probe(run.flags)
        return {"code": self.shared["code"], "optimizer": self._probes[key],
                **{k: v for k, v in self.shared.items() if k != "code"}}

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
        changed = changed_settings(found.config, run.flags)
        if changed:
            return f"its resolved settings changed ({', '.join(changed)})"
        identity = self.identity(run)
        changed = [k for k in identity if found.provenance.get("identity", {}).get(k) != identity[k]]
        if changed:
            return f"its {' and '.join(changed)} changed since {found.provenance.get('commit', '?')[:10]}"
        return None

    def _started(self, run: Planned) -> dict | None:
        """The started.json of ``run``'s scratch folder, if this code started it with these settings."""
        folder = self.scratch / run.key
        try:
            started = json.loads((folder / "started.json").read_text())
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
        same = same_config(config, run.flags) and not changed_settings(config, run.flags)
        return started if started.get("identity") == self.identity(run) and same else None

    def _finished(self, run: Planned) -> dict | None:
        """started.json of a scratch run that finished but was not stored (its orchestrator stopped first: the
        training process writes summary.json last), with a segment saying so if the orchestrator could not."""
        folder = self.scratch / run.key
        started = self._started(run)
        if started is None or not all((folder / name).is_file() for name in KEPT):
            return None
        if not (started["segments"] and started["segments"][-1]["finished"]):
            started["segments"].append({"wall_s": 0.0, "finished": True, **code_provenance(),
                                        "note": "finished after its orchestrator stopped; wall time not measured"})
        return started

    def _resumable(self, run: Planned) -> Path | None:
        """The checkpoint an interrupted scratch run of ``run`` continues from, if it was started by this code."""
        folder = self.scratch / run.key
        if run.flags.get("optimizer") in NOT_RESUMABLE or (folder / "summary.json").exists():
            return None
        if self._started(run) is None:
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
        if self._finished(run) is not None:
            return "store (finished, not yet stored)"
        resume = self._resumable(run)
        if resume is not None:
            return f"resume from step {int(resume.name.removeprefix('step_'))}"
        return "run" if found is None else f"rerun: {why}"

    def command(self, run: Planned) -> str:
        return flags_to_cli("train", {**run.flags, "out": self.scratch / run.key})

    # ------------------------------------------------------------ doing it

    def execute(self, run: Planned) -> Stored:
        """Train ``run`` (resuming its interrupted scratch run when there is one) and store the result."""
        self.refresh()
        folder = self.scratch / run.key
        finished = self._finished(run)
        if finished is not None:  # nothing is trained twice
            return self._keep(run, folder, finished)
        resume = self._resumable(run)
        if resume is None:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            write_json(folder / "started.json", {"identity": self.identity(run), **code_provenance(),
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
            "identity": self.identity(run), "commit": last["commit"], "dirty": last["dirty"],
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
