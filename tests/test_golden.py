"""Golden state: the optimizer's checkpoints stay bitwise what they were when this file was generated.

Every configuration of optim_db (every projector x rule x moments policy, standard and layer-wise) at 32, 16 and
8 bits trains TinyNet 12 steps (gap 4: refreshes at steps 0, 4 and 8). The SHA-256 of its state_dict (tensors'
dtype, shape and bytes; torchao's quantized tensors by their codes, scales and table; every host value) and of the
weights must equal the digests in golden/digests.json. A few full checkpoints in golden/checkpoints.pt are loaded
into a fresh optimizer, which must then take step 13 to the recorded weights: a refactoring may move code, never
change a bit or stop reading old state.

The width 1536 makes the projected moments (3 x 1536) whole blocks of 256 numbers, which 8-bit states quantize.
One torch thread, so that no reduction order depends on the machine. Regenerate only on purpose, with a change
that is meant to alter the trajectory:  GOLDEN_REGENERATE=1 pytest tests/test_golden.py
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from optim_db import CONFIGS, EXACT_ONLY, STEPS, TinyNet, train
from subspace_optim import lowbit
from subspace_optim.rules import get_rule

HERE = Path(__file__).parent / "golden"
DIGESTS, CHECKPOINTS = HERE / "digests.json", HERE / "checkpoints.pt"
WIDTH, BITS = 1536, (32, 16, 8)
REGENERATE = os.environ.get("GOLDEN_REGENERATE") == "1"
#: configurations whose whole checkpoint is stored, to be loaded and stepped: every projector, both modes, 8 bits
STORED = [f"{p}-adamw-project{mode}-8bit" for p in ("galore", "golore", "hybrid", "online_pca", "auto")
          for mode in ("", "-layerwise")]

CASES = [(c, bits) for c in CONFIGS + EXACT_ONLY for bits in BITS
         if bits == 32 or get_rule(c.cls.rule_name).low_bit]


def _name(config, bits: int) -> str:
    return f"{config.name}-{bits}bit"


def _canonical(value, out: list, path: str = "") -> None:
    """Each leaf of a (nested) state as one line: a tensor by dtype, shape and the SHA-256 of its bytes."""
    if isinstance(value, dict):
        for key in sorted(value, key=repr):
            _canonical(value[key], out, f"{path}/{key!r}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _canonical(item, out, f"{path}[{i}]")
    elif lowbit.is_quantized(value):
        names, _ = value.__tensor_flatten__()
        for attr in names:
            _canonical(getattr(value, attr), out, f"{path}.{attr}")
    elif isinstance(value, torch.Tensor):
        data = value.detach().contiguous().cpu()
        flat = data.reshape(-1)
        raw = flat.view(torch.uint8) if data.dtype != torch.bool else flat.to(torch.uint8)
        out.append(f"{path}: {data.dtype} {tuple(data.shape)} {hashlib.sha256(raw.numpy().tobytes()).hexdigest()}")
    else:
        out.append(f"{path}: {value!r}")


def digest(value) -> str:
    lines: list[str] = []
    _canonical(value, lines)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(config, bits: int):
    torch.manual_seed(0)
    model = TinyNet(width=WIDTH)
    opt = config.make(model, state_bits=bits)
    train(model, opt, STEPS)
    return model, opt


def _generate() -> None:
    torch.set_num_threads(1)
    digests, stored = {}, {}
    for config, bits in CASES:
        model, opt = _run(config, bits)
        name = _name(config, bits)
        digests[name] = {"state": digest(opt.state_dict()), "weights": digest(model.state_dict())}
        if name in STORED:
            saved = copy.deepcopy({"optimizer": opt.state_dict(), "weights": model.state_dict()})  # step 13 is in place
            train(model, opt, 1, start=STEPS)
            stored[name] = {**saved, "next": digest(model.state_dict())}
    HERE.mkdir(exist_ok=True)
    DIGESTS.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    torch.save(stored, CHECKPOINTS)


if REGENERATE:
    _generate()


@pytest.mark.parametrize("config, bits", CASES, ids=[_name(c, b) for c, b in CASES])
def test_state_and_weights_are_bitwise_the_golden_ones(config, bits):
    expected = json.loads(DIGESTS.read_text())[_name(config, bits)]
    model, opt = _run(config, bits)
    assert digest(opt.state_dict()) == expected["state"], "the optimizer state changed"
    assert digest(model.state_dict()) == expected["weights"], "the weights changed"


@pytest.mark.parametrize("name", STORED)
def test_an_old_checkpoint_loads_and_steps_to_the_golden_weights(name):
    lowbit.torchao_states()  # torchao's tensor classes, for weights_only loading
    saved = torch.load(CHECKPOINTS, weights_only=True)[name]
    config = next(c for c, b in CASES if _name(c, b) == name)
    model = TinyNet(width=WIDTH)
    model.load_state_dict(saved["weights"])
    opt = config.make(model, state_bits=8)
    opt.load_state_dict(saved["optimizer"])
    train(model, opt, 1, start=STEPS)
    assert digest(model.state_dict()) == saved["next"]


def test_the_golden_files_cover_every_case():
    assert set(json.loads(DIGESTS.read_text())) == {_name(c, b) for c, b in CASES}
    assert len(CASES) > 100 and set(torch.load(CHECKPOINTS, weights_only=True)) == set(STORED)
