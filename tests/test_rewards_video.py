"""Video rewards: per-frame aggregation (mean / min), temporal consistency, masks, shapes."""

from __future__ import annotations

import pytest
import torch

from marble_lightning.rewards.base import MultiReward
from marble_lightning.rewards.video import PerFrameReward, TemporalConsistencyReward
from marble_lightning.testing import BrightnessReward, ChannelMean


def _videos() -> torch.Tensor:
    v = torch.zeros(2, 3, 3, 4, 4)
    v[0] = torch.tensor([0.2, 0.4, 0.9]).view(3, 1, 1, 1)  # brightness per frame
    v[1] = 0.5  # still clip
    return v


def test_per_frame_mean_and_min() -> None:
    videos, prompts = _videos(), ["a red cat", "a dog"]
    inner = BrightnessReward(target=1.0, name="bright")
    mean = PerFrameReward(inner, aggregation="mean")
    worst = PerFrameReward(inner, aggregation="min")
    assert mean.name == "bright"
    torch.testing.assert_close(mean(videos, prompts), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(worst(videos, prompts), torch.tensor([0.2, 0.5]))
    chunked = PerFrameReward(inner, aggregation="min", frames_per_call=2)
    torch.testing.assert_close(chunked(videos, prompts), worst(videos, prompts))
    # images pass straight through to the image reward
    torch.testing.assert_close(mean(videos[:, 0], prompts), inner(videos[:, 0], prompts))


def test_per_frame_keeps_the_mask() -> None:
    reward = PerFrameReward(ChannelMean(0, "red", keyword="red"))
    values = reward(_videos(), ["a red cat", "a dog"])
    assert values[1] == 0 and values[0] > 0
    assert reward.applies_to(["a red cat", "a dog"]).tolist() == [True, False]
    batch = MultiReward([reward, TemporalConsistencyReward()])(_videos(), ["a red cat", "a dog"])
    assert batch.mask.tolist() == [[True, True], [False, True]]


def test_temporal_consistency() -> None:
    reward = TemporalConsistencyReward()
    values = reward(_videos(), ["x", "y"])
    torch.testing.assert_close(values, torch.tensor([1 - (0.2 + 0.5) / 2, 1.0]))
    pooled = TemporalConsistencyReward(pool=2, keyword="cat")
    assert pooled(_videos(), ["a cat", "y"]).tolist()[1] == 0
    assert reward(torch.rand(2, 1, 3, 4, 4), ["x", "y"]).tolist() == [1.0, 1.0]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="aggregation"):
        PerFrameReward(BrightnessReward(), aggregation="median")
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        TemporalConsistencyReward()(torch.rand(2, 3, 4, 4), ["x", "y"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        TemporalConsistencyReward()(2 * torch.ones(1, 2, 3, 4, 4), ["x"])
    with pytest.raises(ValueError, match="prompts"):
        PerFrameReward(BrightnessReward())(torch.rand(2, 2, 3, 4, 4), ["x"])
