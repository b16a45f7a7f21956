"""Supervised fine-tuning (`finetune --task sft`): a pretrained causal LM trained on prompt/response or chat
records, the loss on the responses only.

Records (one JSON object per line of a .jsonl file): ``{"prompt": ..., "response": ...}``, or
``{"messages": [{"role": "system"|"user"|"assistant"|..., "content": ...}, ...]}``. A prompt/response record is
the chat [user: prompt, assistant: response]. Every record is rendered with the tokenizer's chat template, or
DEFAULT_CHAT_TEMPLATE when it has none (a pretrained-from-scratch LLaMA has none); the export of the run carries
that template, so ``apply_chat_template`` at generation time builds the same prompts. Labels are the tokens of
the assistant turns (their end-of-sequence token included); -100 elsewhere, so prompt tokens carry no loss.

The default data, ``bbcnews``, needs no network: headline generation on BBC News, whose articles begin with their
title on the first line; the rest of the article is the prompt and the title the response.

A record longer than --seq-len keeps its start: the first user message (the prompt) is cut, at token
granularity, until the record fits (counted in info.json as ``truncated_prompts``); a response longer than
--seq-len, or a record that does not fit even with an empty prompt, is an error. Without --packing each record is
one sequence (batches padded to their longest); with --packing consecutive records are packed into sequences of
--seq-len tokens, each with position ids that restart at 0, from which HF models attend within each record only.
Records are split into training and validation by a hash of their content, the rule `train` uses for documents.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .config import TrainConfig, UsageError
from .data import ShuffledBatches, bbc_news_dir, split
from .loss import loss_module
from .models import count_parameters, max_positions
from .task import Task, model_loss

#: The chat template of a tokenizer that has none: an instruction format in plain text (no tokens to add).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% else %}### Instruction:\n{{ message['content'] }}\n\n### Response:\n{% endif %}"
    "{% endfor %}"
)


def ensure_chat_template(tokenizer) -> str:
    """Give ``tokenizer`` DEFAULT_CHAT_TEMPLATE if it has no chat template; returns which one it uses."""
    if tokenizer.chat_template:
        return "the tokenizer's"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return "default (### Instruction / ### Response)"


# ---------------------------------------------------------------- records


def _messages(record, where: str) -> list[dict]:
    """The chat of one record, or a one-line UsageError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise UsageError(f"{where}: a record must be a JSON object with \"prompt\" and \"response\", or \"messages\"")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UsageError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise UsageError(f"{where}: message {i} needs a string \"role\" and a string \"content\"")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise UsageError(f"{where}: no assistant message with content (nothing to train on)")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    missing = [k for k in ("prompt", "response") if k not in record]
    if missing:
        raise UsageError(f"{where}: the record has no {' or '.join(repr(k) for k in missing)} field (records are "
                         f"{{\"prompt\", \"response\"}} or {{\"messages\": [...]}}; it has {sorted(record) or 'none'})")
    for key in ("prompt", "response"):
        if not isinstance(record[key], str):
            raise UsageError(f"{where}: {key!r} must be a string, not {type(record[key]).__name__}")
    if not record["response"].strip():
        raise UsageError(f"{where}: the response is empty")
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def bbc_headlines() -> list[tuple[str, list[dict]]]:
    """BBC News as (where, [user: article body, assistant: title]) records, in sorted file order."""
    records = []
    for file in sorted(bbc_news_dir().rglob("*.txt")):
        title, _, body = file.read_bytes().decode("utf-8", errors="replace").strip().partition("\n")
        if title.strip() and body.strip():
            records.append((str(file), [{"role": "user", "content": body.strip()},
                                        {"role": "assistant", "content": title.strip()}]))
    return records


def read_records(spec: str) -> list[tuple[str, list[dict]]]:
    """(where, messages) of every record of ``--data``: ``bbcnews`` or a .jsonl file."""
    if spec == "bbcnews":
        return bbc_headlines()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UsageError(f"--data {spec}: no such file")
    if path.suffix != ".jsonl":
        raise UsageError(f"--data {spec}: finetune --task sft reads a .jsonl file (one record per line)")
    records = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            records.append((f"{path}:{number}", _messages(record, f"{path}:{number}")))
    if not records:
        raise UsageError(f"--data {spec}: the file holds no records")
    return records


# ---------------------------------------------------------------- tokens and labels


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Encoder:
    """Token ids and labels of a chat, rendered with the tokenizer's chat template."""

    def __init__(self, tokenizer, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len

    def ids(self, messages: list[dict], generation: bool = False) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def spans(self, messages: list[dict], ids: list[int]) -> list[tuple[int, int]]:
        """[start, end) of each assistant turn in ``ids``: from the end of the chat before it (with the generation
        prompt) to the end of the chat up to it. Where a template's token boundaries differ between the two
        renderings, the span starts at their first difference."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = _common_prefix(self.ids(messages[:i], generation=True), ids)
                end = _common_prefix(self.ids(messages[:i + 1]), ids)
                if end > start:
                    spans.append((start, end))
        return spans

    def encode(self, messages: list[dict], where: str) -> tuple[list[int], list[int], bool]:
        """(ids, labels, whether the prompt was cut) of one record, at most --seq-len tokens; a record that the
        chat template refuses (roles out of its order, say) is a one-line UsageError."""
        from jinja2 import TemplateError

        try:
            return self._encode(messages, where)
        except TemplateError as err:
            raise UsageError(f"{where}: the chat template refuses this record ({err})") from None

    def _encode(self, messages: list[dict], where: str) -> tuple[list[int], list[int], bool]:
        ids = self.ids(messages)
        spans = self.spans(messages, ids)
        for start, end in spans:
            if end - start > self.seq_len:
                raise UsageError(f"{where}: a response has {end - start} tokens, more than --seq-len {self.seq_len}")
        if not spans:
            raise UsageError(f"{where}: the chat template leaves no assistant tokens to train on")
        cut = False
        prompt = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        for _ in range(4):  # cut the prompt by the excess (token boundaries may shift by a few after a cut)
            if len(ids) <= self.seq_len or prompt is None or not messages[prompt]["content"]:
                break
            content = self.tokenizer(messages[prompt]["content"], add_special_tokens=False)["input_ids"]
            keep = max(0, len(content) - (len(ids) - self.seq_len) - 2)
            messages = [dict(m, content=self.tokenizer.decode(content[:keep])) if i == prompt else m
                        for i, m in enumerate(messages)]
            ids = self.ids(messages)
            spans, cut = self.spans(messages, ids), True
        if len(ids) > self.seq_len:
            if not spans or spans[0][1] > self.seq_len:  # not even the first response fits
                raise UsageError(f"{where}: the record needs {len(ids)} tokens with its prompt cut, its first "
                                 f"response included: more than --seq-len {self.seq_len}")
            ids = ids[: self.seq_len]  # a long multi-turn chat: its later turns are dropped
        labels = [-100] * len(ids)
        for start, end in spans:
            labels[start:min(end, len(ids))] = ids[start:min(end, len(ids))]
        return ids, labels, cut


def pack_examples(examples: list[tuple[list[int], list[int]]], seq_len: int) -> list[list[tuple]]:
    """Consecutive examples grouped greedily into rows of at most ``seq_len`` tokens (an example is never split)."""
    rows, row, used = [], [], 0
    for example in examples:
        if row and used + len(example[0]) > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(example)
        used += len(example[0])
    if row:
        rows.append(row)
    return rows


def collate(rows: list[list[tuple]], pad: int, packed: bool) -> dict:
    """A batch: each row the concatenation of its examples, right-padded (labels -100) to the longest row.
    Unpacked rows hold one example and get an attention mask; packed rows get position ids restarting at 0 in each
    example (and in the padding), and no attention mask, which is how HF models recognise packed sequences."""
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids, labels, positions, mask = [], [], [], []
    for row in rows:
        ids = [t for example, _ in row for t in example]
        lab = [t for _, example in row for t in example]
        n = len(ids)
        input_ids.append(ids + [pad] * (width - n))
        labels.append(lab + [-100] * (width - n))
        positions.append([p for example, _ in row for p in range(len(example))] + list(range(width - n)))
        mask.append([1] * n + [0] * (width - n))
    batch = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
    if packed:
        batch["position_ids"] = torch.tensor(positions)
    else:
        batch["attention_mask"] = torch.tensor(mask)
    return batch


# ---------------------------------------------------------------- the task


def sft_task(cfg: TrainConfig) -> Task:
    from .pretrained import hf_tokenizer, load_causal_lm

    tokenizer = hf_tokenizer(cfg.model, "--model")
    template = ensure_chat_template(tokenizer)
    records = read_records(cfg.data)
    train, val = split(records, cfg.val_fraction, text=lambda r: json.dumps(r[1], sort_keys=True),
                       what="records")
    model = load_causal_lm(cfg.model, cfg.dtype, "--model")
    limit = max_positions(model.config)
    if limit is not None and cfg.seq_len > limit:
        raise UsageError(f"--seq-len {cfg.seq_len} is longer than {cfg.model} allows ({limit} positions)")
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise UsageError(f"--model {cfg.model}: its tokenizer has {len(tokenizer)} tokens, more than the model's "
                         f"{vocab} embeddings")

    encoder = Encoder(tokenizer, cfg.seq_len)
    cut = 0

    def encode(part):
        nonlocal cut
        out = []
        for where, messages in part:
            ids, labels, was_cut = encoder.encode(messages, where)
            cut += was_cut
            out.append((ids, labels))
        return out

    train_examples, val_examples = encode(train), encode(val)
    rows = pack_examples(train_examples, cfg.seq_len) if cfg.packing else [[e] for e in train_examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = ShuffledBatches(len(rows), cfg.batch_size, cfg.seed,
                              lambda items: collate([rows[i] for i in items], pad, cfg.packing))
    val_batches = [collate([[e] for e in val_examples[i:i + cfg.batch_size]], pad, False)
                   for i in range(0, len(val_examples), cfg.batch_size)]
    if cfg.eval_batches:
        val_batches = val_batches[: cfg.eval_batches]

    module = loss_module(model, cfg.fused_loss)

    @torch.no_grad()
    def evaluate(model) -> dict:
        """The mean loss per response token of the validation records (each one whole, none packed)."""
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for batch in val_batches:
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model_loss(model, {k: v.to(device) for k, v in batch.items()}).float().item() * n
            count += n
        loss = total / count
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    def tokens(batch: dict) -> int:  # tokens trained on, padding excluded (packed rows: only their tail is)
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return int(batch["input_ids"].numel())

    info = {"source": cfg.model, "chat_template": template, "train_records": len(train), "val_records": len(val),
            "train_sequences": len(rows), "train_tokens": sum(len(ids) for ids, _ in train_examples),
            "train_response_tokens": sum(sum(t != -100 for t in labels) for _, labels in train_examples),
            "truncated_prompts": cut, "val_sequences": sum(len(b["input_ids"]) for b in val_batches),
            **count_parameters(model)}
    return Task(model=model, batches=batches, evaluate=evaluate, tokens=tokens,
                summary_keys={"val_loss": "final_val_loss", "val_ppl": "final_val_ppl"}, info=info, module=module)
