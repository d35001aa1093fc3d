"""QualityReward: each term against an independent computation, and its ordering of images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marble_lightning.toy.prompts import parse_prompt, train_prompts
from marble_lightning.toy.quality import QualityReward, colorfulness, contrast, sharpness
from marble_lightning.toy.world import render_scene, to_tensor_images


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _scenes(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    rng = np.random.default_rng(seed)
    prompts = train_prompts()[:: max(1, len(train_prompts()) // n)][:n]
    return to_tensor_images([render_scene(parse_prompt(p), rng).image for p in prompts]), prompts


@pytest.mark.parametrize("width", [1, 2, 4, 5])
def test_sharpness_of_a_ramp_edge_is_one_over_width(width):
    # a horizontal step 0 -> 1 spread linearly over `width` pixel transitions
    row = np.clip((np.arange(32) - 10) / width, 0, 1)
    img = torch.tensor(row, dtype=torch.float32).view(1, 1, 1, 32).expand(1, 3, 32, 32).contiguous()
    assert sharpness(img).item() == pytest.approx(1 / width, rel=1e-4)
    assert sharpness(torch.full((1, 3, 32, 32), 0.4)).item() == 0.0


def test_colorfulness_matches_numpy_formula():
    x = torch.rand(3, 3, 8, 8)
    for i in range(3):
        r, g, b = x[i].numpy().astype(np.float64) * 255
        rg, yb = r - g, 0.5 * (r + g) - b
        m = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
        assert colorfulness(x[i : i + 1]).item() == pytest.approx(min(m / 100, 1.0), rel=1e-4)
    assert colorfulness(torch.full((1, 3, 4, 4), 0.7)).item() == pytest.approx(0.0, abs=1e-6)


def test_contrast_matches_quantiles():
    x = torch.rand(2, 3, 10, 10) * 0.5
    expect = [
        max(
            np.quantile(x[i, c].numpy(), 0.99) - np.quantile(x[i, c].numpy(), 0.01)
            for c in range(3)
        )
        for i in range(2)
    ]
    np.testing.assert_allclose(contrast(x).numpy(), expect, rtol=1e-5)


def test_quality_orders_clean_renders_above_degraded_ones():
    q = QualityReward(text_prompts=True)
    x, prompts = _scenes()
    gt = q(x, prompts)
    blurred = q(torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False), prompts)
    grey_bg = q(x * 0.8 + 0.1, prompts)
    noisy = q((x + 0.15 * torch.randn_like(x)).clamp(0, 1), prompts)
    blank = q(torch.ones_like(x), prompts)
    for worse in (blurred, grey_bg, noisy, blank):
        assert (gt > worse).float().mean() >= 0.9
    assert ((gt >= 0) & (gt <= 1)).all() and gt.mean() > 0.75
    assert blank.mean() < 0.4
    # partial credit: a slightly dirty background scores between clean and very dirty
    t_clean = q.terms(x)["clean"]
    t_grey = q.terms(x * 0.8 + 0.1)["clean"]
    assert (t_grey < t_clean).all()
    from marble_lightning.rewards.ocr import quoted_text

    assert q.applies_to(prompts).all()
    masked = QualityReward().applies_to(prompts)
    assert masked.tolist() == [quoted_text(p) is None for p in prompts] and 0 < masked.sum() < len(
        prompts
    )


def test_quality_would_reward_recoloured_text_hence_text_is_masked():
    rng = np.random.default_rng(1)
    prompts = train_prompts("text")[:12]
    x = to_tensor_images([render_scene(parse_prompt(p), rng).image for p in prompts])
    ink = x.mean(1, keepdim=True) < 0.9
    green = torch.where(ink, torch.tensor([0.1, 0.6, 0.3]).view(1, 3, 1, 1), x)
    scored = QualityReward(text_prompts=True)
    assert (scored(green, prompts) > scored(x, prompts) + 0.1).all()  # the hack RL found
    assert not QualityReward().applies_to(prompts).any()


def test_quality_weights_and_errors():
    x, prompts = _scenes(4)
    only_sharp = QualityReward(weights={"sharpness": 2.0}, text_prompts=True)
    torch.testing.assert_close(only_sharp(x, prompts), sharpness(x))
    with pytest.raises(ValueError, match="'blur'"):
        QualityReward(weights={"blur": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        QualityReward(weights={"clean": 0.0})
    with pytest.raises(ValueError, match="max_dirty"):
        QualityReward(max_dirty=0)
    assert QualityReward().name == "quality"
