"""The analytic memory estimator against the seeds' arithmetic and its own definitions."""

import pytest

from subspace_optim.cli import main
from subspace_optim.memory_estimate import estimate, estimate_models

GB = 1e9


def test_llama7b_adam_bf16_is_the_seeds_58_gb():
    # seeds: 14 (weights) + 14 (gradients) + 28 (Adam) + 2 (activations) = 58 GB for a nominal 7B model;
    # our llama-7b has 6.74B parameters, and the seeds' 2 GB is the activation-checkpointing count.
    est = estimate("llama-7b", "adamw", batch=1, seq=2048, dtype="bf16", activations="checkpoint")
    assert est["parameters"] == 6_738_415_616  # GaLore's config, as the harness counts it
    assert est["weights"] == est["gradients"] == 2 * est["parameters"]
    assert est["optimizer_state"] == 2 * est["weights"]
    for part, seed in (("weights", 14), ("gradients", 14), ("optimizer_state", 28)):
        assert est[part] / GB == pytest.approx(seed, rel=0.04)
    assert est["activations"] / GB == pytest.approx(2, rel=0.15)
    assert est["total"] / GB == pytest.approx(58, rel=0.05)


def test_gpt3_adam_bf16_is_the_seeds_1620_gb():
    est = estimate("gpt3-175b", "adamw", batch=1, seq=2048, dtype="bf16", activations="full")
    assert est["parameters"] / 1e9 == pytest.approx(175, rel=0.01)
    for part, seed in (("weights", 350), ("gradients", 350), ("optimizer_state", 700)):
        assert est[part] / GB == pytest.approx(seed, rel=0.01)
    assert est["activations"] / GB == pytest.approx(220, rel=0.3)  # Korthikanti et al.: 276 GB
    assert est["total"] / GB == pytest.approx(1620, rel=0.05)


@pytest.mark.parametrize("optimizer", ["galore", "golore"])
def test_projected_state_is_2_r_max_per_matrix_plus_dense(optimizer):
    spec, r = estimate_models()["llama-60m"], 128
    est = estimate("llama-60m", optimizer, rank=r, dtype="fp32")
    shapes = spec.linear_shapes()
    assert len(shapes) == 7 * spec.layers
    assert est["optimizer_state"] == 4 * (sum(2 * r * max(s) for s in shapes) + 2 * spec.dense_numel())
    assert est["projection"] == 4 * sum(r * min(s) for s in shapes)
    assert est["gradients"] == est["weights"]  # the full gradient exists before projection


def test_layerwise_drops_the_gradient_term():
    full = estimate("llama-7b", "galore", rank=1024)
    layerwise = estimate("llama-7b", "galore", rank=1024, layerwise=True)
    assert layerwise["gradients"] < 0.05 * full["gradients"]
    assert layerwise["total"] == pytest.approx(full["total"] - full["gradients"], abs=0.6 * GB)
    assert {k: layerwise[k] for k in ("weights", "optimizer_state", "activations")} == \
        {k: full[k] for k in ("weights", "optimizer_state", "activations")}


def test_rso_trains_only_b_and_shrinks_linear_inputs():
    spec, r = estimate_models()["llama-7b"], 1024
    adam = estimate("llama-7b", "adamw")
    rso = estimate("llama-7b", "rso", rank=r)
    trained = sum(out * r for out, _ in spec.linear_shapes()) + spec.dense_numel()
    assert rso["gradients"] == 2 * trained and rso["optimizer_state"] == 4 * trained
    assert rso["weights"] == adam["weights"] + 2 * sum(out * r for out, _ in spec.linear_shapes())
    assert rso["activations"] < adam["activations"]


def test_parameter_counts_match_the_harness_table():
    models = estimate_models()
    assert models["llama-60m"].parameters() == 58_073_600
    assert models["llama-tiny"].parameters() == pytest.approx(9.40e6, rel=1e-3)


def test_memory_command(capsys):
    assert main(["memory", "--model", "llama-7b", "--optimizer", "galore", "--rank", "1024", "--layerwise"]) == 0
    out = capsys.readouterr().out
    assert "llama-7b" in out and "optimizer state" in out and "total" in out
    assert main(["memory", "--model", "nope"]) == 2
    assert main(["memory", "--model", "llama-tiny", "--optimizer", "rso", "--rank", "0"]) == 2


def test_a_rank_too_large_for_a_weight_counts_it_at_full_rank(capsys):
    """The library's rule: no layer of llama-tiny (hidden 128) is reduced at rank 500, so RSO and GoLore keep
    AdamW's weights, gradients and moments; the command says so in one warning line."""
    adam = estimate("llama-tiny", "adamw")
    for optimizer in ("rso", "golore"):
        est = estimate("llama-tiny", optimizer, rank=500)
        assert est["full_rank_weights"] == 7 * 6
        assert {k: est[k] for k in ("weights", "gradients", "optimizer_state", "activations")} == \
            {k: adam[k] for k in ("weights", "gradients", "optimizer_state", "activations")}
    assert main(["memory", "--model", "llama-tiny", "--optimizer", "rso", "--rank", "500"]) == 0
    assert "warning: rank 500: 42 linear weights" in capsys.readouterr().err


@pytest.fixture(scope="module")
def llama_tiny():
    from subspace_optim.train.models import build_causal_lm, causal_lm_config

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return build_causal_lm(causal_lm_config("llama-tiny", 32000, None, None))


@pytest.mark.parametrize("state_bits", [32, 16, 8, 4])
@pytest.mark.parametrize("optimizer, method", [("adamw", "full"), ("galore", "galore"), ("golore", "golore"),
                                               ("rso", "rso")])
def test_the_state_estimate_equals_the_measured_state_bytes_of_llama_tiny(llama_tiny, optimizer, method,
                                                                          state_bits):
    """Moments (quantized codes, block scales and tables at 8 and 4 bits), bases and step counters, byte for
    byte, after a step of the harness's optimizer (`full` is our dense AdamW, which the estimate's adamw counts)."""
    import copy

    import torch

    if state_bits in (8, 4):
        pytest.importorskip("torchao.optim")
    from subspace_optim.train.config import TrainConfig, resolve
    from subspace_optim.train.optimizers import build_optimizer

    model = copy.deepcopy(llama_tiny)
    opt = build_optimizer(resolve(TrainConfig(optimizer=method, state_bits=state_bits, update_gap=10)),
                          model).optimizer
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    est = estimate("llama-tiny", optimizer, dtype="fp32", state_bits=state_bits)
    assert opt.state_bytes() == est["optimizer_state"] + est["counters"] + est["projection"]


@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("layerwise", [False, True], ids=["standard", "layerwise"])
def test_the_regenerated_bases_estimate_equals_the_measured_peak_state_of_llama_tiny(llama_tiny, layerwise,
                                                                                     state_bits, monkeypatch):
    """--random-basis regenerate: the state held at each weight's write-back (its peak) during a second step,
    byte for byte: every basis in standard mode (step() draws them all first), the largest one layer-wise (during
    backward); between steps none."""
    import copy

    import torch

    if state_bits == 8:
        pytest.importorskip("torchao.optim")
    from subspace_optim.train.config import TrainConfig, resolve
    from subspace_optim.train.optimizers import build_optimizer

    model = copy.deepcopy(llama_tiny)
    opt = build_optimizer(resolve(TrainConfig(optimizer="golore", state_bits=state_bits, update_gap=10,
                                              layerwise=layerwise, random_basis="regenerate")), model).optimizer
    from subspace_optim.engine.subspace import Subspace

    held, write_back = [], Subspace.apply_back
    monkeypatch.setattr(Subspace, "apply_back", lambda *args, **kwargs: (held.append(opt.state_bytes()),
                                                                         write_back(*args, **kwargs)))
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(2):  # the second step: every moment exists from the start
        held.clear()
        opt.zero_grad()
        sum((p * (torch.randn_like(p) * 1e-3)).sum() for p in params).backward()  # gradient: the noise
        opt.step()
    est = estimate("llama-tiny", "golore", dtype="fp32", state_bits=state_bits, layerwise=layerwise,
                   random_basis="regenerate")
    assert max(held) == est["optimizer_state"] + est["counters"] + est["projection"]
    assert opt.state_bytes() == est["optimizer_state"] + est["counters"]
    rest = sum(est[k] for k in ("weights", "gradients", "optimizer_state", "counters"))
    if layerwise:  # the basis in use is held during backward, with the activations
        assert est["total"] == rest + est["projection"] + est["activations"] + est["transients"]
        assert not est["bases_apart"]
    else:
        # step() holds the drawn bases and one update's temporaries, after backward freed the activations
        assert est["total"] == rest + max(est["projection"] + est["transients"], est["activations"])
        assert est["bases_apart"]


def test_llama_7b_with_8_bit_moments(capsys):
    """The quantized state of GoLore's LLaMA-7B recipe: 1 byte per moment number, a 4-byte scale per 256 and a
    1 KiB table per tensor, against 2 bytes in bf16."""
    args = dict(rank=1024, layerwise=True, dtype="bf16", activations="checkpoint")
    bf16, int8 = estimate("llama-7b", "golore", **args), estimate("llama-7b", "golore", state_bits=8, **args)
    spec = estimate_models()["llama-7b"]
    numbers = sum(2 * 1024 * max(s) for s in spec.linear_shapes()) + 2 * spec.dense_numel()
    assert bf16["optimizer_state"] == 2 * numbers
    tensors = 2 * (len(spec.linear_shapes()) + len(spec.dense_tensors()))
    assert int8["optimizer_state"] == numbers + 4 * numbers // 256 + 1024 * tensors  # every tensor quantizes here
    assert main(["memory", "--model", "llama-7b", "--optimizer", "golore", "--rank", "1024", "--layerwise",
                 "--dtype", "bf16", "--activations", "checkpoint", "--state-bits", "8"]) == 0
    out = capsys.readouterr().out
    assert "8-bit moments" in out and f"{int8['total'] / GB:10.2f} GB" in out
    # random bases regenerated: one basis (4096 x 1024) held at a time instead of all 224
    regen = estimate("llama-7b", "golore", state_bits=8, random_basis="regenerate", **args)
    assert regen["projection"] == 2 * 4096 * 1024 and int8["projection"] == 224 * regen["projection"]
    assert regen["total"] == int8["total"] - int8["projection"] + regen["projection"] and regen["total"] <= 20 * GB
    assert main(["memory", "--model", "llama-7b", "--optimizer", "golore", "--rank", "1024", "--layerwise",
                 "--dtype", "bf16", "--activations", "checkpoint", "--state-bits", "8", "--random-basis",
                 "regenerate"]) == 0
    out = capsys.readouterr().out
    assert "random bases: regenerate" in out and f"{regen['total'] / GB:10.2f} GB" in out
    assert main(["memory", "--optimizer", "galore", "--random-basis", "regenerate"]) == 2
    assert "only golore's bases are random" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):  # argparse names the choices
        main(["memory", "--state-bits", "12"])
    assert "choose from 32, 16, 8, 4" in capsys.readouterr().err


def test_int8_weights_by_hand():
    """A tiny LLaMA (hidden 8, MLP 16, 2 layers, vocab 32) in bf16 at rank 2: every linear weight is projected,
    so all 2·(4·8·8 + 3·16·8) = 1280 linear numbers take 1 byte, plus a 2-byte scale per output row
    (2·(4·8 + 16 + 16 + 8) = 144 rows); the 2·32·8 + 2·2·8 + 8 = 552 others stay at 2 bytes."""
    from subspace_optim.memory_estimate import ArchSpec

    spec = ArchSpec(hidden=8, intermediate=16, layers=2, heads=2, vocab=32)
    args = dict(rank=2, batch=1, seq=4, dtype="bf16", activations="checkpoint", state_bits=16)
    dense, int8 = estimate(spec, "golore", **args), estimate(spec, "golore", weights="int8", **args)
    assert dense["weights"] == 2 * (1280 + 552) == 3664
    assert int8["weights"] == 1280 + 2 * 144 + 2 * 552 == 2672
    # the transients: the larger of the largest weight dequantized to bf16 (16 x 8) and one update's temporaries,
    # here the 16 x 8 MLP weight's: its gradient in float32, R, the direction and the two moments decoded from
    # 16 bits (2 x 16 float32 numbers each at rank 2) and the 16 MiB write-back block
    update = 16 * 8 * 4 + 4 * (2 * 16 * 4) + (4 << 22)
    assert dense["transients"] == int8["transients"] == max(2 * 16 * 8, update)
    assert int8["int8_weights"] == 14 and int8["parameters"] == dense["parameters"] == 1832
    assert {k: int8[k] for k in ("gradients", "optimizer_state", "projection", "activations")} == \
        {k: dense[k] for k in ("gradients", "optimizer_state", "projection", "activations")}
    # the peak is in step(), where one update's 16 MiB block dwarfs the activations: only the weights differ
    assert int8["total"] == dense["total"] - 3664 + 2672
    # bases regenerated in standard mode live inside step(), apart from the activations and the forward's transient
    regen = estimate(spec, "golore", weights="int8", random_basis="regenerate", **args)
    rest = sum(regen[k] for k in ("weights", "gradients", "optimizer_state", "counters"))
    # forward holds the activations and the int8 dequantization, step() the bases and one update's temporaries
    assert regen["total"] == rest + max(regen["projection"] + regen["transients"],
                                        regen["activations"] + 2 * 16 * 8)


def test_int8_weights_only_for_projected_optimizers(capsys):
    for optimizer in ("adamw", "rso"):
        with pytest.raises(ValueError, match="only galore and golore"):
            estimate("llama-7b", optimizer, weights="int8")
    with pytest.raises(ValueError, match="unknown weights"):
        estimate("llama-7b", "golore", weights="int4")
    assert main(["memory", "--weights", "int8"]) == 2
    assert "only galore and golore" in capsys.readouterr().err
    assert main(["memory", "--model", "llama-13b", "--optimizer", "golore", "--weights", "int8"]) == 0
    out = capsys.readouterr().out
    assert "int8 weights" in out and "weights (int8, row scales)" in out and "transients (one update, int8 dequant.)" in out


def test_llama_13b_is_llamas_13_0b():
    """LLaMA-13B (Touvron et al. 2023: 13.0B): 40 x (4·5120² + 3·5120·13824) + 2·32000·5120 + 81·5120."""
    assert estimate_models()["llama-13b"].parameters() == 13_015_864_320
    dense = estimate("llama-13b", "golore", rank=1024)
    int8 = estimate("llama-13b", "golore", rank=1024, weights="int8")
    assert dense["weights"] == 2 * 13_015_864_320
    linear, rows = 40 * (4 * 5120**2 + 3 * 5120 * 13824), 40 * (5 * 5120 + 2 * 13824)
    assert int8["weights"] == linear + 2 * rows + 2 * (13_015_864_320 - linear)
    assert int8["weights"] / GB == pytest.approx(13.35, abs=0.005)
    assert int8["transients"] >= 2 * 13824 * 5120  # at least the largest weight dequantized


def test_fit_ladder_orders_the_free_knobs_then_8_bits_then_rank_then_4_bits_then_int8():
    """The knobs by the quality they give up: none (layer-wise, regenerated bases, checkpointing), then 8-bit
    moments (free in our study), then rank at 8 bits (highest first), then 4 bits at each rank, then all of it
    again with int8 weights; each lossy level with every free knob on."""
    from subspace_optim.memory_estimate import fit_ladder

    ladder = fit_ladder("llama-13b")
    free = [(c["activations"], c["layerwise"], c["random_basis"]) for c in ladder[:4]]
    assert free == [("flash", False, "keep"), ("flash", True, "keep"), ("flash", True, "regenerate"),
                    ("checkpoint", True, "regenerate")]  # the free knobs, cheapest in compute first
    assert all(c["rank"] == 1280 and c["state_bits"] == 16 and c["weights"] == "dense" for c in ladder[:4])
    assert all(free[-1] == (c["activations"], c["layerwise"], c["random_basis"]) for c in ladder[3:])
    lossy = [(c["weights"], c["state_bits"], c["rank"]) for c in ladder[3:]]
    levels = [(16, 1280)] + [(b, r) for b in (8, 4) for r in (1280, 640, 320)]
    assert lossy == [(w, b, r) for w in ("dense", "int8") for b, r in levels]


def _fit_rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()[2:] if line.split() and line.split()[-1] in ("yes", "no")]


def _ladder_totals(model: str, seq: int = 2048) -> list[tuple[dict, float]]:
    from subspace_optim.memory_estimate import fit_ladder

    return [(c, min(estimate(model, "golore", seq=seq, fused_loss=f, **c)["total"] for f in (False, True)))
            for c in fit_ladder(model, seq=seq)]


def test_fit_llama_13b_in_24gb(capsys):
    """Dense bf16 weights alone (26.03 GB) exceed 24 GB, so every dense row fails and the first that fits holds
    int8 weights: the first setting of the ladder within the budget is marked, the rows before it do not fit, the
    table stops at the third that fits, and the printed flags train exactly that setting."""
    assert main(["memory", "--fit", "24GB", "--model", "llama-13b"]) == 0
    out = capsys.readouterr().out
    rows = _fit_rows(out)
    ladder = _ladder_totals("llama-13b")
    fits = [i for i, (_, total) in enumerate(ladder) if total <= 24e9]
    assert all(c["weights"] == "int8" for c, _ in (ladder[i] for i in fits))
    assert len(rows) == fits[2] + 1 and [r[-1] for r in rows].count("yes") == 3
    assert all(r[-1] == "no" for r in rows[:fits[0]])
    best, total = ladder[fits[0]]
    marked = [r for r in rows if r[0] == "*"]
    assert marked == [["*", str(best["rank"]), f"{best['state_bits']}-bit", "int8", "yes", "yes", "regenerate",
                       f"{total / GB:.2f}", "yes"]]
    fused = estimate("llama-13b", "golore", fused_loss=True, **best)["total"] < total  # the cheaper loss
    assert (f"  subspace-optim train --model llama-13b --optimizer golore --rank {best['rank']} --layerwise --dtype "
            f"bfloat16 --state-bits {best['state_bits']} --random-basis regenerate --checkpointing"
            + (" --fused-loss" if fused else "") + " --weights int8 --batch-size 1 --seq-len 2048") in out.splitlines()
    adamw = min((estimate("llama-13b", "adamw", activations="checkpoint", fused_loss=f) for f in (False, True)),
                key=lambda est: est["total"])
    assert f"would need {adamw['total'] / GB:.2f} GB for the same batch 1 x 2048" in out


def test_fit_llama_7b_needs_no_lossy_knob(capsys):
    assert main(["memory", "--fit", "24GiB", "--model", "llama-7b", "--seq", "256"]) == 0
    out = capsys.readouterr().out
    assert "(25.77 GB)" in out
    marked = [line.split() for line in out.splitlines() if line.startswith("  *")]
    # at 256 tokens the activations are small: layer-wise alone fits, no recomputation needed
    assert [m[:7] for m in marked] == [["*", "1024", "16-bit", "bfloat16", "no", "yes", "keep"]]
    # 256 tokens: HF's loss needs less than the fused one's lm_head gradient
    assert "--rank 1024 --layerwise --dtype bfloat16 --state-bits 16 --batch-size 1 --seq-len 256" in out


def test_fit_nothing_fits_prints_the_smallest(capsys):
    assert main(["memory", "--fit", "10GB", "--model", "llama-13b", "--seq", "256"]) == 0
    out = capsys.readouterr().out
    smallest = min(total for _, total in _ladder_totals("llama-13b", seq=256))
    assert f"nothing fits 10GB: the smallest is {smallest / GB:.2f} GB" in out
    assert "*" not in out.split("nothing fits")[0]
    assert "--rank 320 --layerwise --dtype bfloat16 --state-bits 4 --random-basis regenerate" in out


def test_parse_budget():
    from subspace_optim.memory_estimate import parse_budget

    assert parse_budget("24GB") == 24e9 and parse_budget("22.5GB") == 22.5e9
    assert parse_budget("24GiB") == parse_budget("24G") == 24 * 2**30 and parse_budget("16g") == 16 * 2**30


@pytest.mark.parametrize("budget", ["24", "GB", "24XB", "-1GB", "0GB", "1e3GB", "lots"])
def test_a_bad_budget_is_one_usage_error_line(capsys, budget):
    assert main(["memory", f"--fit={budget}"]) == 2  # "=": argparse reads a bare -1GB as an option
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: bad memory budget {budget!r}" in err
