"""The fused causal-LM loss (torch's chunked linear_cross_entropy): HF's loss and gradients, without the logits."""

import math

import pytest
import torch
from torch import nn

from subspace_optim.memory_measured import SavedActivations
from subspace_optim.train.loss import causal_lm_loss

VOCAB, HIDDEN, BATCH, SEQ = 1000, 32, 4, 32


def tiny_lm(model_type="llama", **overrides):
    """A 1-layer HF causal LM (hidden 32, vocab 1000) in fp32, seeded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                  max_position_embeddings=128, use_cache=False, **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def lm_batch(padding=True):
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    if padding:  # a right-padded sequence, a masked prompt, and a lone ignored token
        labels[0, 20:] = -100
        labels[1, :7] = -100
        labels[3, 15] = -100
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model, batch, fused):
    loss = causal_lm_loss(model, batch, fused)
    names, params = zip(*model.named_parameters())  # tied weights appear once
    return loss, dict(zip(names, torch.autograd.grad(loss, params)))


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {"tie_word_embeddings": False}),
    ("llama", {"tie_word_embeddings": True}),
    ("phi", {}),  # lm_head with a bias
])
@pytest.mark.parametrize("padding", [False, True])
def test_fused_loss_and_gradients_equal_hf(model_type, overrides, padding):
    model = tiny_lm(model_type, **overrides)
    batch = lm_batch(padding)
    plain, plain_grads = loss_and_grads(model, batch, fused=False)
    fused, fused_grads = loss_and_grads(model, batch, fused=True)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=0)
    assert plain_grads.keys() == fused_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    head = model.get_output_embeddings()
    assert (head.weight is model.get_input_embeddings().weight) == overrides.get("tie_word_embeddings", False)
    assert (head.bias is not None) == (model_type == "phi")


def test_ignored_labels_are_left_out_of_the_mean():
    """Ignoring more labels changes the fused loss exactly as it changes HF's."""
    model = tiny_lm()
    full, padded = lm_batch(padding=False), lm_batch(padding=True)
    with torch.no_grad():
        losses = {name: (causal_lm_loss(model, b, False), causal_lm_loss(model, b, True))
                  for name, b in (("full", full), ("padded", padded))}
    assert losses["full"][0] != pytest.approx(losses["padded"][0].item(), rel=1e-4)
    for plain, fused in losses.values():
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=0)


class Held(SavedActivations):
    """SavedActivations that also keeps the shape of every tensor it counts."""

    def __init__(self, model):
        super().__init__(model)
        self.shapes = []

    def _pack(self, t):
        self.shapes.append(tuple(t.shape))
        return super()._pack(t)


def held_for_backward(model, batch, fused):
    """(bytes held for backward, those the saved-tensor hooks alone see, shapes of the held tensors)."""
    with Held(model) as rec:
        loss = causal_lm_loss(model, batch, fused)
    hooks_only = rec.bytes
    rec.add_held(loss)
    loss.backward()  # the held gradients are consumed here: backward must still work
    return rec.bytes, hooks_only, rec.shapes


def test_fused_loss_holds_no_logits():
    """The plain loss saves batch×seq×vocab floats for backward; the fused loss saves no tensor that large and
    holds the logits' bytes less, minus the vocab×hidden gradient of lm_head's weight that it computes in
    forward and keeps instead (tokens×hidden for the hidden states replaces lm_head's saved input)."""
    model = tiny_lm()
    batch = lm_batch()
    logits = BATCH * SEQ * VOCAB
    plain, plain_hooks, plain_shapes = held_for_backward(model, batch, fused=False)
    fused, fused_hooks, fused_shapes = held_for_backward(model, batch, fused=True)
    assert max(map(math.prod, plain_shapes)) >= logits
    assert max(map(math.prod, fused_shapes)) < BATCH * (SEQ - 1) * VOCAB
    weight_grad = VOCAB * HIDDEN * 4
    assert plain == plain_hooks  # nothing outside the hooks' view in HF's own graph
    assert fused - fused_hooks >= weight_grad  # the precomputed gradients, invisible to the hooks
    assert fused <= plain - 4 * logits + weight_grad


@pytest.mark.parametrize("model_type, overrides, match", [
    ("gemma2", {"head_dim": 16, "final_logit_softcapping": 0.05}, "final_logit_softcapping"),
    ("cohere", {"logit_scale": 0.0625}, "logit_scale"),
])
def test_fused_loss_refuses_models_whose_loss_differs(model_type, overrides, match):
    """HF's loss of these models is not the cross-entropy of lm_head's output: the fused loss would be wrong."""
    model = tiny_lm(model_type, **overrides)
    batch = lm_batch()
    with torch.no_grad():
        plain = causal_lm_loss(model, batch, fused=False)
        hidden = model.base_model(input_ids=batch["input_ids"]).last_hidden_state
        unscaled = nn.functional.cross_entropy(model.lm_head(hidden[:, :-1]).flatten(0, 1),
                                               batch["labels"][:, 1:].flatten())
    assert abs(plain - unscaled) > 1e-3  # what the fused loss would compute is indeed different
    with pytest.raises(ValueError, match=match):
        causal_lm_loss(model, batch, fused=True)


def test_fused_loss_needs_a_linear_lm_head():
    model = tiny_lm()
    model.set_output_embeddings(nn.Sequential(model.lm_head))
    with pytest.raises(ValueError, match="nn.Linear"):
        causal_lm_loss(model, lm_batch(), fused=True)


@pytest.mark.parametrize("tied", [False, True])
def test_fused_loss_under_fully_shard_unshards_lm_head(one_process_group, tied):
    """The harness's FSDP2 around FusedCausalLM (each decoder layer, then the wrapper as the root): the root's
    pre-forward unshards lm_head's weight, tied to the embedding or not, so the loss and every gradient are the
    unwrapped model's. Outside a forward the weight is the DTensor shard, which the fused op cannot take."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from subspace_optim.train.loss import FusedCausalLM
    from subspace_optim.train.parallel import Parallel

    batch = lm_batch()
    reference = tiny_lm(tie_word_embeddings=tied)
    expected, expected_grads = loss_and_grads(reference, batch, fused=True)
    model = tiny_lm(tie_word_embeddings=tied)
    trained = Parallel("fsdp2").wrap(FusedCausalLM(model))
    assert isinstance(trained, FSDPModule) and isinstance(model.model.layers[0], FSDPModule)
    assert isinstance(model.lm_head.weight, DTensor)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
        causal_lm_loss(model, batch, fused=True)  # the body and lm_head called around the sharded root
    loss = trained(**batch).loss
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    grads = {name.removeprefix("model."): p.grad.full_tensor() for name, p in trained.named_parameters()}
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)
