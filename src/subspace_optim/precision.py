"""How an update reaches a weight held in low precision: bfloat16 with stochastic rounding, or int8.

A bfloat16 weight keeps 8 bits of significand, so round-to-nearest drops every update smaller than half a unit in
the last place of W (|lr·U| < 2^-9 |W|), every step, and training at small learning rates stalls (Zamirai et al.
2020, "Revisiting BFloat16 Training"). Stochastic rounding rounds up with probability equal to the distance from
the lower neighbour, so E[round(x)] = x and the update survives in expectation (torchao's ``bf16_stochastic_round``).

An int8 weight (Q-GaLore, Zhang et al. 2024; torchao's ``Int8QuantizedTrainingLinearWeight``, whose forward and
backward we use) holds row i as int8 codes times one scale s_i = max_j |W_ij| / 127 in the weight's dtype. Every
write re-quantizes the rows it touches with stochastic rounding, against the scale as it is stored, so that
E[codes · s_i] = W_i exactly (torchao's own in-place path rounds W + ΔW to bfloat16 first, which loses a small ΔW).

``update_rows`` writes W <- (W·(1 - decay) - alpha·Δ) (or with the decay after the update: galore-torch's
arithmetic) a block of rows at a time in float32, so that no m x n float32 temporary exists, and rounds once into
the weight's format. The random numbers come from the device's default generator, which the harness's checkpoints
save, so a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

#: How an update is rounded into a bfloat16 weight (a float32 weight needs no rounding; int8 is always stochastic).
WEIGHT_ROUNDINGS = ("nearest", "stochastic")
#: rows x columns of the float32 block that an exact write holds (16 MiB)
BLOCK = 1 << 22


def bf16_stochastic_round(x: Tensor) -> Tensor:
    """float32 -> bfloat16, rounding |x| up with probability (|x| - lower) / (upper - lower): unbiased.

    The low 16 bits of the float32 pattern are what bfloat16 drops: adding a uniform integer in [0, 2^16) before
    clearing them carries into the kept bits with exactly that probability (for either sign, since the pattern is
    sign and magnitude)."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def quantize_rows(x: Tensor, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """float32 rows -> (int8 codes, one scale per row in ``scale_dtype``), codes stochastically rounded against the
    stored scale: E[codes · scale] = x. The scale is max |x| / 127 widened by 2^-8 before it is rounded to
    ``scale_dtype`` (bf16 rounds by at most 2^-9), so that no |x| / scale exceeds 127 and nothing is clipped."""
    widen = 1.0 + torch.finfo(scale_dtype).eps if scale_dtype != torch.float32 else 1.0
    scale = (x.abs().amax(1) * (widen / 127)).to(scale_dtype)
    inverse = 1.0 / scale.float().clamp_min(1e-12)
    scaled = x * inverse[:, None]
    codes = (scaled + torch.rand_like(scaled)).floor_().clamp_(-127, 127).to(torch.int8)
    return codes, scale


def is_int8(weight: Tensor) -> bool:
    """Whether ``weight`` is torchao's int8 training weight (checked by name: importing torchao costs seconds)."""
    return type(weight).__name__ == "Int8QuantizedTrainingLinearWeight"


def writes_exactly(weight: Tensor, rounding: str) -> bool:
    """Whether an update must go through ``update_rows``: an int8 weight, or a bfloat16 one rounded stochastically."""
    return is_int8(weight) or (rounding == "stochastic" and weight.dtype == torch.bfloat16)


def as_rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)


def update_rows(weight: Tensor, delta: Callable[[slice], Tensor], alpha: float | Tensor, *,
                decay: float | Tensor = 0.0, decay_after: bool = False, keep: Tensor | None = None) -> None:
    """W <- W·(1 - decay) - alpha·Δ (``decay_after``: (W - alpha·Δ)·(1 - decay)), rounded stochastically into W.

    ``weight``: an int8 training weight, or a contiguous bfloat16 tensor (any other dtype is written with
    ``copy_``, i.e. rounded to nearest); its rows are its first dimension. ``delta(rows)``: Δ for a slice of rows,
    as a (rows x columns) tensor. ``keep``: a 0-d bool tensor, True where the write must leave W as it was (a
    guarded layer-wise update whose gradient was not finite), decided on the device."""
    int8 = is_int8(weight)
    target = weight if int8 else as_rows(weight)
    rows = max(1, BLOCK // max(1, math.prod(target.shape[1:])))
    for start in range(0, target.shape[0], rows):
        block = slice(start, start + rows)
        if int8:
            old = weight.int_data[block].float() * weight.scale[block].float()[:, None]
        else:
            old = target[block].float()
        new = old if decay_after else old * (1.0 - decay)
        new = new - delta(block).float() * alpha
        if decay_after:
            new = new * (1.0 - decay)
        if int8:
            codes, scale = quantize_rows(new, weight.scale.dtype)
            if keep is not None:
                codes = torch.where(keep, weight.int_data[block], codes)
                scale = torch.where(keep, weight.scale[block], scale)
            weight.int_data[block].copy_(codes)
            weight.scale[block].copy_(scale)
        else:
            value = bf16_stochastic_round(new) if target.dtype == torch.bfloat16 else new
            if keep is not None:
                value = torch.where(keep, target[block], value.to(target.dtype))
            target[block].copy_(value)


def to_int8(weight: Tensor) -> Tensor:
    """A float weight as torchao's int8 training weight (nearest rounding, as torchao's ``from_float``)."""
    from torchao.prototype.quantized_training import Int8QuantizedTrainingLinearWeight

    return Int8QuantizedTrainingLinearWeight.from_float(weight.detach())


def int8_parts(weight: Tensor) -> dict[str, Tensor]:
    """The tensors that hold an int8 weight ({"int_data": codes, "scale": scales}), for checkpoints and memory."""
    return {"int_data": weight.int_data, "scale": weight.scale}


