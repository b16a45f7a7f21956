#!/usr/bin/env bash
# One measured large run (issue 21): N+1 steps uninterrupted (checkpoint at N and N+1), then the step-N checkpoint
# resumed in a fresh process for 1 step; the two step-(N+1) checkpoints must be bitwise equal.
# usage: benchmarks/large_run.sh OUT_DIR STEPS train-flags...   (run from the repository root, on idle cores)
set -euo pipefail
out=$1; steps=$2; shift 2
cli=${SUBSPACE_OPTIM:-.venv/bin/subspace-optim}
rm -rf "$out" "$out-resumed"; mkdir -p "$(dirname "$out")"
/usr/bin/time -v $cli train "$@" --steps $((steps + 1)) --save-every "$steps" --keep-checkpoints 2 \
    --eval-every 0 --out "$out" 2> >(tee "$out.time" >&2)
# the resumed run starts from a copy of the run folder without its last checkpoint (hard links: no bytes copied)
cp -al "$out" "$out-resumed"
rm -rf "$out-resumed/checkpoints/step_$(printf %08d $((steps + 1)))"
/usr/bin/time -v $cli train --resume "$out-resumed" 2> >(tee "$out-resumed.time" >&2)
"${PYTHON:-.venv/bin/python}" - "$out" "$out-resumed" $((steps + 1)) <<'PY'
import sys, torch
from safetensors import safe_open
a, b, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
f = f"checkpoints/step_{step:08d}/model.safetensors"
with safe_open(f"{a}/{f}", "pt") as x, safe_open(f"{b}/{f}", "pt") as y:  # one tensor at a time
    same = set(x.keys()) == set(y.keys()) and all(torch.equal(x.get_tensor(k), y.get_tensor(k)) for k in x.keys())
print(f"resumed step {step} bitwise equal to the uninterrupted run's: {same}")
PY
