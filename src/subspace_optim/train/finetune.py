"""Sequence-classification fine-tuning task: labeled texts, validation loss, accuracy and macro-F1."""

from __future__ import annotations

import torch

from .config import TrainConfig, UsageError
from .data import ShuffledBatches, read_labeled, split, unit_hash
from .models import build_classifier, count_parameters
from .task import Task


def macro_f1(predictions: list[int], labels: list[int]) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN), over the classes that occur in either list."""
    scores = []
    for c in set(labels) | set(predictions):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def evaluation_subset(pairs: list, count: int) -> list:
    """``count`` (text, label) pairs in hash order, not file order: labeled folders are read class by class, so
    the first examples of the list would make a one-class "validation set"."""
    return sorted(pairs, key=lambda pair: unit_hash(pair[0]))[:count]


def classify_task(cfg: TrainConfig) -> Task:
    texts, labels, names = read_labeled(cfg.data, cfg.text_field, cfg.label_field)
    train, val = split(list(zip(texts, labels)), cfg.val_fraction, text=lambda pair: pair[0])
    if cfg.eval_batches:
        val = evaluation_subset(val, cfg.eval_batches * cfg.batch_size)
    model, tokenizer = build_classifier(cfg.model, len(names), cfg.dtype)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and cfg.seq_len > limit:
        raise UsageError(f"--seq-len {cfg.seq_len} is longer than {cfg.model} allows ({limit} positions)")

    def encode(pairs):
        ids = tokenizer([t for t, _ in pairs], truncation=True, max_length=cfg.seq_len)["input_ids"]
        return ids, torch.tensor([y for _, y in pairs])

    train_ids, train_labels = encode(train)
    val_ids, val_labels = encode(val)
    pad = tokenizer.pad_token_id or 0

    def collate(ids: list[list[int]], labels: torch.Tensor) -> dict:
        width = max(map(len, ids))
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    batches = ShuffledBatches(len(train_ids), cfg.batch_size, cfg.seed,
                              lambda rows: collate([train_ids[i] for i in rows], train_labels[rows]))

    @torch.no_grad()
    def evaluate(model) -> dict:
        device = next(model.parameters()).device
        loss, predictions = 0.0, []
        for start in range(0, len(val_ids), cfg.batch_size):
            batch = collate(val_ids[start:start + cfg.batch_size], val_labels[start:start + cfg.batch_size])
            out = model(**{k: v.to(device) for k, v in batch.items()})
            loss += out.loss.float().item() * len(batch["labels"])
            predictions += out.logits.argmax(-1).tolist()
        truth = val_labels.tolist()
        accuracy = sum(p == y for p, y in zip(predictions, truth)) / len(truth)
        return {"val_loss": loss / len(truth), "accuracy": accuracy, "f1": macro_f1(predictions, truth)}

    info = {"labels": names, "train_examples": len(train_ids), "val_examples": len(val_ids),
            **count_parameters(model)}
    return Task(model=model, batches=batches, evaluate=evaluate, tokens=lambda b: int(b["attention_mask"].sum()),
                summary_keys={"val_loss": "final_val_loss", "accuracy": "final_accuracy", "f1": "final_f1"},
                info=info)
