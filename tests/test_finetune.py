"""`subspace-optim finetune`: the packaged MiniLM on BBC News, accuracy and macro-F1."""

import json

import pytest
import torch

from subspace_optim.cli import main
from subspace_optim.train.finetune import macro_f1


def test_macro_f1():
    assert macro_f1([0, 1, 2], [0, 1, 2]) == 1.0
    # class 0: tp 1, fp 1, fn 0 -> 2/3; class 1: tp 0, fp 0, fn 1 -> 0
    assert macro_f1([0, 0], [0, 1]) == pytest.approx((2 / 3 + 0) / 2)


def test_finetune_minilm_on_bbc_news(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--optimizer", "galore", "--rank", "4", "--steps", "3", "--batch-size", "4",
                 "--seq-len", "32", "--eval-batches", "2", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["final_accuracy"] <= 1 and 0 <= summary["final_f1"] <= 1
    assert summary["final_val_loss"] > 0
    for key in ("peak_memory_bytes", "optimizer_state_bytes"):
        assert summary[key] > 0
    assert summary["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert summary["val_examples"] == 8 and summary["train_examples"] > 1700
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,tokens,loss,lr,val_loss,accuracy,f1,tokens_per_s,peak_memory_bytes"
    assert "final_accuracy" in capsys.readouterr().out


def test_finetune_on_a_jsonl_file(tmp_path):
    rows = [{"text": f"{'good great fine' if i % 2 else 'bad awful poor'} review number {i}", "label": i % 2}
            for i in range(40)]
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(tmp_path / "reviews.jsonl"), "--optimizer", "golore", "--steps", "2",
                 "--batch-size", "4", "--seq-len", "16", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == ["0", "1"] and summary["train_examples"] + summary["val_examples"] == 40


def test_eval_subset_mixes_the_classes():
    """--eval-batches takes a hash-ordered subset: BBC News is read class by class, so the first validation
    articles would all share one label."""
    from subspace_optim.train.data import read_labeled, split
    from subspace_optim.train.finetune import evaluation_subset

    texts, labels, _ = read_labeled("bbcnews", "text", "label")
    _, val = split(list(zip(texts, labels)), 0.2, text=lambda pair: pair[0])
    assert len({y for _, y in val[:32]}) == 1  # what the file order alone gives
    subset = evaluation_subset(val, 32)
    assert len(subset) == 32 and len({y for _, y in subset}) >= 4
    assert evaluation_subset(val, 32) == subset


def test_a_folder_without_class_folders_says_what_layout_it_expects(tmp_path, capsys):
    """Plain .txt files in the folder itself used to be skipped without a word."""
    for i, label in enumerate(["sport", "tech"] * 3):
        (tmp_path / label).mkdir(exist_ok=True)
        (tmp_path / label / f"{i}.txt").write_text(f"{label} article {i}")
    (tmp_path / "loose.txt").write_text("an article in no class")
    assert main(["finetune", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one sub-folder of .txt files per class" in err and "e.g. loose.txt" in err


def test_checkpointing_turns_the_generation_cache_off_without_a_warning(monkeypatch):
    """HF warns, even under --quiet, that checkpointing overrides use_cache=True (MiniLM's config has it)."""
    from transformers.utils import generic

    from subspace_optim.train.models import build_classifier, enable_checkpointing

    model, tokenizer = build_classifier("minilm", 2)
    assert model.config.use_cache
    enable_checkpointing(model)
    said = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda message, *a, **k: said.append(message))
    model.train()
    batch = tokenizer(["a short text", "another one"], return_tensors="pt", padding=True)
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    assert not said and not model.config.use_cache
