"""Training harness: causal-LM pretraining and classification fine-tuning with any optimizer of the package."""

from .config import TrainConfig, UsageError
from .loop import run
from .optimizers import OPTIMIZERS, Method, Setup, build_optimizer

__all__ = ["TrainConfig", "UsageError", "run", "OPTIMIZERS", "Method", "Setup", "build_optimizer"]
