"""Held-out evaluation metrics (torchmetrics), correct under DDP.

* :class:`RewardMetric`: mean and standard deviation of one reward over an evaluation set,
  counting only the samples the reward applies to (its mask).
* :class:`CompositeScore`: one number summarising several rewards on a common scale.
* :func:`clip_score_metric`: ``torchmetrics.multimodal.CLIPScore`` pointed at a local CLIP.

All states are sums registered with ``dist_reduce_fx="sum"``, so ``compute()`` after an
evaluation split across ranks equals the single-process result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from marble_lightning.rewards.base import RewardBatch


def _mean_std(total: Tensor, total_sq: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std from sums (float64 scalars); NaN mean / 0 std when count is 0 / 1."""
    if count <= 0:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=total.device)
        return nan, nan
    mean = total / count
    if count <= 1:
        return mean, torch.zeros_like(mean)
    var = (total_sq - total * total / count) / (count - 1)
    return mean, var.clamp_min(0.0).sqrt()


class RewardMetric(Metric):
    """Mean and standard deviation of a reward over an evaluation set.

    States (float64 scalars, summed across ranks): ``total = sum v``, ``total_sq = sum v^2``,
    ``count = n`` over the samples where the reward applies. ``compute()`` returns
    ``{"mean": total / n, "std": sqrt((total_sq - total^2 / n) / (n - 1))}`` as float32 tensors
    (``std`` is the unbiased sample std; 0 for ``n = 1``; both NaN for ``n = 0``).

    Args:
        reward: the reward to evaluate in ``update(images, prompts)``; may be ``None`` if the
            caller passes precomputed ``values`` (and ``mask``) instead.
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    total: Tensor
    total_sq: Tensor
    count: Tensor

    def __init__(self, reward: nn.Module | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reward = reward
        for state in ("total", "total_sq", "count"):
            self.add_state(
                state, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(
        self,
        images: Tensor | None = None,
        prompts: Sequence[str] | None = None,
        values: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> None:
        """Add a batch: either ``images`` [B, 3, H, W] + ``prompts`` (scored with the reward and
        masked with its ``applies_to``) or precomputed ``values`` [B] (+ optional bool ``mask`` [B]).
        """
        if values is None:
            if self.reward is None or images is None or prompts is None:
                raise ValueError(
                    "RewardMetric.update needs images and prompts (with a reward) or values"
                )
            values = self.reward(images, prompts)
            if mask is None and hasattr(self.reward, "applies_to"):
                mask = self.reward.applies_to(prompts)
        values = torch.as_tensor(values).detach().reshape(-1).to(self.total.device, torch.float64)
        if mask is None:
            mask = torch.ones_like(values, dtype=torch.bool)
        mask = torch.as_tensor(mask).reshape(-1).to(values.device, torch.bool)
        if mask.shape != values.shape:
            raise ValueError(
                f"RewardMetric: mask shape {tuple(mask.shape)} != values shape {tuple(values.shape)}"
            )
        v = values[mask]
        if not torch.isfinite(v).all():
            raise ValueError(
                f"RewardMetric: non-finite reward values {v[~torch.isfinite(v)].tolist()[:4]}"
            )
        self.total += v.sum()
        self.total_sq += (v * v).sum()
        self.count += v.numel()

    def compute(self) -> dict[str, Tensor]:
        mean, std = _mean_std(self.total, self.total_sq, self.count)
        return {"mean": mean.float(), "std": std.float()}


class CompositeScore(Metric):
    """Weighted mean of several rewards, each first mapped to ``[0, 1]`` by a known range.

    For member k with range ``(low_k, high_k)`` and weight ``w_k``, over the samples where reward
    k applies::

        m_k = mean of reward k
        s_k = (m_k - low_k) / (high_k - low_k)          clipped to [0, 1] if clip=True
        composite = sum_k w_k s_k / sum_k w_k            over members seen at least once

    Members that have not been seen (no applicable sample) are left out of both sums; with no
    member seen the result is NaN. States: per-member sums and counts (float64 ``[K]``, summed
    across ranks).

    Args:
        ranges: ``{reward name: (low, high)}``, ``high > low`` (see :data:`NATURAL_RANGES`).
        weights: ``{reward name: weight >= 0}``; default 1 for every member.
        clip: clip each normalised mean to ``[0, 1]``.
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    sums: Tensor
    counts: Tensor

    def __init__(
        self,
        ranges: Mapping[str, Sequence[float]],
        weights: Mapping[str, float] | None = None,
        clip: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not ranges:
            raise ValueError("CompositeScore: ranges must name at least one reward")
        self.names = list(ranges)
        lows, highs = [], []
        for name, rng in ranges.items():
            if (
                len(rng) != 2
                or not all(math.isfinite(float(x)) for x in rng)
                or not float(rng[1]) > float(rng[0])
            ):
                raise ValueError(
                    f"CompositeScore: range of {name!r} must be finite (low, high) with high > low, got {rng!r}"
                )
            lows.append(float(rng[0]))
            highs.append(float(rng[1]))
        weights = dict(weights) if weights is not None else {}
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(
                f"CompositeScore: weights given for rewards without a range: {unknown}"
            )
        w = [float(weights.get(n, 1.0)) for n in self.names]
        if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(
                f"CompositeScore: weights must be finite, >= 0 and not all 0, got {dict(zip(self.names, w))}"
            )
        self.register_buffer("low", torch.tensor(lows, dtype=torch.float64), persistent=False)
        self.register_buffer("high", torch.tensor(highs, dtype=torch.float64), persistent=False)
        self.register_buffer("weight", torch.tensor(w, dtype=torch.float64), persistent=False)
        self.clip = bool(clip)
        k = len(self.names)
        self.add_state("sums", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        values: Tensor | RewardBatch,
        mask: Tensor | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        """Add a batch of scores.

        Args:
            values: float ``[B, K']`` or a :class:`RewardBatch` (its mask and names are used).
            mask: bool ``[B, K']``, True where the reward applies (default: all True).
            names: column names of ``values``; default: the members in order (then ``K' = K``).
                Columns that are not members are ignored.
        """
        if isinstance(values, RewardBatch):
            values, mask, names = values.values, values.mask, values.names
        values = torch.as_tensor(values).detach().to(self.sums.device, torch.float64)
        if values.ndim != 2:
            raise ValueError(
                f"CompositeScore: values must be [B, K], got shape {tuple(values.shape)}"
            )
        if names is None:
            if values.shape[1] != len(self.names):
                raise ValueError(
                    f"CompositeScore: got {values.shape[1]} columns without names for {len(self.names)} members"
                )
            names = self.names
        names = list(names)
        if len(names) != values.shape[1]:
            raise ValueError(f"CompositeScore: {len(names)} names for {values.shape[1]} columns")
        mask = (
            torch.ones_like(values, dtype=torch.bool)
            if mask is None
            else torch.as_tensor(mask).to(values.device, torch.bool)
        )
        if mask.shape != values.shape:
            raise ValueError(
                f"CompositeScore: mask shape {tuple(mask.shape)} != values shape {tuple(values.shape)}"
            )
        for col, name in enumerate(names):
            if name not in self.names:
                continue
            k = self.names.index(name)
            v = values[mask[:, col], col]
            if not torch.isfinite(v).all():
                raise ValueError(f"CompositeScore: non-finite values for reward {name!r}")
            self.sums[k] += v.sum()
            self.counts[k] += v.numel()

    def normalized_means(self) -> Tensor:
        """``s_k`` for every member (NaN where unseen), float64 ``[K]``."""
        means = self.sums / self.counts.clamp_min(1)
        s = (means - self.low) / (self.high - self.low)
        if self.clip:
            s = s.clamp(0.0, 1.0)
        return torch.where(self.counts > 0, s, torch.full_like(s, float("nan")))

    def compute(self) -> Tensor:
        s = self.normalized_means()
        seen = self.counts > 0
        if not seen.any():
            return torch.tensor(float("nan"), device=s.device)
        w = self.weight * seen
        return ((w * torch.nan_to_num(s)).sum() / w.sum()).float()


NATURAL_RANGES: dict[str, tuple[float, float]] = {
    "ocr": (0.0, 1.0),
    "composition": (0.0, 1.0),
    "aesthetic": (1.0, 10.0),
}
"""Ranges fixed by a reward's definition (OCR and composition scores in [0, 1]; the aesthetic
predictor's 1-10 rating scale). Unbounded rewards (CLIP-style cosines, PickScore, HPS,
ImageReward, JPEG size) need ranges chosen for the model and data, e.g. the base model's and a
target score."""


class _TensorFeatureCLIP(nn.Module):
    """Wraps a transformers ``CLIPModel`` so ``get_*_features`` return tensors.

    transformers 5 returns output objects from ``get_image_features``/``get_text_features``;
    torchmetrics (1.9) expects tensors.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> Tensor:
        from marble_lightning.rewards._loading import model_output_features

        return model_output_features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        from marble_lightning.rewards._loading import model_output_features

        return model_output_features(self.model.get_text_features(*args, **kwargs))


def clip_score_metric(model: str, processor: str | None = None, **kwargs):
    """``torchmetrics.multimodal.CLIPScore`` on a local (or hub) transformers CLIP.

    The torchmetrics metric is ``max(100 * mean_i cos(image_i, text_i), 0)`` (the clamp applies
    to the mean) and expects images as ``[N, 3, H, W]`` in ``[0, 255]`` (or a list of
    ``[3, H, W]``), e.g. ``metric.update(images * 255, prompts)``.

    Args:
        model: folder or hub id of the ``CLIPModel``.
        processor: folder or hub id of the ``CLIPProcessor`` (default: ``model``).
        **kwargs: passed to ``CLIPScore``.
    """
    from torchmetrics.multimodal import CLIPScore

    from marble_lightning.rewards._loading import resolve_source

    model_ref, model_local = resolve_source(model, "clip_score_metric")
    proc_ref, proc_local = (
        resolve_source(processor, "clip_score_metric") if processor else (model_ref, model_local)
    )

    def factory():
        from transformers import CLIPModel, CLIPProcessor

        clip = CLIPModel.from_pretrained(model_ref, local_files_only=model_local).eval()
        return _TensorFeatureCLIP(clip), CLIPProcessor.from_pretrained(
            proc_ref, local_files_only=proc_local
        )

    return CLIPScore(model_name_or_path=factory, **kwargs)
