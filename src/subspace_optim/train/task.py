"""What the training loop needs from a task (causal-LM pretraining or classification fine-tuning)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's own loss (HF models compute it when the batch has labels)."""
    return model(**batch).loss


@dataclass
class Task:
    model: nn.Module
    batches: Iterator[dict]  # endless; also has state_dict() / load_state_dict() for checkpoints
    evaluate: Callable[[nn.Module], dict]  # validation metrics, "val_loss" first
    tokens: Callable[[dict], int]  # tokens in a batch (for tokens/s)
    summary_keys: dict[str, str]  # validation metric -> summary.json key
    info: dict = field(default_factory=dict)  # facts for config/summary (parameter counts, data sizes, labels)
    # model -> the module to train and evaluate, whose forward(**batch).loss is the loss: the model itself, or a
    # wrapper that computes the loss around it (train/loss.py's fused loss); DDP and FSDP2 wrap that module
    module: Callable[[nn.Module], nn.Module] = lambda model: model
