"""Measured memory of a training run: weights, gradients, optimizer state, activations and the process peak.

The optimizer counts its own state with these helpers, so this module imports nothing but torch; the analytic
estimate of a model that is never built (`subspace-optim memory`) is ``memory_estimate``."""

from __future__ import annotations

import ctypes
import resource
import sys
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn


def leaves(t: torch.Tensor):
    """The plain tensors that hold ``t``: itself, a DTensor's local shard, or the inner tensors of a wrapper
    subclass (torchao's int8 weights: codes and row scales; its quantized optimizer states)."""
    if hasattr(t, "to_local"):  # a DTensor: this process's shard (its flatten names its mesh too)
        yield from leaves(t.to_local())
        return
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None:
        for name in flatten()[0]:
            yield from leaves(getattr(t, name))
    else:
        yield t


def tensor_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] = frozenset()) -> int:
    """Bytes of the storages behind ``tensors``, each storage once (views and tied weights share one)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            for leaf in leaves(t):
                storage = leaf.untyped_storage()
                if storage.data_ptr() not in exclude:
                    seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def storage_ids(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {leaf.untyped_storage().data_ptr() for t in tensors for leaf in leaves(t)}


def weight_bytes(model: nn.Module) -> int:
    return tensor_bytes(model.parameters())


def gradient_bytes(model: nn.Module) -> int:
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def state_tensors(value):
    """Tensors in a state value: tensors, dicts of them, and objects holding them (galore-torch keeps its
    projection matrix in a Python object in the state). A wrapper tensor (a DTensor, torchao's quantized optimizer
    states) counts as the tensors it holds: codes, scales and lookup table."""
    if isinstance(value, torch.Tensor):
        yield from leaves(value)
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
            for leaf in leaves(t):
                storage = leaf.untyped_storage()
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
    """Peak allocated memory on a CUDA device, else the process's peak resident set size (RSS) since it started
    or since the last ``reset_peak`` (Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc give freed tensors of ``threshold`` bytes or more back to the OS; False where it cannot (not
    glibc). By default glibc serves a large block from its own mapping, but each time one is freed it raises that
    threshold (up to 32 MiB), after which such tensors come from the heap, and freed heap memory stays resident:
    the process's RSS only grows, by GiBs at LLaMA-7B (training's short-lived tensors are mostly under 32 MiB).
    A fixed threshold (M_MMAP_THRESHOLD, which also stops the adjustment) and trimming above it (M_TRIM_THRESHOLD)
    keep the RSS at what is allocated; a CUDA device has its own caching allocator and needs none of this."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, threshold))


def resident_bytes(device: torch.device) -> int:
    """Memory in use now: allocated on a CUDA device, else the process's resident set size (RSS)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: the peak is the best we know
        return peak_memory_bytes(device)


def reset_peak(device: torch.device) -> bool:
    """Restart the peak that ``peak_memory_bytes`` reports from the memory in use now; False where the platform
    cannot (then phase peaks are the run's peak so far). Linux resets the RSS high-water mark through
    /proc/self/clear_refs ("5"), which getrusage's ru_maxrss follows."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """The peak memory of each phase of a run (build, forward, backward, step, evaluation, checkpoint, ...) and
    the memory in use when it began, so a report can say in which phase the run peaks and how much of that peak
    was held before the phase (weights, state, ...) and how much the phase itself allocated (its transients).

    ``with peaks.phase("backward"): ...``; a phase entered again keeps its largest peak. ``peak`` is the run's
    peak over every phase and the time between them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, dict] = {}  # name -> {"peak": bytes, "start": bytes in use when that peak's phase began}
        self.peak = peak_memory_bytes(device)

    def mark(self, name: str) -> int:
        """Record the memory in use now under ``name`` (a point, not a phase) and return it."""
        now = resident_bytes(self.device)
        self.phases.setdefault(name, {"peak": now, "start": now})
        return now

    @contextmanager
    def phase(self, name: str):
        self.peak = max(self.peak, peak_memory_bytes(self.device))  # what happened since the last phase
        resettable = reset_peak(self.device)
        start = resident_bytes(self.device)
        try:
            yield
        finally:
            peak, end = peak_memory_bytes(self.device), resident_bytes(self.device)
            self.peak = max(self.peak, peak)
            if not resettable:
                peak = max(start, end)  # ru_maxrss is the run's: the phase's own is unknown
            if peak > self.phases.get(name, {"peak": -1})["peak"]:
                self.phases[name] = {"peak": peak, "start": start, "end": end}

    def where(self) -> str:
        """The phase with the highest peak."""
        return max(self.phases, key=lambda n: self.phases[n]["peak"])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def breakdown(memory: dict) -> list[tuple[str, int]]:
    """The peak, attributed: (row, bytes) whose sum is the peak exactly.

    What was held when the peak's phase began, from the phases the run recorded (``PhasePeaks``): the runtime
    (Python, torch and the libraries, resident when the run began), the data and tokenizer (what building the task
    kept beyond the weights), the weights, the optimizer state, and the saved activations where the peak came in
    backward (they are held from the forward on); what no row names is "held, unattributed". Then what the peak's
    phase allocated above that (the transients: a layer-wise update's upcast gradient and decoded moments,
    checkpointing's recomputed layer, the loss's chunks, ...). Without phases (an old run): the four totals."""
    phases = memory.get("phases") or {}
    rows = [("weights", memory["weights_bytes"]), ("optimizer state", memory["optimizer_state_bytes"])]
    if "data and model" not in phases or "runtime" not in phases:
        return rows + [("gradients", memory["gradients_bytes"]),
                       ("activations (saved for backward, one micro-batch)", memory["activations_bytes"])]
    where = max((n for n in phases if "end" in phases[n]), key=lambda n: phases[n]["peak"])  # marks have no end
    build = phases["data and model"]
    rows = [("runtime (Python, torch, libraries)", phases["runtime"]["start"]),
            ("data and tokenizer", build["end"] - build["start"] - memory["weights_bytes"])] + rows
    if where == "backward":  # held from the forward on
        rows.append(("activations (saved for backward, one micro-batch)", memory["activations_bytes"]))
    if where == "step":  # held from the backward on
        rows.append(("gradients", memory["gradients_bytes"]))
    held = phases[where]["start"]
    rows.append(("held, unattributed", held - sum(b for _, b in rows)))
    rows.append((f"transients of the peak's phase ({where})", phases[where]["peak"] - held))
    if memory["peak_memory_bytes"] > phases[where]["peak"]:
        rows.append(("between phases", memory["peak_memory_bytes"] - phases[where]["peak"]))
    return rows


def format_report(memory: dict) -> str:
    """The memory table printed at the end of a run (``memory`` as stored in summary.json): the peak attributed
    (``breakdown``), then the gradients' and activations' totals where they are not rows of it."""
    peak_kind = "GPU max allocated" if memory.get("device") == "cuda" else "process peak RSS"
    rows = breakdown(memory)
    named = {name.split(" (")[0] for name, _ in rows}
    rows += [(f"peak ({peak_kind})", memory["peak_memory_bytes"])]
    notes = [(f"  {name} (not at the peak's start)", value) for name, value in
             (("gradients", memory["gradients_bytes"]), ("activations", memory["activations_bytes"]))
             if name not in named]
    width = max(len(name) for name, _ in rows + notes)
    return "\n".join(["memory (measured):"] + [f"  {name:<{width}}  {human(value):>10}" for name, value in rows]
                     + [f"  {name:<{width}}  {human(value):>10}" for name, value in notes])
