"""Lightning's Trainer with our optimizers returned by configure_optimizers (tests/lightning_worker.py): in one
process it takes a plain torch loop's steps, standard, layer-wise (with Lightning's gradient accumulation) and under
manual optimization; under DDP at 2 processes (one torchrun launch, gloo) the steps of one process on the whole
batch, grad_comm="subspace" and layer-wise included; the settings the backward hooks cannot follow are refused."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="the lightning extra is not installed (pip install subspace_optim[lightning])")
WORKER = Path(__file__).with_name("lightning_worker.py")
import lightning_worker as worker  # noqa: E402
from torchrun import worker_results  # noqa: E402

from subspace_optim.integrations.lightning import SubspaceCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec")  # Lightning's own use of a deprecated torch API

ONE_PROCESS = {  # optimizer keywords (and manual=), micro-batch, accumulate_grad_batches
    "standard": ({}, worker.BATCH, 1),
    "layerwise": ({"layerwise": True}, worker.BATCH, 1),
    "layerwise-accumulate": ({"layerwise": True, "accumulation_steps": 2}, worker.BATCH // 2, 2),
    "layerwise-manual": ({"layerwise": True, "manual": True}, worker.BATCH, 1),
}


@pytest.mark.parametrize("callbacks", [[], [SubspaceCallback()]], ids=["plain", "callback"])
@pytest.mark.parametrize("optimizer", ["golore", "galore"])
@pytest.mark.parametrize("case", ONE_PROCESS)
def test_one_process_takes_the_steps_of_a_torch_loop(case, optimizer, callbacks):
    """6 steps with a refresh every 2, against the same optimizer (standard mode) stepped by hand on whole batches;
    a step more or less, or a micro-batch lost, would show. Plain use needs nothing; the callback changes nothing."""
    kw, batch, accumulate = ONE_PROCESS[case]
    module = worker.fit(worker.Regression(optimizer, **kw), batch, accumulate_grad_batches=accumulate,
                        callbacks=callbacks)
    assert worker.max_error(module.net, worker.reference(optimizer)) < 1e-6
    assert worker.max_error(module.net, worker.Regression().net) > 1e-2  # it trained


def test_settings_the_hooks_cannot_follow_are_refused():
    """Lightning's gradient clipping and an accumulate_grad_batches other than accumulation_steps, at the start of
    fit; an epoch whose last accumulation window is short, before that step."""
    with pytest.raises(ValueError, match="gradient_clip_val=1.0.*clip by the dense gradients"):
        worker.fit(worker.Regression(layerwise=True), gradient_clip_val=1.0, callbacks=[SubspaceCallback()])
    with pytest.raises(ValueError, match="accumulate_grad_batches=2.*accumulation_steps=1"):
        worker.fit(worker.Regression(layerwise=True), accumulate_grad_batches=2, callbacks=[SubspaceCallback()])
    module = worker.Regression(layerwise=True, accumulation_steps=2)
    with pytest.raises(RuntimeError, match="multiple of accumulate_grad_batches"):
        worker.fit(module, batches=3, accumulate_grad_batches=2, callbacks=[SubspaceCallback()])  # 2 + 1
    # standard mode clips as Lightning does: allowed
    worker.fit(worker.Regression(), gradient_clip_val=1.0, callbacks=[SubspaceCallback()])


def test_the_callback_lets_a_module_be_fit_again():
    """Lightning keeps the first optimizer alive (module -> trainer -> optimizer); its layer-wise hooks would keep
    the parameters from a second optimizer, unless removed at the end of fit."""
    module = worker.Regression(layerwise=True)
    worker.fit(module)
    with pytest.raises(ValueError, match="already updated by another layer-wise optimizer"):
        worker.fit(module)
    module = worker.Regression(layerwise=True)
    worker.fit(module, callbacks=[SubspaceCallback()])
    once = [p.detach().clone() for p in module.parameters()]
    worker.fit(module, callbacks=[SubspaceCallback()])
    assert all(not torch.equal(a, b) for a, b in zip(once, module.parameters()))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return worker_results(WORKER, tmp_path_factory.mktemp("lightning"))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", worker.DDP_CASES)
def test_ddp_at_two_processes_takes_the_steps_of_one_process(ddp, case):
    """Lightning's DDP (SubspaceDDPStrategy for grad_comm="subspace"), rank 1's replica started 1.0 away: every
    replica ends within 1e-6 of one process's standard steps on the whole batch."""
    assert ddp["world"] == 2
    assert ddp[case] < 1e-6, f"{case}: max weight difference {ddp[case]:.3g}"


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_strategy_that_reduces_the_projected_weights_is_refused_and_ours_fits_again(ddp):
    assert "use Trainer(strategy=subspace_optim.integrations.lightning.SubspaceDDPStrategy())" in ddp[
        "plain-ddp-refused"]
    assert ddp["fit-again"] == ""



@pytest.mark.docs
def test_the_example_trains_layerwise_with_accumulation(monkeypatch, capsys):
    """examples/lightning_golore.py as docs/lightning.md shows it, for 6 steps: the loss falls from log 64 = 4.16."""
    pytest.importorskip("transformers")
    example = Path(__file__).resolve().parents[1] / "examples" / "lightning_golore.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--layerwise", "--accumulate", "2", "--steps", "6"])
    runpy.run_path(str(example), run_name="__main__")
    (loss,) = re.findall(r"final training loss ([\d.]+) after 6 steps", capsys.readouterr().out)
    assert float(loss) < 3.0
