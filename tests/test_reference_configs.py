"""The reference-recipe configs (SD3.5-M and toy) load with --print_config and hold the recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from marble_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]


def _printed(name: str, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / name), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    return yaml.safe_load(capsys.readouterr().out)


def _callback(config: dict, suffix: str) -> dict | None:
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith(suffix):
            return cb.get("init_args") or {}
    return None


@pytest.mark.parametrize("name", ["sd35m_marble_reference.yaml", "sd35m_equal_alpha.yaml"])
def test_sd35m_reference_recipe(name: str, capsys) -> None:
    config = _printed(name, capsys)
    model = config["model"]
    rewards = [r["class_path"].rsplit(".", 1)[1] for r in model["rewards"]]
    assert rewards == [
        "PickScoreReward",
        "HPSv21Reward",
        "CLIPScoreReward",
        "OCRReward",
        "CompositionReward",
    ]
    assert model["backbone"]["init_args"]["resolution"] == 512
    assert (model["solver"], model["sample_steps"], model["cfg_scale"]) == ("dpm2", 25, 1.0)
    assert model["eval_sample_steps"] == 40
    assert (model["beta"], model["kl_weight"], model["a_max"]) == (0.1, 1e-4, 5.0)
    assert (model["lr"], model["weight_decay"], model["grad_clip"]) == (3e-4, 1e-4, 1.0)
    assert model["group_size"] == 24 and model["mode"] == "amortized"
    ranks = config["trainer"]["devices"] * config["trainer"]["num_nodes"]
    assert ranks * sum(config["data"]["prompts_per_step"].values()) == 48
    assert model["lr_scheduler"]["class_path"].endswith("CosineAnnealingLR")
    harmonization = _callback(config, "HarmonizationCallback")
    assert harmonization["refresh_every"] == 10
    assert _callback(config, "PolicyEMACallback")["decay"] == 0.9
    assert _callback(config, "RewardEvalCallback")["use_ema"] is True
    if name == "sd35m_marble_reference.yaml":
        assert harmonization["uniform_after"] is None  # no final uniform stage
        assert _callback(config, "EMACoefficientCallback")["decay"] == 0.7
    else:
        assert harmonization["uniform_after"] == 0  # equal alpha, no QP
        assert _callback(config, "EMACoefficientCallback") is None


@pytest.mark.parametrize("name", ["toy_marble_reference.yaml", "toy_equal_alpha.yaml"])
def test_toy_reference_configs(name: str, capsys) -> None:
    config = _printed(name, capsys)
    base = yaml.safe_load((REPO / "configs" / "marble.yaml").read_text())
    assert config["trainer"]["max_steps"] == base["trainer"]["max_steps"]  # same budget
    assert config["model"]["mode"] == "amortized"
    harmonization = _callback(config, "HarmonizationCallback")
    assert harmonization["refresh_every"] == 10
    if name == "toy_marble_reference.yaml":
        assert harmonization["uniform_after"] is None
        assert _callback(config, "EMACoefficientCallback")["decay"] == 0.7
    else:
        assert harmonization["uniform_after"] == 0


def test_quality_benchmark_knows_the_reference_methods() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    assert quality.METHODS["marble (reference recipe)"] == "toy_marble_reference"
    assert quality.METHODS["equal alpha (reference ablation)"] == "toy_equal_alpha"
    for config in ("toy_marble_reference", "toy_equal_alpha"):
        assert quality.load_config(config, 5, True)["model"]["mode"] == "amortized"
