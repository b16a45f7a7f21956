"""subspace_optim: memory-efficient training by subspace optimization (GaLore, GoLore, GoLore@x%,
Online Subspace Descent, auto) with one torch.optim optimizer, plus RSO layers and a training harness."""

from .groups import subspace_param_groups, target_modules
from .rso import RSOController, RSOLinear, apply_rso, merge_rso, rso_layers
from .optimizer import (
    GaLoreAdamW,
    GoLoreAdamW,
    GoLoreSGD,
    OnlineSubspaceAdamW,
    SubspaceAdafactor,
    SubspaceAdamW,
    SubspaceLion,
    SubspaceOptimizer,
    SubspaceSGD,
)
from .engine.comm import subspace_ddp
from .projectors import Projector, get_projector, haar_stiefel, register_projector, top_singular

__all__ = [
    "subspace_param_groups",
    "target_modules",
    "SubspaceOptimizer",
    "SubspaceAdamW",
    "SubspaceSGD",
    "SubspaceAdafactor",
    "SubspaceLion",
    "GaLoreAdamW",
    "GoLoreAdamW",
    "GoLoreSGD",
    "OnlineSubspaceAdamW",
    "subspace_ddp",
    "Projector",
    "register_projector",
    "get_projector",
    "haar_stiefel",
    "top_singular",
    "apply_rso",
    "merge_rso",
    "rso_layers",
    "RSOLinear",
    "RSOController",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``subspace_optim.hf`` (HF Trainer glue) is imported on first use, not by ``import subspace_optim``."""
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
