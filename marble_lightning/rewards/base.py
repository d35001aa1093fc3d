"""The reward interface every reward family implements.

A reward scores a batch of images against their prompts::

    values = reward(images, prompts)   # images: float [B, 3, H, W] in [0, 1]; values: float32 [B]
    mask = reward.applies_to(prompts)  # bool [B]; False where the reward has no opinion

Where ``mask`` is False the value is ignored (it is 0 by convention, never NaN): the sample
carries no signal for that reward (DESIGN.md, "specialist samples").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Reward(Protocol):
    """A callable reward with a name and an applicability mask."""

    name: str

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Score ``images`` ``[B, 3, H, W]`` in ``[0, 1]`` -> float32 ``[B]`` on the images' device."""
        ...

    def applies_to(self, prompts: Sequence[str]) -> Tensor:
        """Bool ``[B]``: True where this reward scores the prompt."""
        ...


def check_images(images: Tensor, who: str) -> None:
    """Raise ``ValueError`` unless ``images`` is a float ``[B, 3, H, W]`` tensor in ``[0, 1]``."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{who}: expected images of shape [B, 3, H, W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{who}: expected floating-point images in [0, 1], got dtype {images.dtype}")
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"{who}: images must lie in [0, 1], got range [{images.min().item():.3g}, "
            f"{images.max().item():.3g}] (pass images / 255 if they are in [0, 255])"
        )


def all_apply(prompts: Sequence[str], device: torch.device | None = None) -> Tensor:
    """The mask of a reward that scores every prompt."""
    return torch.ones(len(prompts), dtype=torch.bool, device=device)
