"""Score a policy (or the base model) on standard prompt sets: the table the evaluation reports.

:func:`evaluate_prompts` samples ``images_per_prompt`` images per prompt at fixed seeds
(:meth:`~marble_lightning.generation.PolicySampling.sample`: image ``c`` of a prompt has seed
``seed + c``, independent of the chunking and of the ranks), scores them with the rewards and,
for prompts with GenEval metadata and a ``detector``, with GenEval's strict accuracy and the
graded score (:mod:`marble_lightning.rewards.geneval`). Under DDP every rank scores its share
(``index % world == rank``) and the rows are gathered, so every rank returns the same table.

Prompts: a list of strings, :class:`~marble_lightning.rewards.geneval.PromptRecord` s, or paths of
prompt files (GenEval ``.jsonl`` or plain text), any mix.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marble_lightning.metrics import composite
from marble_lightning.rewards.base import MultiReward
from marble_lightning.rewards.geneval import (
    PromptRecord,
    geneval_graded,
    geneval_strict,
    read_prompt_file,
)

__all__ = ["EvaluationTable", "evaluate_prompts", "resolve_records"]


@dataclass
class EvaluationTable:
    """Per-image rows and their summary.

    Attributes:
        rows: one dict per image: ``prompt``, ``source``, ``tag``, ``seed``, ``index`` and one
            column per reward (NaN where it does not apply), plus ``geneval_strict`` /
            ``geneval_graded`` for GenEval prompts (NaN otherwise).
        means: ``{column: mean over the images where it applies}`` (rewards and GenEval scores).
        composite: :func:`~marble_lightning.metrics.composite` of the rewards' means.
        geneval: ``{tag: strict accuracy}`` per GenEval task and ``"overall"`` (GenEval's
            overall score: the mean over the tasks present).
        by_source: ``{source: {column: mean}}`` per prompt file.
    """

    rows: list[dict[str, Any]]
    means: dict[str, float]
    composite: float
    geneval: dict[str, float] = field(default_factory=dict)
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "means": self.means,
            "composite": self.composite,
            "geneval": self.geneval,
            "by_source": self.by_source,
        }

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``per_image.csv`` and ``summary.json`` under ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        columns: list[str] = []
        for row in self.rows:
            columns.extend(c for c in row if c not in columns)
        csv_path = out / "per_image.csv"
        with csv_path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        json_path = out / "summary.json"
        clean = json.loads(json.dumps(self.summary(), default=float).replace("NaN", "null"))
        json_path.write_text(
            json.dumps({**clean, "images": len(self.rows)}, indent=2, sort_keys=True)
        )
        return csv_path, json_path


def resolve_records(
    prompts: str | Path | Sequence[str | Path | PromptRecord],
) -> list[PromptRecord]:
    """Prompt records from strings, records and prompt-file paths (a lone path or a list)."""
    items = [prompts] if isinstance(prompts, (str, Path)) else list(prompts)
    records: list[PromptRecord] = []
    for item in items:
        if isinstance(item, PromptRecord):
            records.append(item)
        elif isinstance(item, Path) or (
            isinstance(item, str) and item.endswith((".jsonl", ".txt"))
        ):
            records.extend(read_prompt_file(item))
        elif isinstance(item, str) and item.strip():
            records.append(PromptRecord(item.strip()))
        else:
            raise ValueError(f"evaluate_prompts: not a prompt, record or prompt file: {item!r}")
    if not records:
        raise ValueError("evaluate_prompts: no prompts")
    return records


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


@torch.no_grad()
def evaluate_prompts(
    module: Any,
    prompts: str | Path | Sequence[str | Path | PromptRecord],
    *,
    rewards: Sequence[nn.Module] | MultiReward | None = None,
    detector: Any = None,
    seed: int = 0,
    images_per_prompt: int = 1,
    batch_size: int = 8,
    steps: int | None = None,
    adapter: str = "policy",
    out_dir: str | Path | None = None,
) -> EvaluationTable:
    """The evaluation table of ``module`` on ``prompts`` (see the module docstring).

    Args:
        module: a :class:`~marble_lightning.module.MarbleDiffusionModule` (``adapter="base"``
            scores the base model: no checkpoint needed).
        prompts: strings, :class:`PromptRecord` s or prompt files.
        rewards: reward modules (default: the module's own).
        detector: a :class:`~marble_lightning.rewards.detection.Detector` for GenEval prompts
            (``None``: no GenEval columns).
        seed: noise seed of copy 0 of each prompt.
        images_per_prompt: images per prompt.
        batch_size: images per sampling batch.
        steps: sampler steps (default: the module's ``sample_steps``).
        adapter: ``"policy"``, ``"old"`` or ``"base"``.
        out_dir: if given, rank 0 writes ``per_image.csv`` and ``summary.json`` there.
    """
    records = resolve_records(prompts)
    scorer = (
        rewards
        if isinstance(rewards, MultiReward)
        else MultiReward(list(rewards))
        if rewards
        else module.rewards
    )
    scorer = scorer.to(module.device)
    names = list(scorer.names)
    items = [(i, r, seed + c) for i, r in enumerate(records) for c in range(images_per_prompt)]
    world, rank = _world()
    mine = items[rank::world]
    rows: list[dict[str, Any]] = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        texts = [r.prompt for _, r, _ in chunk]
        images = module.sample(texts, seed=[s for _, _, s in chunk], adapter=adapter, steps=steps)
        batch = scorer(images, texts)
        values, mask = batch.values.double().cpu(), batch.mask.bool().cpu()
        detections = None
        if detector is not None and any(r.metadata is not None for _, r, _ in chunk):
            queries = [
                [e["class"] for e in (r.metadata or {}).get("include", [])] for _, r, _ in chunk
            ]
            detections = detector.detect(images, queries)
        for j, (index, record, image_seed) in enumerate(chunk):
            row: dict[str, Any] = {
                "index": index, "prompt": record.prompt, "source": record.source,
                "tag": record.tag or "", "seed": image_seed,
            }  # fmt: skip
            for k, name in enumerate(names):
                row[name] = float(values[j, k]) if bool(mask[j, k]) else float("nan")
            if detector is not None:
                meta = record.metadata
                found = detections[j] if detections is not None else []
                row["geneval_strict"] = geneval_strict(meta, found) if meta else float("nan")
                row["geneval_graded"] = geneval_graded(meta, found) if meta else float("nan")
            rows.append(row)
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    rows.sort(key=lambda r: (r["index"], r["seed"]))
    columns = names + (["geneval_strict", "geneval_graded"] if detector is not None else [])
    means = {c: _nanmean([r[c] for r in rows]) for c in columns}
    table = EvaluationTable(
        rows=rows, means=means, composite=composite({n: means[n] for n in names})
    )
    for source in dict.fromkeys(r["source"] for r in rows):
        part = [r for r in rows if r["source"] == source]
        table.by_source[source or "<list>"] = {c: _nanmean([r[c] for r in part]) for c in columns}
    if detector is not None:
        tags = [t for t in dict.fromkeys(r["tag"] for r in rows) if t]
        for tag in tags:
            table.geneval[tag] = _nanmean([r["geneval_strict"] for r in rows if r["tag"] == tag])
        if tags:
            table.geneval["overall"] = sum(table.geneval[t] for t in tags) / len(tags)
    if out_dir is not None and rank == 0:
        table.write(out_dir)
    return table
