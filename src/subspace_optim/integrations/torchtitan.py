"""torchtitan (0.3.0): an ``OptimizersContainer`` that builds this library's optimizers by name.

torchtitan matches each ``ParamGroupConfig``'s regex against the parameters' FQNs (first match wins) and builds
one optimizer per ``optimizer_name`` and model part from the matched groups; ``optimizer_kwargs`` become the
group's settings (``lr``, ``rank``, ``projector``, ``update_gap``, ...), ``optimizer_factory_kwargs_by_name[name]``
the optimizer's own keywords (e.g. ``nonfinite``). Each group carries torchtitan's ``param_names``, so
random bases are keyed by FQN: pipeline stages and model parts draw the bases one model would.

Checkpoints go through the container's flat, FQN-keyed state dict. Its ``init_optim_state`` (one step at lr 0 on
zero gradients, before the first save and before a load) is the template step the optimizer recognises: it
creates the state without a refresh and without counting a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torchtitan.components.optimizer import OptimizersContainer

from .. import optimizer

__all__ = ["OPTIMIZERS", "SubspaceOptimizersContainer"]

#: The names a ``ParamGroupConfig.optimizer_name`` may take besides torchtitan's own ("Adam", "AdamW", "DistMuon"):
#: every optimizer class this library exports (a rule's class and the papers' aliases, not the abstract base).
OPTIMIZERS = {name: cls for name, cls in vars(optimizer).items()
              if isinstance(cls, type) and issubclass(cls, optimizer.SubspaceOptimizer) and cls.rule_name}

#: The group keys torchtitan's ``implementation`` sets for torch.optim's kernels. Ours are not switched by them:
#: each rule takes torch's fused kernel where the device has one, so they are dropped, not saved as settings.
_KERNEL_KEYS = ("fused", "foreach")


class SubspaceOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` that also resolves the names in ``OPTIMIZERS``.

    Everything else (grouping, stepping, the flat state dict, the LR schedulers) is torchtitan's; torchtitan's own
    optimizers can be mixed in by name.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        """``OptimizersContainer.Config``, built into a ``SubspaceOptimizersContainer``."""

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        if name not in OPTIMIZERS:
            try:
                return OptimizersContainer._resolve_optimizer_factory(name)
            except NotImplementedError:
                raise NotImplementedError(f"Optimizer {name!r} not added: choose one of {sorted(OPTIMIZERS)} or "
                                          "torchtitan's (Adam, AdamW, DistMuon)") from None
        cls = OPTIMIZERS[name]

        def build(groups: list[dict[str, Any]], **kwargs) -> Optimizer:
            return cls([{k: v for k, v in g.items() if k not in _KERNEL_KEYS} for g in groups], **kwargs)

        return build
