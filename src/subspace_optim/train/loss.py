"""The causal-LM training loss: HF's own ``.loss``, or the fused loss, where torch's ``linear_cross_entropy``
computes lm_head and the cross-entropy together in chunks of tokens, so the batch×seq×vocab logits (and the
log-softmax that autograd would save, and their gradients) never exist at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .task import model_loss

# Config fields (of the model's text config) that make HF's logits more than lm_head(hidden) or its loss more
# than their cross-entropy, with the value at which they do nothing: Gemma's c·tanh(logits / c), Cohere's
# logits · s, Granite's logits / s, an output multiplier, a mixture-of-experts router loss added to `.loss`.
NEUTRAL_CONFIG = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                  "output_multiplier": 1.0, "output_router_logits": False}


# Tokens per chunk on CPU. torch's own heuristic (kept on other devices, where torch tuned it) sizes a chunk's
# logits like the chunk input, i.e. vocab/hidden times fewer tokens than hidden units: 4 to 128 tokens for
# llama-tiny to llama-60m. On CPU that made lm_head + loss (forward and backward) 1.1 to 8.5 times slower than
# the plain loss, fp32 and bf16 (each chunk re-reads the vocab×hidden weight gradient), while 256-token chunks
# ran 0.6 to 1.5 times its time; their logits (256 × 32000 fp32) are 31 MiB.
CPU_CHUNK_TOKENS = 256


def chunk_options(device: torch.device) -> torch.nn.LinearCrossEntropyOptions:
    if device.type == "cpu":
        return torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=CPU_CHUNK_TOKENS)
    return torch.nn.LinearCrossEntropyOptions()


def fused_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(body, lm_head) of an HF causal LM whose ``.loss`` is CE(lm_head(body(x).last_hidden_state)) with
    shifted labels, the only case where the fused loss equals it; ValueError for any other model."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    config = model.config.get_text_config() if hasattr(model, "config") else None
    if config is None or not hasattr(model, "base_model") or model.base_model is model:
        raise ValueError(f"the fused loss needs an HF causal LM with a base model, not {type(model).__name__}")
    for name, neutral in NEUTRAL_CONFIG.items():
        value = getattr(config, name, neutral)
        if value != neutral:
            raise ValueError(f"{type(model).__name__} has {name}={value!r}: its loss is not the plain "
                             "cross-entropy of lm_head's output, so the fused loss would differ")
    if getattr(model, "loss_function", ForCausalLMLoss) is not ForCausalLMLoss:
        raise ValueError(f"{type(model).__name__} computes its loss with {model.loss_function.__name__}, "
                         "not ForCausalLMLoss")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the fused loss needs lm_head to be an nn.Linear, not {type(head).__name__} "
                         "(leave lm_head out of --target)")
    return model.base_model, head


class FusedCausalLM(nn.Module):
    """An HF causal LM whose ``forward(**batch).loss`` is the fused loss: its body's last hidden states, then torch's
    chunked ``linear_cross_entropy`` with lm_head's weight and bias. The loss and both uses of the weights happen
    inside one module's forward, so DDP and FSDP2 wrap this module and their hooks fire as for ``model(**batch)``:
    FSDP2's pre-forward unshards lm_head's weight (outside a forward it is the rank's DTensor shard), DDP reduces
    every gradient. The model is ``self.model``, its parameters and state-dict names the model's under "model.".

    Position t predicts label t+1 (HF's ForCausalLMLoss pads the labels with -100 and drops the first, which
    ignores the last position; here hidden[:, :-1] meets labels[:, 1:]). A tied lm_head is the embedding
    weight, and its gradient reaches both uses. The chunked op computes the gradients of hidden, lm_head's
    weight and bias during forward and keeps them (tokens×hidden + vocab×hidden) until backward instead of
    tokens×vocab logits. Its loss has the input's dtype: in bfloat16 the fp32-accumulated value is rounded to
    bfloat16 once, where HF returns fp32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        fused_parts(model)  # ValueError for a model whose loss is not the fused one
        self.model = model

    def forward(self, labels: torch.Tensor, **inputs):
        from transformers.modeling_outputs import CausalLMOutput

        body, head = self.model.base_model, self.model.get_output_embeddings()
        hidden = body(**inputs).last_hidden_state[:, :-1].flatten(0, 1)
        targets = labels[:, 1:].flatten().long()  # int64, or the op falls back to full logits
        loss = F.linear_cross_entropy(hidden, head.weight, targets, linear_bias=head.bias, ignore_index=-100,
                                      options=chunk_options(hidden.device))
        return CausalLMOutput(loss=loss)


def causal_lm_loss(model: nn.Module, batch: dict, fused: bool) -> torch.Tensor:
    """Mean next-token cross-entropy over the labels that are not -100: ``model(**batch).loss``, or with
    ``fused`` the same value from ``FusedCausalLM(model)`` (a ValueError for a model it cannot fuse)."""
    return model_loss(FusedCausalLM(model) if fused else model, batch)


def loss_module(model: nn.Module, fused: bool):
    """What the harness trains around a model: a function of the model (once moved and transformed) that gives
    the module whose ``forward(**batch).loss`` is the training loss, the model itself or ``FusedCausalLM`` around
    it. --fused-loss on a model it cannot fuse is one UsageError, raised now for ``model``."""
    from .config import UsageError

    if not fused:
        return lambda model: model
    try:
        fused_parts(model)
    except ValueError as err:
        raise UsageError(f"--fused-loss: {err}") from None
    return FusedCausalLM
