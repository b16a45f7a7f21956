"""--optimizer lora: the LoRA baseline (Hu et al. 2021) through HF peft, on the modules the subspace methods project.

Each module that --target selects (by default every linear layer but lm_head: the weights GaLore/GoLore project)
gets a rank --lora-rank adapter W + (alpha / r) B A with W frozen, A random and B zero at the start. Everything
else (embeddings, norms, biases, lm_head, a classifier head) is trained densely, as the subspace methods train it,
so a comparison isolates low-rank adapters against low-rank projections. The optimizer is torch's AdamW.

The peft wrapper (PeftModel) is only a shell: peft injects its LoRA layers into the model in place, so training,
the fused loss and checkpoints use the bare HF model (state-dict names such as
``model.layers.0.self_attn.q_proj.lora_A.default.weight``). ``wrap`` rebuilds the same structure for export, which
merges the adapters (``merge_and_unload``) or writes them as a peft adapter.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..groups import target_modules
from .config import TrainConfig, UsageError, target_spec


def wrap(cfg: TrainConfig, model: nn.Module):
    """The PeftModel of ``model`` with adapters on --target's linear layers (``cfg`` with --lora-rank and
    --lora-alpha resolved, as ``optimizers._lora`` does and config.json records); the adapted
    weights frozen, every other parameter trainable. ``model`` itself is changed in place."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise UsageError(f"--optimizer lora needs peft: pip install peft ({err})") from None
    try:
        names = [name for name, module in target_modules(model, target_spec(cfg.target))
                 if isinstance(module, nn.Linear)]
    except ValueError as err:
        raise UsageError(f"--target {cfg.target}: {err}") from None
    if not names:
        raise UsageError(f"--target {cfg.target} selects no linear layer for LoRA adapters")
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=names)
    with warnings.catch_warnings():  # peft asks transformers about gradient checkpointing by a deprecated name
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Linear):
            base.weight.requires_grad_(False)
    return peft_model

