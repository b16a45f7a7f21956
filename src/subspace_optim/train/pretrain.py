"""Causal-LM pretraining task: packed token sequences, validation loss and perplexity."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator

import torch

from ..groups import target_modules
from .config import TrainConfig, UsageError, target_spec
from .data import (CHUNK_TOKENS, ShuffledBatches, StreamBatches, Tokenizer, hub_documents, in_validation,
                   is_hub_name, lm_batch, pack, read_documents, split, split_token_stream)
from .loss import loss_module
from .models import build_causal_lm, causal_lm_config, count_parameters, default_rank, max_positions
from .task import Task, model_loss
from .tokenizer import load_tokenizer


def _encode(docs: Iterable[str], tokenizer: Tokenizer, chunk: int = 256) -> Iterator[list[int]]:
    """Token ids of each document framed by BOS/EOS, encoded in chunks (batch encoding is much faster)."""
    docs = iter(docs)
    while batch := list(itertools.islice(docs, chunk)):
        yield from map(tokenizer.document, tokenizer.encode(batch))


def _int8_modules(cfg: TrainConfig):
    """--weights int8: the linear modules whose weights the optimizer will project (--target, and a rank below
    the weight's smaller side), chosen on the meta-device model before any weight exists."""
    def chosen(model) -> set[str]:
        rank = cfg.rank or default_rank(model.config.hidden_size)
        return {name for name, module in target_modules(model, target_spec(cfg.target))
                if rank < min(module.weight.shape)}
    return chosen


def lm_task(cfg: TrainConfig) -> Task:
    if cfg.init_from:  # a folder without weights is refused before any data is read
        from .pretrained import check_source

        check_source(cfg.init_from, "--init-from")
    hub = is_hub_name(cfg.data)
    docs = None if hub else read_documents(cfg.data, cfg.text_field)
    single = docs is not None and len(set(docs)) <= 1
    # Local data is split first: a trained tokenizer (--tokenizer bpe:N) sees the training documents only. A single
    # document is split by token chunks, after tokenizing: a trained tokenizer then sees all of it.
    train_docs, val_docs = (None, None) if hub or single else split(docs, cfg.val_fraction)
    if cfg.init_from:  # continued pretraining: the folder's model and tokenizer (pretrained.py)
        from .pretrained import init_tokenizer_spec, model_config

        spec = init_tokenizer_spec(cfg.init_from, cfg.tokenizer, docs if single else train_docs)
        tokenizer, tokenizer_info = load_tokenizer(spec, docs if single else train_docs)
        config = model_config(cfg.init_from)
        if tokenizer.vocab_size > config.vocab_size:
            raise UsageError(f"--init-from {cfg.init_from}: the tokenizer has {tokenizer.vocab_size} tokens, more than "
                             f"the model's vocabulary of {config.vocab_size}")
    else:
        tokenizer, tokenizer_info = load_tokenizer(cfg.tokenizer, docs if single else train_docs)
        config = causal_lm_config(cfg.model, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    limit = max_positions(config)
    if limit is not None and cfg.seq_len > limit:
        raise UsageError(f"--seq-len {cfg.seq_len} is longer than {cfg.model} allows ({limit} positions)")

    if hub:
        if cfg.eval_batches == 0:
            raise UsageError("--eval-batches 0 (the whole validation split) needs local data, not a stream")
        docs = lambda: hub_documents(cfg.data, cfg.text_field)  # noqa: E731
        train_seqs = lambda: pack(_encode((d for d in docs() if not in_validation(d, cfg.val_fraction)),  # noqa: E731
                                          tokenizer), cfg.seq_len)
        val_stream = pack(_encode((d for d in docs() if in_validation(d, cfg.val_fraction)), tokenizer), cfg.seq_len)
        val = list(itertools.islice(val_stream, cfg.eval_batches * cfg.batch_size))
        batches = StreamBatches(train_seqs, cfg.batch_size)
        info = {"data": cfg.data}
    else:
        if not single:
            train_ids, val_ids = _encode(train_docs, tokenizer), _encode(val_docs, tokenizer)
            info = {"split": "documents", "train_documents": len(train_docs), "val_documents": len(val_docs)}
        else:  # one document, e.g. a book with one sentence per line: split its token stream instead
            train_ids, val_ids = split_token_stream([t for ids in _encode(docs, tokenizer) for t in ids],
                                                    cfg.val_fraction)
            info = {"split": f"token chunks of {CHUNK_TOKENS} (a single document)", "train_chunks": len(train_ids),
                    "val_chunks": len(val_ids)}
        train = torch.tensor(list(pack(train_ids, cfg.seq_len)), dtype=torch.long)
        val = list(pack(val_ids, cfg.seq_len))
        if len(train) == 0:
            raise UsageError(f"--data {cfg.data}: the training split holds fewer than --seq-len {cfg.seq_len} tokens")
        batches = ShuffledBatches(len(train), cfg.batch_size, cfg.seed, lambda rows: lm_batch(train[rows]))
        info.update(train_tokens=train.numel(), train_sequences=len(train))
    if not val:
        raise UsageError(f"--data {cfg.data}: the validation split holds fewer than --seq-len {cfg.seq_len} tokens")
    val = torch.tensor(val, dtype=torch.long)
    if cfg.eval_batches:
        val = val[: cfg.eval_batches * cfg.batch_size]
    info["val_sequences"] = len(val)
    info.update(tokenizer_info)

    if cfg.init_from:
        if cfg.weights == "int8":
            raise UsageError("--weights int8 builds the projected weights as int8 when the model is created; it "
                             "cannot yet start from the weights of --init-from")
        from .pretrained import load_causal_lm

        model = load_causal_lm(cfg.init_from, cfg.dtype)
        info["init_from"] = cfg.init_from
    else:
        model = build_causal_lm(config, cfg.dtype, int8=_int8_modules(cfg) if cfg.weights == "int8" else None)
    info.update(count_parameters(model))
    module = loss_module(model, cfg.fused_loss)

    @torch.no_grad()
    def evaluate(model) -> dict:
        device = next(model.parameters()).device
        total = 0.0
        for rows in val.split(cfg.batch_size):
            # ``model`` is the trained module, so the training loss here too: without autograd nothing is saved,
            # but the plain loss still makes the batch×seq×vocab logits (and their log-softmax) at once, which
            # would set the run's peak memory that --fused-loss avoids. Every sequence has seq_len tokens, so a
            # size-weighted mean of batch means is the token mean.
            total += model_loss(model, lm_batch(rows.to(device))).float().item() * len(rows)
        loss = total / len(val)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    return Task(model=model, batches=batches, evaluate=evaluate, tokens=lambda b: b["input_ids"].numel(),
                summary_keys={"val_loss": "final_val_loss", "val_ppl": "final_val_ppl"}, info=info, module=module)
