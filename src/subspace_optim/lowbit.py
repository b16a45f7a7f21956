"""Low precision where it is safe: how moments are stored (``state_bits``), and the dtypes of bases and projections.

``state_bits`` picks how a rule's moments (``Rule.low_bit``: Adam's m and v, SGD's and Lion's momentum) are held
between steps:

- 32: as torch.optim holds them (the parameter's dtype);
- 16: bfloat16, rounded to nearest (deterministic, so resumed runs stay bitwise);
- 8 and 4: block-wise quantized, as torchao's low-bit optimizers (Dettmers et al. 2022; Li et al. 2023):
  torchao's ``OptimState8bit`` / ``OptimState4bit`` tensors hold one code per number (4-bit: two to a byte), one
  float32 absmax scale per block of 256 (8-bit) or 128 (4-bit) numbers, and their lookup table (qmap). Signed
  dynamic-exponent maps for first moments; unsigned maps for second moments, which therefore stay >= 0 (the 4-bit
  one has no zero, so a 1/sqrt(v) never meets v = 0). As in bitsandbytes and torchao, a tensor of fewer than
  4096 numbers, or not a whole number of blocks, is kept as at 32 bits: its scales and table would cost more than
  they save. ``stored_bytes`` is the exact count (the memory estimator uses it).

A rule sees its moments as it would at 32 bits (float32 for a projected weight's R; a dense parameter's dtype):
the optimizer decodes a chunk of parameters' moments, runs the unchanged rule (torch's fused AdamW kernel, ...)
on them and encodes them back (``Rule.__call__``), so the rules are written once and a step holds at most one
chunk's moments decoded. A change of basis transports moments the same way (decode, M <- T M, encode).

Why our own kernels around torchao's tensors: torchao's ``copy_`` into them runs its quantizer eagerly (3.2 s for
a 32000 x 512 moment on this project's CPU) unless the caller is compiled, and compiled graphs that take its
tensor subclasses recompile for every shape and are not cached by inductor across processes. The same math
(torchao's ``quantize_8bit_with_qmap`` / ``quantize_4bit_with_qmap`` / ``dequant_with_qmap``, 4-bit packing as in
``OptimState4bit.copy_``) compiled once on (blocks x block) views of the codes, scales and table, with the
number of blocks dynamic, serves every shape with one graph per bit width and direction (4 graphs in all, never
recompiled at a refresh): 0.27 s to encode that moment on one core, 12x faster than eager (the binary search
over the 256-entry map, 8 dependent table lookups per number, is what quantization costs on a CPU). torchao's
tensors remain the containers: DTensor / FSDP2 / DCP aware,
``torch.load(weights_only=True)`` safe once torchao is imported (building an optimizer with state_bits 8 or 4
imports it).
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor

from .distributed import is_dtensor, local

STATE_BITS = (32, 16, 8, 4)
#: numbers per scale (torchao's defaults: 256 for 8-bit, 128 for 4-bit)
BLOCK = {8: 256, 4: 128}
#: entries of each quantized tensor's own lookup table (float32)
QMAP_SIZE = {8: 256, 4: 16}
#: smaller tensors are not quantized (bitsandbytes' and torchao's threshold)
MIN_QUANTIZED = 4096
#: float32 numbers decoded at once while a rule steps (a single larger tensor is decoded whole)
CHUNK = 1 << 22
#: dtypes a basis may be held in / projections may run in
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", torch.float32: "float32", torch.bfloat16: "bfloat16"}
#: torch.compile the quantization kernels (off: eager, e.g. on meta tensors or where no compiler exists)
COMPILE = True


def check_state_bits(bits) -> None:
    if isinstance(bits, bool) or bits not in STATE_BITS:
        raise ValueError(f"Invalid state_bits: {bits!r}; choose one of {list(STATE_BITS)}")


def dtype_of(name: str, value) -> torch.dtype:
    """``float32`` / ``bfloat16`` (or fp32 / bf16, or the torch dtype) as a torch dtype; ValueError otherwise."""
    key = _DTYPE_NAMES.get(value, value) if isinstance(value, (str, torch.dtype)) else None
    if key not in DTYPES:
        raise ValueError(f"Invalid {name}: {value!r}; choose one of {list(DTYPES)}")
    return DTYPES[key]


@functools.cache
def torchao_states() -> dict[int, type]:
    """{8: OptimState8bit, 4: OptimState4bit}; importing them also lets torch.load(weights_only=True) read them.

    torchao's tensors implement no ``aten.clone``, which ``copy.deepcopy`` (of an optimizer, as torch.optim's
    contract allows) needs: it is registered here, as a copy of codes, scales and table."""
    try:
        from torchao.optim.subclass_4bit import OptimState4bit
        from torchao.optim.subclass_8bit import OptimState8bit
    except ImportError as err:
        raise ImportError(f"state_bits 8 and 4 need torchao ({err}): pip install 'subspace_optim[lowbit]'") from None
    for cls in (OptimState8bit, OptimState4bit):
        cls.implements(torch.ops.aten.clone.default)(_clone)
    return {8: OptimState8bit, 4: OptimState4bit}


def _clone(func, types, args, kwargs):
    return _rebuilt(args[0], lambda t: t.clone())


# ------------------------------------------------------------------------------------------- sizes
def quantizes(numel: int, bits: int) -> bool:
    """Whether a moment of ``numel`` numbers is quantized at ``bits`` (else kept as at 32 bits)."""
    return bits in BLOCK and numel >= MIN_QUANTIZED and numel % BLOCK[bits] == 0


def stored_bytes(numel: int, bits: int, full: int = 4) -> int:
    """Bytes of one stored moment of ``numel`` numbers (``full``: bytes per number at 32 bits, the parameter's)."""
    if bits == 16:
        return 2 * numel
    if not quantizes(numel, bits):
        return full * numel
    return numel * bits // 8 + 4 * (numel // BLOCK[bits]) + 4 * QMAP_SIZE[bits]


def bits_of(t: Tensor) -> int:
    """How a stored moment is held: 8 or 4 (quantized), 16 (bfloat16), else 32."""
    t = local(t)
    for bits, cls in _loaded_states().items():
        if isinstance(t, cls):
            return bits
    return 16 if t.dtype == torch.bfloat16 else 32


def is_quantized(t) -> bool:
    return isinstance(t, Tensor) and bits_of(t) in BLOCK


def _loaded_states() -> dict[int, type]:
    """torchao's classes if torchao's optimizer states are imported (a state at 32/16 bits never imports it)."""
    return torchao_states() if "torchao.optim.subclass_8bit" in sys.modules else {}


# ------------------------------------------------------------------------------------------- kernels
def _quantize(src: Tensor, codes: Tensor, scale: Tensor, qmap: Tensor, four_bit: bool) -> None:
    """Encode ``src`` (blocks x block, any float dtype) in place: absmax scale per block, nearest code of
    src / scale, computed in float32 (inside the compiled kernel: no float32 copy of a bf16 moment exists)."""
    from torchao.optim.quant_utils import quantize_4bit_with_qmap, quantize_8bit_with_qmap

    src = src.float()
    absmax = src.abs().amax(-1).clamp_min(1e-12)  # torchao's scale_tensor, per row of blocks
    scaled = src / absmax[:, None]
    if four_bit:
        q = quantize_4bit_with_qmap(scaled, qmap)
        q = (q[:, ::2] << 4) | q[:, 1::2]  # two codes to a byte, as OptimState4bit packs them
    else:
        q = quantize_8bit_with_qmap(scaled, qmap)
    codes.copy_(q)
    scale.copy_(absmax)


def _dequantize(codes: Tensor, scale: Tensor, qmap: Tensor, four_bit: bool, dtype: torch.dtype) -> Tensor:
    """The float32 values, rounded to ``dtype`` inside the kernel (no float32 copy of a bf16 moment)."""
    if four_bit:
        codes = torch.stack([codes >> 4, codes & 0b1111], dim=-1).view(codes.shape[0], -1)
    return (qmap[codes.int()] * scale[:, None]).to(dtype)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, fullgraph=True)


def _run(fn, blocks: list[Tensor], *rest):
    """Run a kernel on views whose first axis (the block count) is dynamic: one graph for every shape."""
    if not COMPILE or blocks[0].device.type == "meta":
        return fn(*blocks, *rest)
    for t in blocks:
        torch._dynamo.mark_dynamic(t, 0)
    with torch.no_grad():
        return _compiled(fn)(*blocks, *rest)


def _views(q: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(codes as blocks x bytes-per-block, scales) of a torchao state tensor."""
    return q.codes.view(q.scale.shape[0], -1), q.scale


# ------------------------------------------------------------------------------------------- encode / decode
def _rewrap(like: Tensor, value: Tensor) -> Tensor:
    """``value`` (a local tensor) as a DTensor placed like ``like``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def decode(stored: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A stored moment in ``dtype`` (a DTensor stays one); one already in ``dtype`` is returned as it is."""
    if is_dtensor(stored):
        return _rewrap(stored, decode(stored.to_local(), dtype))
    bits = bits_of(stored)
    if bits in BLOCK:
        codes, scale = _views(stored, bits)
        return _run(_dequantize, [codes, scale], stored.qmap, bits == 4, dtype).view(stored.shape)
    return stored.to(dtype)


def store_(stored: Tensor, value: Tensor) -> None:
    """Write ``value`` into the stored moment in its own form (quantized, bfloat16 rounded to nearest, ...)."""
    if is_dtensor(stored):
        return store_(stored.to_local(), local(value))
    bits = bits_of(stored)
    if bits in BLOCK:
        codes, scale = _views(stored, bits)
        src = value.contiguous().view(scale.shape[0], -1)
        _run(_quantize, [src, codes, scale], stored.qmap, bits == 4)
    elif stored is not value:
        stored.copy_(value)


def encode(value: Tensor, bits: int, signed: bool) -> Tensor:
    """A new stored moment holding ``value`` at ``bits`` (``signed``: a first moment; else a second, >= 0)."""
    if is_dtensor(value):
        return _rewrap(value, encode(value.to_local(), bits, signed))
    if bits == 16:
        return value.to(torch.bfloat16)
    if not quantizes(value.numel(), bits):
        return value
    out = torchao_states()[bits].zeros(value.shape, signed, BLOCK[bits], value.device, dtype=torch.float32)
    store_(out, value)
    return out


def convert(stored: Tensor, bits: int, signed: bool, dtype: torch.dtype) -> Tensor | None:
    """``stored`` re-encoded for ``bits`` (``dtype``: the parameter's, what 32 bits means), or None if it already
    is: a checkpoint saved at another state_bits loads by conversion."""
    numel = local(stored).numel()
    target = bits if bits == 16 or quantizes(numel, bits) else 32
    held = bits_of(stored)
    if target == 32 and held not in BLOCK and stored.dtype == dtype or target != 32 and held == target:
        return None
    return encode(decode(stored, dtype if target == 32 else torch.float32), target, signed)


def put_back_(now: Tensor, old: Tensor, keep: Tensor) -> None:
    """now <- old where ``keep`` (a 0-d bool tensor), on the device: a quantized tensor's codes and scales alike
    (a guarded layer-wise update that turned out non-finite is undone this way, bit for bit)."""
    now, old = local(now), local(old)
    if is_quantized(now):
        for name in ("codes", "scale"):
            put_back_(getattr(now, name), getattr(old, name), keep)
    else:
        now.copy_(torch.where(keep, old, now))


def moved_to(t: Tensor, device) -> Tensor:
    """A loaded state tensor on ``device``, in its saved form (quantized ones keep their class): the tensor itself
    where it is there already, as torch.optim's load_state_dict keeps a loaded tensor, so that loading never
    holds the optimizer state twice (3.6 GiB at LLaMA-7B, rank 1024, 8 bits)."""
    if is_dtensor(t) or not is_quantized(t):
        return t.to(device=device)
    return _rebuilt(t, lambda inner: inner.to(device=device))


def _rebuilt(t: Tensor, fn) -> Tensor:
    """A torchao state tensor of the same class and appearance with ``fn`` applied to its inner tensors."""
    names, meta = t.__tensor_flatten__()
    return type(t).__tensor_unflatten__({name: fn(getattr(t, name)) for name in names}, meta, None, None)


def chunks(sizes: list[int]) -> list[list[int]]:
    """Indices grouped so that each group holds at most CHUNK numbers (or one larger tensor)."""
    out, total = [[]], 0
    for i, n in enumerate(sizes):
        if out[-1] and total + n > CHUNK:
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return [c for c in out if c]


def transform_(stored: Tensor, fn, dtype: torch.dtype) -> None:
    """stored <- fn(stored), computed in ``dtype`` on the decoding and stored back in its own form (a change of
    basis carries a moment this way: M <- T M)."""
    store_(stored, fn(decode(stored, dtype)))


def step_decoded(fn, params: list[Tensor], grads: list[Tensor], states: list[dict], held: frozenset,
                 signed: frozenset, bits: int, **hyper) -> None:
    """Run the rule ``fn`` (pure math on full-precision moments) on decodings of the ``held`` entries of
    ``states``, in the dtype each has at 32 bits (the gradient's), a chunk of parameters at a time (at most CHUNK
    numbers, or one larger tensor), and store them back; an entry the step creates is encoded at ``bits``
    (``signed``: the first moments' keys)."""
    for chunk in chunks([g.numel() for g in grads]):
        views = [{k: decode(v, grads[i].dtype) if k in held else v for k, v in states[i].items()} for i in chunk]
        fn([params[i] for i in chunk], [grads[i] for i in chunk], views, **hyper)
        for i, view in zip(chunk, views):
            state = states[i]
            for k, v in view.items():
                if k not in held:
                    state[k] = v
                elif k in state:
                    store_(state[k], v)
                else:  # created by this step
                    state[k] = encode(v, bits, signed=k in signed)
