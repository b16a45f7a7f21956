"""Pretrained starting points: a local HF model folder (config.json + safetensors, sharded or not) or a run folder
of ours (its last checkpoint), for `train --init-from`, `finetune --task sft --model` and `export`.

A run folder holds no HF config: its model is rebuilt from config.json and info.json as the run built it (a named
size or config file with the run's tokenizer; or the folder it started from), given the structure its method
trained (RSO layers, LoRA adapters), loaded from the checkpoint, and turned back into the plain architecture (RSO's
B P folded into W, LoRA adapters merged), so every later step sees an ordinary HF model.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .checkpoint import _first_line
from .config import TrainConfig, UsageError, load_config, target_spec

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def is_run_folder(path: Path) -> bool:
    """A folder written by `train`/`finetune` (its config.json is a TrainConfig, not an HF config)."""
    try:
        values = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and "optimizer" in values and "task" in values


def check_source(source: str, flag: str) -> Path:
    """``source`` as a Path, or a one-line UsageError if it is neither an HF model folder with weights nor a run
    folder with a checkpoint."""
    from . import checkpoint

    path = Path(source).expanduser()
    if not path.is_dir():
        raise UsageError(f"{flag} {source}: no such folder")
    if not (path / "config.json").is_file():
        raise UsageError(f"{flag} {source}: not an HF model folder or a run folder (no config.json)")
    if is_run_folder(path):
        if checkpoint.latest_readable(path) is None:
            raise UsageError(f"{flag} {source}: the run folder has no readable checkpoint")
    elif not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise UsageError(f"{flag} {source}: the folder has a config.json but no weights (expected model.safetensors, "
                         "sharded model-*.safetensors with an index, or pytorch_model.bin)")
    return path


def _run(path: Path) -> tuple[TrainConfig, dict]:
    cfg = load_config(path / "config.json")
    try:
        info = json.loads((path / "info.json").read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: the run folder has no readable info.json ({err})") from None
    return cfg, info


def tokenizer_file(source: str, flag: str = "--init-from") -> Path | None:
    """The tokenizer file of a source that `train` can read (data.Tokenizer: tokenizer.json or a SentencePiece
    .model): an HF folder's own, a run's recorded one; None if the folder has none."""
    path = check_source(source, flag)
    if not is_run_folder(path):
        return next((path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()), None)
    cfg, info = _run(path)
    if cfg.task == "classify":
        raise UsageError(f"{flag} {source}: a classifier run, not a causal LM")
    if cfg.task == "sft":
        return tokenizer_file(cfg.model, flag)
    return Path(info["tokenizer_file"])


def model_config(source: str, flag: str = "--init-from"):
    """The HF config of a source's causal LM (a run folder: as that run built it)."""
    from transformers import AutoConfig

    from .data import Tokenizer
    from .models import causal_lm_config

    path = check_source(source, flag)
    if not is_run_folder(path):
        try:
            return AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"{flag} {source}: not a valid HF config ({err})") from None
    cfg, info = _run(path)
    if cfg.task == "classify":
        raise UsageError(f"{flag} {source}: a classifier run, not a causal LM")
    if cfg.init_from or cfg.task == "sft":  # started from another folder: its architecture
        return model_config(cfg.init_from or cfg.model, flag)
    tokenizer = Tokenizer(info["tokenizer_file"])
    return causal_lm_config(cfg.model, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)


@contextmanager
def _quiet_transformers():
    """transformers' loading bars and info lines off (a run prints its own lines)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_causal_lm(source: str, dtype: str, flag: str = "--init-from") -> nn.Module:
    """The causal LM of ``source`` with its weights in ``dtype`` (torch's name). An HF folder loads with
    ``from_pretrained(dtype=...)``, which reads each tensor straight into ``dtype`` (no float32 copy of a 16-bit
    model); a run folder as ``run_model`` gives it. The generation cache is off (training never uses it)."""
    from transformers import AutoModelForCausalLM

    path = check_source(source, flag)
    if is_run_folder(path):
        if _run(path)[0].task == "classify":
            raise UsageError(f"{flag} {source}: a classifier run, not a causal LM")
        model = run_model(path, dtype, flag=flag)[0]
    else:
        try:
            with _quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"{flag} {source}: cannot load a causal LM from it ({_first_line(err)})") from None
    model.config.use_cache = False
    return model


def hf_tokenizer(source: str, flag: str = "--model"):
    """The HF tokenizer of a source: an HF folder's (AutoTokenizer), or for a run folder one built from the
    tokenizer file the run used (a SentencePiece .model is converted to HF's tokenizer.json form, which encodes
    text to the same ids; the conversion needs protobuf), with the run's BOS/EOS; a classifier run's model folder's."""
    from transformers import AutoTokenizer

    path = check_source(source, flag)
    if is_run_folder(path):
        cfg, info = _run(path)
        if cfg.task == "lm" and not cfg.init_from:  # the tokenizer it trained with
            return tokenizer_from_file(Path(info["tokenizer_file"]))
        if cfg.task == "classify":
            from .models import classifier_dir

            return hf_tokenizer(str(classifier_dir(cfg.model)), flag)
        return hf_tokenizer(cfg.model, flag)  # the folder it started from (sft's --model, --init-from)
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"{flag} {source}: cannot load its tokenizer ({_first_line(err)})") from None


def tokenizer_from_file(file: Path):
    """An HF tokenizer from a file that data.Tokenizer reads (tokenizer.json or a SentencePiece .model): the same
    ids for the same text, the same BOS/EOS, and BOS put before a text by default (``add_special_tokens``), as
    every document started in training."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from .data import Tokenizer

    ours = Tokenizer(file)
    special = {"add_bos_token": ours.bos_id is not None}
    for name, token_id in (("bos_token", ours.bos_id), ("eos_token", ours.eos_id)):
        if token_id is not None:
            special[name] = ours._hf.id_to_token(token_id) if hasattr(ours, "_hf") else ours._sp.id_to_piece(token_id)
    if file.suffix == ".json":
        return PreTrainedTokenizerFast(tokenizer_file=str(file), **special)
    with tempfile.TemporaryDirectory() as tmp, _quiet_transformers():
        shutil.copy(file, Path(tmp) / "tokenizer.model")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp, **special)
        except (ImportError, ValueError, OSError) as err:
            raise UsageError(f"cannot convert the SentencePiece tokenizer {file} to an HF tokenizer "
                             f"({_first_line(err)}); pip install protobuf") from None
    return tokenizer


def run_model(path: Path, dtype: str | None = None, *, merge_lora: bool = True, flag: str = "export"):
    """(model, run config, checkpoint folder) of a run folder's last checkpoint, in ``dtype`` (default: the run's).

    The model is rebuilt as the run built it, given its method's structure, loaded from the checkpoint (tensors
    read in the run's dtype and copied in), and returned as the plain HF architecture: RSO layers folded back into
    nn.Linear; LoRA adapters merged, or with ``merge_lora=False`` the peft model (for saving the adapter)."""
    from transformers import AutoModelForCausalLM

    from . import checkpoint
    from .models import build_classifier

    cfg, info = _run(path)
    found = checkpoint.latest_readable(path)
    if found is None:
        raise UsageError(f"{flag} {path}: the run folder has no readable checkpoint")
    if int(found.name.removeprefix("step_")) < cfg.steps:
        warnings.warn(f"{path} is not finished: using its checkpoint {found.name} of {cfg.steps} steps")
    if getattr(cfg, "weights", "dense") != "dense":
        raise UsageError(f"{flag} {path}: a run with --weights {cfg.weights} cannot be loaded as an HF model yet")
    dtype = dtype or cfg.dtype
    if cfg.task == "classify":
        model, _ = build_classifier(cfg.model, len(info["labels"]), dtype)
        model.config.id2label = dict(enumerate(info["labels"]))
        model.config.label2id = {name: i for i, name in enumerate(info["labels"])}
    else:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_config(model_config(str(path), flag), dtype=getattr(torch, dtype))
    peft_model = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run warned about narrow layers already
        if cfg.optimizer == "rso":
            from ..rso import apply_rso

            apply_rso(model, rank=cfg.rank, target=target_spec(cfg.target), seed=cfg.seed)
        elif cfg.optimizer == "lora":
            from .lora import wrap

            peft_model = wrap(cfg, model)
    checkpoint._load_weights(found / checkpoint.WEIGHTS, model, torch.device("cpu"))
    model = model.to(getattr(torch, dtype))
    if cfg.optimizer == "rso":
        from ..rso import RSOProjection, remove_rso

        for module in model.modules():  # P follows the loaded key (outer count), however the tensors were copied in
            if isinstance(module, RSOProjection):
                module.regenerate()
        remove_rso(model)
    elif peft_model is not None:
        if not merge_lora:
            return peft_model, cfg, found
        model = peft_model.merge_and_unload()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model, cfg, found


def init_tokenizer_spec(source: str, given: str | None, train_docs: list[str] | None) -> str:
    """The --tokenizer of a run that starts from ``source``: the folder's own tokenizer file; a --tokenizer that
    encodes differently (another file, another trained BPE) is an error, as the weights would meet foreign ids."""
    from .tokenizer import file_sha256, load_tokenizer

    own = tokenizer_file(source)
    if given is None:
        if own is None:
            raise UsageError(f"--init-from {source}: the folder has no tokenizer.json or tokenizer.model; pass the "
                             "model's tokenizer with --tokenizer")
        return str(own)
    if own is not None:
        theirs = load_tokenizer(given, train_docs)[0].path
        if file_sha256(theirs) != file_sha256(own):
            raise UsageError(f"--tokenizer {given} does not match the tokenizer of --init-from {source} ({own}): "
                             "the model's embeddings belong to that vocabulary; leave out --tokenizer")
    return given
