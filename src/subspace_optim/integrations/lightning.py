"""Lightning: our optimizers returned by ``configure_optimizers``, and ``SubspaceDDPStrategy`` for
``grad_comm="subspace"``.

Plain use works in one process and under Lightning's DDP: Lightning calls ``optimizer.step(closure)``, and
``step`` runs the closure (zero_grad, training_step, backward) before it steps, so layer-wise updates, taken by
hooks during backward, fall inside it. With ``accumulate_grad_batches=k`` Lightning runs k - 1 closures itself and
the k-th inside ``step``, each loss divided by k: what ``accumulation_steps=k`` expects.

Two things need this module:

- ``grad_comm="subspace"`` (engine/comm.py): DDP must leave the projected weights to the optimizer, and it learns
  which when it is built; Lightning's ``DDPStrategy`` builds it before it calls ``configure_optimizers``.
  ``SubspaceDDPStrategy`` calls ``configure_optimizers`` first, leaves those weights to the optimizers, then wraps.
- Hooks that take the gradient during backward (layer-wise mode, ``grad_comm="subspace"``) cannot follow three of
  Lightning's settings: its gradient clipping (after backward the projected gradients are gone: it would clip by
  the dense ones' norm), an ``accumulate_grad_batches`` other than ``accumulation_steps``, and a step after fewer
  micro-batches (an epoch's last, short accumulation window). ``SubspaceCallback`` (the strategy does what it does
  itself) refuses them with a clear error instead of training on silently, and removes the hooks when fit ends, so
  that the module can be fit again.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel

from ..engine import comm
from ..optimizer import SubspaceOptimizer

__all__ = ["SubspaceCallback", "SubspaceDDPStrategy", "check_trainer", "check_micro_batches", "release"]


def _hooked(optimizers) -> list[SubspaceOptimizer]:
    """Those of ``optimizers`` whose hooks take the gradients during backward."""
    return [o for o in optimizers
            if isinstance(o, SubspaceOptimizer) and (o.layerwise or o.grad_comm == "subspace")]


def check_trainer(trainer: Trainer) -> None:
    """Refuse the Trainer's settings that its optimizers' backward hooks cannot follow (ValueError)."""
    hooked = _hooked(trainer.optimizers)
    if not hooked:
        return
    if trainer.gradient_clip_val:
        raise ValueError(
            f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) with an optimizer built with layerwise=True or "
            "grad_comm='subspace': Lightning clips after backward, when the projected gradients have been taken "
            "by the optimizer's hooks, so it would clip by the dense gradients' norm alone. Leave it unset")
    if trainer.lightning_module.automatic_optimization:
        k = trainer.accumulate_grad_batches
        steps = sorted({g["accumulation_steps"] for o in hooked for g in o.param_groups} - {k})
        if steps:
            raise ValueError(
                f"Trainer(accumulate_grad_batches={k}) with an optimizer built with accumulation_steps={steps[0]}: "
                "its hooks count the micro-batches of a step themselves; give both the same number")
    model = trainer.strategy.model
    if isinstance(model, DistributedDataParallel):
        by_ddp = {id(p) for name, p in model.module.named_parameters() if name not in model.parameters_to_ignore}
        if any(id(p) in by_ddp for o in hooked if o.grad_comm == "subspace"
               for p, space in o._spaces.items() if space.projects):
            raise ValueError(
                "an optimizer built with grad_comm='subspace' under a DDP that also reduces its projected weights: "
                "use Trainer(strategy=subspace_optim.integrations.lightning.SubspaceDDPStrategy())")


def release(optimizers) -> None:
    """At the end of fit: remove the optimizers' hooks, so that the module can be fit again (a second Trainer,
    ``Tuner.lr_find``): the module keeps its trainer, which keeps these optimizers alive, and a parameter takes
    the hooks of one live optimizer at a time."""
    for optimizer in _hooked(optimizers):
        optimizer.remove_hooks()


def check_micro_batches(optimizer) -> None:
    """Before ``step()``: every hook has seen its step's last micro-batch (RuntimeError otherwise)."""
    if any(state.get("micro") for state in optimizer.state.values()):
        raise RuntimeError(
            "the optimizer is stepped before its hooks saw accumulation_steps micro-batches: Lightning steps at an "
            "epoch's last batch, so make the batches per epoch a multiple of accumulate_grad_batches (under manual "
            "optimization, step after accumulation_steps backward passes)")


class SubspaceCallback(Callback):
    """``Trainer(callbacks=[SubspaceCallback()])``: :func:`check_trainer` at the start of fit,
    :func:`check_micro_batches` before every step, :func:`release` at the end. ``SubspaceDDPStrategy`` does all
    three itself."""

    def on_fit_start(self, trainer, pl_module) -> None:
        check_trainer(trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        check_micro_batches(optimizer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            release(trainer.optimizers)


class SubspaceDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` that leaves the weights projected by ``grad_comm="subspace"`` optimizers to
    them (which all-reduce R = Pᵀ G themselves), as ``subspace_optim.subspace_ddp`` does; layer-wise mode included.
    Any other optimizer trains as under ``DDPStrategy``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._optimizers_built = False

    def configure_ddp(self) -> None:
        # DDPStrategy.setup wraps the model and then builds the optimizers; DDP needs them first
        super().setup_optimizers(self.lightning_module.trainer)
        self._optimizers_built = True
        subspace = [o for o in self.optimizers if getattr(o, "grad_comm", None) == "subspace"]
        if subspace:
            comm.leave_to_optimizers(self.lightning_module, subspace)
        super().configure_ddp()

    def setup_optimizers(self, trainer: Trainer) -> None:
        if not self._optimizers_built:  # not built by configure_ddp just before (not fitting, or no DDP wrap)
            super().setup_optimizers(trainer)
        self._optimizers_built = False

    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            check_trainer(trainer)

    def teardown(self) -> None:
        super().teardown()
        release(self.optimizers)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        def checked():
            result = closure()  # training_step and backward (with the hooks)
            check_micro_batches(optimizer)
            return result

        return super().optimizer_step(optimizer, checked, model, **kwargs)
