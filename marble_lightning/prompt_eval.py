"""Score a policy (or the base model) on standard prompt sets: the table the evaluation reports.

:func:`evaluate_prompts` samples ``images_per_prompt`` images per prompt at fixed seeds
(:meth:`~marble_lightning.generation.PolicySampling.sample`: image ``c`` of a prompt has seed
``seed + c``, independent of the chunking and of the ranks), scores them with the rewards and,
for prompts with GenEval metadata and a ``detector``, with GenEval's strict accuracy and the
graded score (:mod:`marble_lightning.rewards.geneval`). Under DDP every rank scores its share
(``index % world == rank``) and the rows are gathered, so every rank returns the same table.

Prompts: a list of strings, :class:`~marble_lightning.rewards.geneval.PromptRecord` s, paths of
prompt files (GenEval ``.jsonl`` or plain ``.txt``) or ``"toy:<split>"``, any mix (see
:func:`~marble_lightning.data.resolve_prompt_records`).

The same rows, gathering and summary serve Lightning's loops (``marble validate | test`` with
:class:`~marble_lightning.callbacks.EvaluationTableCallback`): :func:`table_rows` turns one scored
batch into rows, :func:`gather_rows` collects every rank's rows and :func:`summarize_rows` makes
the :class:`EvaluationTable`.
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
from torch import Tensor, nn

from marble_lightning.data import resolve_prompt_records
from marble_lightning.metrics import composite
from marble_lightning.rewards.base import MultiReward
from marble_lightning.rewards.geneval import PromptRecord, geneval_graded, geneval_strict

__all__ = [
    "GENEVAL_COLUMNS",
    "EvaluationTable",
    "evaluate_prompts",
    "gather_rows",
    "resolve_records",
    "summarize_rows",
    "table_rows",
]

GENEVAL_COLUMNS = ("geneval_strict", "geneval_graded")
"""The columns a detector adds (NaN for prompts without GenEval metadata)."""


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
        by_source: ``{source: {column: mean}}`` per prompt file (``"<list>"``: inline prompts).
        counts: ``{column: number of images where it applies}``.
    """

    rows: list[dict[str, Any]]
    means: dict[str, float]
    composite: float
    geneval: dict[str, float] = field(default_factory=dict)
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "means": self.means,
            "composite": self.composite,
            "geneval": self.geneval,
            "by_source": self.by_source,
            "counts": self.counts,
        }

    def format(self, title: str = "evaluation") -> str:
        """A readable table: reward, mean, images per column; composite; GenEval accuracy."""
        lines = [f"{title}: {len(self.rows)} images"]
        width = max([len(c) for c in self.means] + [len("composite"), len("reward")])
        lines.append(f"  {'reward':<{width}}  {'mean':>10}  {'images':>6}")
        for column, mean in self.means.items():
            lines.append(f"  {column:<{width}}  {mean:>10.4f}  {self.counts.get(column, 0):>6d}")
        lines.append(f"  {'composite':<{width}}  {self.composite:>10.4f}")
        if self.geneval:
            tags = [t for t in self.geneval if t != "overall"]
            tag_width = max(len(t) for t in [*tags, "overall"])
            lines.append("  GenEval strict accuracy:")
            for tag in tags:
                n = sum(1 for r in self.rows if r["tag"] == tag)
                lines.append(f"    {tag:<{tag_width}}  {self.geneval[tag]:>8.4f}  {n:>6d}")
            if "overall" in self.geneval:
                lines.append(f"    {'overall':<{tag_width}}  {self.geneval['overall']:>8.4f}")
        return "\n".join(lines)

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
    """Prompt records from strings, records, prompt-file paths and ``toy:<split>`` (a lone item
    or a list); a lone string that is not a ``.txt`` / ``.jsonl`` path or a split is one prompt.
    """
    items = [prompts] if isinstance(prompts, (str, Path)) else list(prompts)
    return resolve_prompt_records(items, what="prompts")


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def table_rows(
    items: Sequence[tuple[int, PromptRecord, int]],
    names: Sequence[str],
    values: Tensor,
    mask: Tensor,
    images: Tensor | None = None,
    detector: Any = None,
) -> list[dict[str, Any]]:
    """The rows of one scored batch.

    Args:
        items: ``B`` tuples ``(index in the prompt set, record, seed)``.
        names: the ``K`` reward names.
        values: ``[B, K]`` reward values; mask: bool ``[B, K]`` (False: NaN in the row).
        images: ``[B, 3, H, W]`` in ``[0, 1]``, needed with a ``detector``.
        detector: a :class:`~marble_lightning.rewards.detection.Detector`; adds the
            :data:`GENEVAL_COLUMNS` (NaN for records without GenEval metadata).
    """
    values, mask = values.detach().double().cpu(), mask.detach().bool().cpu()
    detections = None
    if detector is not None and any(r.metadata is not None for _, r, _ in items):
        if images is None:
            raise ValueError("table_rows: a detector needs the images")
        queries = [[e["class"] for e in (r.metadata or {}).get("include", [])] for _, r, _ in items]
        detections = detector.detect(images, queries)
    rows: list[dict[str, Any]] = []
    for j, (index, record, image_seed) in enumerate(items):
        row: dict[str, Any] = {
            "index": int(index), "prompt": record.prompt, "source": record.source,
            "tag": record.tag or "", "seed": int(image_seed),
        }  # fmt: skip
        for k, name in enumerate(names):
            row[name] = float(values[j, k]) if bool(mask[j, k]) else float("nan")
        if detector is not None:
            meta = record.metadata
            found = detections[j] if detections is not None else []
            row["geneval_strict"] = geneval_strict(meta, found) if meta else float("nan")
            row["geneval_graded"] = geneval_graded(meta, found) if meta else float("nan")
        rows.append(row)
    return rows


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows (``all_gather_object`` when torch.distributed is initialised), sorted by
    ``(index, seed)``: the same list on every rank."""
    world, _ = _world()
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    return sorted(rows, key=lambda r: (r["index"], r["seed"]))


def summarize_rows(
    rows: list[dict[str, Any]], names: Sequence[str], geneval: bool = False
) -> EvaluationTable:
    """The :class:`EvaluationTable` of ``rows`` (reward columns ``names``; ``geneval``: the rows
    carry the :data:`GENEVAL_COLUMNS`)."""
    names = list(names)
    columns = names + (list(GENEVAL_COLUMNS) if geneval else [])
    means = {c: _nanmean([r[c] for r in rows]) for c in columns}
    table = EvaluationTable(
        rows=rows,
        means=means,
        composite=composite({n: means[n] for n in names}),
        counts={c: sum(1 for r in rows if not math.isnan(r[c])) for c in columns},
    )
    for source in dict.fromkeys(r["source"] for r in rows):
        part = [r for r in rows if r["source"] == source]
        table.by_source[source or "<list>"] = {c: _nanmean([r[c] for r in part]) for c in columns}
    if geneval:
        tags = [t for t in dict.fromkeys(r["tag"] for r in rows) if t]
        for tag in tags:
            table.geneval[tag] = _nanmean([r["geneval_strict"] for r in rows if r["tag"] == tag])
        if tags:
            table.geneval["overall"] = sum(table.geneval[t] for t in tags) / len(tags)
    return table


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
        steps: sampler steps (default: the module's ``eval_sample_steps``, else its
            ``sample_steps``).
        adapter: ``"policy"``, ``"old"`` or ``"base"``.
        out_dir: if given, rank 0 writes ``per_image.csv`` and ``summary.json`` there.
    """
    records = resolve_records(prompts)
    if steps is None:
        steps = getattr(module, "eval_sample_steps", None)
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
        rows.extend(table_rows(chunk, names, batch.values, batch.mask, images, detector))
    table = summarize_rows(gather_rows(rows), names, geneval=detector is not None)
    if out_dir is not None and rank == 0:
        table.write(out_dir)
    return table
