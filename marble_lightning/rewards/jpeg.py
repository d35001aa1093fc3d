"""JPEG compressibility reward (DDPO): images that compress well score higher.

``score = -(size of the image encoded as JPEG at quality q, in kB)`` with 1 kB = 1000 bytes,
quality 95 by default, PIL's encoder, the image quantised to uint8 by rounding. Always negative.

Optionally ``max_score`` caps the reward (``min(score, max_score)``): past the size of a clean
image there is nothing left to gain, which stops a policy from erasing content to compress
better (the toy world caps at the size of its ground-truth renders).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from marble_lightning.checks import check_float, check_int
from marble_lightning.rewards._loading import to_uint8_hwc
from marble_lightning.rewards.base import RewardModel


def jpeg_size_kb(image_hwc, quality: int) -> float:
    """Size in kB (1000 bytes) of a uint8 ``[H, W, 3]`` array saved as JPEG at ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(image_hwc).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JPEGCompressibilityReward(RewardModel):
    """Negative JPEG file size in kB at a fixed quality; applies to every prompt.

    Args:
        quality: JPEG quality, 1..95 (PIL's useful range; DDPO uses 95).
        max_score: optional cap on the score (in -kB), ``None`` for none.
        name: reward name in logs.
    """

    name = "jpeg"

    def __init__(
        self, quality: int = 95, max_score: float | None = None, name: str | None = None
    ) -> None:
        super().__init__(name)
        self.max_score = (
            None
            if max_score is None  # a negative number of kB
            else check_float("max_score", max_score, maximum=0.0, maximum_strict=True)
        )
        self.quality = check_int("quality", quality)
        if self.quality > 100:
            raise ValueError(f"`quality` should be an integer in [1, 100], got {quality!r}")

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        sizes = [jpeg_size_kb(a, self.quality) for a in to_uint8_hwc(images)]
        score = -torch.tensor(sizes, dtype=torch.float32, device=images.device)
        return score if self.max_score is None else score.clamp(max=self.max_score)
