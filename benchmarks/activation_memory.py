"""Peak memory and step time of RSO against AdamW, GaLore, GoLore and GoLore layer-wise (run by hand, not a test).

Model: HF LlamaForCausalLM shaped like LLaMA-60M (hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 32000,
fp32), sequences of 256 tokens, rank 128 for every method. Usage:

    python benchmarks/activation_memory.py                       # batches 4 16 64, 1 measured step each
    python benchmarks/activation_memory.py --batches 4 16 --steps 3
    python benchmarks/activation_memory.py --batches 16 --variants plain fused fused+ckpt

What is measured, and why this way:
- Every (method, batch) runs in a fresh subprocess: a process's peak RSS never goes down, so configurations
  measured one after another in one process would each report the largest so far.
- peak: the subprocess's peak RSS minus its peak after importing torch/transformers (so interpreter and library
  pages are not counted); it includes weights, gradients, optimizer state, activations and temporaries.
  The subprocess runs with MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB, so glibc returns every freed tensor to the OS
  at once and RSS follows live memory instead of allocator caches. On a GPU, use torch.cuda.max_memory_allocated.
- saved: bytes autograd saves for backward (saved_tensors_hooks, each storage once, weights and buffers
  excluded, plus the tensors that custom autograd Functions keep as ctx attributes: with --fused-loss, the
  gradients linear_cross_entropy computes in forward, tokens×hidden and vocab×hidden), total and the part
  saved by the targeted linear layers' own ops (nn.Linear: its input x, tokens×in; RSO: x Pᵀ, tokens×r, once
  per shared-input group).
- --variants: each method runs under each variant, the harness's options that cut other activations:
  plain (HF's model(...).loss, as `subspace-optim train`), fused (`--fused-loss`: causal_lm_loss(fused=True),
  lm_head + cross-entropy by torch's chunked linear_cross_entropy, no batch×seq×vocab logits), ckpt
  (`--checkpointing`: HF activation checkpointing, each decoder layer keeps only its input, which the checkpoint
  holds outside autograd's saved tensors, so the saved figure leaves those out), or a '+' of them.
  Ratios are to AdamW *plain* at the same batch, and to AdamW under the same variant.
- Each run first takes one warm-up step on a single sequence: it creates the optimizer state (and runs GaLore's
  SVDs), so that the measured steps at the full batch hold weights, gradients, state and activations together,
  as every step after the first does in training, without paying for a second full-batch step on a slow CPU.
- step: wall time and process CPU time (all threads) of the measured steps, averaged. CPU time is the better
  comparison on a shared machine, where wall time also counts waiting for the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("adamw", "galore", "golore", "golore_layerwise", "rso")


def build(method: str, model, rank: int):
    """(optimizer, targeted layers) for ``method``; RSO swaps the linear layers of ``model`` first."""
    import torch

    import subspace_optim as so
    from subspace_optim.rso import RSOController, apply_rso, rso_layers

    lr = 1e-3  # irrelevant to memory and time
    if method == "rso":
        apply_rso(model, rank=rank)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        RSOController(model, opt, update_gap=200)
        return opt, list(rso_layers(model).values())
    layers = [m for _, m in so.target_modules(model, "all-linear")]
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr), layers
    groups = so.subspace_param_groups(model, rank=rank, target="all-linear")
    if method == "galore":
        return so.GaLoreAdamW(groups, lr=lr), layers
    if method == "golore":
        return so.GoLoreAdamW(groups, lr=lr), layers
    if method == "golore_layerwise":
        return so.GoLoreAdamW(groups, lr=lr, layerwise=True), layers
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def worker(method: str, batch: int, seq: int, steps: int, rank: int, variant: str) -> dict:
    import torch

    from subspace_optim.memory_measured import (
        SavedActivations,
        gradient_bytes,
        optimizer_state_bytes,
        peak_memory_bytes,
        storage_ids,
        weight_bytes,
    )
    from subspace_optim.train.loss import causal_lm_loss
    from subspace_optim.train.models import build_causal_lm, causal_lm_config, enable_checkpointing

    class LayerSaved(SavedActivations):
        """Also counts what the targeted layers' own ops save (hooks mark when their forward runs)."""

        def __init__(self, model, layers):
            super().__init__(model)
            self._params |= storage_ids(model.buffers())  # RSO's P is a buffer, not an activation
            self.inside, self.layer_saved = False, {}
            self._handles = [h for m in layers for h in (
                m.register_forward_pre_hook(lambda *_: setattr(self, "inside", True)),
                m.register_forward_hook(lambda *_: setattr(self, "inside", False)))]

        def _pack(self, t):
            storage = t.untyped_storage()
            if self.inside and storage.data_ptr() not in self._params:
                self.layer_saved[storage.data_ptr()] = storage.nbytes()
            return super()._pack(t)

        def __exit__(self, *exc):
            for h in self._handles:
                h.remove()
            return super().__exit__(*exc)

    cpu = torch.device("cpu")
    base = peak_memory_bytes(cpu)
    torch.manual_seed(0)
    model = build_causal_lm(causal_lm_config("llama-60m", 32000, None, None)).train()
    opt, layers = build(method, model, rank)
    features = set(variant.split("+"))
    fused_loss = "fused" in features
    if "ckpt" in features:
        enable_checkpointing(model)
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))
    saved = layer_saved = grads = 0
    wall = cpu_time = 0.0
    for step in range(steps + 1):
        batch_ids = ids[:1] if step == 0 else ids  # step 0: warm-up on one sequence, not measured
        lm_batch = {"input_ids": batch_ids, "labels": batch_ids}
        t0, c0 = time.perf_counter(), time.process_time()
        if step == 1:
            with LayerSaved(model, layers) as rec:
                loss = causal_lm_loss(model, lm_batch, fused_loss)
            rec.add_held(loss)
            saved, layer_saved = rec.bytes, sum(rec.layer_saved.values())
        else:
            loss = causal_lm_loss(model, lm_batch, fused_loss)
        loss.backward()
        grads = max(grads, gradient_bytes(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            wall += time.perf_counter() - t0
            cpu_time += time.process_time() - c0
    return {
        "method": method, "batch": batch, "seq": seq, "rank": rank, "steps": steps, "variant": variant,
        "peak": peak_memory_bytes(cpu) - base, "saved": saved, "layer_saved": layer_saved,
        "weights": weight_bytes(model), "grads": grads, "state": optimizer_state_bytes(opt),
        "step_s": wall / steps, "cpu_s": cpu_time / steps,
        "loss": float(loss), "threads": torch.get_num_threads(),
    }


def run_one(method: str, batch: int, variant: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, __file__, "--worker", method, "--batches", str(batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--rank", str(args.rank), "--variants", variant]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{method} ({variant}) batch {batch} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict], command: str) -> str:
    mib = lambda n: n / 2**20  # noqa: E731
    lines = [
        f"`{command}` — LLaMA-60M shape, fp32, seq {results[0]['seq']}, rank {results[0]['rank']}, "
        f"{results[0]['threads']} CPU threads, {results[0]['steps']} measured step(s) per run after a one-sequence "
        "warm-up step; ratios to AdamW (plain) at the same batch, and to AdamW under the same variant",
        "",
        "| batch | method | variant | peak RSS (MiB) | ×AdamW | ×AdamW same variant | saved activations (MiB) | ×AdamW "
        "| saved by linear layers (MiB) | weights+grads+state (MiB) | step wall (s) | step CPU (s) | ×AdamW (CPU) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ref = {(r["batch"], r["variant"]): r for r in results if r["method"] == "adamw"}
    for r in results:
        plain, same = ref.get((r["batch"], "plain")), ref.get((r["batch"], r["variant"]))
        ratio = lambda k, a=plain: f"{r[k] / a[k]:.2f}" if a and a[k] else "–"  # noqa: E731
        static = r["weights"] + r["grads"] + r["state"]
        lines.append(
            f"| {r['batch']} | {r['method']} | {r['variant']} | {mib(r['peak']):.0f} | {ratio('peak')} "
            f"| {ratio('peak', same)} | {mib(r['saved']):.0f} | {ratio('saved')} | {mib(r['layer_saved']):.0f} "
            f"| {mib(static):.0f} | {r['step_s']:.1f} | {r['cpu_s']:.1f} | {ratio('cpu_s')} |")
    return "\n".join(lines)


def variant_name(text: str) -> str:
    """'plain', or a '+'-joined set of 'fused' and 'ckpt' (argparse type)."""
    parts = text.split("+")
    if text != "plain" and (not set(parts) <= {"fused", "ckpt"} or len(set(parts)) != len(parts)):
        raise argparse.ArgumentTypeError(f"{text!r}: use plain, fused, ckpt or fused+ckpt")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1, help="measured full-batch steps per run (after a warm-up)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--variants", nargs="+", type=variant_name, default=["plain"],
                        help="plain, fused (--fused-loss), ckpt (--checkpointing), or fused+ckpt")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batches[0], args.seq, args.steps, args.rank, args.variants[0])))
        return
    command = "python benchmarks/activation_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = []
    for batch in args.batches:
        for variant in args.variants:
            for method in args.methods:
                t0 = time.perf_counter()
                results.append(run_one(method, batch, variant, args))
                print(f"# {method} ({variant}) batch {batch}: {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results, command.strip()))


if __name__ == "__main__":
    main()
