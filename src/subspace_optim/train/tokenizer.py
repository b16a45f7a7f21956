"""Tokenizers trained on the run's own training split: ``--tokenizer bpe:N`` is a byte-level BPE of N tokens.

Why: with the 32k LLaMA vocabulary a CPU-sized model is mostly its dense embedding and lm_head, which no
subspace method projects; a small vocabulary leaves the parameters in the linear layers the methods act on.

The BPE is trained with HF ``tokenizers`` on the training documents only (validation text never shapes it),
and the result is deterministic (same documents, settings and ``tokenizers`` version give the same file). It
is cached under ``cache_dir()`` by a key of exactly those three, so every run of a study loads one file; each
run records the file's path and SHA-256 in its info.json and summary.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .config import UsageError
from .data import Tokenizer, default_tokenizer_path

_SPEC = re.compile(r"bpe:(\d+)")
#: Everything but the vocabulary size that shapes the trained file (part of the cache key).
BPE_SETTINGS = {"model": "BPE", "pre_tokenizer": "ByteLevel(add_prefix_space=False)", "min_frequency": 2,
                "special_tokens": ["<s>", "</s>"]}  # found by data.Tokenizer as BOS/EOS


def bpe_vocab_size(spec: str | None) -> int | None:
    """N for a ``bpe:N`` spec, else None (a file path, or None for the default SentencePiece model)."""
    match = _SPEC.fullmatch(spec or "")
    if match is None:
        return None
    size = int(match.group(1))
    if size < 258:  # the 256 bytes and the two special tokens come first
        raise UsageError(f"--tokenizer {spec}: a byte-level BPE needs at least 258 tokens")
    return size


def cache_dir() -> Path:
    """$SUBSPACE_OPTIM_CACHE, else ~/.cache/subspace_optim (XDG_CACHE_HOME respected)."""
    if os.environ.get("SUBSPACE_OPTIM_CACHE"):
        return Path(os.environ["SUBSPACE_OPTIM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "subspace_optim"


def bpe_key(vocab_size: int, train_docs: list[str]) -> str:
    """What determines the trained file: the documents, the settings and the tokenizers version."""
    import tokenizers

    data = hashlib.sha256()
    for doc in train_docs:
        data.update(hashlib.sha256(doc.encode("utf-8")).digest())
    identity = {"vocab_size": vocab_size, **BPE_SETTINGS, "tokenizers": tokenizers.__version__,
                "documents": data.hexdigest()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def trained_bpe(vocab_size: int, train_docs: list[str]) -> Path:
    """The cached tokenizer.json of a byte-level BPE trained on ``train_docs``; trained on first use."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    path = cache_dir() / "tokenizers" / f"bpe{vocab_size}-{bpe_key(vocab_size, train_docs)[:20]}.json"
    if path.is_file():
        return path
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=BPE_SETTINGS["min_frequency"],
                                  special_tokens=BPE_SETTINGS["special_tokens"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(train_docs, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: concurrent runs never read half a file
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_tokenizer(spec: str | None, train_docs: list[str] | None) -> tuple[Tokenizer, dict]:
    """(tokenizer, facts for info.json) for ``--tokenizer``: ``bpe:N`` (trained on ``train_docs``; None for
    streamed data, which is refused), a SentencePiece .model or tokenizer.json, or None (the default model)."""
    vocab_size = bpe_vocab_size(spec)
    if vocab_size is None:
        tokenizer = Tokenizer(spec)
    elif train_docs is None:
        raise UsageError(f"--tokenizer {spec} is trained on the training split of local data; a streamed "
                         "dataset has no fixed split to train it on (pass a tokenizer file)")
    else:
        tokenizer = Tokenizer(trained_bpe(vocab_size, train_docs))
    info = {"tokenizer": spec or str(default_tokenizer_path()), "tokenizer_file": str(tokenizer.path),
            "tokenizer_sha256": file_sha256(tokenizer.path), "vocab_size": tokenizer.vocab_size}
    return tokenizer, info
