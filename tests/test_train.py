"""End-to-end runs of `subspace-optim train` on the offline BBC News corpus, and bitwise resume."""

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from subspace_optim.cli import main
from subspace_optim.train import TrainConfig, UsageError, run
from subspace_optim.train.data import bbc_news_dir
from subspace_optim.train.loop import cosine_with_warmup
from subspace_optim.train.runlog import MetricsLog

SMALL = ["--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--quiet"]


def tiny_config(path, tie=False):
    """A 1-layer LLaMA (hidden 32) as an HF config JSON: the fastest model that still runs the real code."""
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 32000,
                                "max_position_embeddings": 128, "tie_word_embeddings": tie}))
    return str(path)


@pytest.fixture(scope="module")
def bbc_slice(tmp_path_factory):
    """20 real BBC News articles per class: the resume tests need many runs, not the whole corpus."""
    folder = tmp_path_factory.mktemp("bbc")
    for article in sorted(bbc_news_dir().glob("*/*.txt")):
        if int(article.stem) <= 20:
            (folder / article.parent.name).mkdir(exist_ok=True)
            shutil.copy(article, folder / article.parent.name / article.name)
    return str(folder)


def train(*argv):
    assert main(["train", *argv]) == 0


def train_killed_after(step, monkeypatch, *argv):
    """Run `train` and interrupt it (as Ctrl-C would) right after it logs ``step``."""
    write = MetricsLog.write

    def write_then_kill(self, row):
        write(self, row)
        if row["step"] == step:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLog, "write", write_then_kill)
        assert main(["train", *argv]) == 130


def metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def final_weights(run_dir):
    return load_file(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")


def test_train_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    train("--model", tiny_config(tmp_path / "tiny.json"), "--optimizer", "golore", "--rank", "8",
          "--steps", "3", "--eval-every", "2", "--out", str(out), *SMALL)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_val_loss", "final_val_ppl", "peak_memory_bytes", "optimizer_state_bytes", "tokens",
                "tokens_per_s"):
        assert summary[key] > 0, key
    assert summary["tokens"] == 3 * 2 * 32
    assert summary["final_val_ppl"] == pytest.approx(torch.tensor(summary["final_val_loss"]).exp().item())
    memory = summary["memory"]
    assert memory["weights_bytes"] > 0 and memory["activations_bytes"] > 0 and memory["gradients_bytes"] > 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert [bool(r["val_loss"]) for r in rows] == [False, True, True]  # every 2 steps and at the end
    assert (out / "loss.png").stat().st_size > 1000
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == "golore" and config["rank"] == 8 and config["clip"] == 1.0
    printed = capsys.readouterr().out
    assert "optimizer state" in printed and "activations" in printed and "final_val_ppl" in printed


def test_named_model_and_optimizer_state_is_smaller(tmp_path, bbc_slice, capsys):
    """llama-tiny with GaLore keeps less optimizer state than torch AdamW on the same model."""
    states = {}
    for name in ("adamw", "galore"):
        out = tmp_path / name
        train("--model", "llama-tiny", "--data", bbc_slice, "--optimizer", name, "--steps", "1", "--out", str(out),
              *SMALL)
        states[name] = json.loads((out / "summary.json").read_text())["optimizer_state_bytes"]
    assert states["galore"] < states["adamw"]
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "adamw"), str(tmp_path / "galore")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "optimizer", "steps"] and table[2].split()[:2] == ["galore", "galore"]


def test_metrics_are_mirrored_to_tensorboard(tmp_path, monkeypatch, bbc_slice):
    scalars = []

    class Writer:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            pass

    monkeypatch.setattr("subspace_optim.train.runlog._tensorboard", lambda folder: Writer())
    train("--model", tiny_config(tmp_path / "tiny.json"), "--data", bbc_slice, "--steps", "2",
          "--out", str(tmp_path / "run"), *SMALL)
    assert ("loss", 1) in scalars and ("val_ppl", 2) in scalars


@pytest.mark.parametrize("optimizer, extra, tie", [
    ("adamw", [], True),                                             # torch AdamW, tied embeddings
    ("golore@50", ["--rank", "4", "--update-gap", "2"], False),     # SVD then random projections
    ("galore", ["--rank", "4", "--update-gap", "2", "--layerwise", "--grad-accum", "2"], False),
    ("golore", ["--rank", "4", "--update-gap", "2", "--state-bits", "8"], False),  # quantized embedding moments
    # int8 linear weights (codes and scales saved), layer-wise, regenerated bases, 8-bit moments, stochastic
    # rounding of the bf16 embeddings: every draw of the rounding comes back with the RNG state
    ("golore", ["--rank", "4", "--update-gap", "2", "--dtype", "bf16", "--weights", "int8", "--layerwise",
                "--random-basis", "regenerate", "--state-bits", "8", "--weight-rounding", "stochastic"], False),
    ("full", ["--dtype", "bf16", "--weight-rounding", "stochastic", "--weight-decay", "0.1"], True),
])
def test_resume_is_bitwise_identical(tmp_path, monkeypatch, bbc_slice, optimizer, extra, tie):
    """4 steps in one go == a run killed after step 3 (last checkpoint: step 2) and resumed: same weights
    (torch.equal) and the same metrics, the killed run's leftover row 3 replaced."""
    args = ["--model", tiny_config(tmp_path / "tiny.json", tie), "--optimizer", optimizer, *extra,
            "--data", bbc_slice, "--steps", "4", "--eval-every", "2", "--save-every", "2", *SMALL]
    full, split = tmp_path / "full", tmp_path / "split"
    train(*args, "--out", str(full))

    train_killed_after(3, monkeypatch, *args, "--out", str(split))
    assert len(metrics(split)) == 3
    train("--resume", str(split), "--quiet")

    a, b = final_weights(full), final_weights(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    keep = ("step", "tokens", "loss", "lr", "val_loss", "val_ppl")
    assert [{k: r[k] for k in keep} for r in metrics(full)] == [{k: r[k] for k in keep} for r in metrics(split)]


def test_resume_refuses_changed_flags(tmp_path, capsys, bbc_slice):
    out = tmp_path / "run"
    train("--model", tiny_config(tmp_path / "tiny.json"), "--data", bbc_slice, "--steps", "1", "--out", str(out),
          *SMALL)
    assert main(["train", "--resume", str(out), "--steps", "2", "--lr", "0.5"]) == 2
    assert "--lr 0.5 differs" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 2
    assert "pass --steps above it" in capsys.readouterr().err
    train("--resume", str(out), "--steps", "2", "--quiet")  # a larger --steps extends a finished run
    assert json.loads((out / "config.json").read_text())["steps"] == 2
    assert [r["step"] for r in metrics(out)] == ["1", "2"]
    assert main(["train", "--model", "llama-tiny", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_cosine_schedule():
    lr = cosine_with_warmup(warmup=10, total=110, min_ratio=0.1)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0) and lr(60) == pytest.approx(0.55) and lr(110) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)


@pytest.mark.parametrize("extra", [
    ["--optimizer", "full", "--rule", "sgd"],
    ["--optimizer", "online_pca", "--rule", "lion"],
    ["--optimizer", "auto", "--rule", "adafactor"],
    ["--optimizer", "golore", "--dtype", "bfloat16", "--target", "mlp,o_proj"],
    ["--optimizer", "rso", "--fused-loss", "--grad-accum", "2"],
    ["--optimizer", "galore", "--layerwise", "--fused-loss", "--dtype", "bfloat16"],
])
def test_optimizers_and_rules_run(tmp_path, extra):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Story {i}. " + "The council approved the new budget today. " * 5
                                for i in range(30)))
    out = tmp_path / "run"
    train("--model", tiny_config(tmp_path / "tiny.json"), "--data", str(text), "--rank", "4", "--steps", "2",
          "--out", str(out), *extra, *SMALL)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 0 and summary["final_val_loss"] > 0
    if "auto" in extra:
        assert isinstance(summary["switch_steps"], dict)


def test_auto_summary_names_the_switched_parameters(tmp_path, monkeypatch):
    """summary.json's switch_steps is keyed by parameter name, not by the optimizer's index."""
    from subspace_optim import optimizer

    monkeypatch.setitem(optimizer.SETTINGS, "auto_threshold", -1e9)  # z far below any: switch at the 1st decision
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Story {i}. " + "The council approved the new budget today. " * 5
                                for i in range(30)))
    out = tmp_path / "run"
    train("--model", tiny_config(tmp_path / "tiny.json"), "--data", str(text), "--rank", "4", "--steps", "4",
          "--update-gap", "3", "--optimizer", "auto", "--out", str(out), *SMALL)
    switched = json.loads((out / "summary.json").read_text())["switch_steps"]
    assert "model.layers.0.self_attn.q_proj.weight" in switched and "model.layers.0.mlp.down_proj.weight" in switched
    assert len(set(switched.values())) == 1  # every projected weight, at the same refresh


@pytest.mark.parametrize("side, reduced", [("std", 32), ("left", 48), ("right", 32)])
def test_side_chooses_which_dimension_is_projected(side, reduced):
    """--side reaches every projected group: the basis of a 48 x 32 (out x in) weight spans its smaller side (std),
    its rows (left) or its columns (right); the moments are r x (the other side)."""
    from subspace_optim.train.config import resolve
    from subspace_optim.train.optimizers import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 8))
    cfg = resolve(TrainConfig(optimizer="golore", rank=4, side=side, target="0"))
    opt = build_optimizer(cfg, model).optimizer
    model(torch.randn(5, 32)).square().sum().backward()
    opt.step()
    state = opt.state[model[0].weight]
    assert state["basis"].shape == (reduced, 4) and state["exp_avg"].shape == (4, 80 - reduced)


def test_state_bits_reach_our_optimizers_and_torchs_adamw_refuses_them():
    from subspace_optim.train.config import resolve
    from subspace_optim.train.optimizers import build_optimizer

    for optimizer in ("full", "golore", "rso"):
        opt = build_optimizer(resolve(TrainConfig(optimizer=optimizer, state_bits=16, rank=2)),
                              torch.nn.Sequential(torch.nn.Linear(8, 8))).optimizer
        assert {g["state_bits"] for g in opt.param_groups} == {16}
    for optimizer in ("adamw", "galore-torch"):
        with pytest.raises(UsageError, match="--state-bits 8: --optimizer .* holds float32 moments"):
            run(TrainConfig(optimizer=optimizer, state_bits=8))


def test_side_needs_a_projected_optimizer():
    for optimizer in ("adamw", "full", "rso"):
        with pytest.raises(UsageError, match="--side right"):
            run(TrainConfig(optimizer=optimizer, side="right"))


def test_fused_loss_trains_like_the_plain_loss_with_less_saved(tmp_path, bbc_slice):
    """`--fused-loss` on llama-tiny: the same first loss as HF's `.loss` (same seed and data), close losses
    after an update, and less memory held for backward: the 4 × 64 × 32000 fp32 logits are gone, the
    32000 × 128 gradient of lm_head's weight that torch's chunked loss computes in forward is held instead."""
    runs = {}
    for fused in (False, True):
        out = tmp_path / f"fused-{fused}"
        train("--model", "llama-tiny", "--data", bbc_slice, "--steps", "2", "--batch-size", "4", "--seq-len", "64",
              "--eval-batches", "1", "--quiet", "--out", str(out), *(["--fused-loss"] if fused else []))
        runs[fused] = metrics(out), json.loads((out / "summary.json").read_text())
        assert json.loads((out / "config.json").read_text())["fused_loss"] is fused
    (plain_rows, plain), (fused_rows, fused) = runs[False], runs[True]
    assert float(fused_rows[0]["loss"]) == pytest.approx(float(plain_rows[0]["loss"]), rel=1e-5)
    assert float(fused_rows[1]["loss"]) == pytest.approx(float(plain_rows[1]["loss"]), rel=1e-3)
    assert fused["final_val_loss"] == pytest.approx(plain["final_val_loss"], rel=1e-3)
    logits, weight_grad = 4 * 64 * 32000 * 4, 32000 * 128 * 4
    saved = {name: s["memory"]["activations_bytes"] for name, s in (("plain", plain), ("fused", fused))}
    assert saved["fused"] <= saved["plain"] - logits + weight_grad


def test_checkpointing_changes_memory_not_the_run(tmp_path, bbc_slice):
    """--checkpointing (HF activation checkpointing, non-reentrant), here with RSO's custom autograd layers and the
    fused loss: the same losses step for step as without it, and far less saved for backward (only each
    layer's input, held by the checkpoint outside autograd's saved tensors)."""
    runs = {}
    for ckpt in (False, True):
        out = tmp_path / f"ckpt-{ckpt}"
        train("--model", "llama-tiny", "--data", bbc_slice, "--optimizer", "rso", "--update-gap", "2", "--steps", "3",
              "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--fused-loss", "--quiet",
              "--out", str(out), *(["--checkpointing"] if ckpt else []))
        runs[ckpt] = [float(r["loss"]) for r in metrics(out)], json.loads((out / "summary.json").read_text())
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6, abs=0)
    # the fused loss's lm_head weight gradient (32000 x 128 fp32, computed in forward) is held either way
    saved = {ckpt: s["memory"]["activations_bytes"] - 32000 * 128 * 4 for ckpt, (_, s) in runs.items()}
    assert 0 < saved[True] < 0.5 * saved[False]


def test_checkpointing_needs_a_model_that_supports_it():
    from subspace_optim.train.models import enable_checkpointing

    with pytest.raises(UsageError, match="--checkpointing: Sequential does not support activation checkpointing"):
        enable_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_fused_loss_usage_errors(tmp_path, bbc_slice, capsys):
    with pytest.raises(UsageError, match="--fused-loss is for causal-LM training"):
        run(TrainConfig(task="classify", fused_loss=True))
    # `finetune` has the flag for --task sft (a causal LM); a classifier refuses it in one line
    assert main(["finetune", "--fused-loss", "--out", str(tmp_path / "never")]) == 2
    assert "--fused-loss is for causal-LM training" in capsys.readouterr().err
    gemma = tmp_path / "gemma2.json"
    gemma.write_text(json.dumps({"model_type": "gemma2", "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                                 "head_dim": 16, "vocab_size": 32000, "final_logit_softcapping": 30.0}))
    out = tmp_path / "run"
    assert main(["train", "--model", str(gemma), "--data", bbc_slice, "--fused-loss", "--out", str(out), *SMALL]) == 2
    assert "--fused-loss: Gemma2ForCausalLM has final_logit_softcapping=30.0" in capsys.readouterr().err
    assert not out.exists()


def test_full_scaled_steps_the_targeted_linear_weights_at_lr_times_scale():
    """--optimizer full-scaled: every parameter dense, the weights the projected methods project in a group at
    lr x scale, the rest at lr."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from subspace_optim.train.config import TrainConfig, resolve
    from subspace_optim.train.optimizers import build_optimizer

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=50))
    cfg = resolve(TrainConfig(optimizer="full-scaled", lr=1e-2, scale=0.25))
    opt = build_optimizer(cfg, model).optimizer
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model.model.layers[0].mlp.down_proj.weight)] == pytest.approx(2.5e-3)
    assert lrs[id(model.model.embed_tokens.weight)] == 1e-2 and lrs[id(model.lm_head.weight)] == 1e-2
    assert all("rank" not in g for g in opt.param_groups)
    assert len(lrs) == sum(1 for _ in model.parameters())
