"""RSO through the harness: `subspace-optim train --optimizer rso` trains, merges and resumes exactly."""

import json

import torch

from test_train import (  # noqa: F401 (bbc_slice is a fixture)
    SMALL, bbc_slice, final_weights, metrics, tiny_config, train, train_killed_after,
)


def test_rso_trains_llama_tiny_through_the_cli(tmp_path, bbc_slice):  # noqa: F811
    out = tmp_path / "run"
    train("--model", "llama-tiny", "--optimizer", "rso", "--rank", "16", "--update-gap", "2", "--data", bbc_slice,
          "--steps", "5", "--eval-every", "5", "--lr", "3e-3", "--out", str(out), *SMALL)
    rows = metrics(out)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 0 and summary["final_val_loss"] > 0
    weights = final_weights(out)
    # The outer-iteration count (P is regenerated from it, never saved) is part of the saved weights.
    assert any(k.endswith("rso_key") for k in weights)
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])


def test_rso_resume_is_bitwise_identical(tmp_path, monkeypatch, bbc_slice):  # noqa: F811
    args = ["--model", tiny_config(tmp_path / "tiny.json"), "--optimizer", "rso", "--rank", "4", "--update-gap",
            "3", "--data", bbc_slice, "--steps", "6", "--eval-every", "3", "--save-every", "2", *SMALL]
    full, split = tmp_path / "full", tmp_path / "split"
    train(*args, "--out", str(full))
    train_killed_after(5, monkeypatch, *args, "--out", str(split))
    train("--resume", str(split), "--quiet")  # resumes from step 4: mid outer-iteration (merge at 3 and 6)
    a, b = final_weights(full), final_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _B_norm(rso_eta, steps=6):
    """‖B‖ of every RSO layer after `steps` steps of the harness's rso optimizer (no merge yet) on a tiny llama."""
    import transformers

    from subspace_optim.rso import rso_layers
    from subspace_optim.train.config import TrainConfig, resolve
    from subspace_optim.train.optimizers import build_optimizer

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4))
    cfg = resolve(TrainConfig(optimizer="rso", rank=4, update_gap=100, lr=1e-2, rso_eta=rso_eta))
    opt = build_optimizer(cfg, model).optimizer
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return torch.stack([layer.B.norm() for layer in rso_layers(model).values()]).norm()


def test_rso_eta_adds_the_proximal_term_and_is_checked(tmp_path, bbc_slice, capsys):  # noqa: F811
    """--rso-eta reaches the controller: a strong proximal pull (small eta) keeps B near 0, where without it B
    grows step after step; a bad value or another optimizer is a usage error."""
    free, pulled = _B_norm(None), _B_norm(1e-3)
    assert pulled < 0.5 * free
    from subspace_optim.cli import main

    for bad in (["--optimizer", "golore", "--rso-eta", "1"], ["--optimizer", "rso", "--rso-eta", "0"],
                ["--optimizer", "rso", "--rso-eta", "inf"], ["--optimizer", "rso", "--moments", "keep"]):
        assert main(["train", "--data", bbc_slice, "--out", str(tmp_path / "x"), *bad, *SMALL]) == 2
        assert bad[2] in capsys.readouterr().err
