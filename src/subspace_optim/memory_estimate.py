"""Analytic estimate of the memory of training a model (`subspace-optim memory`), from its shapes alone.

total = weights + gradients + optimizer state + projection bases + activations (+ int8's transient), every tensor
in --dtype unless --weights int8 or --state-bits say otherwise
(pure 16-bit training, as the seeds' arithmetic assumes: LLaMA-7B with Adam in BF16 = 14 + 14 + 28 + 2 GB).

Activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), per
transformer layer, in 16-bit, no recomputation, the standard convention for such estimates:
    s·b·h·34 + 5·a·s²·b  bytes
split here as  linear-layer inputs (q/k/v 2sbh, o 2sbh, MLP in 2sbh, MLP out 2·s·b·f; f = 4h gives 14sbh)
             + everything else (norms, attention internals, nonlinearity, dropout masks: 20sbh + 5as²b),
plus the output layer's fp32 log-softmax, 4·b·s·V bytes. Variants (--activations): "flash" drops the as²
terms (FlashAttention / torch SDPA keep no s x s score matrix); "checkpoint" keeps only each layer's input
(2sbh) plus one layer's activations during its recomputation. RSO replaces each linear input (width w) by
its rank-r projection, so the linear-input term becomes 2·s·b·r per projection group.

Optimizer state: two moments per trained tensor, each stored as ``lowbit.stored_bytes`` says for ``state_bits``:
at 32 bits in --dtype (the convention above; our optimizer holds a projected weight's moments in R's float32, and
state_bits=16 / basis_dtype="bfloat16" give the 16-bit counts), at 16 in bfloat16, at 8 and 4 block-wise
quantized (a code per number, a float32 scale per block, a lookup table per tensor; tensors under 4096 numbers
in --dtype), as our optimizer and torchao's AdamW8bit / AdamW4bit hold them; plus one float32 step counter per
trained tensor (AdamW's).

Weights (--weights): "dense" holds every weight in --dtype; "int8" (galore/golore only: Q-GaLore's idea, as torchao's
``Int8QuantizedTrainingLinearWeight``) holds each projected linear weight (m x n) as m·n int8 codes plus one
--dtype scale per output row, m·n + m·nbytes bytes (LLaMA-13B in bf16: 12.69 GB of linear weights + 0.66 GB of
embeddings, lm_head and norms = 13.35 GB, against 26.03 GB); the rest stays in --dtype. Its gradients are
plain --dtype tensors as before. Its forward (and backward) dequantizes the weight for each matmul,
``input @ int_data.T.to(dtype)``: one m x n --dtype temporary of the largest int8 weight is alive at a time
(``transients``). Not counted, as for dense weights: the update's own m x n temporaries in step().
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .lowbit import check_state_bits, stored_bytes
from .engine.settings import RANDOM_BASES
from .train.config import dtype_name
from .train.models import LLAMA_SIZES, MAX_POSITIONS, default_rank

ESTIMATE_OPTIMIZERS = ("adamw", "galore", "golore", "rso")
ACTIVATION_MODELS = ("full", "flash", "checkpoint")
WEIGHT_FORMATS = ("dense", "int8")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # any spelling of dtype_name


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

    def dense_tensors(self) -> list[int]:
        """Numbers in each parameter tensor outside the projected linear weights (they sum to dense_numel)."""
        h, f, L = self.hidden, self.intermediate, self.layers
        if self.kind == "llama":  # embedding, lm_head, two RMSNorms per layer, the final norm
            return [self.vocab * h] * 2 + [h] * (2 * L + 1)
        # embedding (tied to lm_head), positions; per layer q/k/v/o, MLP-in and MLP-out biases and two LayerNorms
        # (weight and bias); the final LayerNorm
        return [self.vocab * h, self.positions * h] + ([h] * 4 + [f, h] + [h] * 4) * L + [h] * 2

    def parameters(self) -> int:
        return sum(m * n for m, n in self.linear_shapes()) + self.dense_numel()


def estimate_models() -> dict[str, ArchSpec]:
    """The harness's LLaMA sizes (GaLore's configs) plus GPT-3 175B (Brown et al. 2020, Table 2.1)."""
    models = {name: ArchSpec(h, f, L, a, 32000, "llama", MAX_POSITIONS.get(name, 1024))
              for name, (h, f, L, a) in LLAMA_SIZES.items()}
    models["gpt3-175b"] = ArchSpec(12288, 4 * 12288, 96, 96, 50257, "gpt", 2048)
    return models


def activation_bytes(spec: ArchSpec, batch: int, seq: int, nbytes: int, model: str = "full",
                     rank: int | None = None) -> int:
    """Activation bytes saved for backward (formula above), scaled from 16-bit to ``nbytes`` per number."""
    s, b, h, f, a, L = seq, batch, spec.hidden, spec.intermediate, spec.heads, spec.layers
    # the inputs of q/k/v (one tensor), o, gate/up or MLP-in, down or MLP-out: 6sbh + 2sbf in 16-bit; RSO saves
    # each one's rank-r projection instead, unless the rank is not below its width (that layer stays dense)
    linear_inputs = sum(2 * s * b * (rank if rank is not None and rank < width else width) for width in (h, h, h, f))
    scores = 0 if model == "flash" else 5 * a * s * s * b
    per_layer = (linear_inputs + 20 * s * b * h + scores) * nbytes // 2
    logits = 4 * b * s * spec.vocab
    if model == "checkpoint":
        return L * s * b * h * nbytes + per_layer + logits
    return L * per_layer + logits


#: What a CPU training process holds beyond its tensors (``host=True``): Python, torch, transformers, tokenizers and
#: torchao's compiled kernels, the BBC News data. Measured by the harness's phases at llama-1b (torch 2.13, this
#: machine): runtime 265 MiB, data and tokenizer 153 MiB, held after the first step beyond weights and state
#: 103 MiB. A GPU's peak (max allocated) has none of it.
HOST_BYTES = 520 * 2**20
#: The fused loss's chunk: CPU_CHUNK_TOKENS tokens' float32 logits at a time (train/loss.py).
FUSED_CHUNK_TOKENS = 256
#: torch's linear_cross_entropy on the CPU, bf16 inputs: what its forward allocates beyond what it keeps, in units
#: of lm_head's float32 size V·h·4 (a float32 copy of the weight, the weight gradient's float32 scratch and
#: accumulator, ...): measured 4.75 at llama-350m and at llama-1b (594 and 1189 MiB), batch 1 x 256.
FUSED_FORWARD_FACTOR = 4.75
#: The float32 block a narrow-dtype write-back holds (engine.subspace.WRITE_BACK_BLOCK, precision.BLOCK), in bytes.
WRITE_BACK_BYTES = 4 << 22


def update_transient(shapes: list[tuple[int, int]], dense: list[int], rank: int | None, nbytes: int,
                     state_bits: int, int8: bool, rounding: str, upcast: bool = True) -> int:
    """Bytes alive beside the held tensors while the largest single update runs (one weight at a time, layer-wise
    or in step()): for a projected m x n weight (D = max(m, n)) G upcast to float32 for R = Pᵀ G (when --dtype is
    narrower and ``upcast``: float32 projections), R, the rule's float32 direction and, below 32 bits, its two decoded moments (r x D float32 each),
    and the float32 write-back block; for a dense tensor of n numbers, its two moments decoded to --dtype (below 32
    bits) and, when rounded stochastically or into int8, the rule's direction buffer and the write-back block."""
    low = state_bits < 32
    projected = [(m * n * 4 if nbytes < 4 and upcast else 0) + rank * max(m, n) * 4 * (2 + 2 * low)
                 + (WRITE_BACK_BYTES if nbytes < 4 or int8 else 0) for m, n in shapes] if rank else []
    exact = rounding == "stochastic" and nbytes == 2
    full = [n * nbytes * 2 * low + (n * nbytes + WRITE_BACK_BYTES if exact else 0) for n in dense]
    return max(projected + full, default=0)


def estimate(model: str | ArchSpec, optimizer: str = "adamw", *, rank: int | None = None, batch: int = 1,
             seq: int = 2048, dtype: str = "bf16", layerwise: bool = False, activations: str = "full",
             state_bits: int = 32, random_basis: str = "keep", weights: str = "dense", fused_loss: bool = False,
             weight_rounding: str = "nearest", projection_dtype: str = "float32", host: bool = False) -> dict:
    """Bytes of each part of training ``model`` with Adam-type ``optimizer``; keys as in ``format_estimate``.

    adamw: 2 moments per parameter. galore/golore: 2·r·max(m, n) moments and an r x min(m, n) basis per
    projected (linear) weight, 2 moments per dense parameter. rso: frozen weights; gradients and moments only for
    each B (out x r) and the dense parameters. layerwise: each gradient is freed inside backward, so at most the
    largest one is alive.
    random_basis (golore): "keep" holds every basis between steps; "regenerate" draws each from its seed when
    its weight is projected and drops it after its update. Layer-wise that is one basis at a time, during
    backward (the largest counts); in standard mode step() draws every basis before it updates any weight, so
    all of them are held at once, but only inside step(), after backward has freed the activations: the total
    counts the larger of the two (``bases_apart``). A refresh's transient second basis (the old one, for the
    moments' transport) is not counted, as keep's new one is not.
    rank: default ``default_rank(hidden)`` (returned as ``rank``); a linear weight that it does not reduce is
    counted at full rank (``full_rank_weights`` of them), as the optimizer and ``apply_rso`` train it.
    state_bits: how each moment tensor is stored (module docstring); ``counters``: the step counters' bytes.
    weights: "dense" or "int8" (galore/golore: each projected weight as int8 codes + a scale per row,
    ``int8_weights`` of them, and its largest dequantized --dtype copy; module docstring).
    fused_loss: the output layer's float32 logits (4·b·s·V) are replaced by what torch's chunked
    linear_cross_entropy keeps from forward to backward, lm_head's weight gradient (V·h) and the hidden states'
    (b·s·h) in --dtype, plus one chunk's float32 logits; its forward's transients (FUSED_FORWARD_FACTOR · V·h·4
    bytes on the CPU, one unit less for float32 inputs, which need no float32 copy) join ``transients``. It saves
    memory only when a micro-batch has many more tokens than the model has hidden units.
    ``transients``: the largest of the int8 dequantization and the largest single update's temporaries
    (``update_transient``; --weight-rounding stochastic adds a dense tensor's direction buffer).
    host: add ``HOST_BYTES``, what a CPU process holds beyond its tensors (``host``), to compare with a CPU run's
    peak RSS; a GPU's max-allocated peak has none of it.
    """
    spec = estimate_models()[model] if isinstance(model, str) else model
    if optimizer not in ESTIMATE_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {ESTIMATE_OPTIMIZERS}")
    if activations not in ACTIVATION_MODELS:
        raise ValueError(f"unknown activation model {activations!r}; expected one of {ACTIVATION_MODELS}")
    if dtype_name(dtype) not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)} (or fp32, bf16, fp16)")
    check_state_bits(state_bits)
    if random_basis not in RANDOM_BASES:
        raise ValueError(f"unknown random_basis {random_basis!r}; expected one of {RANDOM_BASES}")
    if random_basis != "keep" and optimizer != "golore":
        raise ValueError(f"random_basis {random_basis!r}: only golore's bases are random ({optimizer!r} has none "
                         "to regenerate)")
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weights {weights!r}; expected one of {WEIGHT_FORMATS}")
    if weights == "int8" and optimizer not in ("galore", "golore"):
        raise ValueError(f"int8 weights: only galore and golore (projected linear weights) hold them, not "
                         f"{optimizer!r}")
    nbytes = DTYPE_BYTES[dtype_name(dtype)]
    shapes, dense = spec.linear_shapes(), spec.dense_numel()
    rank = None if optimizer == "adamw" else default_rank(spec.hidden) if rank is None else rank
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    # The library's rule: a weight whose reduced side (its smaller one; RSO's input) is not wider than the rank is
    # trained at full rank, as a dense parameter.
    reduced = (lambda out, inp: inp) if optimizer == "rso" else min
    low = [shape for shape in shapes if rank is not None and rank < reduced(*shape)]
    narrow = [m * n for m, n in shapes if rank is None or rank >= reduced(m, n)]
    params = spec.parameters()
    if optimizer == "rso":
        params += sum(out * rank for out, _ in low)  # the B's are parameters too
        trainable = [out * rank for out, _ in low] + narrow + [dense]
        stepped = [out * rank for out, _ in low] + narrow
    else:
        trainable = [m * n for m, n in shapes] + [dense]
        stepped = [rank * max(m, n) for m, n in low] + narrow if optimizer in ("galore", "golore") else trainable[:-1]
    stepped += spec.dense_tensors()  # the numbers of each moment tensor the optimizer holds (two per tensor)
    # layer-wise: one gradient alive at a time, at most the largest tensor (a linear weight, its B, or the embedding)
    gradients = max(trainable[:-1] + [spec.vocab * spec.hidden]) if layerwise else sum(trainable)
    sizes = [rank * min(m, n) for m, n in low] if optimizer in ("galore", "golore") else []
    regenerate = random_basis == "regenerate"
    bases = max(sizes, default=0) if regenerate and layerwise else sum(sizes)
    apart = regenerate and not layerwise  # held only inside step(), never with the activations
    moments = sum(2 * stored_bytes(n, state_bits, nbytes) for n in stepped)
    act = activation_bytes(spec, batch, seq, nbytes, activations, rank if optimizer == "rso" else None)
    if fused_loss:
        act += (spec.vocab * spec.hidden + batch * seq * spec.hidden) * nbytes - 4 * batch * seq * spec.vocab
        act += 4 * min(batch * seq, FUSED_CHUNK_TOKENS) * spec.vocab
    # int8: each projected weight's m·n numbers at 1 byte instead of nbytes, plus m scales in --dtype
    int8 = low if weights == "int8" else []
    weight_bytes = params * nbytes - sum(m * n * (nbytes - 1) - m * nbytes for m, n in int8)
    dequantized = max((m * n for m, n in int8), default=0) * nbytes
    # measured on the CPU; on a GPU torch picks its "compact" policy (no float32 weight-gradient scratch): counted
    # there as its float32 weight-gradient accumulator alone, an assumption we have not measured
    factor = (FUSED_FORWARD_FACTOR - (nbytes == 4)) if host else 1
    fused = int(factor * spec.vocab * spec.hidden * 4) if fused_loss else 0
    update = update_transient(low if optimizer in ("galore", "golore") else [], spec.dense_tensors()
                              + [n for n in narrow] + ([m * n for m, n in shapes] if optimizer == "adamw" else []),
                              rank if optimizer in ("galore", "golore") else None, nbytes, state_bits, bool(int8),
                              weight_rounding, upcast=dtype_name(projection_dtype) == "float32")
    parts = {"weights": weight_bytes, "gradients": gradients * nbytes, "optimizer_state": moments,
             "counters": 4 * len(stepped), "projection": bases * nbytes, "activations": act,
             "transients": max(dequantized, update, fused), "host": HOST_BYTES if host else 0}
    # The peak: what is held throughout, plus the largest of what each phase adds. Forward: the activations and
    # its transients (the fused loss's, an int8 weight dequantized). Backward: the activations, the gradients
    # and, layer-wise, the update (its basis and temporaries). Standard mode's step(): the gradients, regenerated
    # bases (``apart``) and one update's temporaries.
    held = parts["weights"] + moments + parts["counters"] + parts["host"] + (0 if regenerate else parts["projection"])
    drawn = parts["projection"] if regenerate else 0
    # the fused loss's transients come at the end of forward, when the checkpointed layers' inputs are small and
    # its own kept gradients are not made yet: the larger of the two, not their sum
    during = {"forward": max(act, fused) + dequantized,
              "backward": act + parts["gradients"] + dequantized + (drawn + update if layerwise else 0),
              "step": 0 if layerwise else parts["gradients"] + drawn + update}
    total = held + max(during.values())
    return {**parts, "total": total, "parameters": params, "rank": rank,
            "full_rank_weights": len(narrow) if rank is not None else 0, "bases_apart": apart, "fused_loss": fused_loss,
            "int8_weights": len(int8)}


BUDGET_UNITS = {"mb": 1e6, "gb": 1e9, "tb": 1e12, "mib": 2**20, "gib": 2**30, "tib": 2**40,
                "m": 2**20, "g": 2**30, "t": 2**40}  # a bare letter is binary, as Slurm, docker and ls -h read it


def parse_budget(text: str) -> float:
    """Bytes of a memory budget: a number and a unit, e.g. 24GB (24e9), 22.5GB, 24GiB (24·2^30), 16G (16 GiB)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*", text, re.IGNORECASE)
    if not found or found[2].lower() not in BUDGET_UNITS or float(found[1]) <= 0:
        raise ValueError(f"bad memory budget {text!r}: expected a positive number and a unit, e.g. 24GB, 22.5GB, "
                         "24GiB or 16G (GiB)")
    return float(found[1]) * BUDGET_UNITS[found[2].lower()]


def fit_ladder(model: str | ArchSpec, *, batch: int = 1, seq: int = 2048, dtype: str = "bf16") -> list[dict]:
    """GoLore settings, as ``estimate``'s keyword arguments, in the order of the quality they give up, least
    first; the first one within a budget is the one to use.

    First the knobs that change no update, in the order of the compute they add: layer-wise updates (the same
    step, taken inside backward: none), regenerated random bases (the same bases, drawn again from their seeds:
    a QR per weight per step), activation checkpointing (the same activations, recomputed: about one more
    forward pass). Then the lossy ones, the cheapest in quality first, as our pretraining study measured them
    (docs/results): 8-bit moments (GoLore's perplexity 1.000x 32-bit's), then a lower rank at 8 bits (default,
    /2, /4: GaLore's rank ablation at r = 32-128 was within the seeds' spread, and the GaLore paper's loses a
    little per halving), then 4-bit moments (1.087x) at each rank, then the same with int8 weights (rounding in
    every weight, every step)."""
    spec = estimate_models()[model] if isinstance(model, str) else model
    top = default_rank(spec.hidden)
    ranks = sorted({max(1, top >> i) for i in range(3)}, reverse=True)
    plain = {"rank": top, "state_bits": 16, "weights": "dense", "activations": "flash", "layerwise": False,
             "random_basis": "keep"}  # flash: torch SDPA keeps no s x s scores
    free = [plain, {**plain, "layerwise": True}]
    free += [{**free[-1], "random_basis": "regenerate"}]
    free += [{**free[-1], "activations": "checkpoint"}]
    levels = [(16, top)] + [(bits, r) for bits in (8, 4) for r in ranks]
    lossy = [{**free[-1], "rank": r, "state_bits": bits, "weights": w} for w in WEIGHT_FORMATS for bits, r in levels]
    return free + lossy[1:]  # lossy[0] is free[-1]


def format_estimate(est: dict, title: str) -> str:
    int8 = est.get("int8_weights")
    rows = [("weights (int8, row scales)" if int8 else "weights", "weights"), ("gradients", "gradients"),
            ("optimizer state (moments)", "optimizer_state"), ("step counters", "counters"),
            ("projection bases", "projection"), ("activations", "activations")]
    rows += [("transients (one update" + (", int8 dequant." if int8 else "") + ")", "transients")]
    rows += [("host process (CPU)", "host")] if est.get("host") else []
    rows += [("total", "total")]
    lines = [title]
    lines += [f"  {label:<26} {est[key] / 1e9:10.2f} GB" for label, key in rows]
    if est.get("bases_apart"):
        lines.append("  (the bases are drawn inside step(), after backward has freed the activations: the total "
                     "counts the larger of the two)")
    return "\n".join(lines)
