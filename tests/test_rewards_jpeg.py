"""JPEGCompressibilityReward against an independent PIL computation."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from marble_lightning.rewards.jpeg import JPEGCompressibilityReward


def pil_jpeg_kb(img: torch.Tensor, quality: int) -> float:
    """Independent: write a file through PIL, read its size from the filesystem."""
    arr = np.clip(np.rint(img.permute(1, 2, 0).numpy().astype(np.float64) * 255), 0, 255).astype(
        np.uint8
    )
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.jpg")
        Image.fromarray(arr).save(path, quality=quality)
        return os.path.getsize(path) / 1000.0


@pytest.mark.parametrize("quality", [95, 50])
def test_matches_pil_file_size(quality: int) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.cat([torch.rand(2, 3, 48, 40, generator=g), torch.full((1, 3, 48, 40), 0.5)])
    values = JPEGCompressibilityReward(quality=quality)(images, ["a", "b", "c"])
    expected = torch.tensor([-pil_jpeg_kb(im, quality) for im in images])
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, expected)
    assert values[2] > values[0]  # flat image compresses better than noise
    assert (values < 0).all()


def test_bad_input() -> None:
    r = JPEGCompressibilityReward()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        r(torch.rand(1, 3, 8, 8) * 255, ["a"])
    with pytest.raises(ValueError, match="shape"):
        r(torch.rand(1, 1, 8, 8), ["a"])
    with pytest.raises(ValueError, match="quality"):
        JPEGCompressibilityReward(quality=0)
