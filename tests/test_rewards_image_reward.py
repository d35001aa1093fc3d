"""ImageRewardReward: the optional-package plumbing (the real package does not import here)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from marble_lightning.rewards.image_reward import (
    INSTALL_HINT,
    ImageRewardReward,
    import_image_reward,
)


class FakeImageReward(nn.Module):
    """Stands in for ImageReward.ImageReward: score = mean red * len(prompt)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.device = "cpu"

    def score(self, prompt, image) -> float:
        import numpy as np

        return float(np.asarray(image, dtype=np.float64)[..., 0].mean() / 255.0 * len(prompt))


@pytest.fixture
def fake_package(monkeypatch):
    calls = {}

    def load(name, device="cpu", download_root=None, med_config=None):
        calls.update(name=name, device=device, download_root=download_root, med_config=med_config)
        return FakeImageReward()

    module = types.ModuleType("ImageReward")
    module.load = load
    monkeypatch.setitem(sys.modules, "ImageReward", module)
    return calls


def test_missing_package_has_install_hint(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # import raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match="marble-lightning\\[imagereward\\]"):
        import_image_reward()
    reward = ImageRewardReward()  # construction is lazy: no import yet
    with pytest.raises(ModuleNotFoundError, match="pip install"):
        reward(torch.rand(1, 3, 8, 8), ["a cat"])
    assert "imagereward" in INSTALL_HINT


def test_broken_package_is_reported(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "ImageReward":
            raise ImportError(
                "cannot import name 'apply_chunking_to_forward' from 'transformers.modeling_utils'"
            )
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "ImageReward", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="transformers<5"):
        import_image_reward()


def test_scores_each_pair_through_the_package(fake_package, tmp_path) -> None:
    ckpt = tmp_path / "ImageReward.pt"
    ckpt.write_bytes(b"")
    reward = ImageRewardReward(str(ckpt), download_root=str(tmp_path))
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0] = 1.0
    images[1, 0] = 0.5
    values = reward(images, ["abc", "abcdef"])
    assert fake_package["name"] == str(ckpt) and fake_package["download_root"] == str(tmp_path)
    # independent: mean red of the uint8 image / 255 * len(prompt)
    torch.testing.assert_close(values, torch.tensor([1.0 * 3, 128 / 255 * 6]))


def test_missing_local_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="imagereward.*nope.pt"):
        ImageRewardReward(str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="med_config.json"):
        ImageRewardReward(med_config=str(tmp_path / "med_config.json"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ImageRewardReward()(torch.rand(1, 3, 4, 4) + 2, ["a"])
