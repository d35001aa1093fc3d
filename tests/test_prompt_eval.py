"""GenEval jsonl / plain prompt files, GenEval strict accuracy on synthetic detections for every
task type, and evaluate_prompts' table (per image, means, composite, CSV/JSON)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from marble_lightning.prompt_eval import evaluate_prompts
from marble_lightning.rewards.detection import Detection
from marble_lightning.rewards.geneval import (
    geneval_graded,
    geneval_strict,
    read_prompt_file,
    requirements_from_metadata,
)
from marble_lightning.testing import make_module

torch.set_num_threads(1)


def box(cx: float, cy: float, s: float = 0.1) -> tuple[float, float, float, float]:
    return (cx - s, cy - s, cx + s, cy + s)


def det(
    label: str, cx: float = 0.5, cy: float = 0.5, score: float = 0.95, color: str | None = None
) -> Detection:
    return Detection(label, box(cx, cy), score, color)


META = {
    "single_object": {
        "tag": "single_object",
        "prompt": "a photo of a dog",
        "include": [{"class": "dog", "count": 1}],
    },
    "two_object": {
        "tag": "two_object",
        "prompt": "a photo of a dog and a cat",
        "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
    },
    "counting": {
        "tag": "counting",
        "prompt": "a photo of three dogs",
        "include": [{"class": "dog", "count": 3}],
        "exclude": [{"class": "dog", "count": 4}],
    },
    "colors": {
        "tag": "colors",
        "prompt": "a photo of a red dog",
        "include": [{"class": "dog", "count": 1, "color": "red"}],
    },
    "position": {
        "tag": "position",
        "prompt": "a photo of a dog left of a cat",
        "include": [
            {"class": "cat", "count": 1},
            {"class": "dog", "count": 1, "position": ["left of", 0]},
        ],
    },
    "color_attr": {
        "tag": "color_attr",
        "prompt": "a photo of a red dog and a blue cat",
        "include": [
            {"class": "dog", "count": 1, "color": "red"},
            {"class": "cat", "count": 1, "color": "blue"},
        ],
    },
}

CASES = [
    ("single_object", [det("dog")], 1.0),
    ("single_object", [det("cat")], 0.0),
    ("single_object", [det("dog", score=0.2)], 0.0),  # below GenEval's 0.3
    ("two_object", [det("dog"), det("cat")], 1.0),
    ("two_object", [det("dog")], 0.0),
    ("counting", [det("dog", x / 5) for x in range(1, 4)], 1.0),
    ("counting", [det("dog", x / 5) for x in range(1, 3)], 0.0),
    ("counting", [det("dog", x / 6) for x in range(1, 5)], 0.0),  # 4 dogs: the exclude fails it
    ("counting", [det("dog", x / 5, score=0.8) for x in range(1, 4)], 0.0),  # counting needs 0.9
    ("colors", [det("dog", color="red")], 1.0),
    ("colors", [det("dog", color="blue")], 0.0),
    ("position", [det("dog", 0.2), det("cat", 0.8)], 1.0),
    ("position", [det("dog", 0.8), det("cat", 0.2)], 0.0),
    ("position", [det("dog", 0.2, 0.1), det("cat", 0.25, 0.9)], 0.0),  # mostly above, not left
    ("color_attr", [det("dog", color="red"), det("cat", color="blue")], 1.0),
    ("color_attr", [det("dog", color="blue"), det("cat", color="red")], 0.0),
]


@pytest.mark.parametrize("tag, detections, expected", CASES)
def test_geneval_strict_every_task(tag, detections, expected) -> None:
    meta = META[tag]
    assert geneval_strict(meta, detections) == expected
    graded = geneval_graded(meta, detections)
    assert 0.0 <= graded <= 1.0
    if expected == 1.0:
        assert graded == 1.0


def test_requirements_from_metadata() -> None:
    specs = requirements_from_metadata(META["position"])
    assert specs[1].position == ("left of", 0) and specs[0].label == "cat"
    assert requirements_from_metadata(META["counting"])[0].exact


def test_read_prompt_files(tmp_path) -> None:
    jsonl = tmp_path / "geneval.jsonl"
    jsonl.write_text("\n".join(json.dumps(m) for m in META.values()) + "\n\n")
    records = read_prompt_file(jsonl)
    assert [r.tag for r in records] == list(META)
    assert records[2].metadata["include"][0]["count"] == 3
    txt = tmp_path / "drawbench.txt"
    txt.write_text('# a comment\nA sign that says "hello"\n\n  a cat  \n')
    plain = read_prompt_file(txt)
    assert [r.prompt for r in plain] == ['A sign that says "hello"', "a cat"] and plain[
        0
    ].metadata is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"tag": "single_object", "prompt": "x", "include": [{"class": "dog", "count": 0}]}\n'
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:1.*count"):
        read_prompt_file(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        read_prompt_file(bad)
    with pytest.raises(FileNotFoundError):
        read_prompt_file(tmp_path / "missing.txt")


class FakeDetector:
    """Detects a dog left of a cat in every image (whatever the image)."""

    def detect(self, images, queries):
        return [[det("dog", 0.2), det("cat", 0.8)] for _ in queries]


def test_evaluate_prompts_table_and_files(tmp_path) -> None:
    jsonl = tmp_path / "geneval.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps(META[t]) for t in ("single_object", "position", "colors"))
    )
    txt = tmp_path / "pick.txt"
    txt.write_text("a red cat\nsmall box\n")
    module = make_module("marble")
    table = evaluate_prompts(
        module, [jsonl, txt, "a green dog"], detector=FakeDetector(), images_per_prompt=2,
        batch_size=3, adapter="base", out_dir=tmp_path / "out",
    )  # fmt: skip
    assert len(table.rows) == 12
    assert [(r["index"], r["seed"]) for r in table.rows][:4] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert table.geneval == {
        "single_object": 1.0,
        "position": 1.0,
        "colors": 0.0,
        "overall": pytest.approx(2 / 3),
    }
    red = [r["red"] for r in table.rows]
    assert table.means["red"] == pytest.approx(sum(red) / len(red))
    assert math.isnan(table.rows[-1]["geneval_strict"])  # plain prompts have no GenEval score
    assert math.isnan(table.rows[0]["green"])  # "green" applies only to prompts with the word
    assert set(table.by_source) == {"geneval.jsonl", "pick.txt", "<list>"}
    assert table.counts["green"] == 2 and table.counts["geneval_strict"] == 6
    text = table.format("base")
    assert text.startswith("base: 12 images") and "GenEval strict accuracy" in text
    # the same images as the module's own sampler at those seeds (the base model, no checkpoint)
    images = module.sample(["a photo of a dog"], seed=[1], adapter="base")
    assert module.rewards(images, ["a photo of a dog"]).values[0, 0].item() == pytest.approx(
        table.rows[1]["red"], rel=1e-6
    )
    with (tmp_path / "out" / "per_image.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and "geneval_strict" in rows[0]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["images"] == 12 and summary["geneval"]["overall"] == pytest.approx(2 / 3)
    assert summary["counts"]["red"] == 12
    # chunking does not change the table
    again = evaluate_prompts(
        module,
        [jsonl, txt, "a green dog"],
        detector=FakeDetector(),
        images_per_prompt=2,
        batch_size=5,
        adapter="base",
    )
    assert [r["red"] for r in again.rows] == pytest.approx(red, rel=1e-6)
