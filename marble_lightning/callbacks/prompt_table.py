"""``EvaluationTableCallback``: the per-image evaluation table of ``validate`` / ``test``."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from marble_lightning.callbacks._common import check_module
from marble_lightning.prompt_eval import EvaluationTable, gather_rows, summarize_rows, table_rows
from marble_lightning.rewards.detection import Detector

__all__ = ["EvaluationTableCallback"]

_PREFIX = {"validate": "eval", "test": "test"}


class EvaluationTableCallback(Callback):
    """Collects the rows of Lightning's evaluation loops into an
    :class:`~marble_lightning.prompt_eval.EvaluationTable`.

    For every ``validation_step`` / ``test_step`` output (images ``[B, 3, H, W]``, rewards
    ``[B, K]`` and the prompts' records, see :data:`~marble_lightning.evaluation.StepOutput`) it
    keeps one row per image, as :func:`~marble_lightning.prompt_eval.evaluate_prompts` does:
    index, prompt, source, tag, seed, one column per reward (NaN where it does not apply) and,
    with a ``detector``, ``geneval_strict`` / ``geneval_graded`` for GenEval prompts. At epoch end
    the rows of all ranks are gathered (every rank gets the same :attr:`table`), summarised by
    :func:`~marble_lightning.prompt_eval.summarize_rows`, and global rank 0 writes
    ``per_image.csv`` and ``summary.json`` and prints the table. GenEval's overall strict
    accuracy is logged as ``eval/geneval_overall`` (validate) or ``test/geneval_overall`` (test).
    Sanity-check batches are ignored. ::

        marble test --config C --ckpt_path X \\
            --trainer.callbacks+=marble_lightning.callbacks.EvaluationTableCallback \\
            --trainer.callbacks.detector=marble_lightning.toy.detector.ToyDetector

    Args:
        detector: a :class:`~marble_lightning.rewards.detection.Detector` (``class_path`` in
            YAML) for the GenEval columns; ``None``: rewards only.
        output_dir: folder of the files; default ``<trainer.log_dir>/<stage>_table``
            (``trainer.log_dir`` is ``default_root_dir`` without a logger), ``stage`` being
            ``validate`` or ``test``.
        print_table: print the table on global rank 0.

    Attributes:
        table: the latest table (``None`` before the first evaluation epoch ends).
        written: the folder of the latest files (global rank 0; ``None`` elsewhere).
    """

    def __init__(
        self,
        detector: Detector | None = None,
        output_dir: str | Path | None = None,
        print_table: bool = True,
    ) -> None:
        if detector is not None and not callable(getattr(detector, "detect", None)):
            raise TypeError(
                f"`detector` should have a detect(images, queries) method, got {detector!r}"
            )
        self.detector = detector
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.print_table = bool(print_table)
        self.table: EvaluationTable | None = None
        self.written: Path | None = None
        self._rows: list[dict[str, Any]] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(output_dir=str(self.output_dir))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_module(pl_module, "EvaluationTableCallback")
        if isinstance(self.detector, nn.Module):
            self.detector.to(pl_module.device)

    def _collect(self, trainer: Trainer, pl_module: LightningModule, outputs: Any) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict) or "records" not in outputs:
            return
        scored = outputs["rewards"]
        items = list(zip(outputs["indices"], outputs["records"], outputs["seeds"]))
        self._rows.extend(
            table_rows(
                items,
                pl_module.reward_names,  # type: ignore[arg-type]
                scored.values,
                scored.mask,
                outputs["images"],
                self.detector,
            )
        )

    def _folder(self, trainer: Trainer, stage: str) -> Path:
        if self.output_dir is not None:
            return self.output_dir
        root = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank
        return Path(os.fspath(root)) / f"{stage}_table"

    def _finish(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        rows, self._rows = self._rows, []
        if trainer.sanity_checking:
            return
        folder = self._folder(trainer, stage)
        table = summarize_rows(
            gather_rows(rows),
            pl_module.reward_names,  # type: ignore[arg-type]
            geneval=self.detector is not None,
        )
        self.table = table
        overall = table.geneval.get("overall")
        if overall is not None and math.isfinite(overall):
            pl_module.log(f"{_PREFIX[stage]}/geneval_overall", overall)
        if trainer.is_global_zero:
            table.write(folder)
            self.written = folder
            if self.print_table:
                print(table.format(f"marble: {stage} table ({folder})"), flush=True)

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []

    @override
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._collect(trainer, pl_module, outputs)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module, "validate")

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []

    @override
    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._collect(trainer, pl_module, outputs)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    @override
    def state_dict(self) -> dict[str, Any]:
        """Nothing to resume: a table is rebuilt at every evaluation epoch."""
        return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None
