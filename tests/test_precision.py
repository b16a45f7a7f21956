"""Weights in low precision: stochastic rounding of bf16 updates and int8 weights (precision.py), and models
built in their training dtype without a float32 copy."""

import math

import pytest
import torch
from torch import nn

from subspace_optim import SubspaceAdamW, SubspaceSGD
from subspace_optim.precision import bf16_stochastic_round, quantize_rows, to_int8, update_rows


def test_bf16_stochastic_rounding_is_unbiased():
    """Between two bf16 neighbours a and b, x rounds to b with probability (x - a) / (b - a): every draw is a or
    b, and the mean of many draws is x (within 5 standard errors), where round-to-nearest is off by up to half a
    unit."""
    torch.manual_seed(0)
    u = 2.0**-7  # bf16's unit at 1.0
    x = torch.tensor([1.0 + 0.1 * u, 1.0 + 0.5 * u, -(1.0 + 0.9 * u), 3.0e-3 * (1 + 0.3 * u)])
    truncated = (x.view(torch.int32) & -65536).view(torch.float32)  # a: |x| rounded down to bf16
    draws = 40_000
    rounded = bf16_stochastic_round(x.repeat(draws, 1)).float()
    for i in range(len(x)):
        values = rounded[:, i].unique()
        assert len(values) == 2 and truncated[i] in values
        gap = (values[1] - values[0]).item()
        assert abs(rounded[:, i].double().mean().item() - x[i].item()) < 5 * gap / 2 / math.sqrt(draws)
    assert abs(x[0].to(torch.bfloat16).float().item() - x[0].item()) > 0.09 * u  # the bias it removes


def test_stochastic_rounding_keeps_exact_values():
    exact = torch.randn(1000).to(torch.bfloat16)
    assert torch.equal(bf16_stochastic_round(exact.float()), exact)


def test_int8_rows_are_unbiased():
    """E[codes · scale] = x per row, with the scale as it is stored (bf16)."""
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    draws = torch.stack([(lambda c, s: c.float() * s.float()[:, None])(*quantize_rows(x, torch.bfloat16))
                         for _ in range(4000)])
    _, scale = quantize_rows(x, torch.bfloat16)
    error = (draws.mean(0) - x).abs()
    assert error.max() < 5 * scale.float().max() / 2 / math.sqrt(4000)
    assert draws.std(0).max() > 0  # it is random


def _small_updates(weight, rounding, steps=200):
    """A dense weight near 1 stepped by SGD with a constant gradient, lr·g = 1e-4 a step: below half a bf16 unit
    (2^-8 / 2 near 1), so round-to-nearest drops every step."""
    weight = nn.Parameter(weight)
    opt = SubspaceSGD([weight], lr=1e-4, momentum=0.0, weight_rounding=rounding)
    for _ in range(steps):
        weight.grad = torch.ones_like(weight)
        opt.step()
    return weight.detach().float()


def test_small_bf16_updates_survive_stochastic_rounding():
    start = torch.ones(4096, dtype=torch.bfloat16)
    assert torch.equal(_small_updates(start.clone(), "nearest"), start.float())  # every update lost
    moved = _small_updates(start.clone(), "stochastic")
    assert moved.mean().item() == pytest.approx(1.0 - 200 * 1e-4, abs=2e-4)  # 0.98 in expectation
    # float32 weights are not rounded at all: the setting changes nothing there
    exact = _small_updates(torch.ones(8), "stochastic", steps=10)
    assert torch.equal(exact, _small_updates(torch.ones(8), "nearest", steps=10))


@pytest.mark.parametrize("projector", ["golore", "galore"])
def test_projected_bf16_updates_with_stochastic_rounding(projector):
    """A projected bf16 weight: the mean of the rounded weight after one step matches the float32 step (the
    update and the weight decay), where nearest rounding loses most of a small step."""
    torch.manual_seed(0)
    start = (torch.ones(64, 48) + 0.01 * torch.randn(64, 48)).to(torch.bfloat16)
    grad = torch.randn(64, 48)

    def step(dtype, rounding, lr=1e-3, weight_decay=0.5):
        weight = nn.Parameter(start.to(dtype).clone())
        opt = SubspaceSGD([{"params": [weight], "rank": 8}], lr=lr, momentum=0.0, weight_decay=weight_decay,
                          projector=projector, weight_rounding=rounding)
        weight.grad = grad.to(dtype)
        opt.step()
        return weight.detach().float()

    exact = step(torch.float32, "nearest") - start.float()
    nearest = step(torch.bfloat16, "nearest") - start.float()
    stochastic = torch.stack([step(torch.bfloat16, "stochastic") for _ in range(200)]).mean(0) - start.float()
    assert (stochastic.mean() - exact.mean()).abs() < 0.05 * exact.abs().mean()
    assert (nearest - exact).abs().mean() > 2 * (stochastic - exact).abs().mean()


def test_int8_weight_updates_are_unbiased():
    """update_rows on an int8 weight: the mean over draws of the re-quantized W - lr·Δ is W - lr·Δ."""
    torch.manual_seed(0)
    base = torch.randn(8, 32)
    delta = torch.randn(8, 32) * 1e-3
    results = []
    for _ in range(2000):
        weight = to_int8(base)
        update_rows(weight, lambda rows: delta[rows], 1.0)
        results.append(weight.int_data.float() * weight.scale.float()[:, None])
    expected = to_int8(base)
    expected = expected.int_data.float() * expected.scale.float()[:, None] - delta
    assert (torch.stack(results).mean(0) - expected).abs().max() < 5 * base.abs().max() / 127 / 2 / math.sqrt(2000)


def _regression(weight_format, steps=60, layerwise=False):
    """A linear layer fit by projected AdamW to a fixed target: the loss after ``steps``."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 48, bias=False).to(torch.bfloat16)
    target = torch.randn(48, 32) * 0.05
    if weight_format == "int8":
        layer.weight = nn.Parameter(to_int8(layer.weight), requires_grad=True)
    opt = SubspaceAdamW([{"params": [layer.weight], "rank": 8}], lr=1e-2, projector="golore", update_gap=10,
                        weight_decay=0.0, layerwise=layerwise, weight_rounding="stochastic")
    x = torch.randn(256, 32, dtype=torch.bfloat16)
    for _ in range(steps):
        loss = ((layer(x).float() - x.float() @ target.T) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("layerwise", [False, True])
def test_int8_weights_train_like_bf16(layerwise):
    first = _regression("int8", steps=1, layerwise=layerwise)
    int8, bf16 = _regression("int8", layerwise=layerwise), _regression("bf16", layerwise=layerwise)
    assert int8 < 0.5 * first
    assert int8 < 1.1 * bf16


def test_a_skipped_layerwise_update_leaves_an_int8_weight_bitwise():
    """A non-finite gradient in layer-wise mode: the guarded write keeps the codes and scales as they were."""
    layer = nn.Linear(16, 24, bias=False)
    layer.weight = nn.Parameter(to_int8(layer.weight.to(torch.bfloat16)), requires_grad=True)
    opt = SubspaceAdamW([{"params": [layer.weight], "rank": 4}], lr=1e-2, projector="golore", layerwise=True,
                        weight_decay=0.1)
    codes, scale = layer.weight.int_data.clone(), layer.weight.scale.clone()
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    x[0, 0] = float("nan")
    layer(x).float().sum().backward()
    opt.step()
    assert opt.skipped_steps == 1
    assert torch.equal(layer.weight.int_data, codes) and torch.equal(layer.weight.scale, scale)


def test_weight_rounding_is_checked():
    with pytest.raises(ValueError, match="weight_rounding"):
        SubspaceAdamW([nn.Parameter(torch.ones(2))], lr=1e-3, weight_rounding="up")


def _build_peak(dtype, int8):
    """(model, the bytes its build added to the process's peak, measured as the harness measures phases)."""
    from subspace_optim.memory_measured import PhasePeaks, return_freed_memory
    from subspace_optim.train.models import build_causal_lm
    from transformers import LlamaConfig

    def config(hidden, layers):
        return LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                           num_hidden_layers=layers, num_attention_heads=8, tie_word_embeddings=False, use_cache=False)

    chosen = (lambda model: {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n})
    return_freed_memory()  # as the harness does: without it, glibc keeps freed temporaries resident
    build_causal_lm(config(64, 1), dtype, int8=chosen if int8 else None)  # the imports' memory is not the build's
    peaks = PhasePeaks(torch.device("cpu"))
    with peaks.phase("build"):
        model = build_causal_lm(config(512, 4), dtype, int8=chosen if int8 else None)
    phase = peaks.phases["build"]
    return model, phase["peak"] - phase["start"]


@pytest.mark.skipif(not __import__("subspace_optim.memory_measured", fromlist=["x"]).reset_peak(torch.device("cpu")),
                    reason="needs a resettable peak RSS (Linux)")
@pytest.mark.parametrize("int8", [False, True])
def test_a_model_is_built_in_its_dtype_without_a_float32_copy(int8):
    """The build's peak is the bf16 (or int8) model plus a small margin, never the float32 model, and the
    weights keep HF's initialization: normal(0, 0.02) for linear and embedding weights, ones for norms."""
    from subspace_optim.memory_measured import weight_bytes

    model, added = _build_peak("bfloat16", int8)
    size = weight_bytes(model)
    float32 = sum(p.numel() for p in model.parameters()) * 4
    assert size < (0.35 if int8 else 0.55) * float32
    assert added <= size * 1.1 + (8 << 20), (added, size)  # the largest bf16 weight: 1.4 MiB here
    for name, p in model.named_parameters():
        values = p.dequantize().float() if hasattr(p, "dequantize") else p.float()
        if p.dim() == 2:
            assert values.std().item() == pytest.approx(0.02, rel=0.05), name
        else:
            assert torch.equal(values, torch.ones_like(values)), name
    assert (type(model.model.layers[0].mlp.up_proj.weight).__name__ == "Int8QuantizedTrainingLinearWeight") == int8
