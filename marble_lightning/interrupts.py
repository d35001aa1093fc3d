"""Graceful SIGINT / SIGTERM for ``marble fit``: finish the step, save, report, exit non-zero.

:class:`GracefulInterrupt` is added to every trainer the ``marble`` CLI builds. From the start of
training it handles SIGINT (Ctrl+C) and SIGTERM itself (replacing Lightning's handlers for the
duration of the fit):

* the first signal only sets a flag; the optimizer step in progress is finished (so a signal is
  acted on within one training step), then ``last.ckpt`` is written to the checkpoint folder with
  ``trainer.save_checkpoint`` (a normal mid-run checkpoint: ``--ckpt_path last`` resumes from it)
  and ``trainer.should_stop`` ends the fit, so ``on_fit_end`` callbacks (the run report) run for
  the steps that were done;
* a second signal of the same kind aborts at once (``KeyboardInterrupt``), as before.

The CLI then exits with ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM). Single-process
runs are what the tests cover; under DDP every rank must receive the signal (as a terminal's
Ctrl+C or a scheduler's SIGTERM to the process group does).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["GracefulInterrupt", "checkpoint_dir"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def checkpoint_dir(trainer: Trainer) -> str:
    """The folder ``ModelCheckpoint`` writes to (or ``<log_dir>/checkpoints`` without one)."""
    callback = trainer.checkpoint_callback
    directory = getattr(callback, "dirpath", None) if callback is not None else None
    if directory is None:
        base = trainer.log_dir or trainer.default_root_dir
        directory = os.path.join(base, "checkpoints")
    return str(directory)


class GracefulInterrupt(Callback):
    """Turn SIGINT/SIGTERM into: finish the step, save ``last.ckpt``, stop, report, exit non-zero.

    Attributes:
        signum: the signal received (``None`` when none was).
        saved: path of the checkpoint written after the signal (``None`` until written).
        steps_done: ``trainer.global_step`` when the checkpoint was written.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saved: str | None = None
        self.steps_done: int | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ handlers
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # second signal: give up at once
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"marble: {name} received; finishing the current step, then saving a resumable "
            "checkpoint (send it again to abort at once)",
            file=sys.stderr,
            flush=True,
        )

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _SIGNALS:
            current = signal.getsignal(sig)
            if sig not in self._previous:
                self._previous[sig] = current
            signal.signal(sig, self._handle)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            except (TypeError, ValueError):  # pragma: no cover
                pass
        self._previous.clear()

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning registers its own SIGTERM handler after on_fit_start; ours replaces it again
        self._install()

    def _save(self, trainer: Trainer) -> None:
        if self.saved is not None:
            return
        name = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
        path = os.path.join(checkpoint_dir(trainer), name)
        trainer.save_checkpoint(path)
        self.saved = path
        self.steps_done = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.signum is None:
            return
        self._save(trainer)
        trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.signum is not None:  # signal after the last step (e.g. during the final evaluation)
            self._save(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    @property
    def exit_code(self) -> int | None:
        """``128 + signum`` after a signal, else ``None``."""
        return None if self.signum is None else 128 + int(self.signum)
