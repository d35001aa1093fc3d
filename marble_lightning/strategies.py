"""``ddp_spawn`` / ``ddp_fork`` that leave the main process in the state the workers reached.

Lightning's multiprocessing launcher (used by ``strategy="ddp_spawn"`` and ``"ddp_fork"``) runs
``fit`` in worker processes and sends back to the main process only rank 0's ``state_dict()``,
``trainer.state``, ``callback_metrics`` and the checkpoint callback's ``best_model_path``. A
:class:`~marble_lightning.module.MarbleDiffusionModule` keeps much of its training state outside
the ``state_dict`` (``step_index``, ``current_alpha``, the cached norms, the trackers, the
history: its ``on_save_checkpoint`` writes them under ``checkpoint["marble"]``), and the trainer's
own progress (``global_step``) and the callbacks' states (``ModelCheckpoint.last_model_path``,
``RewardEvalCallback.history``, ...) live in the loops and callbacks. So after ``fit`` the main
process saw ``global_step == 0``, ``step_index == 0``, uniform alpha and no ``last_model_path``.

:class:`MarbleMultiProcessingLauncher` sends back, in addition, what a checkpoint of rank 0 would
hold (written with Lightning's own ``dump_checkpoint``: the module's ``on_save_checkpoint``
extras, the loops' progress and every callback's ``state_dict``) and restores it in the main
process with the matching hooks (``on_load_checkpoint``, callbacks' ``load_state_dict``, the
fit loop's ``load_state_dict``). The weights themselves still come back through Lightning's
temporary ``state_dict`` file.

:class:`MarbleDDPStrategy` is ``DDPStrategy`` with that launcher. :func:`register_strategies`
registers it as ``"marble_ddp_spawn"`` / ``"marble_ddp_fork"`` and, with
``override_builtin=True``, under Lightning's own names ``"ddp_spawn"`` / ``"ddp_fork"`` (so a
plain ``Trainer(strategy="ddp_spawn")`` gets it); :func:`use_state_returning_launcher` swaps the
launcher of an already built trainer.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import TrainerFn

__all__ = [
    "MarbleDDPStrategy",
    "MarbleMultiProcessingLauncher",
    "register_strategies",
    "use_state_returning_launcher",
]

_KEY = "marble_checkpoint_bytes"


class MarbleMultiProcessingLauncher(_MultiProcessingLauncher):
    """Lightning's multiprocessing launcher that also returns rank 0's loop, callback and module
    checkpoint state to the main process (see the module docstring)."""

    def get_extra_results(self, trainer: Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        if trainer.state.fn != TrainerFn.FITTING or trainer.lightning_module is None:
            return extra
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        # optimizer state is rebuilt by the next fit anyway; the weights travel in Lightning's file
        for key in ("optimizer_states", "lr_schedulers"):
            checkpoint.pop(key, None)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        extra[_KEY] = buffer.getvalue()
        return extra

    def update_main_process_results(self, trainer: Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        data = extra.get(_KEY)
        if data is None:
            return
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        restore_fit_state(trainer, checkpoint)


def restore_fit_state(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """Restore loops, callbacks and the module's ``on_load_checkpoint`` extras (not the weights)
    from ``checkpoint`` into ``trainer``, e.g. in the main process after a spawned ``fit``."""
    module = trainer.lightning_module
    if module is not None:
        call._call_lightning_module_hook(trainer, "on_load_checkpoint", checkpoint)
    for callback in trainer.callbacks:
        state = (checkpoint.get("callbacks") or {}).get(callback.state_key)
        # the main process never ran ModelCheckpoint.setup: adopt the worker's folder so that
        # load_state_dict takes best/last paths instead of warning about a changed directory
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None and state:
            callback.dirpath = state.get("dirpath")
    connector = trainer._checkpoint_connector
    connector._loaded_checkpoint = checkpoint
    try:
        connector.restore_callbacks()
    finally:
        connector._loaded_checkpoint = {}
    loops = checkpoint.get("loops") or {}
    if "fit_loop" in loops:
        trainer.fit_loop.load_state_dict(loops["fit_loop"])


class MarbleDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose ``spawn`` / ``fork`` / ``forkserver`` launcher is
    :class:`MarbleMultiProcessingLauncher` (other launchers, e.g. ``torchrun``'s, unchanged)."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _MultiProcessingLauncher:
            self._launcher = MarbleMultiProcessingLauncher(self, start_method=self._start_method)


def use_state_returning_launcher(trainer: Trainer) -> bool:
    """Swap a built trainer's stock multiprocessing launcher for
    :class:`MarbleMultiProcessingLauncher`.

    Returns:
        Whether the launcher was swapped (``False`` for other launchers: subprocess/torchrun, none).
    """
    strategy = trainer.strategy
    launcher = getattr(strategy, "_launcher", None)
    if type(launcher) is not _MultiProcessingLauncher:
        return False
    strategy._launcher = MarbleMultiProcessingLauncher(
        strategy, start_method=launcher._start_method
    )
    return True


def register_strategies(override_builtin: bool = False) -> None:
    """Register ``"marble_ddp_spawn"`` / ``"marble_ddp_fork"`` (and, with ``override_builtin``,
    Lightning's ``"ddp_spawn"`` / ``"ddp_fork"``) as :class:`MarbleDDPStrategy`."""
    for start_method in ("spawn", "fork"):
        names = [f"marble_ddp_{start_method}"] + (
            [f"ddp_{start_method}"] if override_builtin else []
        )
        for name in names:
            StrategyRegistry.register(
                name,
                MarbleDDPStrategy,
                description=(
                    f"DDP ({start_method}) that returns loop/callback/module state to the main "
                    "process"
                ),
                start_method=start_method,
                override=True,
            )
