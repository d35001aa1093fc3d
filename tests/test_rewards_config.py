"""Every reward builds from a jsonargparse class_path/init_args config (as LightningCLI does)."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentParser

from marble_lightning.rewards.base import MultiReward, RewardModel
from marble_lightning.testing import (
    save_aesthetic_mlp,
    save_tiny_clip,
    save_tiny_open_clip,
    save_tiny_owlv2,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cfg")
    clip = save_tiny_clip(root / "clip")
    oc_config, oc_ckpt = save_tiny_open_clip(root / "openclip", name="tiny-cfg-clip")
    return {
        "clip": str(clip),
        "oc_config": str(oc_config),
        "oc_ckpt": str(oc_ckpt),
        "mlp": str(save_aesthetic_mlp(root / "mlp.safetensors", input_dim=16)),
        "owl": str(save_tiny_owlv2(root / "owl")),
    }


def test_all_rewards_build_from_config(files) -> None:
    configs = [
        {"class_path": "marble_lightning.rewards.ocr.OCRReward", "init_args": {"upscale": 2.0}},
        {
            "class_path": "marble_lightning.rewards.jpeg.JPEGCompressibilityReward",
            "init_args": {"quality": 80},
        },
        {
            "class_path": "marble_lightning.rewards.composition.CompositionReward",
            "init_args": {
                "detector": {
                    "class_path": "marble_lightning.rewards.owl_detector.OwlDetector",
                    "init_args": {"model": files["owl"], "box_threshold": 0.0},
                },
                "score_threshold": 0.0,
            },
        },
        {
            "class_path": "marble_lightning.rewards.composition.CompositionReward",
            "init_args": {
                "detector": {"class_path": "marble_lightning.toy.detector.ToyDetector"},
                "count_mode": "exact",
                "position_rule": "axis",
                "colors": ["red", "green", "blue", "yellow"],
                "classes": ["circle", "square"],
                "name": "toy_composition",
            },
        },
        {
            "class_path": "marble_lightning.rewards.clip_score.OpenCLIPScoreReward",
            "init_args": {
                "model_config": files["oc_config"],
                "checkpoint": files["oc_ckpt"],
                "scale": 100.0,
            },
        },
        {
            "class_path": "marble_lightning.rewards.clip_score.CLIPScoreReward",
            "init_args": {"model": files["clip"]},
        },
        {
            "class_path": "marble_lightning.rewards.pickscore.PickScoreReward",
            "init_args": {"model": files["clip"], "processor": files["clip"], "normalize": 26.0},
        },
        {
            "class_path": "marble_lightning.rewards.aesthetic.AestheticReward",
            "init_args": {"mlp": files["mlp"], "clip_model": files["clip"]},
        },
        {
            "class_path": "marble_lightning.rewards.hps.HPSv21Reward",
            "init_args": {"checkpoint": files["oc_ckpt"], "model_config": files["oc_config"]},
        },
        {"class_path": "marble_lightning.rewards.image_reward.ImageRewardReward"},
    ]
    parser = ArgumentParser()
    parser.add_argument("--rewards", type=list[RewardModel])
    rewards = parser.instantiate(parser.parse_object({"rewards": configs})).rewards
    names = [r.name for r in rewards]
    assert names == [
        "ocr", "jpeg", "composition", "toy_composition", "openclip_score", "clipscore",
        "pickscore", "aesthetic", "hpsv21", "imagereward",
    ]  # fmt: skip
    multi = MultiReward(rewards[:-1])  # ImageReward's package is not importable here
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ['a sign that says "cat"', "two red circles", "a photo of a dog left of a cat"]
    batch = multi(images, prompts)
    assert batch.values.shape == (3, 9) and torch.isfinite(batch.values).all()
    assert batch.mask[:, 0].tolist() == [True, False, False]  # OCR: quoted text only
    assert batch.mask[:, 2].tolist() == [False, True, True]  # composition: object prompts only
    assert batch.mask[:, 3].tolist() == [False, True, False]  # toy classes only
    direct = rewards[4](images, prompts)  # same object, scored directly
    torch.testing.assert_close(batch.values[:, 4], direct)


def test_missing_checkpoint_in_config_names_path_and_reward(files, tmp_path) -> None:
    parser = ArgumentParser()
    parser.add_argument("--reward", type=RewardModel)
    missing = str(tmp_path / "HPS_v2.1_compressed.pt")
    cfg = parser.parse_object(
        {
            "reward": {
                "class_path": "marble_lightning.rewards.hps.HPSv21Reward",
                "init_args": {"checkpoint": missing},
            }
        }
    )
    with pytest.raises(FileNotFoundError, match=r"hpsv21.*HPS_v2\.1_compressed\.pt"):
        parser.instantiate(cfg)
