"""The reward interface every reward family implements.

A reward scores a batch of images against their prompts::

    values = reward(images, prompts)   # images: float [B, 3, H, W] in [0, 1]; values: float32 [B]
    mask = reward.applies_to(prompts)  # bool [B]; False where the reward has no opinion

Where ``mask`` is False the value is ignored (0 by convention, never NaN): the sample carries no
signal for that reward (a "specialist sample" in the MARBLE paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


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


class RewardModel(nn.Module):
    """Base class of all rewards: ``reward(images, prompts) -> Tensor[B]`` plus ``applies_to``.

    Subclasses implement :meth:`score` (called under ``torch.no_grad`` with checked inputs) and may
    override :meth:`applies_to`. ``name`` is the key used in logs and configs.
    """

    name: str = "reward"

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"reward name must be a non-empty string, got {name!r}")
            self.name = name

    @classmethod
    def from_config(cls, *args: Any, **kwargs: Any) -> RewardModel:
        """Build from the constructor's arguments (the hook configs and the CLI use)."""
        return cls(*args, **kwargs)

    def applies_to(self, prompts: Sequence[str]) -> Tensor:
        """Bool ``[B]`` (CPU): True where this reward scores the prompt. Default: every prompt."""
        return torch.ones(len(prompts), dtype=torch.bool)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Score checked images ``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Float32 ``[B]`` on ``images.device``; 0 where :meth:`applies_to` is False."""
        check_images(images, f"reward {self.name!r}")
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"reward {self.name!r}: got {images.shape[0]} images but {len(prompts)} prompts"
            )
        values = self.score(images, list(prompts))
        if not isinstance(values, Tensor) or values.shape != (images.shape[0],):
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(
                f"reward {self.name!r} returned shape {shape}, expected ({images.shape[0]},)"
            )
        mask = self.applies_to(prompts).to(values.device)
        return torch.where(mask, values.float(), torch.zeros((), device=values.device))


@dataclass
class RewardBatch:
    """Scores of K rewards on B samples.

    Attributes:
        values: float32 ``[B, K]``; 0 where ``mask`` is False.
        mask: bool ``[B, K]``; True where reward k applies to sample b.
        names: the K reward names, in column order.
    """

    values: Tensor
    mask: Tensor
    names: list[str]


class MultiReward(nn.Module):
    """K rewards evaluated together -> :class:`RewardBatch`.

    Raises ``ValueError`` naming the reward when one returns a wrong shape or non-finite values
    where it applies, and re-raises any exception from a reward with the reward's name attached.
    """

    def __init__(self, rewards: Sequence[nn.Module]) -> None:
        super().__init__()
        rewards = list(rewards)
        if not rewards:
            raise ValueError("MultiReward needs at least one reward (K=0 given)")
        names = [getattr(r, "name", None) or type(r).__name__ for r in rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"reward names must be unique, got duplicates {duplicates}")
        self.rewards = nn.ModuleList(rewards)
        self.names = names

    def __len__(self) -> int:
        return len(self.rewards)

    def masks(self, prompts: Sequence[str]) -> Tensor:
        """Bool ``[B, K]`` applicability of every reward."""
        cols = []
        for name, reward in zip(self.names, self.rewards):
            applies = getattr(reward, "applies_to", None)
            cols.append(applies(prompts).cpu().bool() if applies else torch.ones(len(prompts), dtype=torch.bool))
        return torch.stack(cols, dim=1)

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str]) -> RewardBatch:
        b = images.shape[0]
        mask = self.masks(prompts).to(images.device)
        cols = []
        for k, (name, reward) in enumerate(zip(self.names, self.rewards)):
            try:
                value = reward(images, prompts)
            except Exception as err:  # attach the reward's name, keep the original type
                raise type(err)(f"reward {name!r} failed: {err}") from err
            if not isinstance(value, Tensor) or value.shape != (b,):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"reward {name!r} returned shape {shape}, expected ({b},)")
            value = value.to(images.device, torch.float32)
            bad = mask[:, k] & ~torch.isfinite(value)
            if bad.any():
                i = int(bad.nonzero()[0])
                raise ValueError(
                    f"reward {name!r} returned a non-finite value {value[i].item()} "
                    f"for prompt {prompts[i]!r}"
                )
            cols.append(torch.where(mask[:, k], value, torch.zeros((), device=value.device)))
        return RewardBatch(values=torch.stack(cols, dim=1), mask=mask, names=list(self.names))
