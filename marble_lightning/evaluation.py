"""Lightning's own loops for a trained policy: ``validate`` / ``test`` score held-out prompts,
``forward`` / ``predict`` generate images.

A mixin of :class:`~marble_lightning.module.MarbleDiffusionModule`. Evaluation batches come from
:meth:`~marble_lightning.data.PromptDataModule.val_dataloader` (and ``test_`` / ``predict_``):
dicts ``{"prompts": [B], "seeds": [B]}`` plus, from
:class:`~marble_lightning.data.EvaluationPrompts`, ``sources``, ``tags``, ``metadata`` and
``indices`` (``[B]`` each), already split across ranks, so nothing is scored twice.

* ``validate`` logs ``eval/<name>``, ``eval/<name>_sem`` and ``eval/mean`` (the composite of the
  trained rewards' means, :func:`~marble_lightning.metrics.composite`); ``test`` logs the same
  under ``test/``. Sums are reduced across ranks by :class:`~marble_lightning.metrics.RewardMetric`,
  so ``ModelCheckpoint(monitor="eval/mean")`` and ``EarlyStopping`` work with a validation loop.
* ``validation_step`` / ``test_step`` return the batch's images and scores (:data:`StepOutput`);
  :class:`~marble_lightning.callbacks.EvaluationTableCallback` turns them into the per-image table
  of :func:`~marble_lightning.prompt_eval.evaluate_prompts` (CSV, summary, GenEval accuracy).
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
from marble_lightning.rewards.geneval import PromptRecord

__all__ = ["EvaluationSteps", "ImageWriter", "StepOutput", "unpack_evaluation_batch"]

StepOutput = dict[str, Any]
"""What ``validation_step`` / ``test_step`` return: ``prompts`` and ``seeds`` (``[B]``), ``images``
``[B, 3, H, W]`` in ``[0, 1]``, ``rewards`` (a :class:`~marble_lightning.rewards.base.RewardBatch`:
``values`` and ``mask`` ``[B, K]``), ``records`` (``B``
:class:`~marble_lightning.rewards.geneval.PromptRecord` s: source, GenEval metadata) and
``indices`` (``[B]``, each prompt's index in the evaluation set)."""


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


def unpack_evaluation_batch(batch: Any) -> list[tuple[int, PromptRecord, int]]:
    """``[(index, record, seed)]`` of an evaluation batch; plain batches get no source or
    metadata and indices ``0..B-1``."""
    prompts, seeds = _unpack(batch)
    extra = batch if isinstance(batch, dict) else {}
    n = len(prompts)
    sources = list(extra.get("sources") or [""] * n)
    metadata = list(extra.get("metadata") or [None] * n)
    indices = [int(i) for i in (extra.get("indices") or range(n))]
    if not len(sources) == len(metadata) == len(indices) == len(seeds) == n:
        raise ValueError(
            f"an evaluation batch should hold {n} items in every list, got "
            f"{ {k: len(v) for k, v in extra.items() if isinstance(v, (list, tuple))} }"
        )
    return [
        (index, PromptRecord(prompt, str(source), meta), seed)
        for index, prompt, source, meta, seed in zip(indices, prompts, sources, metadata, seeds)
    ]


class EvaluationSteps:
    """``validation_step``, ``test_step``, ``forward`` and ``predict_step`` for the module."""

    rewards: Any
    reward_names: list[str]
    device: torch.device
    eval_sample_steps: int | None

    def forward(
        self, prompts: Sequence[str], seed: int | Sequence[int] = 0, **kwargs: Any
    ) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` of the policy for ``prompts`` (see ``sample``;
        ``steps`` defaults to ``eval_sample_steps``)."""
        kwargs.setdefault("steps", self.eval_sample_steps)
        return self.sample(list(prompts), seed=seed, **kwargs)  # type: ignore[attr-defined]

    def _score(self, batch: Any) -> tuple[Tensor, Any]:
        prompts, seeds = _unpack(batch)
        steps = self.eval_sample_steps
        images = self.sample(prompts, seed=seeds, steps=steps)  # type: ignore[attr-defined]
        return images, self.rewards(images, prompts)

    def _metric(self, stage: str) -> RewardMetric:
        metrics = self.__dict__.setdefault("_eval_metrics", {})
        if stage not in metrics:
            metrics[stage] = RewardMetric(self.reward_names).to(self.device)
        return metrics[stage]

    def _evaluation_step(self, batch: Any, stage: str) -> StepOutput:
        items = unpack_evaluation_batch(batch)
        images, scored = self._score(batch)
        self._metric(stage).update(scored)
        return {
            "prompts": [r.prompt for _, r, _ in items],
            "seeds": [s for _, _, s in items],
            "images": images,
            "rewards": scored,
            "records": [r for _, r, _ in items],
            "indices": [i for i, _, _ in items],
        }

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

    def validation_step(self, batch: Any, batch_idx: int) -> StepOutput:
        """Scores one batch (logged at epoch end); returns the :data:`StepOutput`."""
        return self._evaluation_step(batch, "validate")

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end("validate", "eval")

    def test_step(self, batch: Any, batch_idx: int) -> StepOutput:
        """Scores one batch (logged under ``test/``); returns the :data:`StepOutput`."""
        return self._evaluation_step(batch, "test")

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
