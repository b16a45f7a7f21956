"""`subspace-optim export RUN DIR`: a finished run as an HF folder that ``AutoModelForCausalLM`` (train, finetune
--task sft) or ``AutoModelForSequenceClassification`` (finetune) ``.from_pretrained`` loads, with its tokenizer.

The model comes from ``pretrained.run_model``: RSO layers folded back into plain linear layers, LoRA adapters
merged. With ``lora_adapter`` a LoRA run is written as a peft adapter instead (adapter_config.json and
adapter_model.safetensors, which ``peft.AutoPeftModelForCausalLM.from_pretrained(DIR)`` loads) over DIR/base: the
run's model without its adapters, i.e. the frozen starting weights with what the run trained densely (embeddings,
norms, lm_head or the classifier head), so adapter + base equal the merged model. An SFT run's tokenizer carries
the chat template it was trained with.
"""

from __future__ import annotations

from pathlib import Path

from .config import UsageError
from .pretrained import _quiet_transformers


def export(run: Path, out: Path, *, lora_adapter: bool = False, dtype: str | None = None) -> str:
    """Write ``run``'s last checkpoint to ``out`` as an HF folder; returns a one-line description."""
    from .pretrained import _run, check_source, hf_tokenizer, is_run_folder, run_model

    if not is_run_folder(run):
        raise UsageError(f"{run}: not a run folder of train or finetune (no such config.json)")
    check_source(str(run), "export")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not empty")
    cfg, _ = _run(run)
    if lora_adapter and cfg.optimizer != "lora":
        raise UsageError(f"--lora-adapter: {run} was trained with --optimizer {cfg.optimizer}, not lora")
    tokenizer = hf_tokenizer(str(run), "export")
    if cfg.task == "sft":
        from .sft import ensure_chat_template

        ensure_chat_template(tokenizer)
    model, cfg, found = run_model(run, dtype, merge_lora=not lora_adapter)
    if cfg.task != "classify":
        model.config.use_cache = True  # for generation; training switched it off
        if tokenizer.bos_token_id is not None:
            model.config.bos_token_id = tokenizer.bos_token_id
        if tokenizer.eos_token_id is not None:
            model.config.eos_token_id = tokenizer.eos_token_id
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.eos_token_id = tokenizer.eos_token_id
                model.generation_config.bos_token_id = tokenizer.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        if lora_adapter:
            # the base holds what the run trained densely (embeddings, norms, heads) next to the frozen weights
            base = (out / "base").resolve()
            model.peft_config["default"].base_model_name_or_path = str(base)
            model.save_pretrained(out)
            model.unload().save_pretrained(base)
            tokenizer.save_pretrained(base)
            what = f"peft LoRA adapter over {base}"
        else:
            model.save_pretrained(out)
            what = "merged model" if cfg.optimizer in ("lora", "rso") else "model"
        tokenizer.save_pretrained(out)
    return f"{out}: {what} of {run} at {found.name}, with its tokenizer"

