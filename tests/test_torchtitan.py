"""torchtitan 0.3.0 with SubspaceOptimizersContainer, through torchtitan's own components (tests/torchtitan_worker.py):
its llama3 debug model, its optimizer config, LR schedulers and DCP CheckpointManager, its ConfigManager.

One torchrun run (2 gloo processes, FSDP2) saves and resumes GoLore and GaLore; the single-process tests resume
every other projector, check the flat FQN-keyed state dict and the template step, and key random bases by FQN.
torchtitan's trainer itself assumes CUDA and is not run.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan", reason="needs the torchtitan extra: pip install 'subspace_optim[torchtitan]'")
pytest.importorskip("triton", reason="torchtitan's models import triton (a CUDA torch brings it; so does the extra)")
from torchrun import require_gloo, worker_results  # noqa: E402

require_gloo()

from torchtitan.components.optimizer import ParamGroupConfig  # noqa: E402
from torchtitan.config import ConfigManager  # noqa: E402

from subspace_optim.integrations.torchtitan import SubspaceOptimizersContainer  # noqa: E402

WORKER = Path(__file__).with_name("torchtitan_worker.py")
import torchtitan_worker as worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_CHECKS = ("weights_unchanged", "state_created", "counters_zero", "no_refresh", "no_skip", "lrs_restored",
                   "grads_cleared", "fqn_keyed", "same_trajectory")


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchtitan")
    return worker_results(WORKER, folder, folder / "checkpoints")


def check_resumed(result: dict) -> None:
    assert result["loaded"] and result["lr_steps"] == worker.STEPS
    failed = [k for k in TEMPLATE_CHECKS if not result["template"][k]]
    assert not failed, f"the template step (init_optim_state) changed something: {failed}"
    assert result["error"] == 0.0, f"the resumed run is {result['error']:.3g} from the uninterrupted one"


@pytest.mark.distributed
@pytest.mark.parametrize("projector", ["golore", "galore"])
def test_fsdp2_run_resumes_bitwise_through_torchtitans_checkpointer(fsdp2, projector):
    """2 processes, the debug model under fully_shard: saved at step 3 by CheckpointManager, loaded into a fresh
    model and container, step 4 equals the uninterrupted run's bitwise (GoLore: the basis regenerated from its FQN
    and refresh count; GaLore: the saved basis, each SVD computed by its owner rank)."""
    check_resumed(fsdp2[projector])


@pytest.mark.slow
@pytest.mark.parametrize("projector,extra", [("golore", {}), ("hybrid", {"total_steps": 4, "random_fraction": 0.5}),
                                             ("online_pca", {}), ("auto", {})])
def test_one_process_run_resumes_bitwise(tmp_path, projector, extra):
    """The same in one process on the debug model's first 2 blocks, for the projectors whose state has other keys:
    hybrid's switch (at step 3, before the save), online PCA's nested Adam state of P (saved as state.FQN.pca.*),
    auto's statistics."""
    check_resumed(worker.case_resume(projector, tmp_path, sharded=False, blocks=2, **extra))


def test_flat_state_dict_is_keyed_by_fqn_and_holds_the_nested_state():
    model = worker.debug_model(blocks=1)
    optimizers, _ = worker.build(model, worker.optimizer_config(projector="online_pca"))
    flat = optimizers.state_dict()
    wo = "layers.0.attention.wo.weight"
    assert {f"state.{wo}.{k}" for k in ("exp_avg", "exp_avg_sq", "basis", "pca.exp_avg", "pca.step")} <= flat.keys()
    assert flat[f"param_groups.{wo}.rank"] == 8 and flat[f"param_groups.{wo}.projector"] == "online_pca"
    assert "param_groups.norm.weight.rank" not in flat and "param_groups.norm.weight.lr" in flat  # dense
    # torchtitan's kernel switches are for torch.optim: not settings of ours, not saved
    assert not [k for k in flat if k.endswith((".fused", ".foreach"))]


def fqn_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tokens = worker.batch(0)
    torch.nn.functional.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def stepped(parts: list[torch.nn.Module], config, grads: dict) -> dict[str, torch.Tensor]:
    """Each part's weights (by FQN) after one step of a container over ``parts`` on the gradients ``grads``."""
    optimizers = config.build(model_parts=parts)
    for part in parts:
        for name, p in part.named_parameters():
            p.grad = grads[name].clone()
    optimizers.step()
    return {n: p.detach().clone() for part in parts for n, p in part.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_random_bases_are_keyed_by_fqn_across_model_parts_and_group_order():
    """GoLore over two pipeline-style model parts (block 0 with the embeddings, block 1 with the head), and with
    block 1's weights listed first, takes the whole model's step bitwise: each basis is drawn from its FQN, not
    from the parameter's position (block 1's first weight is #0 in the second part, #5 in the whole model)."""
    model = worker.debug_model(blocks=2)
    grads = fqn_grads(model)
    whole = stepped([copy.deepcopy(model)], worker.optimizer_config("GoLoreAdamW"), grads)

    first, second = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["1"]
    first.norm = first.lm_head = None
    del second.layers["0"]
    second.tok_embeddings = None
    assert same(stepped([first, second], worker.optimizer_config("GoLoreAdamW"), grads), whole)

    config = worker.optimizer_config("GoLoreAdamW")
    config.param_groups.insert(0, ParamGroupConfig(pattern=r"^layers\.1\.\S+\.weight$", optimizer_name="GoLoreAdamW",
                                                   optimizer_kwargs=config.param_groups[0].optimizer_kwargs))
    assert same(stepped([copy.deepcopy(model)], config, grads), whole)


def test_documented_config_builds_the_container_through_torchtitans_config_manager(tmp_path, monkeypatch):
    """The `my_configs.py` of docs/distributed.md, loaded as torchtitan.train loads a config (--module, --config)."""
    text = (ROOT / "docs" / "distributed.md").read_text()
    source = re.search(r"```python\n# my_configs.py\n(.*?)```", text, re.S).group(1)
    (tmp_path / "my_configs.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = ConfigManager().parse_args(["--module", "my_configs", "--config", "llama3_debugmodel_golore"])
    assert type(config.optimizer) is SubspaceOptimizersContainer.Config

    model = worker.debug_model(blocks=1)
    optimizers = config.optimizer.build(model_parts=[model])
    assert type(optimizers) is SubspaceOptimizersContainer
    (opt,) = optimizers.optimizers
    assert type(opt).__name__ == "GoLoreAdamW"
    projected, dense = opt.param_groups
    assert projected["rank"] == 64 and projected["projector"] == "golore" and "rank" not in dense
    assert {p.dim() for p in projected["params"]} == {2} and len(projected["params"]) == 5  # wqkv, wo, w1, w2, w3


def test_torchtitans_optimizers_mix_in_and_unknown_names_are_refused():
    model = worker.debug_model(blocks=1)
    config = worker.optimizer_config("GaLoreAdamW")
    config.param_groups.insert(0, ParamGroupConfig(pattern=r"^(tok_embeddings|lm_head)\.", optimizer_name="AdamW",
                                                   optimizer_kwargs={"lr": 1e-3}))
    optimizers = config.build(model_parts=[model])
    assert sorted(type(o).__name__ for o in optimizers) == ["AdamW", "GaLoreAdamW"]
    assert next(o for o in optimizers if type(o).__name__ == "AdamW").param_groups[0]["fused"]  # torchtitan's
    config.param_groups[-1].optimizer_name = "GaloreAdamW"
    with pytest.raises(NotImplementedError, match="'GaloreAdamW' not added: choose one of .*GaLoreAdamW"):
        config.build(model_parts=[model])
