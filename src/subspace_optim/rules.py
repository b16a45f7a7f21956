"""Inner update rules: AdamW, momentum SGD, Adafactor and Lion.

A rule is one function ``rule(params, grads, states, *, lr, weight_decay, **hyper)`` that updates ``params`` in
place, W <- W - lr * (U + weight_decay * W), where U is the rule's direction computed from the gradients and the
per-parameter state dicts (created lazily, updated in place). This is torch.optim's contract, so dense parameters
are updated directly, with torch's fused kernel where one exists. For a projected weight the optimizer passes a
zero r x D buffer as the "parameter", lr = -1 and no weight decay: the buffer then holds U, which it projects back.

State keys follow torch.optim (``step``, ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) so that state reads the
same as torch's. The optimizer transports moments to a new subspace by key kind: first moments are linear in the
gradient, second moments are (factored) squares. A group's ``state_bits`` (lowbit.py) stores the moments a rule
lists in ``low_bit`` in bfloat16 or quantized; the rule itself always computes on float32 copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from torch.optim.adamw import adamw as torch_adamw

from . import lowbit

try:  # the devices with fused optimizer kernels (the CPU from torch 2.4 on)
    from torch.optim.optimizer import _get_fused_kernels_supported_devices
except ImportError:  # pragma: no cover - older torch
    _get_fused_kernels_supported_devices = list

#: State tensors that are linear in the gradient: transported by M <- T M on a change of basis.
FIRST_MOMENTS = frozenset({"exp_avg", "momentum_buffer"})
#: State tensors that estimate squares along the subspace axis: transported by V <- (T∘T) V.
SECOND_MOMENTS = frozenset({"exp_avg_sq", "exp_avg_sq_row"})

_FUSED_DEVICES = set(_get_fused_kernels_supported_devices())


def scalar(x):
    """A hyper-parameter as a number or a 0-dim tensor: torch accepts any 1-element tensor lr (torch.optim's
    ``_to_scalar``). A tensor stays a tensor: reading it on the host would stall a GPU."""
    return x.reshape(()) if isinstance(x, Tensor) else x


def _count_step(states: list[dict]) -> None:
    for state in states:
        state["step"] = state.get("step", 0) + 1


def _apply(params: list[Tensor], directions: list[Tensor], lr: float, weight_decay: float) -> None:
    """W <- W - lr * (U + weight_decay * W), decoupled weight decay as in AdamW (lr a number or a 0-dim tensor)."""
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    if isinstance(lr, Tensor):  # alpha= takes only numbers
        torch._foreach_sub_(params, torch._foreach_mul(directions, lr))
    else:
        torch._foreach_add_(params, directions, alpha=-lr)


#: AdamW's arithmetics: torch.optim.AdamW's, and galore-torch's (the old HF transformers AdamW it copied).
ARITHMETICS = ("torch", "galore-torch")


def adamw(params, grads, states, *, lr, weight_decay, betas, eps, arithmetic="torch") -> None:
    """AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019), computed by torch's own (fused where available) kernel.

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g²;  U = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
    ``arithmetic="galore-torch"`` computes U = sqrt(1-b2^t) / (1-b1^t) * m / (sqrt(v) + eps) instead, as
    galore-torch's AdamW does: eps added before the bias correction, i.e. an effective eps 1/sqrt(1-b2^t) times
    larger (31.6x at step 1 with b2 = 0.999), so that its users can reproduce their runs (galore-torch's default eps
    is 1e-6; pass it). Its weight decay comes after the update too, W <- W (1 - lr wd) (torch decays first):
    ``decays_after_update``.
    ``step`` is a float tensor on the parameter's device, as in torch.optim.AdamW's fused state; a plain number
    (older checkpoints) or a step loaded onto another device is converted, as torch.optim.Adam does on load.
    The fused kernel mishandles tensors of different layouts (a transposed parameter, a strided gradient), so
    it runs on contiguous copies of those, written back after.
    """
    fused = all(p.device.type in _FUSED_DEVICES for p in params)
    for param, grad, state in zip(params, grads, states):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.contiguous_format)
        # torch.optim's convention: a fused kernel reads ``step`` on the parameter's device, the for-each path
        # on the host (where reading it costs no device synchronisation); a plain number is converted
        where = param.device if fused else torch.device("cpu")
        if "step" not in state or not isinstance(state["step"], Tensor) or state["step"].device != where:
            state["step"] = torch.as_tensor(state.get("step", 0.0), dtype=torch.float32, device=where)
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    if arithmetic == "galore-torch":
        return _adamw_eps_before_correction(params, grads, exp_avgs, exp_avg_sqs, [s["step"] for s in states],
                                            lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    inputs = [[t.contiguous() for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    torch_adamw(
        *inputs, [], [s["step"] for s in states], fused=fused, foreach=not fused, amsgrad=False, beta1=betas[0],
        beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps, maximize=False,
    )
    for original, copy in zip(params + exp_avgs + exp_avg_sqs, inputs[0] + inputs[2] + inputs[3]):
        if copy is not original:
            original.copy_(copy)


def _adamw_eps_before_correction(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, weight_decay, betas,
                                 eps) -> None:
    """galore-torch's AdamW arithmetic (see ``adamw``) in for-each ops: no host synchronisation (the step counts
    and the per-parameter step sizes stay tensors), the moments updated as galore-torch updates them."""
    beta1, beta2 = betas
    torch._foreach_add_(steps, 1.0)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, eps)
    updates = torch._foreach_div(exp_avgs, denominators)
    # lr sqrt(1 - b2^t) / (1 - b1^t), in float64 as galore-torch computes it on the host
    for update, step in zip(updates, steps):
        t = step.to(torch.float64)
        size = lr * torch.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        update.mul_(size.to(update.device))
    torch._foreach_sub_(params, updates)
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)


def decays_after_update(group: dict) -> bool:
    """Whether a group's weight decay follows its update (galore-torch's arithmetic) rather than precedes it."""
    return group.get("arithmetic") == "galore-torch"


def sgd(params, grads, states, *, lr, weight_decay, momentum, dampening, nesterov) -> None:
    """Heavy-ball momentum SGD with torch.optim.SGD's conventions (weight decay decoupled, as everywhere here).

    b <- momentum b + (1 - dampening) g (b = g on the first step);  U = g + momentum b (Nesterov) or b.
    ``dampening = momentum`` gives the EMA form M <- (1-β) M + β g of the GoLore paper's MSGD.
    """
    if momentum == 0:
        _count_step(states)
        return _apply(params, grads, lr, weight_decay)
    for grad, state in zip(grads, states):
        if state.get("step", 0) and "momentum_buffer" in state:
            state["momentum_buffer"].mul_(momentum).add_(grad, alpha=1 - dampening)
        else:  # the first step (counted, so that a state created ahead of it, e.g. by DCP, starts the same)
            state["momentum_buffer"] = grad.clone()
    _count_step(states)
    bufs = [s["momentum_buffer"] for s in states]
    _apply(params, torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs, lr, weight_decay)


def adafactor(params, grads, states, *, lr, weight_decay, beta2_decay, eps, clip_threshold, beta1) -> None:
    """Adafactor (Shazeer & Stern 2018) with an explicit learning rate (no relative step), as GaLore uses it.

    Second moment factored over the last two axes: row/column means of g² + eps1, decayed with
    b2_t = 1 - t^decay; U = g / sqrt(v̂), clipped so that RMS(U) <= clip_threshold; optional momentum beta1.
    For a low-rank gradient R (r x D) the row factor lies along the subspace axis.
    """
    eps1, _ = eps
    directions = []
    for grad, state in zip(grads, states):
        factored = grad.dim() >= 2
        if "step" not in state:
            state["step"] = 0
            if factored:
                state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            if beta1 is not None:
                state["exp_avg"] = torch.zeros_like(grad)
        state["step"] += 1
        weight = state["step"] ** beta2_decay  # = 1 - b2_t: the first step takes g² as it is
        sq = grad.square().add_(eps1)
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.lerp_(sq.mean(dim=-1), weight)
            col.lerp_(sq.mean(dim=-2), weight)
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = grad * row_factor * col.rsqrt().unsqueeze(-2)
        else:
            state["exp_avg_sq"].lerp_(sq, weight)
            update = grad * state["exp_avg_sq"].rsqrt()
        rms = update.square().mean().sqrt()
        update.div_((rms / clip_threshold).clamp_(min=1.0))
        if beta1 is not None:
            update = state["exp_avg"].lerp_(update, 1 - beta1)
        directions.append(update)
    _apply(params, directions, lr, weight_decay)


def lion(params, grads, states, *, lr, weight_decay, betas) -> None:
    """Lion (Chen et al. 2023): U = sign(b1 m + (1-b1) g);  m <- b2 m + (1-b2) g."""
    beta1, beta2 = betas
    for grad, state in zip(grads, states):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
    _count_step(states)
    exp_avgs = [s["exp_avg"] for s in states]
    directions = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
    torch._foreach_sign_(directions)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)
    _apply(params, directions, lr, weight_decay)


def _check_betas(betas) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"Invalid betas: {betas!r}; expected two numbers in [0, 1)")


def _check_adamw(h: dict) -> None:
    _check_betas(h["betas"])
    if not h["eps"] >= 0.0:
        raise ValueError(f"Invalid eps: {h['eps']!r}; expected >= 0")
    if h["arithmetic"] not in ARITHMETICS:
        raise ValueError(f"Invalid arithmetic: {h['arithmetic']!r}; choose one of {', '.join(ARITHMETICS)}")


def _check_sgd(h: dict) -> None:
    if not h["momentum"] >= 0.0:
        raise ValueError(f"Invalid momentum: {h['momentum']!r}; expected >= 0")
    if not 0.0 <= h["dampening"] <= 1.0:
        raise ValueError(f"Invalid dampening: {h['dampening']!r}; expected in [0, 1]")
    if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")


def _check_adafactor(h: dict) -> None:
    if not h["beta2_decay"] <= 0.0:
        raise ValueError(f"Invalid beta2_decay: {h['beta2_decay']!r}; expected <= 0")
    if not (len(h["eps"]) == 2 and h["eps"][0] > 0):
        raise ValueError(f"Invalid eps: {h['eps']!r}; expected (eps1 > 0, eps2)")
    if not h["clip_threshold"] > 0:
        raise ValueError(f"Invalid clip_threshold: {h['clip_threshold']!r}; expected > 0")
    if h["beta1"] is not None and not 0.0 <= h["beta1"] < 1.0:
        raise ValueError(f"Invalid beta1: {h['beta1']!r}; expected None or in [0, 1)")


def _check_lion(h: dict) -> None:
    _check_betas(h["betas"])


@dataclass(frozen=True)
class Rule:
    """An inner rule: its step function, its hyper-parameters with defaults, their validation, and the state
    entries that ``state_bits`` may store in low precision (``low_bit``; none: the rule has no quantized form)."""

    name: str
    fn: Callable[..., list[Tensor]]
    defaults: dict = field(default_factory=dict)
    check: Callable[[dict], None] = lambda h: None
    low_bit: frozenset = frozenset()

    def __call__(self, params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict, *,
                 lr: float | None = None, weight_decay: float | None = None) -> None:
        """Update ``params`` in place with the hyper-parameters of ``group`` (lr/weight_decay overridable).

        With ``group["state_bits"] < 32`` the rule runs on decodings of its ``low_bit`` moments in the dtype they
        have at 32 bits (the gradient's: float32 for a projected R), a chunk of parameters at a time (at most
        lowbit.CHUNK numbers, or one larger tensor), encoded back after."""
        lr = scalar(group["lr"] if lr is None else lr)
        weight_decay = group.get("weight_decay", 0.0) if weight_decay is None else weight_decay
        hyper = {k: group[k] for k in self.defaults}
        bits = group.get("state_bits", 32)
        if bits == 32:
            return self.fn(params, grads, states, lr=lr, weight_decay=weight_decay, **hyper)
        lowbit.step_decoded(self.fn, params, grads, states, self.low_bit, FIRST_MOMENTS, bits, lr=lr,
                            weight_decay=weight_decay, **hyper)

    def direction(self, grads: list[Tensor], states: list[dict], group: dict) -> list[Tensor]:
        """U for each gradient (not applied): the rule run on zero buffers with lr = -1."""
        buffers = [torch.zeros_like(g) for g in grads]
        self(buffers, grads, states, group, lr=-1.0, weight_decay=0.0)
        return buffers


RULES: dict[str, Rule] = {
    "adamw": Rule("adamw", adamw, {"betas": (0.9, 0.999), "eps": 1e-8, "arithmetic": "torch"}, _check_adamw,
                  frozenset({"exp_avg", "exp_avg_sq"})),
    "sgd": Rule("sgd", sgd, {"momentum": 0.9, "dampening": 0.0, "nesterov": False}, _check_sgd,
                frozenset({"momentum_buffer"})),
    # the factored second moment (row and column means, r + D numbers) stays float32
    "adafactor": Rule(
        "adafactor",
        adafactor,
        {"beta2_decay": -0.8, "eps": (1e-30, 1e-3), "clip_threshold": 1.0, "beta1": None},
        _check_adafactor,
        frozenset({"exp_avg", "exp_avg_sq"}),
    ),
    "lion": Rule("lion", lion, {"betas": (0.9, 0.99)}, _check_lion, frozenset({"exp_avg"})),
}


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise ValueError(f"Unknown rule {name!r}; choose one of {sorted(RULES)}")
    return RULES[name]
