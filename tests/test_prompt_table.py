"""Lightning's validate / test loops on standard prompt files: EvaluationTableCallback's table
equals evaluate_prompts', is the same on one and two ranks, comes out of ``marble test`` (also
without a checkpoint), and bad prompt files fail clearly."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from marble_lightning.callbacks import EvaluationTableCallback
from marble_lightning.cli import main
from marble_lightning.data import PromptDataModule
from marble_lightning.module import MarbleDiffusionModule
from marble_lightning.prompt_eval import evaluate_prompts
from marble_lightning.testing import TINY, make_trainer
from marble_lightning.toy.backbone import ToyBackbone
from marble_lightning.toy.detector import ToyDetector
from marble_lightning.toy.rewards import ToyCompositionReward, ToyJPEGReward, ToyOCRReward

REPO = Path(__file__).resolve().parents[1]

GENEVAL = [
    {"tag": "single_object", "prompt": "a red circle", "include": [{"class": "circle"}]},
    {
        "tag": "colors",
        "prompt": "a blue square",
        "include": [{"class": "square", "count": 1, "color": "blue"}],
    },
    {
        "tag": "counting",
        "prompt": "two green circles",
        "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 3}],
    },
    {
        "tag": "position",
        "prompt": "a red circle left of a blue square",
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "position": ["left of", 0]},
        ],
    },
]
PLAIN = '# DrawBench-style list\na sign that says "cat"\ntwo yellow squares\n'
REWARDS = ("composition", "ocr", "jpeg")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def prompt_files(tmp_path: Path) -> list[str]:
    """A GenEval metadata file, a plain prompt list and one inline prompt (7 prompts)."""
    jsonl = tmp_path / "geneval_toy.jsonl"
    jsonl.write_text("".join(json.dumps(m) + "\n" for m in GENEVAL), encoding="utf-8")
    txt = tmp_path / "plain.txt"
    txt.write_text(PLAIN, encoding="utf-8")
    return [str(jsonl), str(txt), "a green square"]


def toy_module() -> MarbleDiffusionModule:
    """The toy world's base model, 2 sampler steps, three rewards (two prompt-specific)."""
    rewards = [ToyCompositionReward(), ToyOCRReward(), ToyJPEGReward()]
    return MarbleDiffusionModule(ToyBackbone(), rewards, mode="amortized", **TINY)


def _same_rows(rows: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert len(rows) == len(expected)
    for row, ref in zip(rows, expected):
        assert list(row) == list(ref)
        for key, value in ref.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(row[key]), (key, row)
            elif isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, row, ref)
            else:
                assert row[key] == value, (key, row, ref)


def _csv_mean(rows: list[dict[str, str]], column: str) -> float:
    kept = [float(r[column]) for r in rows if r[column] not in ("", "nan")]
    kept = [v for v in kept if not math.isnan(v)]
    return sum(kept) / len(kept)


def test_test_loop_table_equals_evaluate_prompts(tmp_path: Path, prompt_files, capsys) -> None:
    module = toy_module()
    data = PromptDataModule("toy:train", heldout_prompts=prompt_files, eval_batch_size=3)
    table_cb = EvaluationTableCallback(detector=ToyDetector())
    trainer = make_trainer(1, [table_cb], default_root_dir=str(tmp_path))
    result = trainer.test(module, datamodule=data)[0]
    printed = capsys.readouterr().out

    records = data.heldout_records
    assert [r.source for r in records] == ["geneval_toy.jsonl"] * 4 + ["plain.txt"] * 2 + [""]
    expected = evaluate_prompts(
        module, records, detector=ToyDetector(), seed=data.eval_seed, batch_size=4
    )
    table = table_cb.table
    _same_rows(table.rows, expected.rows)
    assert [r["tag"] for r in table.rows] == [m["tag"] for m in GENEVAL] + [""] * 3
    for column, mean in expected.means.items():
        assert table.means[column] == pytest.approx(mean, rel=1e-6, nan_ok=True)
    assert set(table.geneval) == {m["tag"] for m in GENEVAL} | {"overall"}
    assert table.geneval == pytest.approx(expected.geneval, rel=1e-6)
    # the loop's own logs are unchanged, plus GenEval's overall accuracy
    for name in ("composition", "ocr", "jpeg"):
        assert result[f"test/{name}"] == pytest.approx(table.means[name], rel=1e-5)
    assert result["test/mean"] == pytest.approx(table.composite, rel=1e-5)
    assert result["test/geneval_overall"] == pytest.approx(table.geneval["overall"])

    out = tmp_path / "test_table"
    with (out / "per_image.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7 and rows[0]["source"] == "geneval_toy.jsonl"
    for name in (*REWARDS, "geneval_strict"):
        assert _csv_mean(rows, name) == pytest.approx(expected.means[name], rel=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 7 and summary["counts"]["ocr"] == 1
    assert summary["geneval"]["overall"] == pytest.approx(expected.geneval["overall"])
    assert "marble: test table" in printed and "GenEval strict accuracy" in printed
    assert "composite" in printed and "position" in printed

    result = trainer.validate(module, datamodule=data)[0]
    assert (tmp_path / "validate_table" / "per_image.csv").is_file()
    assert result["eval/geneval_overall"] == pytest.approx(table.geneval["overall"])
    _same_rows(table_cb.table.rows, expected.rows)


class _Oracle:
    """One confident detection per queried class, placed right to left in query order."""

    def detect(self, images, queries):
        from marble_lightning.rewards.detection import Detection

        def box(i: int) -> tuple[float, float, float, float]:
            return (0.8 - 0.3 * i, 0.4, 0.9 - 0.3 * i, 0.6)

        return [[Detection(c, box(i)) for i, c in enumerate(wanted)] for wanted in queries]


def test_geneval_metadata_reaches_the_strict_accuracy(tmp_path: Path, prompt_files) -> None:
    table_cb = EvaluationTableCallback(detector=_Oracle(), output_dir=tmp_path / "val")
    data = PromptDataModule("toy:train", heldout_prompts=prompt_files[:1], eval_batch_size=3)
    result = make_trainer(1, [table_cb]).validate(toy_module(), datamodule=data)[0]
    # one circle: pass; no colour found: fail; one circle of two: fail; circle left of square: pass
    expected = {"single_object": 1.0, "colors": 0.0, "counting": 0.0, "position": 1.0}
    assert table_cb.table.geneval == {**expected, "overall": 0.5}
    assert result["eval/geneval_overall"] == 0.5
    assert json.loads((tmp_path / "val" / "summary.json").read_text())["geneval"]["overall"] == 0.5


def test_without_the_callback_the_loop_logs_as_before(prompt_files) -> None:
    module = toy_module()
    data = PromptDataModule("toy:train", heldout_prompts=prompt_files[1:], eval_batch_size=2)
    result = make_trainer(1).test(module, datamodule=data)[0]
    logged = {f"test/{n}{s}" for n in REWARDS for s in ("", "_sem")} | {"test/mean"}
    assert set(result) == logged - {"test/ocr_sem"}  # one OCR image: no standard error


class _DumpTable(Callback):
    """Each rank writes its gathered table rows to ``<dir>/rank<r>.json``."""

    def __init__(self, directory: Path, table_cb: EvaluationTableCallback) -> None:
        self.directory = directory
        self.table_cb = table_cb

    def on_test_end(self, trainer, pl_module) -> None:
        path = self.directory / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.table_cb.table.rows))


def _table_run(root: Path, devices: int, prompts: list[str]) -> list[list[dict[str, Any]]]:
    root.mkdir(parents=True, exist_ok=True)
    table_cb = EvaluationTableCallback(detector=ToyDetector())
    trainer = make_trainer(
        1,
        [table_cb, _DumpTable(root, table_cb)],
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        default_root_dir=str(root),
    )
    data = PromptDataModule("toy:train", heldout_prompts=prompts, eval_batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.test(toy_module(), datamodule=data)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(devices)]


def test_two_ranks_give_the_single_process_table(tmp_path: Path, prompt_files) -> None:
    two = _table_run(tmp_path / "ddp", 2, prompt_files)
    one = _table_run(tmp_path / "single", 1, prompt_files)[0]
    assert two[0] == two[1]  # every rank holds the gathered table
    assert len(one) == 7
    _same_rows(two[0], one)
    with (tmp_path / "ddp" / "test_table" / "per_image.csv").open(encoding="utf-8") as handle:
        assert [r["prompt"] for r in csv.DictReader(handle)] == [r["prompt"] for r in one]


def _tiny_config(tmp_path: Path, heldout: Any, callbacks: list[dict]) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 1,
            "default_root_dir": str(tmp_path / "run"),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "logger": False,
            "callbacks": callbacks,
        },
        "model": {
            "backbone": {"class_path": "marble_lightning.toy.backbone.ToyBackbone"},
            "rewards": [
                {"class_path": "marble_lightning.toy.rewards.ToyCompositionReward"},
                {"class_path": "marble_lightning.toy.rewards.ToyJPEGReward"},
            ],
            "mode": "amortized",
            **TINY,
        },
        "data": {
            "train_prompts": "toy:train",
            "prompts_per_step": 1,
            "heldout_prompts": heldout,
            "eval_batch_size": 4,
        },
    }
    path = tmp_path / "input" / "config.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


TABLE_CALLBACK = {
    "class_path": "marble_lightning.callbacks.EvaluationTableCallback",
    "init_args": {"detector": {"class_path": "marble_lightning.toy.detector.ToyDetector"}},
}


def test_marble_test_cli_prints_and_writes_the_table(tmp_path: Path, prompt_files) -> None:
    """``marble test`` without ``--ckpt_path`` scores the base model; the detector comes from
    YAML."""
    config = _tiny_config(tmp_path, prompt_files, [TABLE_CALLBACK])
    proc = subprocess.run(
        [sys.executable, "-m", "marble_lightning", "test", "--config", str(config)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "without --ckpt_path" in proc.stderr
    out = tmp_path / "run" / "test_table"
    assert f"marble: test table ({out})" in proc.stdout
    for word in ("composition", "jpeg", "composite", "GenEval strict accuracy", "overall"):
        assert word in proc.stdout
    with (out / "per_image.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["prompt"] for r in rows][:2] == ["a red circle", "a blue square"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 7 and set(summary["geneval"]) >= {"counting", "overall"}
    assert summary["means"]["jpeg"] == pytest.approx(_csv_mean(rows, "jpeg"), rel=1e-6)


def _cli(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as exit_info:
        assert exit_info.code in (0, None), exit_info.code


def test_test_a_checkpoint_on_other_prompt_files(tmp_path: Path, prompt_files, capsys) -> None:
    """A run trained without held-out prompts is tested on prompt files (evaluation settings
    may differ from the checkpoint's run)."""
    config = _tiny_config(tmp_path, None, [])
    _cli("fit", "--config", str(config), "--trainer.enable_checkpointing=true")
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    capsys.readouterr()
    _cli(
        "test", "--config", str(config), "--ckpt_path", str(ckpt),
        f"--data.heldout_prompts={json.dumps(prompt_files[:2])}",
        "--trainer.callbacks+=marble_lightning.callbacks.EvaluationTableCallback",
        f"--trainer.callbacks.output_dir={tmp_path / 'table'}",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert "data.heldout_prompts: checkpoint run null" in captured.err
    assert "marble: test table" in captured.out and "test/jpeg" in captured.out
    summary = json.loads((tmp_path / "table" / "summary.json").read_text())
    assert summary["images"] == 6 and summary["geneval"] == {}


def test_marble_test_default_config_scores_the_base_model(tmp_path: Path, capsys) -> None:
    """``marble test --config configs/marble.yaml``: no checkpoint, the held-out prompts of its
    RewardEvalCallback (one batch of 2 steps here)."""
    _cli(
        "test", "--config", str(REPO / "configs" / "marble.yaml"),
        f"--trainer.default_root_dir={tmp_path}", "--model.sample_steps=2",
        "--trainer.limit_test_batches=1", "--data.eval_batch_size=4",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert "scoring the prompts of the config's RewardEvalCallback ('toy:heldout')" in captured.err
    assert "test/mean" in captured.out


def test_marble_test_without_prompts_fails_clearly(tmp_path: Path, capsys) -> None:
    config = _tiny_config(tmp_path, None, [])
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(config)])
    assert exit_info.value.code == 2
    assert "`marble test` scores data.heldout_prompts, which is not set" in capsys.readouterr().err


def test_bad_prompt_files_fail_clearly(tmp_path: Path) -> None:
    def setup(heldout: Any) -> None:
        PromptDataModule("toy:train", heldout_prompts=heldout).setup("test")

    with pytest.raises(FileNotFoundError, match=r"heldout_prompts.*missing\.jsonl"):
        setup(["a cat", str(tmp_path / "missing.jsonl")])
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        setup(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GENEVAL[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"heldout_prompts.*bad\.jsonl:2: not valid JSON"):
        setup(str(bad))
    bad.write_text(json.dumps({"tag": "counting", "prompt": "x", "include": []}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1.*include"):
        setup([str(bad)])
    other = tmp_path / "prompts.csv"
    other.write_text("a cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts\.csv.*unknown suffix '\.csv'"):
        setup(str(other))
    with pytest.raises(ValueError, match=r"prompts\.csv.*unknown suffix"):
        setup(["a cat", str(other)])
