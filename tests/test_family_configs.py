"""The FLUX / Qwen-Image / Wan configs: the real ones print (tests/test_cli.py parses every
config); the tiny twins train offline through ``marble fit`` on pipelines written by
``marble make-tiny-<family>``, and the tiny Wan run logs video samples (a frame strip per clip)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from marble_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"flux": "tiny_flux", "qwen-image": "tiny_qwen_image", "wan": "tiny_wan"}
REAL = ["flux1_dev_marble", "qwen_image_marble", "wan21_t2v_1_3b_marble"]


@pytest.mark.parametrize("name", REAL)
def test_real_configs_print(name: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / f"{name}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    config = yaml.safe_load(capsys.readouterr().out)
    backbone = config["model"]["backbone"]
    assert backbone["class_path"].startswith("marble_lightning.backbones.")
    assert backbone["init_args"]["gradient_checkpointing"] is True
    assert len(config["model"]["rewards"]) >= 4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_config_trains_offline(family: str, tmp_path: Path, capsys) -> None:
    torch.set_num_threads(1)
    pipe = tmp_path / "pipe"
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main([f"make-tiny-{family}", "--out", str(pipe)])
    assert exit_info.value.code == 0 and (pipe / "model_index.json").is_file()
    root = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / f"{FAMILIES[family]}.yaml"),
                f"--model.backbone.init_args.pretrained={pipe}",
                f"--trainer.default_root_dir={root}",
                "--trainer.max_steps=2",
            ]
        )
    events = sorted(root.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard log"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "eval/mean" in tags["scalars"], tags["scalars"]
    assert any(t.startswith("eval/images") for t in tags["images"]), tags["images"]
    if family == "wan":  # a frame strip: one row of 5 frames per clip
        image = acc.Images(next(t for t in tags["images"] if t.startswith("eval/images")))[-1]
        assert image.width > 4 * image.height / 2, (image.width, image.height)
        assert {"reward/brightness_mean", "reward/temporal_mean"} <= set(tags["scalars"])
