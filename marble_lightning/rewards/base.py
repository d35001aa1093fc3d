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
        raise ValueError(
            f"{who}: expected floating-point images in [0, 1], got dtype {images.dtype}"
        )
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


def _describe_prompts(prompts: Sequence[str] | None, limit: int = 3) -> str:
    if not prompts:
        return "no prompt"
    unique = list(dict.fromkeys(prompts))
    shown = ", ".join(repr(p) for p in unique[:limit])
    more = f" and {len(unique) - limit} more" if len(unique) > limit else ""
    return f"prompt {shown}{more}" if len(unique) == 1 else f"prompts {shown}{more}"


class RewardError(RuntimeError):
    """A reward failed while scoring: names the reward, the step and the prompt(s).

    Raised by :class:`MultiReward` (``raise RewardError(...) from err``), so the original
    exception stays available as ``__cause__`` whatever its constructor looks like.

    Args:
        message: what went wrong (the original error's text); a single argument also works, so
            ``type(err)(message)`` style re-raising keeps the type.
        reward: the reward's name.
        step: the rollout step (``None`` when the caller did not say).
        prompts: the prompts being scored (the batch, or the one whose value was bad).

    Attributes:
        reward, step, prompts: as given.
    """

    def __init__(
        self,
        message: str,
        *,
        reward: str | None = None,
        step: int | None = None,
        prompts: Sequence[str] | None = None,
    ) -> None:
        self.reward = reward
        self.step = step
        self.prompts = list(prompts) if prompts is not None else None
        self.detail = message
        if reward is not None:
            where = f"step {step}" if step is not None else "unknown step"
            message = (
                f"reward {reward!r} failed at {where} on {_describe_prompts(self.prompts)}: "
                f"{message}"
            )
        super().__init__(message)

    def __reduce__(self):  # keep the keyword fields through pickling (multiprocessing)
        return (_rebuild_reward_error, (self.detail, self.reward, self.step, self.prompts))


def _rebuild_reward_error(message, reward, step, prompts) -> RewardError:
    return RewardError(message, reward=reward, step=step, prompts=prompts)


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
    where it applies, and :class:`RewardError` (naming the reward, the step and the prompts,
    chained to the original exception) when a reward raises.
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
        for _, reward in zip(self.names, self.rewards):
            applies = getattr(reward, "applies_to", None)
            cols.append(
                applies(prompts).cpu().bool()
                if applies
                else torch.ones(len(prompts), dtype=torch.bool)
            )
        return torch.stack(cols, dim=1)

    @torch.no_grad()
    def forward(
        self, images: Tensor, prompts: Sequence[str], step: int | None = None
    ) -> RewardBatch:
        """Score ``images`` with every reward; ``step`` (optional) is named in errors."""
        b = images.shape[0]
        mask = self.masks(prompts).to(images.device)
        cols = []
        for k, (name, reward) in enumerate(zip(self.names, self.rewards)):
            try:
                value = reward(images, prompts)
            except RewardError:
                raise
            except Exception as err:  # one project type naming reward/step/prompt, chained
                detail = f"{type(err).__name__}: {err}"
                raise RewardError(detail, reward=name, step=step, prompts=prompts) from err
            if not isinstance(value, Tensor) or value.shape != (b,):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"reward {name!r} returned shape {shape}, expected ({b},)")
            value = value.to(images.device, torch.float32)
            valid = getattr(reward, "last_valid", None)  # per-image failures (e.g. an HTTP judge)
            if valid is not None:
                mask[:, k] &= valid.to(mask.device)
            bad = mask[:, k] & ~torch.isfinite(value)
            if bad.any():
                i = int(bad.nonzero()[0])
                raise ValueError(
                    f"reward {name!r} returned a non-finite value {value[i].item()} "
                    f"for prompt {prompts[i]!r}"
                )
            cols.append(torch.where(mask[:, k], value, torch.zeros((), device=value.device)))
        return RewardBatch(values=torch.stack(cols, dim=1), mask=mask, names=list(self.names))
