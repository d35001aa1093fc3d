"""The toy CLIP model: the training script writes open_clip-loadable files; the shipped model ranks
captions."""

from __future__ import annotations

import importlib.resources
import json

import numpy as np
import pytest
import torch

from marble_lightning.toy import train_clip
from marble_lightning.toy.prompts import heldout_prompts, parse_prompt
from marble_lightning.toy.world import render_scene, to_tensor_images


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_tiny_run_writes_open_clip_files(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import load_file

    res = train_clip.train(tmp_path, minutes=5, max_steps=2, batch=16, lr=1e-3, seed=0, threads=1)
    assert res["steps"] == 2 and 0 <= res["retrieval_top1"]["all"] <= 1
    cfg = json.loads((tmp_path / "toy_clip.json").read_text())
    assert cfg["vision_cfg"]["image_size"] == 32
    open_clip.add_model_config(tmp_path / "toy_clip.json")
    model = open_clip.create_model("toy_clip", pretrained=str(tmp_path / "toy_clip.safetensors"))
    saved = load_file(str(tmp_path / "toy_clip.safetensors"))
    assert set(saved) == set(model.state_dict())
    for k, v in saved.items():
        torch.testing.assert_close(model.state_dict()[k], v.float())
    with pytest.raises(ValueError, match="batch 1000"):
        train_clip.train(
            tmp_path / "x", minutes=1, max_steps=1, batch=1000, lr=1e-3, seed=0, threads=1
        )


def test_degrade_changes_only_a_fraction():
    x = torch.rand(200, 3, 8, 8)
    y = train_clip.degrade(x, np.random.default_rng(0), fraction=0.25)
    changed = (x != y).flatten(1).any(1).float().mean().item()
    assert 0.15 < changed < 0.35 and y.min() >= 0 and y.max() <= 1


def _asset(name: str):
    return importlib.resources.files("marble_lightning.toy") / "assets" / name


@pytest.mark.skipif(
    not _asset("toy_clip.safetensors").is_file(), reason="toy_clip not trained/shipped yet"
)
def test_shipped_clip_prefers_the_right_caption():
    from marble_lightning.rewards.clip_score import OpenCLIPScoreReward

    with (
        importlib.resources.as_file(_asset("toy_clip.json")) as cfg,
        importlib.resources.as_file(_asset("toy_clip.safetensors")) as w,
    ):
        reward = OpenCLIPScoreReward(model_config=str(cfg), checkpoint=str(w), name="clip")
        rng = np.random.default_rng(0)
        prompts = heldout_prompts()
        images = to_tensor_images([render_scene(parse_prompt(p), rng).image for p in prompts])
        right = reward(images, prompts)
        wrong = reward(images, prompts[1:] + prompts[:1])  # a different prompt for each image
    assert (right > wrong).float().mean() >= 0.8
