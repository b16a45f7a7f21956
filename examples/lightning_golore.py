"""GoLore in a LightningModule: a tiny LLaMA learns a synthetic next-token rule on the CPU, offline.

    python examples/lightning_golore.py                                   # one process
    python examples/lightning_golore.py --layerwise --accumulate 2        # layer-wise, 2 micro-batches a step
    python examples/lightning_golore.py --devices 2 --layerwise           # DDP, gradients reduced in the subspace

With --devices 2 Lightning starts the second process itself (it runs this script again). The optimizer is built
with grad_comm="subspace", so that DDP leaves the projected weights to it: SubspaceDDPStrategy does that.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from subspace_optim import GoLoreAdamW, subspace_param_groups
from subspace_optim.integrations.lightning import SubspaceCallback, SubspaceDDPStrategy

VOCAB, SEQ = 64, 32


class TinyLlama(pl.LightningModule):
    def __init__(self, rank: int, steps: int, layerwise: bool, accumulate: int, grad_comm: str):
        super().__init__()
        self.save_hyperparameters()
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=SEQ)
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        # the attention and MLP weights projected at rank h.rank, embeddings and norms dense; a new random basis
        # every 20 steps
        optimizer = GoLoreAdamW(subspace_param_groups(self.model, rank=h.rank), lr=1e-2, update_gap=20,
                                layerwise=h.layerwise, accumulation_steps=h.accumulate if h.layerwise else 1,
                                grad_comm=h.grad_comm)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=h.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def sequences(count: int, seed: int = 0) -> TensorDataset:
    """x_{t+1} = (5 x_t + 3) mod 64 from a random start: learnable, so the loss falls from log 64 = 4.16."""
    tokens = torch.empty(count, SEQ, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))
    for t in range(1, SEQ):
        tokens[:, t] = (5 * tokens[:, t - 1] + 3) % VOCAB
    return TensorDataset(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1, help="processes (DDP on gloo when more than 1)")
    parser.add_argument("--layerwise", action="store_true", help="update each weight during backward")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    pl.seed_everything(0)
    grad_comm = "subspace" if args.devices > 1 else "full"
    module = TinyLlama(args.rank, args.steps, args.layerwise, args.accumulate, grad_comm)
    micro = 16 // args.accumulate // args.devices  # a global batch of 16 sequences
    data = DataLoader(sequences(16 * args.steps), batch_size=micro, shuffle=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, max_epochs=1, accumulate_grad_batches=args.accumulate,
        strategy=SubspaceDDPStrategy() if args.devices > 1 else "auto", callbacks=[SubspaceCallback()],
        logger=False, enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=10,
    )
    trainer.fit(module, data)
    if trainer.is_global_zero:
        print(f"final training loss {trainer.callback_metrics['loss'].item():.3f} after {trainer.global_step} steps")


if __name__ == "__main__":
    main()
