"""A rich progress bar that counts training *steps*, not dataloader batches.

:class:`MarbleProgressBar` is Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar`
with the training bar rebuilt around ``trainer.global_step`` / ``trainer.max_steps``::

    Training ━━━━━━━━━━━━╸━━━━━━━━  61/150 steps • 4.12 s/step • ETA 0:06:07 • composition 0.412 ...

* ``completed`` is ``trainer.global_step`` (optimizer steps; a resumed run starts where it left
  off) and ``total`` is ``trainer.max_steps`` (or the estimated stepping batches when
  ``max_steps`` is unset). The prompt dataloader is an endless ``IterableDataset`` whose length
  says nothing about training, so it is never used.
* ``s/step`` is the median wall time of the last :attr:`window` steps, evaluation passes
  excluded; the ETA is the remaining steps times that.
* The metrics column shows the latest ``reward/<name>_mean`` values (logged by the module each
  step with ``prog_bar=False``, read from ``trainer.callback_metrics``), the last held-out
  ``eval/mean`` when a :class:`~marble_lightning.callbacks.RewardEvalCallback` ran, and whatever
  the module logs with ``prog_bar=True``.
* Each evaluation pass of a ``RewardEvalCallback`` (base at train start, every ``every_n_steps``,
  at fit end) gets its own bar, ``Eval (base)`` / ``Eval (policy)``, advanced after each sampled
  chunk and hidden when the pass ends.

Use it in a config in place of ``lightning.pytorch.callbacks.RichProgressBar``::

    callbacks:
      - class_path: marble_lightning.progress.MarbleProgressBar
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections import deque
from datetime import timedelta
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import (
    BatchesProcessedColumn,
    CustomBarColumn,
    CustomTimeColumn,
    RichProgressBarTheme,
)
from rich.progress import ProgressColumn, Task, TextColumn
from rich.text import Text

__all__ = ["MarbleProgressBar"]

_DEFAULT_THEME = RichProgressBarTheme()


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    return str(timedelta(seconds=int(round(seconds))))


class _StepsColumn(ProgressColumn):
    """``61/150 steps`` on the training bar, ``3/12`` (sampled chunks) on the others."""

    def __init__(self, bar: MarbleProgressBar, style: Any) -> None:
        self._bar = bar
        self._style = style
        self._batches = BatchesProcessedColumn(style)
        super().__init__()

    def render(self, task: Task) -> Text:
        if task.id != self._bar.train_progress_bar_id:
            return self._batches.render(task)
        total = "--" if task.total is None or not math.isfinite(task.total) else int(task.total)
        return Text(f"{int(task.completed)}/{total} steps", style=self._style)


class _StepTimeColumn(ProgressColumn):
    """``4.12 s/step • ETA 0:06:07`` on the training bar, ``elapsed • remaining`` on the others."""

    max_refresh = 0.5

    def __init__(self, bar: MarbleProgressBar, style: Any) -> None:
        self._bar = bar
        self._style = style
        self._time = CustomTimeColumn(style)
        super().__init__()

    def render(self, task: Task) -> Text:
        if task.id != self._bar.train_progress_bar_id:
            return self._time.render(task)
        per_step = self._bar.seconds_per_step
        speed = "-.-- s/step" if per_step is None else f"{per_step:.2f} s/step"
        return Text(f"• {speed} • ETA {_clock(self._bar.eta_seconds)}", style=self._style)


class MarbleProgressBar(RichProgressBar):
    """Rich progress bar in training steps, with s/step, ETA, reward means and evaluation bars.

    Args:
        refresh_rate: screen refreshes per second (0 disables the bar).
        leave: keep finished bars on screen.
        theme: Lightning's :class:`RichProgressBarTheme`.
        console_kwargs: keyword arguments for rich's console (e.g. ``{"record": True}``).
        window: steps whose median duration gives ``s/step`` and the ETA.
        show_rewards: show the latest ``reward/<name>_mean`` values.
        eval_bars: give each ``RewardEvalCallback`` pass its own bar.
    """

    def __init__(
        self,
        refresh_rate: int = 1,
        leave: bool = False,
        theme: RichProgressBarTheme = _DEFAULT_THEME,
        console_kwargs: dict[str, Any] | None = None,
        window: int = 20,
        show_rewards: bool = True,
        eval_bars: bool = True,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(
                f"MarbleProgressBar: `window` should be an integer >= 1, got {window!r}"
            )
        super().__init__(
            refresh_rate=refresh_rate, leave=leave, theme=theme, console_kwargs=console_kwargs
        )
        self.window = window
        self.show_rewards = bool(show_rewards)
        self.eval_bars = bool(eval_bars)
        self.eval_progress_bar_id: Any = None
        self._durations: deque[float] = deque(maxlen=window)
        self._mark: float | None = None
        self._eval_seconds = 0.0
        self._last_eval: dict[str, float] = {}
        self._wrapped: list[Any] = []

    # ------------------------------------------------------------------ timing
    @property
    def total_steps(self) -> float:
        """``max_steps``, else Lightning's estimate of the stepping batches, else infinity."""
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return float(trainer.max_steps)
        try:
            estimate = float(trainer.estimated_stepping_batches)
        except Exception:
            return float("inf")
        return estimate if estimate > 0 else float("inf")

    @property
    def seconds_per_step(self) -> float | None:
        """Median wall time of the last :attr:`window` training steps (evaluation excluded)."""
        return statistics.median(self._durations) if self._durations else None

    @property
    def eta_seconds(self) -> float | None:
        """Remaining steps times :attr:`seconds_per_step`."""
        per_step = self.seconds_per_step
        total = self.total_steps
        if per_step is None or not math.isfinite(total):
            return None
        return max(total - self.trainer.global_step, 0.0) * per_step

    # ------------------------------------------------------------------ columns and metrics
    def configure_columns(self, trainer: Trainer) -> list:
        return [
            TextColumn("[progress.description]{task.description}"),
            CustomBarColumn(
                complete_style=self.theme.progress_bar,
                finished_style=self.theme.progress_bar_finished,
                pulse_style=self.theme.progress_bar_pulse,
            ),
            _StepsColumn(self, self.theme.batch_progress),
            _StepTimeColumn(self, self.theme.time),
        ]

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = dict(super().get_metrics(trainer, pl_module))
        items.pop("v_num", None)
        if self.show_rewards:
            for key, value in trainer.callback_metrics.items():
                if key.startswith("reward/") and key.endswith("_mean"):
                    number = float(value)
                    if math.isfinite(number):
                        items[key[len("reward/") : -len("_mean")]] = number
        if "eval/mean" in self._last_eval and math.isfinite(self._last_eval["eval/mean"]):
            items["eval/mean"] = self._last_eval["eval/mean"]
        return items

    # ------------------------------------------------------------------ training bar
    def _get_train_description(self, current_epoch: int) -> str:
        return "Training"

    def _initialize_train_progress_bar_id(self) -> None:
        self.train_progress_bar_id = self._add_task(
            self.total_steps, self._get_train_description(0)
        )
        assert self.progress is not None
        self.progress.update(self.train_progress_bar_id, completed=self.trainer.global_step)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._mark = time.perf_counter()
        self._eval_seconds = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # one bar for the whole run: a new epoch of the prompt stream does not reset it
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self.refresh()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._mark is not None:
            self._durations.append(max(now - self._mark - self._eval_seconds, 0.0))
        self._mark, self._eval_seconds = now, 0.0
        if self.is_disabled:
            return
        if self.progress is not None and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._update(self.train_progress_bar_id, trainer.global_step)
        super().on_train_epoch_end(trainer, pl_module)

    # ------------------------------------------------------------------ evaluation bars
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not self.eval_bars:
            return
        from marble_lightning.callbacks import RewardEvalCallback

        for callback in trainer.callbacks:
            if isinstance(callback, RewardEvalCallback) and "evaluate" not in vars(callback):
                callback.evaluate = self._wrap_evaluate(callback, callback.evaluate)
                self._wrapped.append(callback)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for callback in self._wrapped:
            vars(callback).pop("evaluate", None)  # back to the class's method (keeps it picklable)
        self._wrapped = []
        super().teardown(trainer, pl_module, stage)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_wrapped"] = []
        return state

    def _eval_chunks(self, callback: Any, trainer: Trainer) -> int:
        prompts = getattr(callback, "prompts", None) or []
        items = len(prompts) * int(getattr(callback, "images_per_prompt", 1))
        mine = len(range(trainer.global_rank, items, max(trainer.world_size, 1)))
        batch = max(int(getattr(callback, "batch_size", 1) or 1), 1)
        return max(math.ceil(mine / batch), 1)

    def _wrap_evaluate(self, callback: Any, evaluate: Any) -> Any:
        @functools.wraps(evaluate)
        def evaluate_with_bar(
            trainer: Trainer, pl_module: LightningModule, adapter: str = "policy"
        ) -> Any:
            start = time.perf_counter()
            task = None
            restore = None
            if self.is_enabled:
                self._init_progress(
                    trainer
                )  # the base pass runs at fit start, before on_train_start
                if self.progress is not None:
                    task = self._add_task(self._eval_chunks(callback, trainer), f"Eval ({adapter})")
                    self.eval_progress_bar_id = task
                    sample = pl_module.sample
                    if "sample" not in vars(pl_module):

                        @functools.wraps(sample)
                        def sample_with_bar(*args: Any, **kwargs: Any) -> Any:
                            out = sample(*args, **kwargs)
                            if self.progress is not None and task is not None:
                                self.progress.update(task, advance=1)
                                self.refresh()
                            return out

                        object.__setattr__(pl_module, "sample", sample_with_bar)
                        restore = pl_module
                    self.refresh()
            try:
                metrics = evaluate(trainer, pl_module, adapter)
            finally:
                if restore is not None:
                    vars(restore).pop("sample", None)
                if task is not None and self.progress is not None:
                    self.progress.update(task, advance=0, visible=False)
                    self.refresh()
                self.eval_progress_bar_id = None
                self._eval_seconds += time.perf_counter() - start
            if adapter == "policy" and isinstance(metrics, dict):
                self._last_eval = {k: float(v) for k, v in metrics.items()}
                self._update_metrics(trainer, pl_module)
            return metrics

        return evaluate_with_bar
