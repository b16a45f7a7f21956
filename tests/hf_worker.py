"""A tiny LlamaForCausalLM trained by ``transformers.Trainer`` with ``subspace_optim.hf``; run by tests/test_hf.py.

On one process the tests import it. Under ``torchrun --nproc_per_node 2``, ``python hf_worker.py OUT`` trains with
DDP (gloo), then with FSDP2, and writes each rank's final weights and facts to ``OUT/rank{R}.pt``.
"""

from __future__ import annotations

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from subspace_optim.hf import optimizer_cls_and_kwargs

VOCAB, SEQ, RANK, STEPS = 64, 16, 8, 4


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """hidden 32, 2 layers; biases on attention and MLP, so Trainer's no-decay group holds biases and norms."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=SEQ,
                         attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def dataset(n: int = 32) -> list[dict]:
    """Counting sequences (t, t+1, ...) mod VOCAB from random starts: easy to learn, so the loss falls fast."""
    starts = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(1))
    rows = (starts[:, None] + torch.arange(SEQ)) % VOCAB
    return [{"input_ids": r, "labels": r} for r in rows]


def trainer(model, folder, steps: int, batch: int = 4, args: dict | None = None, **optim) -> Trainer:
    """``args`` adds TrainingArguments; ``optim`` overrides the optimizer settings (GoLore, rank 8, gap 2)."""
    args = TrainingArguments(
        output_dir=str(folder), max_steps=steps, per_device_train_batch_size=batch, weight_decay=0.1,
        lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0, ddp_find_unused_parameters=False,
        **(args or {}),
    )
    settings = {"projector": "golore", "rank": RANK, "lr": 1e-2, "update_gap": 2, "scale": 0.25, **optim}
    return Trainer(model=model, args=args, train_dataset=dataset(),
                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, **settings))


def force_fsdp2(run: Trainer) -> None:
    """accelerate turns FSDP on only for GPU-like devices (on CPU it quietly runs DDP): switch it on by hand, so
    that Trainer's FSDP2 path runs for real: the optimizer is built on plain parameters, then accelerate's
    ``prepare`` shards the model and swaps the optimizer's parameters for DTensors."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    run.accelerator.state.distributed_type = DistributedType.FSDP
    run.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**run.args.fsdp_plugin_args)
    run.is_fsdp_enabled = True


def full_weights(model) -> dict:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


if __name__ == "__main__":  # under torchrun: DDP, then FSDP2, 2 x 2 samples per step (one process: 4)
    import torch.distributed as dist

    out, results = sys.argv[1], {}
    for case in ("ddp", "fsdp2"):
        model = tiny_llama()
        fsdp = {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "cpu_ram_efficient_loading": False,
                                              "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
        args = {"ddp_backend": "gloo", **(fsdp if case == "fsdp2" else {})}
        # GaLore: its SVD refreshes are computed by one owner rank per weight and broadcast
        run = trainer(model, out, steps=STEPS, batch=2, args=args, projector="galore")
        if case == "fsdp2":
            force_fsdp2(run)
        run.train()
        opt = run.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps ours
        results[case] = {
            "weights": full_weights(run.model), "ddp_group": opt.process_group is not None,
            "dtensors": any(hasattr(p, "full_tensor") for p in run.model.parameters()),
            "losses": [h["loss"] for h in run.state.log_history if "loss" in h],
        }
    results["world"] = dist.get_world_size()
    torch.save(results, f"{out}/rank{dist.get_rank()}.pt")
