"""GPU readiness, proved on the CPU: one host read per step, state on the parameter's device, no hidden fp32
copies of bf16 gradients.

A step on ``meta`` tensors runs every kernel's shape logic and no arithmetic; any host synchronisation
(``.item()``, ``bool(t)``, a masked assignment) raises or shows up as ``_local_scalar_dense`` / ``nonzero`` under a
dispatch mode. The step's one deliberate read (the non-finite decision, with ``auto``'s switches) goes through
``engine.step.read_host``, which the test counts.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import subspace_optim as so
from subspace_optim.engine import step as step_module
from subspace_optim.engine import subspace as subspace_module
from subspace_optim import rules

SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
            torch.ops.aten.is_nonzero.default}
RULE_CLASSES = (so.SubspaceAdamW, so.SubspaceSGD, so.SubspaceAdafactor, so.SubspaceLion)
PROJECTORS = ("galore", "golore", "hybrid", "online_pca", "auto")


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func in SYNC_OPS
        return func(*args, **(kwargs or {}))


@pytest.fixture
def reads(monkeypatch):
    """Count the step's deliberate host reads; meta tensors cannot be read, so answer "all finite"."""
    calls = []
    monkeypatch.setattr(step_module, "read_host", lambda t: calls.append(t.numel()) or [0.0] * t.numel())
    # run AdamW's fused kernel on meta too, to check torch's convention that its `step` lives on the device
    monkeypatch.setattr(rules, "_FUSED_DEVICES", rules._FUSED_DEVICES | {"meta"})
    return calls


def meta_params():
    left = torch.nn.Parameter(torch.empty(8, 12, device="meta"))
    right = torch.nn.Parameter(torch.empty(12, 8, device="meta"))
    bias = torch.nn.Parameter(torch.empty(12, device="meta"))
    return [left, right, bias]


@pytest.mark.parametrize("projector", PROJECTORS)
@pytest.mark.parametrize("cls", RULE_CLASSES, ids=lambda c: c.__name__)
def test_a_step_reads_the_host_once_and_keeps_state_on_the_device(cls, projector, reads):
    left, right, bias = meta_params()
    opt = cls([{"params": [left, right], "rank": 2, "projector": projector, "update_gap": 3, "total_steps": 6},
               {"params": [bias]}], lr=1e-2)
    with CountSyncs() as mode:
        for _ in range(7):  # three refreshes, the hybrid's switch and auto's two decisions among them
            for p in (left, right, bias):
                p.grad = torch.empty_like(p)
            opt.step()
    assert mode.syncs == 0
    assert len(reads) == 7
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert value.device.type == "meta", f"state {key!r} on {value.device}"


def test_fused_adamw_keeps_step_on_the_device_and_foreach_on_the_host(monkeypatch):
    """torch.optim's convention: a fused kernel reads `step` on the parameter's device, for-each on the host."""
    w = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    monkeypatch.setattr(step_module, "read_host", lambda t: [0.0] * t.numel())
    for fused_devices, expected in (({"meta"}, "meta"), (set(), "cpu")):
        monkeypatch.setattr(rules, "_FUSED_DEVICES", fused_devices)
        opt = so.SubspaceAdamW([w], lr=1e-2)
        w.grad = torch.empty_like(w)
        opt.step()
        assert opt.state[w]["step"].device.type == expected


def test_bf16_step_holds_no_fp32_copy_of_all_gradients_and_writes_back_without_an_m_by_n_temporary(monkeypatch):
    """Large fp32 tensors alive at once during a bf16 step: at most the one gradient being projected; none of
    m x n while the update is written back (it is computed a block of rows at a time)."""
    monkeypatch.setattr(subspace_module, "WRITE_BACK_BLOCK", 64)
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(24, 40, dtype=torch.bfloat16)) for _ in range(4)]
    size = 24 * 40
    live, peak, in_write_back = set(), [0], [False]
    big_in_write_back = []

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= size:
                    if in_write_back[0]:
                        big_in_write_back.append(func)
                    key = id(t)
                    live.add(key)
                    weakref.finalize(t, live.discard, key)
                    peak[0] = max(peak[0], len(live))
            return out

    original = subspace_module.Subspace.apply_back

    def apply_back(self, *args, **kwargs):
        in_write_back[0] = True
        try:
            return original(self, *args, **kwargs)
        finally:
            in_write_back[0] = False

    monkeypatch.setattr(subspace_module.Subspace, "apply_back", apply_back)
    for projector in ("golore", "galore"):
        opt = so.SubspaceAdamW(weights, lr=1e-2, rank=4, projector=projector, update_gap=2)
        for step in range(3):
            for w in weights:
                w.grad = torch.randn_like(w)
            peak[0] = 0
            with Track():
                opt.step()
            if projector == "golore" or step == 1:  # an SVD refresh has its own m x n workspace
                assert peak[0] <= 1, f"{projector}: {peak[0]} full-size fp32 tensors alive at once"
    assert big_in_write_back == []
    assert all(w.dtype == torch.bfloat16 for w in weights)


def test_flattened_parameters_in_a_projected_group_get_a_clear_error():
    flat = torch.nn.Parameter(torch.randn(100))
    with pytest.raises(ValueError, match="FSDP1|DeepSpeed"):
        so.SubspaceAdamW([{"params": [flat], "rank": 4}])
    zero3 = torch.nn.Parameter(torch.randn(10, 10))
    zero3.ds_numel = 100  # what DeepSpeed ZeRO-3 puts on its partitioned parameters
    with pytest.raises(ValueError, match="DeepSpeed ZeRO"):
        so.SubspaceAdamW([{"params": [zero3], "rank": 4}])
    # a bias beside a weight in a projected group stays dense, as documented
    so.SubspaceAdamW([{"params": [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(6))],
                       "rank": 2}])


@pytest.mark.parametrize("projector", PROJECTORS)
@pytest.mark.parametrize("cls", RULE_CLASSES, ids=lambda c: c.__name__)
def test_a_layerwise_step_reads_the_host_once(cls, projector, reads):
    """Layer-wise updates run inside backward with no host read: each parameter's update is guarded on the device
    and step() reads every parameter's non-finite flag (and auto's switches) at once."""
    left, right, bias = meta_params()
    opt = cls([{"params": [left, right], "rank": 2, "projector": projector, "update_gap": 3, "total_steps": 6},
               {"params": [bias]}], lr=1e-2, layerwise=True)
    with CountSyncs() as mode:
        for _ in range(7):  # three refreshes, the hybrid's switch and auto's two decisions among them
            loss = left.sum() + right.sum() + bias.sum()
            loss.backward()  # the hooks update every parameter here
            opt.step()
    assert mode.syncs == 0
    assert len(reads) == 7
    assert all(p.grad is None for p in (left, right, bias))
