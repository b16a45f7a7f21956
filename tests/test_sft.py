"""Fine-tuning pretrained causal LMs: `train --init-from`, `finetune --task sft` (loss on responses only, packing),
`--optimizer lora`, `export` to HF folders, and the one-line errors for bad SFT input. Tiny models, few steps."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from subspace_optim.cli import main
from subspace_optim.train.config import TrainConfig, resolve
from subspace_optim.train.data import bbc_news_dir

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 32000, "max_position_embeddings": 128, "tie_word_embeddings": False}
QUIET = ["--quiet", "--batch-size", "2", "--eval-batches", "1"]


def records(n=24):
    return [{"prompt": f"Write a headline for story {i} about {'markets' if i % 2 else 'football'}.",
             "response": f"{'Shares rise' if i % 2 else 'United win'} again, number {i}"} for i in range(n)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A pretrained 1-layer LLaMA run folder, its HF export, a BBC slice and a records file."""
    root = tmp_path_factory.mktemp("sft")
    data = root / "bbc"
    for article in sorted(bbc_news_dir().glob("*/*.txt")):
        if int(article.stem) <= 4:
            (data / article.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(article, data / article.parent.name / article.name)
    (root / "tiny.json").write_text(json.dumps(TINY))
    assert main(["train", "--model", str(root / "tiny.json"), "--data", str(data), "--optimizer", "golore",
                 "--steps", "2", "--seq-len", "32", "--out", str(root / "base"), *QUIET]) == 0
    assert main(["export", str(root / "base"), str(root / "base-hf")]) == 0
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    return root


def last_weights(run):
    return load_file(sorted((run / "checkpoints").glob("step_*"))[-1] / "model.safetensors")


def test_init_from_loads_the_folders_weights(work):
    """--init-from a run folder and an HF folder: the model the run starts from is the folder's, bitwise; in
    bfloat16 it is the folder's weights rounded once, and there is no float32 parameter."""
    from subspace_optim.train.pretrain import lm_task

    saved = last_weights(work / "base")
    hf = load_file(work / "base-hf" / "model.safetensors")
    assert saved.keys() == hf.keys() and all(torch.equal(saved[k], hf[k]) for k in saved)
    from transformers import AutoModelForCausalLM

    sharded = work / "base-sharded"  # an HF folder in several safetensors files with an index
    if not sharded.exists():
        AutoModelForCausalLM.from_pretrained(work / "base-hf").save_pretrained(sharded, max_shard_size="1MB")
        shutil.copy(work / "base-hf" / "tokenizer.json", sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    for source in (work / "base", work / "base-hf", sharded):
        cfg = resolve(TrainConfig(init_from=str(source), data=str(work / "bbc"), seq_len=32))
        state = lm_task(cfg).model.state_dict()
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    cfg = resolve(TrainConfig(init_from=str(work / "base-hf"), data=str(work / "bbc"), seq_len=32, dtype="bfloat16"))
    model = lm_task(cfg).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.equal(v, saved[k].to(torch.bfloat16)) for k, v in model.state_dict().items())


def test_init_from_then_train_continues(work):
    out = work / "continued"
    assert main(["train", "--init-from", str(work / "base"), "--data", str(work / "bbc"), "--optimizer", "adamw",
                 "--steps", "1", "--seq-len", "32", "--out", str(out), *QUIET]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init_from"] == str(work / "base") and summary["final_val_loss"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--tokenizer", "bpe:300"], "does not match the tokenizer of --init-from"),
    (["--model", "llama-tiny"], "give only --init-from"),
])
def test_init_from_refuses_a_foreign_tokenizer(work, capsys, argv, message):
    assert main(["train", "--init-from", str(work / "base"), "--data", str(work / "bbc"), "--steps", "1",
                 "--out", str(work / "never"), *argv, *QUIET]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("subspace-optim train: error:")
    assert not (work / "never").exists()


def test_exported_tokenizer_encodes_as_training_did(work):
    """The HF tokenizer written beside a run's model (converted from the SentencePiece model) gives the ids the run
    trained on, and puts BOS first as every training document began."""
    from transformers import AutoTokenizer

    from subspace_optim.train.data import Tokenizer

    ours, theirs = Tokenizer(), AutoTokenizer.from_pretrained(work / "base-hf")
    texts = [p.read_text(errors="replace") for p in sorted((work / "bbc").rglob("*.txt"))[:5]] + ["  two  spaces\n"]
    for text in texts:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode([text])[0]
    assert theirs("Hello")["input_ids"] == ours.document(ours.encode(["Hello"])[0])[:-1]  # BOS, no EOS


def chat_tokenizer(work):
    from subspace_optim.train.pretrained import hf_tokenizer
    from subspace_optim.train.sft import ensure_chat_template

    tokenizer = hf_tokenizer(str(work / "base-hf"))
    ensure_chat_template(tokenizer)
    return tokenizer


def test_labels_cover_the_responses_only(work):
    """Prompt tokens carry label -100; the labelled tokens are exactly each response and its end-of-sequence
    token; with a tokenizer's own (ChatML-like) template, over several turns too."""
    from subspace_optim.train.sft import Encoder

    tokenizer = chat_tokenizer(work)
    encoder = Encoder(tokenizer, 128)
    chat = [{"role": "user", "content": "Summarise: shares rose."}, {"role": "assistant", "content": "Shares up"}]
    ids, labels, cut = encoder.encode(chat, "record")
    assert not cut and len(ids) == len(labels)
    kept = [t for t in labels if t != -100]
    assert tokenizer.decode(kept) == "Shares up</s>"
    first = labels.index(kept[0])
    assert all(t == -100 for t in labels[:first]) and labels[first:] == ids[first:]
    assert tokenizer.decode(ids[:first]).endswith("### Response:\n")

    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == "
                               "'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One"},
             {"role": "assistant", "content": "First answer"}, {"role": "user", "content": "Two"},
             {"role": "assistant", "content": "Second answer"}]
    ids, labels, _ = Encoder(tokenizer, 128).encode(turns, "record")
    spans, run = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    spans += [tokenizer.decode(run)] if run else []
    assert [s.strip() for s in spans] == ["First answer</s>", "Second answer</s>"]

    from subspace_optim.train.config import UsageError

    tokenizer.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must "
                               "be the user\\'s') }}{% endif %}" + tokenizer.chat_template)
    with pytest.raises(UsageError, match="record: the chat template refuses this record"):
        Encoder(tokenizer, 128).encode(turns, "record")


def test_the_loss_ignores_the_prompt(work):
    """Changing the prompt's labels changes nothing: the training loss of a batch depends on the response
    positions only (equal to a cross-entropy over those alone)."""
    from subspace_optim.train.pretrained import load_causal_lm
    from subspace_optim.train.sft import Encoder, collate

    model = load_causal_lm(str(work / "base-hf"), "float32")
    ids, labels, _ = Encoder(chat_tokenizer(work), 128).encode(
        [{"role": "user", "content": "A long prompt about markets."}, {"role": "assistant", "content": "Up"}], "r")
    batch = collate([[(ids, labels)]], 0, False)
    loss = model(**batch).loss
    logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    targets = torch.tensor(ids[1:])
    keep = torch.tensor(labels[1:]) != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, manual)
    assert keep.sum() == 2  # "Up" and </s>


def test_packing_keeps_examples_apart(work):
    """A packed row (position ids restarting per example, no attention mask) gives each example the loss it has
    alone: the examples do not attend to each other."""
    from subspace_optim.train.pretrained import load_causal_lm
    from subspace_optim.train.sft import Encoder, collate, pack_examples

    model = load_causal_lm(str(work / "base-hf"), "float32")
    encoder = Encoder(chat_tokenizer(work), 128)
    examples = [encoder.encode([{"role": "user", "content": r["prompt"]},
                                {"role": "assistant", "content": r["response"]}], "r")[:2] for r in records(3)]
    rows = pack_examples(examples, 128)
    assert len(rows) == 1 and len(rows[0]) == 3
    packed = collate(rows, 0, True)
    assert packed["position_ids"][0, len(examples[0][0])] == 0 and "attention_mask" not in packed
    apart = [model(**collate([[e]], 0, False)).loss * sum(t != -100 for t in e[1]) for e in examples]
    total = sum(sum(t != -100 for t in e[1]) for e in examples)
    torch.testing.assert_close(model(**packed).loss, sum(apart) / total, rtol=1e-5, atol=1e-5)
    assert sum(len(r) for r in pack_examples(examples, 30)) == 3  # never splits an example


@pytest.mark.parametrize("optimizer", ["golore", "lora"])
def test_sft_runs_and_exports_a_model_that_generates(work, optimizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from subspace_optim.train.pretrained import run_model

    run, hf = work / f"sft-{optimizer}", work / f"sft-{optimizer}-hf"
    assert main(["finetune", "--task", "sft", "--model", str(work / "base"), "--data", str(work / "chat.jsonl"),
                 "--optimizer", optimizer, "--steps", "2", "--seq-len", "64", "--lr", "1e-2", "--packing",
                 *(["--fused-loss"] if optimizer == "lora" else []), "--out", str(run), *QUIET]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_records"] + summary["val_records"] == 24 and summary["final_val_loss"] > 0
    assert summary["memory"]["optimizer_state_bytes"] > 0
    assert main(["export", str(run), str(hf)]) == 0
    model, tokenizer = AutoModelForCausalLM.from_pretrained(hf), AutoTokenizer.from_pretrained(hf)
    x = torch.randint(0, 32000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, run_model(run)[0](input_ids=x).logits)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Markets today"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4
    if optimizer == "lora":
        from peft import AutoPeftModelForCausalLM

        assert json.loads((run / "config.json").read_text())["lora_rank"] == 8  # hidden 32 // 4
        assert main(["export", str(run), str(work / "adapter"), "--lora-adapter"]) == 0
        adapted = AutoPeftModelForCausalLM.from_pretrained(work / "adapter")
        with torch.no_grad():
            torch.testing.assert_close(adapted(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_sft_layerwise_run_resumes_as_sft(work):
    """finetune --resume without --task continues an SFT run as SFT (its own task), layer-wise here."""
    run = work / "sft-layerwise"
    argv = ["--data", str(work / "chat.jsonl"), "--seq-len", "64", "--quiet", "--batch-size", "2", "--eval-batches", "1"]
    assert main(["finetune", "--task", "sft", "--model", str(work / "base-hf"), "--optimizer", "galore", "--layerwise",
                 "--rank", "4", "--steps", "1", "--out", str(run), *argv]) == 0
    assert main(["finetune", "--resume", str(run), "--steps", "2", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["task"] == "sft"
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_train_lora_freezes_the_targets_and_trains_the_rest(work):
    """`train --optimizer lora`: gradients exist for every parameter but the targeted linear weights, plus the
    adapters (rank 8 = hidden 32 // 4: r * (in + out) each), and the memory report counts them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from subspace_optim.groups import target_modules

    run = work / "train-lora"
    assert main(["train", "--model", str(work / "tiny.json"), "--data", str(work / "bbc"), "--optimizer", "lora",
                 "--steps", "1", "--seq-len", "32", "--out", str(run), *QUIET]) == 0
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY))
    targets = [m for _, m in target_modules(model, "all-linear")]
    trainable = (sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() for m in targets)
                 + sum(8 * (m.in_features + m.out_features) for m in targets))
    memory = json.loads((run / "summary.json").read_text())["memory"]
    assert memory["gradients_bytes"] == 4 * trainable
    assert memory["optimizer_state_bytes"] >= 8 * trainable


def test_rso_run_exports_plain_linear_layers(work):
    """RSO's W + B P is folded into nn.Linear weights: the exported model computes what the run's model did."""
    from transformers import AutoModelForCausalLM

    from subspace_optim.rso import apply_rso
    from subspace_optim.train.pretrained import model_config

    run = work / "rso"
    assert main(["train", "--model", str(work / "tiny.json"), "--data", str(work / "bbc"), "--optimizer", "rso",
                 "--rank", "4", "--steps", "3", "--update-gap", "2", "--lr", "0.05", "--seq-len", "32",
                 "--out", str(run), *QUIET]) == 0  # merged once (step 2): a new P, and B trained on it
    assert main(["export", str(run), str(work / "rso-hf")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(work / "rso-hf")
    assert "B" not in str(list(exported.state_dict()))
    trained = AutoModelForCausalLM.from_config(model_config(str(run)))
    apply_rso(trained, rank=4, seed=0)
    trained.load_state_dict(last_weights(run))  # torch's own loading: P regenerated from the saved key
    assert {int(m.rso_key[2]) for m in trained.modules() if hasattr(m, "rso_key")} == {1}
    assert any(m.B.abs().sum() > 0 for m in trained.modules() if hasattr(m, "B"))  # B trained, not yet merged
    x = torch.randint(0, 32000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=x).logits, trained(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_classifier_lora_run_exports_a_sequence_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [{"text": f"{'good great' if i % 2 else 'bad awful'} review {i}", "label": i % 2} for i in range(20)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert main(["finetune", "--data", str(tmp_path / "r.jsonl"), "--optimizer", "lora", "--lora-rank", "2",
                 "--checkpointing", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--out", str(run), "--quiet"]) == 0
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert model.config.id2label == {0: "0", 1: "1"}
    assert model(**tokenizer(["good"], return_tensors="pt")).logits.shape == (1, 2)


BAD = [
    ("", "holds no records"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', "chat.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}\n', "no 'response' field"),
    ('{"prompt": "a", "response": "  "}\n', "the response is empty"),
    ('{"messages": [{"role": "user"}]}\n', 'message 0 needs a string "role" and a string "content"'),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant message"),
    ('["prompt", "response"]\n', "must be a JSON object"),
    ('{"prompt": "a", "response": "' + "word " * 80 + '"}\n{"prompt": "b", "response": "c"}\n',
     "more than --seq-len 32"),
]


@pytest.mark.parametrize("content, message", BAD)
def test_bad_sft_input_is_one_line(work, tmp_path, capsys, content, message):
    (tmp_path / "chat.jsonl").write_text(content)
    assert main(["finetune", "--task", "sft", "--model", str(work / "base-hf"), "--data", str(tmp_path / "chat.jsonl"),
                 "--seq-len", "32", "--steps", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("subspace-optim finetune: error:")
    assert not (tmp_path / "run").exists()


def test_a_model_folder_without_weights_is_one_line(work, tmp_path, capsys):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    shutil.copy(work / "base-hf" / "config.json", folder)
    for argv in (["finetune", "--task", "sft", "--model", str(folder)], ["train", "--init-from", str(folder)],
                 ["finetune", "--task", "sft"]):
        assert main([*argv, "--data", str(work / "chat.jsonl"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("no weights" in err or "needs --model DIR" in err), err
