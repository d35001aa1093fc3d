"""The default toy config runs end to end (2 steps) and writes its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ALLOCATOR

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_two_steps(tmp_path: Path) -> None:
    pytest.importorskip("rapidocr_onnxruntime")
    cfg = yaml.safe_load((ROOT / "configs" / "marble.yaml").read_text())
    cfg["trainer"]["max_steps"] = 2
    cfg["trainer"]["default_root_dir"] = str(tmp_path)
    for logger in cfg["trainer"]["logger"]:
        logger["init_args"]["save_dir"] = str(tmp_path)
    cfg["trainer"]["callbacks"] = [
        cb for cb in cfg["trainer"]["callbacks"] if not cb["class_path"].endswith("ProgressBar")
    ]
    cfg["trainer"]["enable_progress_bar"] = False
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("RewardEvalCallback"):
            # a few held-out prompts keep the smoke test short; the real run evaluates all of them
            cb["init_args"]["prompts"] = [
                'the word "cat"',
                "two red circles",
                "a green circle left of a yellow square",
            ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, **ALLOCATOR)
    proc = subprocess.run(
        [sys.executable, "-m", "marble_lightning", "fit", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "marble: fit finished" in proc.stdout
    reports = list(tmp_path.glob("lightning_logs/version_*/report"))
    assert len(reports) == 1
    report = reports[0]
    for name in (
        "alpha.png",
        "rewards.png",
        "grid_base.png",
        "grid_final.png",
        "summary.md",
        "history.json",
    ):
        assert (report / name).is_file(), name
    record = json.loads((report / "history.json").read_text())
    assert record["names"] == ["composition", "ocr", "quality", "jpeg", "clip"]
    assert record["eval_names"] == record["names"] + [
        "ocr_edit"
    ]  # evaluation-only strict OCR score
    assert len(record["train"]) == 2
    assert len(record["eval_samples"]) == 2  # base and final
    assert (
        len(record["eval_samples"][0])
        == 3 * cfg["trainer"]["callbacks"][-2]["init_args"]["images_per_prompt"]
    )
    summary = (report / "summary.md").read_text()
    for name in record["eval_names"]:
        assert f"| {name} |" in summary
    assert list(tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
