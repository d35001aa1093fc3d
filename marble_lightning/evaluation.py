"""Lightning's own loops for a trained policy: ``validate`` / ``test`` score held-out prompts,
``forward`` / ``predict`` generate images.

A mixin of :class:`~marble_lightning.module.MarbleDiffusionModule`. Evaluation batches come from
:meth:`~marble_lightning.data.PromptDataModule.val_dataloader` (and ``test_`` / ``predict_``):
dicts ``{"prompts": [B], "seeds": [B]}``, already split across ranks, so nothing is scored twice.

* ``validate`` logs ``eval/<name>``, ``eval/<name>_sem`` and ``eval/mean`` (the composite of the
  trained rewards' means, :func:`~marble_lightning.metrics.composite`); ``test`` logs the same
  under ``test/``. Sums are reduced across ranks by :class:`~marble_lightning.metrics.RewardMetric`,
  so ``ModelCheckpoint(monitor="eval/mean")`` and ``EarlyStopping`` work with a validation loop.
* ``predict_step`` returns images ``[B, 3, H, W]`` and their per-image rewards (``[B, K]``, NaN
  where a reward does not apply); :class:`ImageWriter` saves PNGs and a CSV.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from marble_lightning.metrics import RewardMetric, composite

__all__ = ["EvaluationSteps", "ImageWriter"]


def _unpack(batch: Any) -> tuple[list[str], list[int]]:
    if isinstance(batch, dict) and "prompts" in batch:
        prompts = list(batch["prompts"])
        seeds = [int(s) for s in batch.get("seeds", range(len(prompts)))]
        return prompts, seeds
    if isinstance(batch, (list, tuple)) and all(isinstance(p, str) for p in batch):
        return list(batch), list(range(len(batch)))
    raise ValueError(
        f"an evaluation batch should be {{'prompts': [...], 'seeds': [...]}}, got {batch!r}"
    )


class EvaluationSteps:
    """``validation_step``, ``test_step``, ``forward`` and ``predict_step`` for the module."""

    rewards: Any
    reward_names: list[str]
    device: torch.device

    def forward(
        self, prompts: Sequence[str], seed: int | Sequence[int] = 0, **kwargs: Any
    ) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` of the policy for ``prompts`` (see ``sample``)."""
        return self.sample(list(prompts), seed=seed, **kwargs)  # type: ignore[attr-defined]

    def _score(self, batch: Any) -> tuple[Tensor, Any]:
        prompts, seeds = _unpack(batch)
        images = self.sample(prompts, seed=seeds)  # type: ignore[attr-defined]
        return images, self.rewards(images, prompts)

    def _metric(self, stage: str) -> RewardMetric:
        metrics = self.__dict__.setdefault("_eval_metrics", {})
        if stage not in metrics:
            metrics[stage] = RewardMetric(self.reward_names).to(self.device)
        return metrics[stage]

    def _evaluation_step(self, batch: Any, stage: str) -> None:
        _, scored = self._score(batch)
        self._metric(stage).update(scored)

    def _evaluation_end(self, stage: str, prefix: str) -> None:
        metric = self._metric(stage)
        stats = metric.compute()  # summed over ranks
        metric.reset()
        means = {name: float(stats["mean"][i]) for i, name in enumerate(self.reward_names)}
        for i, name in enumerate(self.reward_names):
            if math.isfinite(means[name]):
                self.log(f"{prefix}/{name}", means[name])  # type: ignore[attr-defined]
            sem = float(stats["sem"][i])
            if math.isfinite(sem):
                self.log(f"{prefix}/{name}_sem", sem)  # type: ignore[attr-defined]
        mean = composite({n: v for n, v in means.items() if math.isfinite(v)})
        if math.isfinite(mean):
            self.log(f"{prefix}/mean", mean)  # type: ignore[attr-defined]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "validate")

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end("validate", "eval")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._evaluation_end("test", "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        prompts, seeds = _unpack(batch)
        images, scored = self._score(batch)
        values = torch.where(scored.mask, scored.values.double(), torch.nan)
        return {"prompts": prompts, "seeds": seeds, "images": images.cpu(), "rewards": values.cpu()}


class ImageWriter(BasePredictionWriter):
    """Writes ``marble predict`` results: one PNG per image and ``rewards.csv`` (per rank).

    Args:
        output_dir: folder for ``<rank>_<batch>_<i>.png`` and ``rewards_rank<r>.csv``.
    """

    def __init__(self, output_dir: str | Path = "predictions") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def write_on_batch_end(
        self, trainer: Any, pl_module: Any, prediction: Any, batch_indices: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        from torchvision.utils import save_image

        self.output_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        table = self.output_dir / f"rewards_rank{rank}.csv"
        new = not table.exists()
        with table.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["file", "prompt", "seed", *pl_module.reward_names])
            for i, (prompt, seed) in enumerate(zip(prediction["prompts"], prediction["seeds"])):
                name = f"{rank}_{batch_idx:05d}_{i:03d}.png"
                save_image(prediction["images"][i], self.output_dir / name)
                row = [float(v) for v in prediction["rewards"][i]]
                writer.writerow([name, prompt, seed, *row])
