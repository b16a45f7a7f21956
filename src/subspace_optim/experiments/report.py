"""What every `subspace-optim reproduce NAME` report shares: provenance header, markdown tables, figure paths,
and running the training harness in a fresh process (so each run's peak RSS is its own)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
#: Run folders that ``harness`` reused instead of running (reported in the header: their time is not counted).
REUSED: list[Path] = []


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def provenance() -> dict:
    """The code the numbers come from: commit, and source files that differ from it (should be none)."""
    dirty = [line[3:] for line in _git("status", "--porcelain", "--", "src").splitlines()]
    return {"commit": _git("rev-parse", "HEAD").strip() or "unknown", "dirty": dirty}


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats are written as given (format them before). A '|' inside a cell is escaped."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)])


#: The columns of every report's closing "## Verdicts" table, which `reproduce index` copies into the results index.
VERDICT_HEADER = ["claim (paper)", "verdict", "our numbers", "the paper's"]
VERDICTS = "## Verdicts"


class Report:
    """One experiment's report: ``OUT/NAME.md`` plus ``NAME*.png`` next to it (OUT: docs/results for the full
    experiment, see cli._report_dir).

    Created when the experiment starts (the wall-time clock and the commit are read then); ``write`` puts the
    header (command, commit, seeds, wall time, machine) above the experiment's own markdown.
    """

    def __init__(self, name: str, out_dir: str | Path, argv: list[str] | None = None, run_threads: str = "1"):
        """``run_threads``: the torch threads of each training run it starts, as the header says them."""
        self.name, self.out_dir, self.run_threads = name, Path(out_dir), run_threads
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.argv = argv if argv is not None else ["subspace-optim", "reproduce", name]
        self.source = provenance()
        self.t0 = time.time()
        self.reused_before = len(REUSED)

    def figure(self, suffix: str = "") -> Path:
        return self.out_dir / f"{self.name}{'-' + suffix if suffix else ''}.png"

    def write(self, title: str, body: str, seeds, verdicts: list[list[str]] | None = None) -> Path:
        """The report: header, ``body``, and the verdict rows (VERDICT_HEADER's columns) as its last section."""
        wall = time.time() - self.t0
        commit = self.source["commit"]
        dirty = (f" (uncommitted changes in {', '.join(self.source['dirty'])})" if self.source["dirty"]
                 else " (clean: every source file as committed)")
        header = [
            f"# {title}", "",
            f"- command: `{shlex.join(self.argv)}`",
            *(["- **toy size (`--quick`): this checks that the experiment runs end to end; its numbers mean "
               "nothing**"] if "--quick" in self.argv else []),
            f"- code: commit `{commit}`{dirty}",
            f"- seeds: {seeds}",
            f"- wall time: {wall / 60:.1f} min ({wall:.0f} s)",
            *([f"- reused: {len(REUSED) - self.reused_before} finished training runs with the same settings "
               "(their folders' config.json and summary.json), not counted in the wall time"]
              if len(REUSED) > self.reused_before else []),
            f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), "
            f"torch {torch.__version__}, Python {platform.python_version()}; {torch.get_num_threads()} torch thread(s) "
            f"in this process, {self.run_threads} in each training run it starts",
            "",
        ]
        if verdicts:
            body = (body.rstrip() + f"\n\n{VERDICTS}\n\nThe claims and what this report found (copied into the results "
                    "index by `subspace-optim reproduce index`):\n\n" + table(VERDICT_HEADER, verdicts))
        path = self.out_dir / f"{self.name}.md"
        path.write_text("\n".join(header) + body.rstrip() + "\n")
        print(f"wrote {path}")
        return path


def harness(command: str, flags: dict, out: Path) -> dict:
    """Run `subspace-optim COMMAND` with ``flags`` (name -> value; True for a bare flag) into ``out`` in a
    fresh Python process (its output in OUT.log beside it) and return its summary.json. A run already finished
    in ``out`` with the same settings is reused; an unfinished or different one is deleted and run again."""
    summary = out / "summary.json"
    if summary.is_file() and same_config(_read_json(out / "config.json"), flags):
        REUSED.append(out)
        return json.loads(summary.read_text())
    if out.exists():  # interrupted, or run with other settings: start again from scratch, one process per run
        shutil.rmtree(out)
    argv = [sys.executable, "-m", "subspace_optim", command, *_flag_args(flags), "--out", str(out), "--quiet"]
    print("$ " + flags_to_cli(command, flags), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One thread per run: on a shared, oversubscribed machine two OpenMP threads per process spin-wait on each
    # other and ran about 10x slower (measured: 20-28 vs 240 tokens/s fine-tuning MiniLM).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as sink:
        result = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"run failed ({result.returncode}): {shlex.join(argv)}; see {log}")
    return json.loads(summary.read_text())


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def same_config(config: dict | None, flags: dict) -> bool:
    """Whether a run's resolved config.json says what ``flags`` ask (flags left out may be anything)."""
    if config is None:
        return False
    return all(str(config.get(k)) == str(v) for k, v in flags.items() if v is not True) and \
        all(config.get(k) is True for k, v in flags.items() if v is True)


def _flag_args(flags: dict) -> list[str]:
    args = []
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return args


def flags_to_cli(command: str, flags: dict) -> str:
    """The command line a user types for a harness run."""
    return shlex.join(["subspace-optim", command, *_flag_args(flags)])
