"""`subspace-optim reproduce pretrain`: how much quality the memory saving costs, and which projector to use.

Every method pretrains the same model on the same tokens, in the same order, at each learning rate of one grid
at the first seed, and is reported at its best learning rate there (lowest validation perplexity) over two
seeds. The model, llama-study with a 2k-token BPE trained on the training split, has 82% of its parameters in the
linear layers that the subspace methods project (llama-tiny with the 32k vocabulary: 13%). The papers' claims are
sub-studies on top, run at the methods' best learning rates and judged from the numbers by ``not_worse`` and
``better`` ("pending" while their runs are missing).

The runs live in a store beside the report (docs/results/pretrain-runs for the full study, see runstore.py): a run
is reused while the training code is unchanged, an interrupted one resumes, and ``--max-runs N`` builds the study
over several invocations (``--jobs`` runs at once, ``--methods`` only some). The report is written from whatever
is stored.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import statistics
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from ..train.config import TASK_DEFAULTS, UsageError
from ..train.data import default_tokenizer_path, is_hub_name, read_documents, split
from ..train.optimizers import method_of
from ..train.tokenizer import bpe_key, bpe_vocab_size, file_sha256
from .report import Report, table
from . import index
from .runstore import Planned, RunStore, Stored

METHODS = ("adamw", "full-scaled", "galore", "golore", "golore@20", "online_pca", "auto", "rso", "galore-torch")
#: The one learning-rate rule of every method. Written into the report; the harness implements it (--lr, --scale).
LR_RULE = ("every parameter of a run follows one peak learning rate `lr` (linear warm-up over 10% of the steps, "
           "then cosine decay to 0.1 x lr): dense parameters (all of AdamW's; the embeddings, norms and lm_head of "
           "the subspace methods) step at lr, projected weights at lr x scale (GaLore's alpha, 0.25, applied to "
           "the projected update only; RSO steps its B at lr x scale, which makes its steps GoLore's; full-scaled, "
           "AdamW at full rank, steps the same linear weights at lr x scale, so that it differs from GaLore only "
           "by the projection). The grid is the same for every method, so no method gets a step size the others "
           "could not have.")
#: "matches": within this share of the other's perplexity; GaLore's "within a few %" of full-rank Adam (its
#: Table 2: 0.5-2.4%).
MATCH, FEW_PERCENT = 0.02, 0.03
#: GaLore (Zhao et al. 2024), Table 2: validation perplexity on C4, full-rank Adam vs GaLore (rank).
PAPER = {"llama-60m": (34.06, 34.88, 128), "llama-130m": (25.08, 25.36, 256), "llama-350m": (18.80, 18.95, 256),
         "llama-1b": (15.56, 15.64, 512)}


#: Half-decade steps: a best lr at the edge of a method's grid adds the next rung beyond it, until the best is inside.
LR_LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass(frozen=True)
class Scale:
    """One size of the study: the flags every run shares and what varies."""

    name: str
    base: dict  # `subspace-optim train` flags of every run (data: None = the quick toy corpus)
    methods: tuple[str, ...]
    lr_grid: tuple[float, ...]
    seeds: tuple[int, ...]
    batch_sweep: tuple[int, ...]  # batch sizes besides base's, at the same tokens (GaLore, GoLore, auto)
    ranks: tuple[int, ...]  # GaLore ranks besides base's
    state_bits: tuple[int, ...] = ()  # GoLore's quantized moments besides 32-bit
    arithmetic: bool = False  # GaLore with galore-torch's moments (kept) and AdamW arithmetic, one at a time
    lr_ladder: tuple[float, ...] = ()  # rungs that widen a method's grid past a best lr at its edge (none: fixed)
    val_sequences: int | None = None  # validation sequences of every run (None: the whole split)
    fresh_process: bool = True  # False: toy runs in this process (a fresh Python spends seconds importing)
    toy_documents: int | None = None  # quick: train on the first N BBC News articles


SCALES = {
    # 512 steps x 8 x 256 = 1,048,576 tokens (0.69 epoch of the 1.52M training tokens: no token seen twice);
    # validation on the whole held-out split at the end; 16 refreshes; a checkpoint every quarter (resumable).
    "cpu": Scale("cpu", dict(model="llama-study", tokenizer="bpe:2048", data="bbcnews", steps=512, batch_size=8,
                             seq_len=256, rank=64, update_gap=32, scale=0.25, eval_every=0, eval_batches=0,
                             save_every=128),
                 METHODS, lr_grid=(3e-4, 1e-3, 3e-3, 1e-2), seeds=(0, 1), batch_sweep=(2, 32), ranks=(32, 128),
                 state_bits=(8, 4), arithmetic=True, lr_ladder=LR_LADDER),
    # GaLore's C4 recipe for LLaMA-60M (batch 512 = 128 x 4, 256 tokens, 10k steps, gap 200, bf16), for GPUs
    "paper": Scale("paper", dict(model="llama-60m", data="allenai/c4", steps=10_000, batch_size=128, grad_accum=4,
                                 seq_len=256, rank=128, update_gap=200, scale=0.25, dtype="bfloat16",
                                 eval_every=1000, save_every=1000),
                   METHODS, lr_grid=(1e-3, 3e-3, 1e-2), seeds=(0, 1), batch_sweep=(32, 512), ranks=(64, 256),
                   state_bits=(8, 4), arithmetic=True, lr_ladder=LR_LADDER, val_sequences=10240),
    # every method and sub-study, at toy size: llama-tiny (cheaper SVDs than llama-study), 200 articles, 4 steps
    "quick": Scale("quick", dict(model="llama-tiny", tokenizer="bpe:512", data=None, steps=4, batch_size=2,
                                 seq_len=32, rank=16, update_gap=2, scale=0.25, eval_every=2, save_every=2),
                   METHODS, lr_grid=(1e-3, 1e-2), seeds=(0, 1), batch_sweep=(4,), ranks=(8,), state_bits=(8,),
                   arithmetic=True, val_sequences=4,
                   fresh_process=False, toy_documents=200),
}
SCALED_WITH_STEPS = ("steps", "update_gap", "save_every", "eval_every")  # kept per token in the batch sweep
VAL_FRACTION = TASK_DEFAULTS["lm"]["val_fraction"]


#: galore-torch's choices that our GaLore can take one at a time: its moments kept across refreshes (ours: projected)
#: and then also its AdamW arithmetic (eps added to sqrt(v) before the bias correction, eps 1e-6, decay after).
GALORE_TORCH_VARIANTS = ({"moments": "keep"}, {"moments": "keep", "arithmetic": "galore-torch"})


def run_for(scale: Scale, method: str, lr: float, seed: int, *, batch: int | None = None,
            rank: int | None = None, state_bits: int | None = None, moments: str | None = None,
            arithmetic: str | None = None) -> Planned:
    """The run of ``method`` at ``lr`` and ``seed``; ``batch``: the same tokens in batches of that size (steps,
    refresh gap, checkpoint and evaluation intervals scaled to keep their share of the run); ``rank``: GaLore's;
    ``state_bits``: the moments quantized to that many bits; ``moments``: the refresh policy; ``arithmetic``:
    AdamW's (``--adam-arithmetic``)."""
    flags = dict(scale.base, optimizer=method, lr=lr, seed=seed)
    tags = []
    if moments is not None:
        flags["moments"], tags = moments, tags + [moments]
    if arithmetic is not None:
        flags["adam_arithmetic"], tags = arithmetic, tags + [f"{arithmetic}-arith"]
    if not method_of(method).rank:  # full-rank baselines take no --rank
        flags.pop("rank", None)
    if rank is not None:
        flags["rank"], tags = rank, tags + [f"r{rank}"]
    if state_bits is not None:
        flags["state_bits"], tags = state_bits, tags + [f"{state_bits}bit"]
    if batch is not None:
        for name in SCALED_WITH_STEPS:
            if flags.get(name):
                flags[name] = max(1, flags[name] * scale.base["batch_size"] // batch)
        flags["batch_size"], tags = batch, tags + [f"b{batch}"]
        if flags["steps"] * batch != scale.base["steps"] * scale.base["batch_size"]:
            raise ValueError(f"batch {batch}: {scale.base['steps']} x {scale.base['batch_size']} sequences do not "
                             "divide into equal steps")
    if scale.val_sequences:
        flags["eval_batches"] = scale.val_sequences // flags["batch_size"]
    return Planned("-".join([method.replace("@", "at"), *tags, f"lr{lr:g}", f"s{seed}"]), flags)


@dataclass
class Ppl:
    """A method's final validation perplexities, one per seed."""

    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


def not_worse(x: Ppl, y: Ppl, tolerance: float) -> str:
    """Verdict on "x's perplexity is at most (1 + tolerance) times y's": reproduced when the means say so; not
    reproduced when x misses it by more than the seeds' spread (the two standard deviations added, relative to
    y's mean); inconclusive in between. A claim of near-parity that x beats by more than the tolerance and the
    spread is flagged: the paper's "within a few %" is then not what was seen."""
    ratio, spread = x.mean / y.mean, (x.std + y.std) / y.mean
    if ratio < 1 - tolerance - spread:
        return f"reproduced, and beaten: {(1 - ratio) * 100:.0f}% lower, not within {tolerance * 100:g}%"
    if ratio <= 1 + tolerance:
        return "reproduced"
    return "not reproduced" if ratio > 1 + tolerance + spread else "inconclusive (within the seeds' spread)"


def better(x: Ppl, y: Ppl) -> str:
    """Verdict on "x reaches a lower perplexity than y": a difference counts when it exceeds the seeds' spread
    (the two standard deviations added)."""
    spread = x.std + y.std
    if x.mean < y.mean - spread:
        return "reproduced"
    return "not reproduced" if x.mean > y.mean + spread else "inconclusive (within the seeds' spread)"


def _finite(ppl: float) -> float:
    return ppl if math.isfinite(ppl) else math.inf  # a diverged run (NaN loss) ranks last


class Study:
    """The planned runs at one scale, what the store holds of them, and the learning rates they select."""

    def __init__(self, args, *, dry_run: bool = False):
        self.scale = SCALES["quick" if args.quick else args.scale]
        scratch = Path(args.runs) / f"pretrain-{self.scale.name}"
        docs = None
        if self.scale.toy_documents:
            docs = read_documents("bbcnews")[: self.scale.toy_documents]
            corpus = scratch / f"bbcnews-{len(docs)}.jsonl"
            if not dry_run and not corpus.is_file():
                corpus.parent.mkdir(parents=True, exist_ok=True)
                corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
            self.scale = Scale(**{**self.scale.__dict__, "base": {**self.scale.base, "data": str(corpus)}})
        elif not is_hub_name(self.scale.base["data"]):  # a stream has no fixed split (and no trained tokenizer)
            docs = read_documents(self.scale.base["data"])
        self.methods = [m for m in self.scale.methods
                        if m != "galore-torch" or importlib.util.find_spec("galore_torch") is not None]
        self.store = RunStore(Path(args.out) / "pretrain-runs", scratch, {"tokenizer": self._tokenizer_key(docs)},
                              fresh_process=self.scale.fresh_process)
        self._found: dict[str, Stored] = {}

    def _tokenizer_key(self, docs: list[str] | None) -> str:
        """What the runs' tokenizer is determined by: a trained BPE's cache key, else the file's SHA-256."""
        spec = self.scale.base.get("tokenizer")
        size = bpe_vocab_size(spec)
        if size is not None:
            return bpe_key(size, split(docs, VAL_FRACTION)[0])
        return file_sha256(Path(spec) if spec else default_tokenizer_path())

    # ------------------------------------------------------------ runs and results

    def result(self, run: Planned) -> Stored | None:
        if run.key not in self._found:
            found = self.store.stored(run)
            if found is None:
                return None
            self._found[run.key] = found
        return self._found[run.key]

    def add(self, run: Planned, stored: Stored) -> None:
        self._found[run.key] = stored

    def seeds(self, method: str, lr: float, **variant) -> list[Stored] | None:
        """Every seed's stored run, or None while one is missing."""
        found = self.stored_seeds(method, lr, **variant)
        return found if len(found) == len(self.scale.seeds) else None

    def stored_seeds(self, method: str, lr: float, **variant) -> list[Stored]:
        """The seeds' stored runs (as many as are stored so far: the plots show a partial study too)."""
        found = [self.result(run_for(self.scale, method, lr, s, **variant)) for s in self.scale.seeds]
        return [f for f in found if f is not None]

    @property
    def tuning_seed(self) -> int:
        return self.scale.seeds[0]

    def grid(self) -> list[Planned]:
        """The learning-rate grid of every method at the tuning seed (the first)."""
        return [run_for(self.scale, m, lr, self.tuning_seed) for m in self.methods for lr in self.lr_grid(m)[0]]

    def lr_grid(self, method: str) -> tuple[list[float], float | None]:
        """(the method's grid, its best lr or None while a grid run is missing). The grid is the scale's, widened
        one rung of the lr ladder at a time while the best lr (lowest perplexity at the tuning seed) is at its
        edge and the ladder goes on: no method is reported at an lr that a neighbour might beat."""
        grid = sorted(self.scale.lr_grid)
        while True:
            found = {lr: self.result(run_for(self.scale, method, lr, self.tuning_seed)) for lr in grid}
            if None in found.values():
                return grid, None
            best = min(found, key=lambda lr: _finite(found[lr].summary["final_val_ppl"]))
            ladder = self.scale.lr_ladder
            beyond = ([x for x in ladder if x > grid[-1]][:1] if best == grid[-1] else
                      [x for x in ladder if x < grid[0]][-1:] if best == grid[0] else [])
            if not beyond:
                return grid, best
            grid = sorted(grid + beyond)

    def best_lr(self, method: str) -> float | None:
        """The lr of the method's grid with the lowest perplexity at the tuning seed; None until the grid is
        settled. The other seeds then run at this lr only: tuned on one seed, reported over all of them."""
        return self.lr_grid(method)[1]

    def variants(self) -> list[tuple[str, dict]]:
        """(method, variant) of the sub-studies' runs: the batch sweep and GaLore's rank ablation."""
        batch = [(m, {"batch": b}) for b in self.scale.batch_sweep for m in ("galore", "golore", "auto")
                 if m in self.methods]
        rank = [("galore", {"rank": r}) for r in self.scale.ranks if "galore" in self.methods]
        bits = [("golore", {"state_bits": b}) for b in self.scale.state_bits if "golore" in self.methods]
        arithmetic = [("galore", v) for v in GALORE_TORCH_VARIANTS if self.scale.arithmetic and "galore" in self.methods]
        return batch + rank + bits + arithmetic

    def planned(self) -> tuple[list[Planned], list[str]]:
        """(runs whose settings are known, in order; what waits for a method's learning-rate grid)."""
        runs, waiting = self.grid(), []
        for method in self.methods:
            lr = self.best_lr(method)
            if lr is not None:
                runs += [run_for(self.scale, method, lr, s) for s in self.scale.seeds if s != self.tuning_seed]
        for method, variant in self.variants():
            lr = self.best_lr(method)
            if lr is None:
                waiting.append(f"{method} {' '.join(f'{k} {v}' for k, v in variant.items())}")
            else:
                runs += [run_for(self.scale, method, lr, s, **variant) for s in self.scale.seeds]
        return runs, waiting

    def at_best(self, method: str, **variant) -> Ppl | str:
        """The method's perplexities at its best lr (and ``variant``), or why there are none yet."""
        if method not in self.methods:
            return "not planned at this scale"
        lr = self.best_lr(method)
        if lr is None:
            grid = self.lr_grid(method)[0]
            done = sum(self.result(run_for(self.scale, method, x, self.tuning_seed)) is not None for x in grid)
            return f"pending: the lr grid of {method} ({done} of {len(grid)} runs)"
        found = self.seeds(method, lr, **variant)
        if found is None:
            return f"pending: {method} {' '.join(f'{k} {v}' for k, v in variant.items())}".rstrip()
        return Ppl([_finite(s.summary["final_val_ppl"]) for s in found])

    def summaries(self, method: str, **variant) -> list[dict]:
        lr = self.best_lr(method)
        found = self.seeds(method, lr, **variant) if lr is not None else None
        return [s.summary for s in found or []]


# ---------------------------------------------------------------- the claims


@dataclass
class Claim:
    """One paper's claim as a sub-study: its section of the report and its row of the verdict table."""

    claim: str
    paper: str
    verdict: str = ""
    numbers: str = ""
    section: list[str] = field(default_factory=list)

    def row(self) -> list[str]:
        return [self.claim, f"**{self.verdict}**", self.numbers, self.paper]

    def unknown(self, why: str) -> Claim:
        """No verdict yet: 'pending' (with what is missing) or 'not planned at this scale'."""
        self.verdict, self.numbers = why.split(":")[0], why.partition(": ")[2] or "—"
        return self


def _pending(*values) -> str | None:
    """The first 'pending'/'not planned' reason among ``values`` (Ppl or str), or None when all are numbers."""
    return next((v for v in values if isinstance(v, str)), None)


def _pair(study: Study, claim: Claim, mine: str, theirs: str, judge, variants: tuple[dict, dict] = ({}, {}),
          labels: tuple[str, str] | None = None) -> Claim:
    """A claim about two methods (or ``variants`` of them) at their best learning rates, judged by
    ``judge(mine, theirs)``."""
    a, b = study.at_best(mine, **variants[0]), study.at_best(theirs, **variants[1])
    why = _pending(a, b)
    if why:
        return claim.unknown(why)
    claim.verdict = judge(a, b)
    names = labels or (mine, theirs)
    claim.numbers = (f"val ppl {names[0]} {a} vs {names[1]} {b} (ratio {a.mean / b.mean:.3f}; mean ± std over seeds "
                     f"{', '.join(map(str, study.scale.seeds))}, each at its best lr)")
    return claim


def claims(study: Study) -> list[Claim]:
    galore_adamw = _pair(study, Claim(
        "GaLore pretrains to within a few % of full-rank Adam's perplexity (Zhao et al. 2024, Table 2)",
        "GaLore / full = 1.005–1.024 (60M–1B, C4)"), "galore", "adamw", lambda a, b: not_worse(a, b, FEW_PERCENT))
    equal_steps = _pair(study, Claim(
        "GaLore pretrains to within a few % of full-rank Adam's perplexity at equal step sizes (ours: full-scaled, "
        "AdamW whose linear weights step at lr x scale as GaLore's projected updates do)",
        "GaLore / full = 1.005–1.024 (60M–1B, C4)"), "galore", "full-scaled",
        lambda a, b: not_worse(a, b, FEW_PERCENT))
    golore20 = _pair(study, Claim("GoLore@20% (GaLore, then random projections for the last 20%) matches or beats "
                                  "GaLore (He et al. 2024)", "GoLore@20% ≤ GaLore"),
                     "golore@20", "galore", lambda a, b: not_worse(a, b, MATCH))
    pca = _pair(study, Claim("Online Subspace Descent matches or beats GaLore's perplexity (Liang et al. 2024)",
                             "OSD ≤ GaLore"), "online_pca", "galore", lambda a, b: not_worse(a, b, MATCH))
    rso = _rso_claim(study)
    return [galore_adamw, equal_steps, golore20, pca, rso, _rank_claim(study), *_batch_claims(study), _bits_claim(study),
            _arithmetic_claim(study)]


def _arithmetic_claim(study: Study) -> Claim:
    """Which AdamW arithmetic wins for GaLore with galore-torch's kept moments: torch.optim's or galore-torch's."""
    claim = Claim("galore-torch's AdamW arithmetic (eps added to sqrt(v) before the bias correction; ours: "
                  "torch.optim's) does better for GaLore with kept moments (issue 11; no paper claims either)",
                  "(a question, not a claim: the verdict says whether galore-torch's wins)")
    if not study.scale.arithmetic:
        return claim.unknown("not planned at this scale")
    _pair(study, claim, "galore", "galore", better, variants=GALORE_TORCH_VARIANTS[::-1],
          labels=("GaLore (moments kept) with galore-torch's arithmetic", "with torch's"))
    if claim.verdict.startswith(("pending", "not planned")):
        return claim
    ours = study.at_best("galore")
    if not isinstance(ours, str):
        claim.numbers += f"; our default (moments projected, torch's arithmetic) {ours}"
    same = _galore_torch_at(study, study.best_lr("galore"))
    if same:
        claim.numbers += (f"; galore-torch itself at the same lr and seed {study.tuning_seed}: {same[0]:.2f}, our "
                          f"reproduction of it {same[1]:.2f}")
    return claim


def _galore_torch_at(study: Study, lr: float) -> tuple[float, float] | None:
    """(galore-torch's, our galore-torch-arithmetic GaLore's) perplexity at ``lr`` and the tuning seed, if stored."""
    if "galore-torch" not in study.methods:
        return None
    theirs = study.result(run_for(study.scale, "galore-torch", lr, study.tuning_seed))
    ours = study.result(run_for(study.scale, "galore", lr, study.tuning_seed, **GALORE_TORCH_VARIANTS[1]))
    if theirs is None or ours is None:
        return None
    return theirs.summary["final_val_ppl"], ours.summary["final_val_ppl"]


def _bits_claim(study: Study) -> Claim:
    """Quantized moments against float32 ones, GoLore at its best lr (issue 10's target: 8 bits within 1%)."""
    claim = Claim("8-bit moments cost GoLore under 1% perplexity (ours, with torchao's block-wise states; 8-bit "
                  "Adam, Dettmers et al. 2022: parity)", "8-bit ≈ 32-bit")
    if not study.scale.state_bits:
        return claim.unknown("not planned at this scale")
    values = {32: study.at_best("golore"), **{b: study.at_best("golore", state_bits=b) for b in study.scale.state_bits}}
    why = _pending(*values.values())
    if why:
        return claim.unknown(why)
    claim.verdict = not_worse(values[8], values[32], 0.01) if 8 in values else "not planned at this scale"
    claim.numbers = "GoLore val ppl " + ", ".join(
        f"{b}-bit {values[b]}" + (f" ({values[b].mean / values[32].mean:.3f} x 32-bit)" if b != 32 else "")
        for b in sorted(values, reverse=True))
    return claim


def _memory(summary: dict) -> int:
    """What a method changes: gradients, optimizer state and saved activations (measured, deterministic)."""
    m = summary["memory"]
    return m["gradients_bytes"] + m["optimizer_state_bytes"] + m["activations_bytes"]


def _rso_claim(study: Study) -> Claim:
    claim = _pair(study, Claim("RSO reaches comparable perplexity with less memory (Chen et al. 2025); here against "
                               "GoLore, whose steps RSO's equal with moments reset", "comparable perplexity, lower memory"),
                  "rso", "golore", lambda a, b: not_worse(a, b, MATCH))
    mine, theirs = study.summaries("rso"), study.summaries("golore")
    if mine and theirs and claim.verdict == "reproduced":
        ratio = statistics.fmean(map(_memory, mine)) / statistics.fmean(map(_memory, theirs))
        claim.numbers += f"; gradients + optimizer state + activations {ratio:.2f} x GoLore's"
        if ratio >= 1:
            claim.verdict = "not reproduced (perplexity yes, memory no)"
    return claim


def _rank_claim(study: Study) -> Claim:
    claim = Claim("Higher rank brings GaLore closer to full-rank Adam (GaLore's rank ablation)",
                  "higher rank, lower perplexity")
    base = study.scale.base.get("rank")
    ranks = sorted({base, *study.scale.ranks})
    values = {r: study.at_best("galore", **({} if r == base else {"rank": r})) for r in ranks}
    why = _pending(*values.values())
    if why:
        return claim.unknown(why)
    steps = [better(values[hi], values[lo]) for lo, hi in zip(ranks, ranks[1:])]
    claim.verdict = ("reproduced" if all(v == "reproduced" for v in steps) else
                     "not reproduced" if "not reproduced" in steps else "inconclusive (within the seeds' spread)")
    claim.numbers = "GaLore val ppl " + ", ".join(f"r={r} {values[r]}" for r in ranks)
    adamw = study.at_best("adamw")
    if not isinstance(adamw, str):
        claim.numbers += f"; AdamW {adamw}"
    return claim


def _batch_claims(study: Study) -> list[Claim]:
    """GaLore vs GoLore across batch sizes at equal tokens, and auto against the better of the two."""
    sizes = sorted({study.scale.base["batch_size"], *study.scale.batch_sweep})
    at = {(m, b): study.at_best(m, **({} if b == study.scale.base["batch_size"] else {"batch": b}))
          for m in ("galore", "golore", "auto") for b in sizes}
    noise = Claim("Under gradient noise (small batches) GaLore falls behind and GoLore does not; with large batches "
                  "they match (He et al. 2024)", "GoLore converges where GaLore stalls under noise")
    auto = Claim("auto (ours) matches the better of GaLore and GoLore at every batch size",
                 "(ours; no paper)")
    why = _pending(at["galore", sizes[0]], at["golore", sizes[0]])
    if why:
        noise.unknown(why)
    else:
        noise.verdict = better(at["golore", sizes[0]], at["galore", sizes[0]])
        noise.numbers = "; ".join(
            f"batch {b}: GaLore {at['galore', b]}, GoLore {at['golore', b]}"
            + (f" (GoLore / GaLore {at['golore', b].mean / at['galore', b].mean:.3f})"
               if not _pending(at["galore", b], at["golore", b]) else " (pending)") for b in sizes)
        noise.numbers += f" (equal tokens; the judged batch is the smallest, {sizes[0]})"
    verdicts, parts = [], []
    for b in sizes:
        why_b = _pending(at["auto", b], at["galore", b], at["golore", b])
        if why_b:
            verdicts.append(why_b.split(":")[0])
            parts.append(f"batch {b}: {why_b.partition(': ')[2] or why_b}")
            continue
        name = min(("galore", "golore"), key=lambda m: at[m, b].mean)
        verdicts.append(not_worse(at["auto", b], at[name, b], MATCH))
        parts.append(f"batch {b}: auto {at['auto', b]} vs {name} {at[name, b]} "
                     f"({at['auto', b].mean / at[name, b].mean:.3f})")
    if "not planned at this scale" in verdicts:
        return [noise, auto.unknown("not planned at this scale")]
    auto.verdict = "pending" if "pending" in verdicts else (
        "not reproduced" if "not reproduced" in verdicts else
        "reproduced" if all(v == "reproduced" for v in verdicts) else "inconclusive (within the seeds' spread)")
    auto.numbers = "; ".join(parts)
    return [noise, auto]


# ---------------------------------------------------------------- the report


def _smoothed_losses(stored: Stored, points: int = 100) -> tuple[list[float], list[float]]:
    """(tokens, training loss averaged over windows), ``points`` windows per run. Before the first epoch ends
    (every run here), each batch is unseen, so the training loss estimates the held-out loss."""
    rows = stored.metrics()
    width = max(1, len(rows) // points)
    xs, ys = [], []
    for start in range(0, len(rows) - width + 1, width):
        window = rows[start:start + width]
        xs.append(float(window[-1]["tokens"]))
        ys.append(statistics.fmean(float(r["loss"]) for r in window))
    return xs, ys


def _band(ax, runs: list[Stored], label: str) -> None:
    """Mean over the seeds of the smoothed loss, with a band of ± one standard deviation."""
    curves = [_smoothed_losses(s) for s in runs]
    n = min(len(x) for x, _ in curves)
    xs = curves[0][0][:n]
    mean = [statistics.fmean(c[1][i] for c in curves) for i in range(n)]
    std = [statistics.stdev([c[1][i] for c in curves]) if len(curves) > 1 else 0.0 for i in range(n)]
    line, = ax.plot(xs, mean, lw=1.2, label=label)
    ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color=line.get_color(), alpha=0.25, lw=0)


def _figure(report: Report, suffix: str, panels: list[tuple[str, list[tuple[str, list[Stored]]]]]) -> Path | None:
    """Loss against tokens, one panel per (title, [(label, the seeds' runs)]); None when no panel has a run."""
    panels = [(t, curves) for t, curves in panels if curves]
    if not panels:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * len(panels), 4.5), dpi=110)
    for i, (title, curves) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for label, runs in curves:
            _band(ax, runs, label)
        ax.set(xlabel="training tokens", ylabel="training loss (window mean; band: ± std over seeds)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = report.figure(suffix)
    fig.savefig(path)
    return path


#: LLaMA's projected linear layers, in the order of a block; other names found in switch_steps go after them.
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER_WEIGHT = re.compile(r"layers\.(\d+)\..*?([A-Za-z0-9_]+)\.weight$")


def switch_grid(switch_steps: dict[str, int], layers: int, steps: int) -> tuple[list[str], list[list[float]]]:
    """(module names, a module x layer grid of each weight's switch step as a share of the run; NaN: never).
    ``switch_steps`` is a run's summary entry: {parameter name: step}, the weights that switched."""
    found = {}
    for name, step in switch_steps.items():
        match = _LAYER_WEIGHT.search(name)
        if match:
            found[match.group(2), int(match.group(1))] = step / steps
    modules = list(BLOCK_LINEARS) + sorted({m for m, _ in found} - set(BLOCK_LINEARS))
    layers = max([layers, *(i + 1 for _, i in found)])
    return modules, [[found.get((m, i), math.nan) for i in range(layers)] for m in modules]


def _switch_figure(report: Report, study: Study) -> Path | None:
    """auto's switch step per weight (module x layer), one panel per batch size, at auto's best lr and the tuning
    seed: which weights' SVD subspaces fell behind a random one, and when."""
    s = study.scale
    lr = study.best_lr("auto") if "auto" in study.methods else None
    if lr is None:
        return None
    from ..train.models import LLAMA_SIZES

    layers = LLAMA_SIZES.get(s.base["model"], (0, 0, 0, 0))[2]
    panels = []
    for b in sorted({s.base["batch_size"], *s.batch_sweep}):
        variant = {} if b == s.base["batch_size"] else {"batch": b}
        found = study.result(run_for(s, "auto", lr, study.tuning_seed, **variant))
        if found is not None:
            panels.append((b, found.summary))
    if not panels:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels) + 1.2, 3.8), dpi=110)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (b, summary) in zip(axes, panels):
        modules, grid = switch_grid(summary.get("switch_steps") or {}, layers, summary["steps"])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        switched = sum(not math.isnan(x) for row in grid for x in row)
        ax.set(title=f"batch {b}: {switched} of {len(modules) * len(grid[0])} switched", xlabel="layer",
               xticks=range(len(grid[0])), yticks=range(len(modules)), yticklabels=modules)
    fig.colorbar(image, ax=list(axes), label="switch step / run length (blank: never)")
    path = report.figure("auto-switches")
    fig.savefig(path, bbox_inches="tight")  # the module names are wider than the margin
    return path


def _cell(ppl: Ppl | str) -> str:
    """A table cell: mean ± std, or just 'pending' / 'not planned' (the claims say what is missing)."""
    return ppl.split(":")[0] if isinstance(ppl, str) else str(ppl)


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def _methods_table(study: Study) -> str:
    grid = sorted({lr for m in study.methods for lr in study.lr_grid(m)[0]})
    base = study.at_best("adamw")
    rows = []
    for m in study.methods:
        cells = []
        own = study.lr_grid(m)[0]
        for lr in grid:
            found = study.result(run_for(study.scale, m, lr, study.tuning_seed))
            cell = (f"{_finite(found.summary['final_val_ppl']):.2f}" if found is not None else
                    "pending" if lr in own else "—")
            cells.append(f"**{cell}**" if lr == study.best_lr(m) else cell)
        ppl, summaries = study.at_best(m), study.summaries(m)
        best = study.best_lr(m)
        edge = best is not None and best in (own[0], own[-1]) and len(own) > 1
        rows.append([m, "pending" if best is None else f"{best:g}" + (" (grid's edge)" if edge else ""), _cell(ppl),
                     f"{ppl.mean / base.mean:.3f}" if not _pending(ppl, base) else "", *cells,
                     *([_mib(statistics.fmean(s["optimizer_state_bytes"] for s in summaries)),
                        f"{statistics.fmean(s['peak_memory_bytes'] for s in summaries) / 2**20:.0f}",
                        f"{statistics.fmean(s['tokens_per_s'] for s in summaries):.0f}"] if summaries else ["", "", ""])])
    header = ["method", "best lr", "val ppl at best lr (all seeds)", "× AdamW",
              *(f"lr {lr:g} (seed {study.tuning_seed})" for lr in grid),
              "optimizer state (MiB)", "peak RSS (MiB)", "tokens/s"]
    return table(header, rows)


def _variant_table(study: Study, rows: list[tuple[str, str, dict]]) -> str:
    out = []
    for label, method, variant in rows:
        ppl, summaries = study.at_best(method, **variant), study.summaries(method, **variant)
        lr = study.best_lr(method)
        out.append([label, "pending" if lr is None else f"{lr:g}", _cell(ppl),
                    _mib(statistics.fmean(s["optimizer_state_bytes"] for s in summaries)) if summaries else "",
                    f"{statistics.fmean(s['tokens_per_s'] for s in summaries):.0f}" if summaries else ""])
    return table(["run", "lr (the method's best)", "val ppl", "optimizer state (MiB)", "tokens/s"], out)


def _runs_table(study: Study, runs: list[Planned]) -> str:
    rows = []
    for run in runs:
        found = study.result(run)
        if found is None:
            rows.append([run.key, study.store.status(run), "", "", ""])
            continue
        p = found.provenance
        rows.append([run.key, "stored", f"{found.summary['final_val_ppl']:.2f}",
                     f"`{p['commit'][:10]}`" + (" (dirty)" if p["dirty"] else ""), f"{p['wall_s'] / 60:.1f}"])
    return table(["run", "status", "val ppl", "commit (dirty: training code not as committed)", "wall time (min)"],
                 rows)


def _setup(study: Study, runs: list[Planned]) -> str:
    s, b = study.scale, study.scale.base
    summaries = [f.summary for r in runs if (f := study.result(r)) is not None]
    tokens = b["steps"] * b["batch_size"] * b.get("grad_accum", 1) * b["seq_len"]
    facts = ""
    if summaries:
        x = summaries[0]
        facts = (f" It has {x['parameters'] / 1e6:.2f}M parameters, {x['non_embedding_parameters'] / x['parameters']:.0%} "
                 f"of them outside the embedding and lm_head (all in the projected linear layers but the norms). "
                 f"Tokenizer `{b.get('tokenizer') or 'the default 32k SentencePiece model'}`: {x['vocab_size']} tokens, "
                 f"SHA-256 `{x['tokenizer_sha256'][:16]}…`; {x.get('train_tokens', '?'):,} training tokens in "
                 f"{x.get('train_documents', '?')} documents, validation on {x['val_sequences']} held-out sequences.")
    walls = [f.provenance["wall_s"] for r in study.grid() if (f := study.result(r)) is not None]
    timing = (f" Measured: the {len(walls)} stored grid runs took {statistics.fmean(walls) / 60:.1f} min each on "
              "average (one thread each, on CPU cores shared with other jobs)." if walls else "")
    widened = (f", widened one rung of the ladder {', '.join(f'{x:g}' for x in s.lr_ladder)} at a time while a "
               "method's best lr is at its edge" if s.lr_ladder else "")
    return (f"Model `{b['model']}` on `{b['data']}`, {b['steps']} steps of {b['batch_size']}"
            f"{' x ' + str(b['grad_accum']) if b.get('grad_accum', 1) > 1 else ''} x {b['seq_len']} tokens = "
            f"{tokens:,} tokens per run, in the order fixed by the seed (the same for every method: model init, data "
            f"order and random projections all follow `--seed`).{facts} Rank {b.get('rank')}, refresh gap "
            f"{b['update_gap']} steps, scale {b['scale']}, gradient clipping 1.0, {b.get('dtype', 'float32')}. "
            f"Learning rates: {LR_RULE} Grid: {', '.join(f'{x:g}' for x in s.lr_grid)}{widened}, run at seed "
            f"{study.tuning_seed}; a method's best lr has the lowest validation perplexity there, and the other "
            f"seeds ({', '.join(str(x) for x in s.seeds if x != study.tuning_seed)}) run at that lr only, as do the "
            f"sub-studies (mean ± std over seeds {', '.join(map(str, s.seeds))}; choosing on the seed that is also "
            f"reported favours every method alike). A best lr at the grid's edge is marked (a wider grid might do "
            f"better). Methods: "
            f"{', '.join(study.methods)}"
            f"{'' if 'galore-torch' in study.methods or 'galore-torch' not in s.methods else ' (galore-torch: not installed)'}."
            f"{timing}")


def _selected(args, runs: list[Planned]) -> list[Planned]:
    """The runs that --methods lets start (all without it); UsageError for a method the study does not have."""
    if not getattr(args, "methods", None):
        return runs
    methods = set(args.methods.split(","))
    if methods - set(METHODS):
        raise UsageError(f"--methods {args.methods}: the study's methods are {', '.join(METHODS)}")
    return [r for r in runs if r.flags["optimizer"] in methods]


def dry_run(args) -> list[str]:
    """Each planned run with what would happen to it (reuse, resume, run, rerun and why), and what waits."""
    study = Study(args, dry_run=True)
    runs, waiting = study.planned()
    runs = _selected(args, runs)
    lines = [f"[{study.store.status(r)}] {study.store.command(r)}" for r in runs]
    return lines + [f"[waiting for its method's learning-rate grid] {w}, seeds "
                    f"{', '.join(map(str, study.scale.seeds))}" for w in waiting]


def main(args) -> Path:
    """Run what the study still needs (at most --max-runs, --jobs at once, only --methods' runs if given), then
    write the report from every stored run and, where OUT holds the results index, regenerate the index."""
    study = Study(args)
    report = Report("pretrain", args.out, args.argv)
    jobs = getattr(args, "jobs", 1) if study.scale.fresh_process else 1  # in-process runs: one at a time
    started, running = 0, {}
    with ThreadPoolExecutor(jobs) as pool:
        while True:
            todo = [r for r in _selected(args, study.planned()[0]) if study.result(r) is None
                    and r.key not in running]
            while todo and len(running) < jobs and (args.max_runs is None or started < args.max_runs):
                run = todo.pop(0)
                running[run.key] = (run, pool.submit(study.store.execute, run))
                started += 1
            if not running:
                break
            done, _ = wait([f for _, f in running.values()], return_when=FIRST_COMPLETED)
            for key in [k for k, (_, f) in running.items() if f in done]:
                run, future = running.pop(key)
                study.add(run, future.result())
    runs, waiting = study.planned()
    path = write(study, report, runs, waiting)
    if (Path(args.out) / "README.md").is_file():  # the committed results: their index follows the new verdicts
        index.main(argparse.Namespace(out=args.out))
    return path


def write(study: Study, report: Report, runs: list[Planned], waiting: list[str]) -> Path:
    s = study.scale
    done = sum(study.result(r) is not None for r in runs)
    found = [(f"{m} (lr {study.best_lr(m):g})", study.stored_seeds(m, study.best_lr(m)))
             for m in study.methods if study.best_lr(m) is not None]
    found = [(label, runs) for label, runs in found if runs]
    fig = _figure(report, "", [("each method at its best learning rate", found)])
    sizes = sorted({s.base["batch_size"], *s.batch_sweep})
    panels = []
    for b in sizes:
        variant = {} if b == s.base["batch_size"] else {"batch": b}
        curves = [(f"{m} (lr {study.best_lr(m):g})", study.stored_seeds(m, study.best_lr(m), **variant))
                  for m in ("galore", "golore", "auto") if m in study.methods and study.best_lr(m) is not None]
        panels.append((f"batch {b}", [(m, c) for m, c in curves if c]))
    batch_fig = _figure(report, "batch", panels)
    switch_fig = _switch_figure(report, study)
    results = claims(study)
    base_rank = s.base.get("rank")
    sections = [
        f"""
Questions: how much validation perplexity does each memory-saving method give up against full-rank AdamW at
equal tokens, and which projector should one use? Claims checked as sub-studies: GaLore within a few % of AdamW
(Zhao et al. 2024), GoLore@20% and online PCA against GaLore (He et al. 2024; Liang et al. 2024), RSO against
GoLore (Chen et al. 2025), GaLore's rank ablation, GaLore vs GoLore vs auto across batch sizes at equal tokens,
GoLore's 8- and 4-bit moments, and which AdamW arithmetic (torch.optim's or galore-torch's) serves GaLore better.

Status: {done} of {len(runs)} runs stored{f"; {len(waiting) * len(s.seeds)} sub-study runs wait for their method's lr grid" if waiting else ""}.
Missing runs make their rows "pending"; `subspace-optim reproduce pretrain` runs what is missing (`--max-runs N` at
most N per invocation; `--dry-run` lists them).

## Set-up

{_setup(study, runs)}

Memory columns are the harness's measured report (optimizer state: `opt.state_bytes()` for ours, the state's
tensors for torch AdamW and galore-torch, which leaves out galore-torch's projection matrices; peak RSS: the whole
process). tokens/s: wall clock on shared CPU cores, rough. The loss curves are training losses: no token is seen
twice, so each is an estimate of the held-out loss.

## Methods at their best learning rate

{f"![loss against tokens]({fig.name})" if fig else "(the figure appears once a method's grid is complete)"}

{_methods_table(study)}
""",
        "## GaLore's rank (at GaLore's best lr)\n\n" + _variant_table(study, [
            (f"galore r={r}", "galore", {} if r == base_rank else {"rank": r})
            for r in sorted({base_rank, *s.ranks})]) if "galore" in study.methods else "",
        "## Quantized moments (GoLore at its best lr)\n\n" + _variant_table(study, [
            (f"golore {b}-bit", "golore", {} if b == 32 else {"state_bits": b})
            for b in (32, *s.state_bits)]) if "golore" in study.methods and s.state_bits else "",
        "## GaLore with galore-torch's choices (at GaLore's best lr)\n\n" + _variant_table(study, [
            ("galore (ours: moments projected, torch.optim's AdamW)", "galore", {}),
            ("galore, moments kept (galore-torch's)", "galore", GALORE_TORCH_VARIANTS[0]),
            ("galore, moments kept, galore-torch's AdamW arithmetic (= galore-torch)", "galore",
             GALORE_TORCH_VARIANTS[1])]) if "galore" in study.methods and s.arithmetic else "",
        "## Batch size at equal tokens (each method at its best lr from the grid)\n\n"
        + (f"![batch sweep]({batch_fig.name})\n\n" if batch_fig else "")
        + (f"auto's switches, per weight (its best lr, seed {study.tuning_seed}):\n\n![auto's switch steps]"
           f"({switch_fig.name})\n\n" if switch_fig else "")
        + _variant_table(study, [(f"{m} batch {b}", m, {} if b == s.base["batch_size"] else {"batch": b})
                                 for b in sizes for m in ("galore", "golore", "auto") if m in study.methods]),
        "## The papers' numbers (GaLore Table 2, C4, validation perplexity)\n\n" + table(
            ["model", "full-rank Adam", "GaLore", "GaLore / full", "rank"],
            [[m, f"{a:.2f}", f"{g:.2f}", f"{g / a:.3f}", r] for m, (a, g, r) in PAPER.items()]),
        "## Runs\n\nEach run's commit is the code that trained it (stored in `pretrain-runs/KEY/provenance.json` "
        "with its training-code digest); a run whose training code has changed since is run again.\n\n"
        + _runs_table(study, runs) + "\n\nCommands (`subspace-optim train`, in the order they run):\n\n```\n"
        + "\n".join(study.store.command(r) for r in runs) + "\n```",
    ]
    body = "\n\n".join(x.strip("\n") for x in sections if x)
    return report.write("Pretraining: quality against memory, at each method's best learning rate", "\n" + body,
                        seeds=", ".join(map(str, s.seeds)) + " for every method and learning rate",
                        verdicts=[c.row() for c in results])
