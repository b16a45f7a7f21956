"""One torchrun launch of a test worker: the distributed tests share it (and each launches once per module)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

#: What every worker gets: one thread per process (the CI machine has 2 cores), and this test session's import
#: path, so that the workers import the same subspace_optim (a worktree's source first) as the tests.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def torchrun(*args: str, processes: int = 2, env: dict | None = None, timeout: int = 600,
             launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node processes [launcher] args``; fails the test with the errors of the
    workers' output if the job fails."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), *launcher, *map(str, args)],
                          capture_output=True, text=True, env=env or ENV, timeout=timeout)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
    assert proc.returncode == 0, "\n".join(errors[-20:]) + proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def worker_results(worker: Path, folder: Path, *args, processes: int = 2) -> dict:
    """Run ``worker`` (which writes its results as JSON to its first argument) and return them."""
    out = folder / "results.json"
    torchrun(worker, out, *args, processes=processes)
    return json.loads(out.read_text())


def require_gloo() -> None:
    """Skip the calling test module where torch.distributed or its gloo backend is missing."""
    import pytest
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)


def write_results(out: str, results: dict) -> None:
    """In a worker: rank 0 prints the results (the launch's log) and writes them as JSON to ``out``."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        for name, value in results.items():
            print(name, value, flush=True)
        Path(out).write_text(json.dumps(results, indent=1))
