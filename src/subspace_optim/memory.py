"""Measured memory of a training run: weights, gradients, optimizer state, activations and the process peak."""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


def tensor_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] = frozenset()) -> int:
    """Bytes of the storages behind ``tensors``, each storage once (views and tied weights share one)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this process's shard
            storage = t.untyped_storage()
            if storage.data_ptr() not in exclude:
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def storage_ids(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {(t.to_local() if hasattr(t, "to_local") else t).untyped_storage().data_ptr() for t in tensors}


def weight_bytes(model: nn.Module) -> int:
    return tensor_bytes(model.parameters())


def gradient_bytes(model: nn.Module) -> int:
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def state_tensors(value):
    """Tensors in a state value: tensors, dicts of them, and objects holding them (galore-torch keeps its
    projection matrix in a Python object in the state)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from state_tensors(v)
    elif hasattr(value, "__dict__"):
        yield from (v for v in vars(value).values() if isinstance(v, torch.Tensor))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer's own count when it has one (ours: ``state_bytes()``), else every tensor in its state."""
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    return tensor_bytes(t for state in optimizer.state.values() for t in state_tensors(state))


class SavedActivations:
    """Context manager counting the bytes autograd saves for backward (activations), each storage once.

    Parameters saved by e.g. linear layers are weights, not activations, so their storages are excluded.
    ``add_held(loss)`` after the forward adds what custom autograd Functions hold outside the hooks' view.
    """

    def __init__(self, model: nn.Module):
        self._params = storage_ids(model.parameters())
        self._saved: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._params:
                self._saved[storage.data_ptr()] = storage.nbytes()
        return t

    def add_held(self, output: torch.Tensor) -> None:
        """Also count the tensors that custom autograd Functions in ``output``'s graph keep as plain ctx
        attributes (``ctx.t = t``): they live until backward too, but saved_tensors_hooks never see them. torch's
        chunked ``linear_cross_entropy`` keeps its gradients, computed in forward, that way (tokens×hidden and
        vocab×hidden)."""
        stack, seen = [output.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for value in getattr(node, "__dict__", {}).values():
                if isinstance(value, torch.Tensor):
                    self._pack(value)
            stack.extend(next_node for next_node, _ in node.next_functions)

    @property
    def bytes(self) -> int:
        return sum(self._saved.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated memory on a CUDA device, else the process's peak resident set size (RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_report(memory: dict) -> str:
    """The memory table printed at the end of a run (``memory`` as stored in summary.json)."""
    peak_kind = "GPU max allocated" if memory.get("device") == "cuda" else "process peak RSS"
    rows = [
        ("weights", memory["weights_bytes"]),
        ("gradients", memory["gradients_bytes"]),
        ("optimizer state", memory["optimizer_state_bytes"]),
        ("activations (saved for backward, one micro-batch)", memory["activations_bytes"]),
        (f"peak ({peak_kind})", memory["peak_memory_bytes"]),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["memory (measured):"] + [f"  {name:<{width}}  {human(value):>10}" for name, value in rows])


# --- Analytic estimate (`subspace-optim memory`): what training a model needs, from its shapes alone ---------
#
# total = weights + gradients + optimizer state + projection bases + activations, every tensor in --dtype
# (pure 16-bit training, as the seeds' arithmetic assumes: LLaMA-7B with Adam in BF16 = 14 + 14 + 28 + 2 GB).
#
# Activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), per
# transformer layer, in 16-bit, no recomputation, the standard convention for such estimates:
#     s·b·h·34 + 5·a·s²·b  bytes
# split here as  linear-layer inputs (q/k/v 2sbh, o 2sbh, MLP in 2sbh, MLP out 2·s·b·f; f = 4h gives 14sbh)
#              + everything else (norms, attention internals, nonlinearity, dropout masks: 20sbh + 5as²b),
# plus the output layer's fp32 log-softmax, 4·b·s·V bytes. Variants (--activations): "flash" drops the as²
# terms (FlashAttention / torch SDPA keep no s x s score matrix); "checkpoint" keeps only each layer's input
# (2sbh) plus one layer's activations during its recomputation. RSO replaces each linear input (width w) by
# its rank-r projection, so the linear-input term becomes 2·s·b·r per projection group.

ESTIMATE_OPTIMIZERS = ("adamw", "galore", "golore", "rso")
ACTIVATION_MODELS = ("full", "flash", "checkpoint")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2}


@dataclass(frozen=True)
class ArchSpec:
    """Shapes of a decoder-only transformer: enough to count every parameter and activation."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    kind: str = "llama"  # llama: SwiGLU MLP, RMSNorm, no biases, untied lm_head; gpt: GeLU MLP, LayerNorm and
    # biases, learned positions, lm_head tied to the embedding (GPT-3)
    positions: int = 2048

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of every linear weight inside the layers: what GaLore/GoLore project and RSO replaces."""
        h, f = self.hidden, self.intermediate
        mlp = [(f, h), (f, h), (h, f)] if self.kind == "llama" else [(f, h), (h, f)]
        return ([(h, h)] * 4 + mlp) * self.layers

    def dense_numel(self) -> int:
        """Every parameter outside the projected linear weights: embeddings, lm_head, norms, biases."""
        h, f, L = self.hidden, self.intermediate, self.layers
        if self.kind == "llama":
            return 2 * self.vocab * h + L * 2 * h + h
        biases = L * (4 * h + f + h)
        norms = L * 4 * h + 2 * h
        return self.vocab * h + self.positions * h + biases + norms

    def parameters(self) -> int:
        return sum(m * n for m, n in self.linear_shapes()) + self.dense_numel()


def estimate_models() -> dict[str, ArchSpec]:
    """The harness's LLaMA sizes (GaLore's configs) plus GPT-3 175B (Brown et al. 2020, Table 2.1)."""
    from .train.models import LLAMA_SIZES, MAX_POSITIONS

    models = {name: ArchSpec(h, f, L, a, 32000, "llama", MAX_POSITIONS.get(name, 1024))
              for name, (h, f, L, a) in LLAMA_SIZES.items()}
    models["gpt3-175b"] = ArchSpec(12288, 4 * 12288, 96, 96, 50257, "gpt", 2048)
    return models


def activation_bytes(spec: ArchSpec, batch: int, seq: int, nbytes: int, model: str = "full",
                     rank: int | None = None) -> int:
    """Activation bytes saved for backward (formula above), scaled from 16-bit to ``nbytes`` per number."""
    s, b, h, f, a, L = seq, batch, spec.hidden, spec.intermediate, spec.heads, spec.layers
    if rank is None:
        linear_inputs = 6 * s * b * h + 2 * s * b * f
    else:  # RSO: four rank-r projections (q/k/v share one, o, gate/up or MLP-in, down or MLP-out)
        linear_inputs = 4 * 2 * s * b * rank
    scores = 0 if model == "flash" else 5 * a * s * s * b
    per_layer = (linear_inputs + 20 * s * b * h + scores) * nbytes // 2
    logits = 4 * b * s * spec.vocab
    if model == "checkpoint":
        return L * s * b * h * nbytes + per_layer + logits
    return L * per_layer + logits


def estimate(model: str | ArchSpec, optimizer: str = "adamw", *, rank: int | None = None, batch: int = 1,
             seq: int = 2048, dtype: str = "bf16", layerwise: bool = False, activations: str = "full") -> dict:
    """Bytes of each part of training ``model`` with Adam-type ``optimizer``; keys as in ``format_estimate``.

    adamw: 2 moments per parameter. galore/golore: 2·r·max(m, n) moments and an r x min(m, n) basis per
    projected (linear) weight, 2 moments per dense parameter (GoLore's basis can be regenerated from a seed,
    but is held while training). rso: frozen weights; gradients and moments only for each B (out x r) and the
    dense parameters. layerwise: each gradient is freed inside backward, so at most the largest one is alive.
    """
    spec = estimate_models()[model] if isinstance(model, str) else model
    if optimizer not in ESTIMATE_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {ESTIMATE_OPTIMIZERS}")
    if activations not in ACTIVATION_MODELS:
        raise ValueError(f"unknown activation model {activations!r}; expected one of {ACTIVATION_MODELS}")
    nbytes = DTYPE_BYTES[dtype]
    shapes, dense = spec.linear_shapes(), spec.dense_numel()
    if optimizer != "adamw":
        rank = rank or spec.hidden // 4
        if rank > min(min(shape) for shape in shapes):
            raise ValueError(f"rank {rank} is larger than the smallest projected dimension")
    else:
        rank = None
    weights = spec.parameters()
    if optimizer == "rso":
        weights += sum(out * rank for out, _ in shapes)  # the B's are parameters too
        trainable = [out * rank for out, _ in shapes] + [dense]
    else:
        trainable = [m * n for m, n in shapes] + [dense]
    # layer-wise: one gradient alive at a time, at most the largest tensor (a linear weight, its B, or the embedding)
    gradients = max(trainable[:-1] + [spec.vocab * spec.hidden]) if layerwise else sum(trainable)
    if optimizer in ("galore", "golore"):
        moments = sum(2 * rank * max(m, n) for m, n in shapes) + 2 * dense
        bases = sum(rank * min(m, n) for m, n in shapes)
    else:
        moments, bases = 2 * sum(trainable), 0
    act = activation_bytes(spec, batch, seq, nbytes, activations, rank if optimizer == "rso" else None)
    parts = {"weights": weights * nbytes, "gradients": gradients * nbytes, "optimizer_state": moments * nbytes,
             "projection": bases * nbytes, "activations": act}
    return {**parts, "total": sum(parts.values()), "parameters": weights}


def format_estimate(est: dict, title: str) -> str:
    rows = [("weights", "weights"), ("gradients", "gradients"), ("optimizer state (moments)", "optimizer_state"),
            ("projection bases", "projection"), ("activations", "activations"), ("total", "total")]
    lines = [title]
    lines += [f"  {label:<26} {est[key] / 1e9:10.2f} GB" for label, key in rows]
    return "\n".join(lines)


def add_estimate_arguments(parser) -> None:
    parser.add_argument("--model", default="llama-7b", help="named model: " + ", ".join(estimate_models())
                        + " (default: llama-7b)")
    parser.add_argument("--optimizer", default="adamw", choices=ESTIMATE_OPTIMIZERS, help="adamw (full rank), "
                        "galore, golore (projected linear weights) or rso (default: adamw)")
    parser.add_argument("--rank", type=int, default=None, help="projection rank (default: hidden // 4)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default: 1)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default: 2048)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="bytes per number of every tensor (default: bf16)")
    parser.add_argument("--layerwise", action="store_true", help="per-layer updates inside backward: "
                        "gradients are freed as they are used")
    parser.add_argument("--activations", default="full", choices=ACTIVATION_MODELS, help="activation model: "
                        "full (Korthikanti et al. 2022, no recomputation), flash (no s x s scores), checkpoint "
                        "(layer inputs + one layer) (default: full)")


def estimate_from_args(args) -> str:
    """The `subspace-optim memory` output for parsed arguments (errors as UsageError)."""
    from .train.config import UsageError

    if args.model not in estimate_models():
        raise UsageError(f"unknown model {args.model!r}; expected one of {', '.join(estimate_models())}")
    try:
        est = estimate(args.model, args.optimizer, rank=args.rank, batch=args.batch, seq=args.seq,
                       dtype=args.dtype, layerwise=args.layerwise, activations=args.activations)
    except ValueError as err:
        raise UsageError(str(err)) from None
    rank = f", rank {args.rank or estimate_models()[args.model].hidden // 4}" if args.optimizer != "adamw" else ""
    title = (f"{args.model} ({est['parameters'] / 1e9:.2f}B parameters), {args.optimizer}{rank}"
             f"{', layer-wise' if args.layerwise else ''}, batch {args.batch} x {args.seq} tokens, {args.dtype}, "
             f"activations: {args.activations}")
    return format_estimate(est, title)
