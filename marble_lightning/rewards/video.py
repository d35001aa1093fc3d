"""Rewards on videos ``[B, F, 3, H, W]`` in ``[0, 1]`` (what video backbones such as Wan decode to).

* :class:`PerFrameReward` applies any image reward to every frame and aggregates the ``F``
  per-frame values of a clip:

  - ``"mean"``: the average frame quality (smooth, every frame counts equally);
  - ``"min"``: the worst frame ("every frame must be right": a clip is only as good as its worst
    frame, so the policy cannot buy a good average with a few broken frames).

  It keeps the image reward's mask (``applies_to``) and name, so configs, ``single_reward`` and
  logs refer to it exactly like the image reward. Images ``[B, 3, H, W]`` pass straight through.
* :class:`TemporalConsistencyReward`: a video-specific reward against flicker, ``1 - mean_f
  mean |frame_{f+1} - frame_f|`` on (optionally average-pooled) frames, in ``[0, 1]`` (1: a still
  clip). Pooling by ``pool`` pixels first measures flicker of regions rather than fine texture.
  Optionally masked to prompts containing ``keyword``. Pair it with a per-frame quality reward
  (a static clip scores 1 here, so alone it rewards stillness).

Both are plain per-sample computations on the local batch (no collective, no state), hence
DDP-safe like the image rewards; values are float32 ``[B]``, 0 where masked, as for
:class:`~marble_lightning.rewards.base.RewardModel`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marble_lightning.rewards.base import RewardModel, check_images

__all__ = ["AGGREGATIONS", "PerFrameReward", "TemporalConsistencyReward", "check_videos"]

AGGREGATIONS = ("mean", "min")
"""How :class:`PerFrameReward` reduces the per-frame values of a clip."""


def check_videos(videos: Tensor, who: str) -> None:
    """Raise ``ValueError`` unless ``videos`` is a float ``[B, F, 3, H, W]`` tensor in
    ``[0, 1]``."""
    if not isinstance(videos, Tensor) or videos.ndim != 5 or videos.shape[2] != 3:
        shape = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
        raise ValueError(f"{who}: expected videos of shape [B, F, 3, H, W], got {shape}")
    check_images(videos.flatten(0, 1), who)


class PerFrameReward(RewardModel):
    """An image reward applied to every frame of a video, aggregated over frames.

    Args:
        reward: the image reward (``reward(images [N, 3, H, W], prompts) -> [N]``).
        aggregation: ``"mean"`` or ``"min"`` over the ``F`` frames (see the module docstring).
        name: reward name (default: the image reward's name).
        frames_per_call: score at most this many frames per call of the image reward (memory of
            large reward models); ``None``: all ``B F`` frames at once.
    """

    def __init__(
        self,
        reward: RewardModel,
        aggregation: str = "mean",
        name: str | None = None,
        frames_per_call: int | None = None,
    ) -> None:
        if not isinstance(reward, nn.Module):
            raise TypeError(
                f"PerFrameReward: reward must be a reward module, got {type(reward).__name__}"
            )
        super().__init__(
            name if name is not None else getattr(reward, "name", None) or type(reward).__name__
        )
        if aggregation not in AGGREGATIONS:
            raise ValueError(
                f"PerFrameReward: aggregation={aggregation!r}; expected one of {AGGREGATIONS}"
            )
        if frames_per_call is not None and (
            not isinstance(frames_per_call, int) or frames_per_call < 1
        ):
            raise ValueError(
                f"PerFrameReward: frames_per_call={frames_per_call!r} must be a positive int"
            )
        self.reward = reward
        self.aggregation = aggregation
        self.frames_per_call = frames_per_call

    def applies_to(self, prompts: Sequence[str]) -> Tensor:
        applies = getattr(self.reward, "applies_to", None)
        return (
            applies(prompts).cpu().bool() if applies else torch.ones(len(prompts), dtype=torch.bool)
        )

    @torch.no_grad()
    def forward(self, videos: Tensor, prompts: Sequence[str]) -> Tensor:
        """Float32 ``[B]``: the aggregated per-frame values; 0 where :meth:`applies_to` is False."""
        if isinstance(videos, Tensor) and videos.ndim == 4:  # images: the image reward itself
            return super().forward(videos, prompts)
        check_videos(videos, f"reward {self.name!r}")
        b, f = videos.shape[:2]
        if len(prompts) != b:
            raise ValueError(f"reward {self.name!r}: got {b} videos but {len(prompts)} prompts")
        frames = videos.flatten(0, 1)
        frame_prompts = [p for p in prompts for _ in range(f)]
        chunk = self.frames_per_call or frames.shape[0]
        values = torch.cat(
            [
                self.reward(frames[i : i + chunk], frame_prompts[i : i + chunk]).float()
                for i in range(0, frames.shape[0], chunk)
            ]
        )
        if values.shape != (b * f,):
            raise ValueError(
                f"reward {self.name!r}: the image reward returned shape {tuple(values.shape)}, "
                f"expected ({b * f},)"
            )
        per_clip = values.view(b, f)
        value = per_clip.mean(dim=1) if self.aggregation == "mean" else per_clip.amin(dim=1)
        mask = self.applies_to(prompts).to(value.device)
        return torch.where(mask, value, torch.zeros((), device=value.device))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.reward(images, prompts).float()


class TemporalConsistencyReward(RewardModel):
    """Temporal consistency (anti-flicker): ``1 - mean |frame_{f+1} - frame_f|`` in ``[0, 1]``.

    Args:
        pool: average-pool frames by this factor first (1: per pixel); larger values measure
            flicker of regions and forgive small motions.
        keyword: if given, the reward applies only to prompts containing this word.
        name: reward name.
    """

    name = "temporal"

    def __init__(self, pool: int = 1, keyword: str | None = None, name: str | None = None) -> None:
        super().__init__(name)
        if not isinstance(pool, int) or pool < 1:
            raise ValueError(f"TemporalConsistencyReward: pool={pool!r} must be a positive int")
        self.pool = pool
        self.keyword = keyword

    def applies_to(self, prompts: Sequence[str]) -> Tensor:
        if self.keyword is None:
            return torch.ones(len(prompts), dtype=torch.bool)
        return torch.tensor([self.keyword in p.split() for p in prompts], dtype=torch.bool)

    @torch.no_grad()
    def forward(self, videos: Tensor, prompts: Sequence[str]) -> Tensor:
        """Float32 ``[B]`` on ``videos.device``; 0 where masked; 1 for a single-frame clip."""
        check_videos(videos, f"reward {self.name!r}")
        b, f = videos.shape[:2]
        if len(prompts) != b:
            raise ValueError(f"reward {self.name!r}: got {b} videos but {len(prompts)} prompts")
        frames = videos.float()
        if self.pool > 1:
            frames = F.avg_pool2d(frames.flatten(0, 1), self.pool, ceil_mode=True)
            frames = frames.view(b, f, *frames.shape[1:])
        if f < 2:
            value = torch.ones(b, device=videos.device)
        else:
            value = 1.0 - (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
        mask = self.applies_to(prompts).to(value.device)
        return torch.where(mask, value, torch.zeros((), device=value.device))
