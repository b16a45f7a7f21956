"""FSDP2 x tensor parallelism on a 2 x 2 mesh, for real: 4 processes (torchrun, gloo, CPU).

One torchrun run (tests/tp_worker.py) trains a tiny LLaMA under torch's ColwiseParallel / RowwiseParallel plan
composed with ``fully_shard`` on the other mesh dimension, and on one process with the same global batch; these
tests read its results. Then a DCP checkpoint of the 2 x 2 job resumes at 4 x 1 (in the worker) and at 1 x 1 (here).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch.distributed.tensor.parallel")
pytest.importorskip("transformers")
from torch.distributed.tensor import DTensor, Partial, Shard  # noqa: E402

from torchrun import require_gloo, worker_results  # noqa: E402

require_gloo()

WORKER = Path(__file__).with_name("tp_worker.py")
import tp_worker as worker  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("shape, placement", [((2, 3, 4), Shard(1)), ((6, 4), Partial())], ids=str)
def test_placements_the_projection_cannot_follow_are_refused(one_process_group, shape, placement):
    """A split of a 3-D weight's middle dimension (not a column of the flattened W), or a pending sum: refused."""
    from torch.distributed.device_mesh import init_device_mesh

    from subspace_optim.distributed import layout_of

    mesh = init_device_mesh("cpu", (1,))
    p = DTensor.from_local(torch.zeros(shape), mesh, [placement], run_check=False)
    with pytest.raises(ValueError, match="must be sharded by rows"):
        layout_of(p, left=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tensor-parallel")
    return worker_results(WORKER, folder, folder / "checkpoints", processes=4), folder / "checkpoints"


def test_the_plan_covers_every_layout(run):
    """q/gate/up: right projection, D split by both mesh dims (_StridedShard); k/v: left, d split by both;
    o_proj and down_proj (rowwise): both axes split, one by each mesh dimension."""
    layouts = {name.split(".")[-2]: tuple(rest) for name, *rest in run[0]["layouts"]}
    assert layouts == {"q_proj": ("right", False, True, 4), "k_proj": ("left", True, False, 4),
                       "v_proj": ("left", True, False, 4), "o_proj": ("right", True, True, 4),
                       "gate_proj": ("right", False, True, 4), "up_proj": ("right", False, True, 4),
                       "down_proj": ("left", True, True, 4)}


CASES = ([f"tp/{rule}/{p}" for rule in worker.RULES for p in worker.PROJECTORS]
         + [f"tp-layerwise/adamw/{p}" for p in ("galore", "golore", "online_pca")] + ["tp-named/adamw/golore"])


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_by_tensor_parallel_takes_the_steps_of_one_process(run, case):
    """fp32, 5 steps with a refresh every 2 (auto switching at 3, hybrid at 2): within the FSDP2 tolerance."""
    error = run[0][case]
    assert error < 1e-4, f"{case}: max weight difference {error:.3g}"


DCP = ["adamw/galore", "adamw/golore", "adafactor/auto"]


@pytest.mark.parametrize("case", [f"dcp/{case}" for case in DCP] + ["dcp-named/adamw/golore"])
def test_a_2x2_checkpoint_resumes_at_4x1(run, case):
    result = run[0][case]
    assert result["error_4x1"] < 1e-5, result


@pytest.mark.parametrize("case", DCP)
def test_a_2x2_checkpoint_resumes_at_1x1(run, case):
    """The sharded (2-D) checkpoint loads into one plain process (DCP reshards weights and optimizer state) and
    continues the same run as the uninterrupted 2 x 2 job."""
    from distributed_worker import error_to_saved, load_checkpoint

    _, folder = run
    rule, projector = case.split("/")
    model = copy.deepcopy(worker.tiny_llama())
    with torch.no_grad():  # a different start, so that only the checkpoint can make them equal
        for p in model.parameters():
            p.add_(1.0)
    opt = worker.make_optimizer(rule, model, **worker.settings(projector))
    load_checkpoint(model, opt, folder / f"{rule}-{projector}")
    worker.train(model, opt, worker.STEPS - 3, first=4)
    assert error_to_saved(model, folder / f"{rule}-{projector}" / "straight.pt") < 1e-5
