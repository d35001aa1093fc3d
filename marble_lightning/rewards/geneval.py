"""GenEval prompt files and GenEval's strict accuracy on detections.

GenEval's evaluation metadata is a jsonl file, one prompt per line::

    {"tag": "counting", "prompt": "a photo of three dogs",
     "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}]}

Tags (tasks): ``single_object``, ``two_object``, ``counting``, ``colors``, ``position``,
``color_attr``. An ``include`` entry may carry ``count`` (default 1), ``color`` and ``position``
(``[relation, index of an earlier include entry]``); an ``exclude`` entry ``{class, count}`` fails
the image when at least ``count`` objects of that class are detected.

Strict accuracy (GenEval's rule, 0 or 1 per image): every include requirement passes
(:func:`~marble_lightning.rewards.composition.strict_score`: at least ``count`` confident
detections, the top ``count`` of them of the wanted colour, every pair in the wanted relation to
the target's objects) and no exclude requirement is violated. Detections count above
``score_threshold`` (GenEval: 0.3), or ``counting_threshold`` (0.9) for counting prompts. The
graded score (:func:`~marble_lightning.rewards.composition.graded_score`) is reported alongside.

:func:`read_prompt_file` reads such jsonl files and plain prompt lists (OCR, PickScore,
DrawBench-style: one prompt per line; blank lines and lines starting with ``#`` skipped).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marble_lightning.rewards.composition import (
    ObjectRequirement,
    graded_score,
    strict_score,
)
from marble_lightning.rewards.detection import Detection

__all__ = [
    "GENEVAL_TAGS",
    "PromptRecord",
    "geneval_graded",
    "geneval_strict",
    "read_prompt_file",
    "requirements_from_metadata",
]

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass(frozen=True)
class PromptRecord:
    """One evaluation prompt: its text, its source file and GenEval metadata (``None``: plain)."""

    prompt: str
    source: str = ""
    metadata: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)

    @property
    def tag(self) -> str | None:
        return None if self.metadata is None else self.metadata.get("tag")


def _check_metadata(meta: Any, where: str) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: a GenEval metadata line should be a JSON object, got {meta!r}")
    prompt = meta.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: GenEval metadata needs a non-empty 'prompt', got {prompt!r}")
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(
            f"{where}: GenEval metadata needs a non-empty 'include' list, got {include!r}"
        )
    for _, entry in enumerate(list(include) + list(meta.get("exclude") or [])):
        if not isinstance(entry, dict) or not isinstance(entry.get("class"), str):
            raise ValueError(
                f"{where}: each include/exclude entry needs a 'class' name, got {entry!r}"
            )
        count = entry.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{where}: 'count' should be an integer >= 1, got {count!r}")
    for entry in include:
        position = entry.get("position")
        if position is not None:
            ok = isinstance(position, (list, tuple)) and len(position) == 2
            if (
                not ok
                or not isinstance(position[1], int)
                or not 0 <= position[1] < include.index(entry)
            ):
                raise ValueError(
                    f"{where}: 'position' should be [relation, index of an earlier include entry], "
                    f"got {position!r}"
                )
    return meta


def read_prompt_file(path: str | Path) -> list[PromptRecord]:
    """Prompts of a GenEval metadata ``.jsonl`` file or of a plain text file (one per line).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a malformed jsonl line (naming the file and line) or no prompt at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    records: list[PromptRecord] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                meta = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
            meta = _check_metadata(meta, where)
            records.append(PromptRecord(meta["prompt"].strip(), path.name, meta))
    else:
        for line in lines:
            text = line.strip()
            if text and not text.startswith("#"):
                records.append(PromptRecord(text, path.name))
    if not records:
        raise ValueError(f"prompt file {str(path)!r} holds no prompt")
    return records


def requirements_from_metadata(meta: Mapping[str, Any]) -> list[ObjectRequirement]:
    """GenEval ``include`` entries as :class:`ObjectRequirement` (counting prompts: exact
    counts)."""
    counting = meta.get("tag") == "counting"
    specs = []
    for entry in meta["include"]:
        position = entry.get("position")
        specs.append(
            ObjectRequirement(
                label=entry["class"].lower(),
                count=int(entry.get("count", 1)),
                exact=counting,
                color=entry.get("color"),
                position=None if position is None else (str(position[0]), int(position[1])),
            )
        )
    return specs


def _threshold(meta: Mapping[str, Any], score_threshold: float, counting_threshold: float) -> float:
    return counting_threshold if meta.get("tag") == "counting" else score_threshold


def geneval_strict(
    meta: Mapping[str, Any],
    detections: Sequence[Detection],
    *,
    score_threshold: float = 0.3,
    counting_threshold: float = 0.9,
    position_threshold: float = 0.1,
) -> float:
    """GenEval's pass/fail of one image (1.0 or 0.0); see the module docstring."""
    specs = requirements_from_metadata(meta)
    ok = strict_score(
        specs, detections, score_threshold, counting_threshold, position_threshold, "geneval"
    )
    threshold = _threshold(meta, score_threshold, counting_threshold)
    for entry in meta.get("exclude") or []:
        label = entry["class"].lower()
        found = sum(d.label.lower() == label and d.score >= threshold for d in detections)
        if found >= int(entry.get("count", 1)):
            return 0.0
    return float(ok)


def geneval_graded(
    meta: Mapping[str, Any],
    detections: Sequence[Detection],
    *,
    score_threshold: float = 0.3,
    counting_threshold: float = 0.9,
    position_threshold: float = 0.1,
) -> float:
    """Partial credit in ``[0, 1]`` (:func:`~marble_lightning.rewards.composition.graded_score`)."""
    specs = requirements_from_metadata(meta)
    return graded_score(
        specs, detections, score_threshold, counting_threshold, position_threshold, "geneval"
    )
