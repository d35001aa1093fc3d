"""The toy world's five preset rewards on ground-truth renders and on corrupted ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marble_lightning.rewards.base import MultiReward
from marble_lightning.toy.prompts import heldout_prompts, parse_prompt
from marble_lightning.toy.world import render_scene, to_tensor_images

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def scenes() -> tuple[list[str], torch.Tensor]:
    rng = np.random.default_rng(0)
    prompts = heldout_prompts()[::3]
    images = to_tensor_images([render_scene(parse_prompt(p), rng).image for p in prompts])
    return prompts, images


def test_specialists_are_masked_and_ground_truth_scores_high(scenes) -> None:
    from marble_lightning.toy.rewards import ToyCompositionReward, ToyOCRReward

    prompts, images = scenes
    rewards = MultiReward([ToyCompositionReward(), ToyOCRReward(likelihood_weight=0.0)])
    batch = rewards(images, prompts)
    is_text = torch.tensor(['"' in p for p in prompts])
    assert torch.equal(batch.mask[:, 0], ~is_text)  # composition: shape prompts only
    assert torch.equal(batch.mask[:, 1], is_text)  # ocr: text prompts only
    assert batch.values[~is_text, 0].min() == 1.0  # exact detector on exact renders
    assert batch.values[is_text, 1].mean() >= 0.95
    # a blank image earns nothing from either specialist
    blank = torch.ones_like(images)
    blank_batch = rewards(blank, prompts)
    assert blank_batch.values[~is_text, 0].max() < 0.5
    assert blank_batch.values[is_text, 1].max() == 0.0
    # the default toy OCR score adds the CTC-likelihood term: high on renders, near 0 on blanks
    mixed = ToyOCRReward()
    assert mixed.likelihood_weight == 0.5
    text_prompts = [p for p, t in zip(prompts, is_text) if t]
    assert mixed(images[is_text], text_prompts).mean() >= 0.85
    assert mixed(blank[is_text], text_prompts).max() < 0.1


def test_clip_reward_prefers_matching_captions(scenes) -> None:
    from marble_lightning.toy import asset_path

    try:
        asset_path("toy_clip.safetensors")
    except FileNotFoundError as err:
        pytest.fail(f"the shipped toy CLIP is missing: {err}")
    from marble_lightning.toy.rewards import ToyCLIPReward

    prompts, images = scenes
    reward = ToyCLIPReward()
    matched = reward(images, prompts)
    shuffled = reward(images, prompts[1:] + prompts[:1])
    assert (matched > shuffled).float().mean() > 0.8


def test_default_rewards_names() -> None:
    from marble_lightning.toy.rewards import default_rewards

    assert [r.name for r in default_rewards()] == ["composition", "ocr", "quality", "jpeg", "clip"]


def test_jpeg_cap_stops_rewarding_erased_content(scenes) -> None:
    from marble_lightning.rewards.jpeg import JPEGCompressibilityReward
    from marble_lightning.toy.rewards import JPEG_CAP, ToyJPEGReward

    prompts, images = scenes
    blank = torch.ones_like(images[:2])
    uncapped = JPEGCompressibilityReward(quality=95)
    assert float(uncapped(blank, prompts[:2]).min()) > JPEG_CAP  # a blank image compresses best...
    assert torch.equal(
        ToyJPEGReward()(blank, prompts[:2]), torch.full((2,), JPEG_CAP)
    )  # ...but earns only the cap
    raw = uncapped(images, prompts)
    torch.testing.assert_close(ToyJPEGReward()(images, prompts), raw.clamp(max=JPEG_CAP))
    with pytest.raises(ValueError, match="max_score"):
        JPEGCompressibilityReward(max_score=1.0)
