"""Evaluation metrics: the one place that defines per-reward means, standard errors and the
composite.

Functional definitions (used by :class:`~marble_lightning.callbacks.RewardEvalCallback`,
``benchmarks/quality.py`` and the metrics below):

* :func:`masked_moments`: per-reward sums ``sum v``, ``sum v^2`` and counts over the samples
  where each reward applies (its mask).
* :func:`moments_to_stats`: mean, unbiased standard deviation and standard error of the mean
  (SE over images) from those sums.
* :func:`normalize_scores` and :func:`composite`: one number summarising several rewards, the
  weighted mean of per-reward scores, each optionally mapped through a range
  ``(x - low) / (high - low)`` first.

Metrics (``torchmetrics.Metric``; every state is a float64 sum registered with
``dist_reduce_fx="sum"``, so ``compute()`` after an evaluation split across ranks equals the
single-process result):

* :class:`RewardMetric`: mean, std and SE of ``K`` rewards over an evaluation set.
* :class:`CompositeScore`: :func:`composite` of those means, each normalised by a known range.
* :func:`clip_score_metric`: ``torchmetrics.multimodal.CLIPScore`` pointed at a local CLIP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from marble_lightning.rewards.base import RewardBatch

__all__ = [
    "NATURAL_RANGES",
    "CompositeScore",
    "RewardMetric",
    "clip_score_metric",
    "composite",
    "masked_moments",
    "moments_to_stats",
    "normalize_scores",
]


# ----------------------------------------------------------------------------- functional
def masked_moments(values: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-column sums over the masked entries.

    Args:
        values: float ``[B, K]`` (``B`` samples, ``K`` rewards); entries where ``mask`` is False
            are ignored (they may be NaN).
        mask: bool ``[B, K]``, True where reward k applies to sample b (default: all True).

    Returns:
        ``(sums, squares, counts)``, each float64 ``[K]``: ``sum_b m_bk v_bk``,
        ``sum_b m_bk v_bk^2`` and ``sum_b m_bk``.
    """
    values = values.to(torch.float64)
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum(dim=0), kept.square().sum(dim=0), mask.to(torch.float64).sum(dim=0)


def moments_to_stats(sums: Tensor, squares: Tensor, counts: Tensor) -> dict[str, Tensor]:
    """Mean, unbiased standard deviation and standard error of the mean from sums.

    With ``n`` the count, ``mean = sum v / n``, ``var = (sum v^2 - n mean^2) / (n - 1)`` (clamped
    at 0), ``std = sqrt(var)`` and ``sem = sqrt(var / n)`` (the standard error of the mean over
    the ``n`` samples).

    Args:
        sums: float64 ``[K]``, ``sum v``.
        squares: float64 ``[K]``, ``sum v^2``.
        counts: float64 ``[K]``, ``n``.

    Returns:
        ``{"mean", "std", "sem", "count"}``, float64 ``[K]``; ``mean`` is NaN where ``n = 0``,
        ``std`` and ``sem`` are NaN where ``n <= 1``.
    """
    nan = torch.full_like(sums, float("nan"))
    means = torch.where(counts > 0, sums / counts.clamp_min(1), nan)
    var = (squares - counts * means.square()).clamp_min(0) / (counts - 1).clamp_min(1)
    std = torch.where(counts > 1, var.sqrt(), nan)
    sem = torch.where(counts > 1, (var / counts.clamp_min(1)).sqrt(), nan)
    return {"mean": means, "std": std, "sem": sem, "count": counts.clone()}


def _check_ranges(
    ranges: Mapping[str, Sequence[float]], who: str
) -> dict[str, tuple[float, float]]:
    """``{name: (low, high)}`` as floats; ValueError unless finite with ``high > low``."""
    checked = {}
    for name, rng in ranges.items():
        pair = tuple(_real(x) for x in rng) if isinstance(rng, Sequence) else ()
        if len(pair) != 2 or not all(math.isfinite(x) for x in pair) or not pair[1] > pair[0]:
            raise ValueError(
                f"{who}: range of {name!r} must be finite (low, high) with high > low, got {rng!r}"
            )
        checked[name] = (pair[0], pair[1])
    return checked


def _real(x: object) -> float:
    """``float(x)`` for a real number (NaN for anything else, e.g. a bool or a string)."""
    if isinstance(x, (bool, str)):
        return float("nan")
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _check_weights(
    weights: Mapping[str, float] | None, names: Sequence[str], who: str
) -> dict[str, float]:
    """A weight per name (default 1); ValueError on unknown names, negative or non-finite
    weights."""
    weights = dict(weights) if weights is not None else {}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"{who}: weights given for rewards without a score or range: {unknown}")
    out = {}
    for name in names:
        w = _real(weights.get(name, 1.0))
        if not math.isfinite(w) or w < 0:
            raise ValueError(
                f"{who}: weights must be finite and >= 0, got {name!r}: {weights.get(name)!r}"
            )
        out[name] = w
    return out


def normalize_scores(
    scores: Mapping[str, float],
    ranges: Mapping[str, Sequence[float]] | None = None,
    clip: bool = False,
) -> dict[str, float]:
    """Map each score to ``(x - low) / (high - low)`` (optionally clipped to ``[0, 1]``).

    Args:
        scores: ``{reward name: score}``; non-finite scores stay as they are (NaN: unseen).
        ranges: ``{reward name: (low, high)}`` covering every score, finite, ``high > low``;
            ``None``: the identity (no normalisation, ``clip`` ignored).
        clip: clip each normalised score to ``[0, 1]``.

    Returns:
        ``{reward name: normalised score}`` in the order of ``scores``.
    """
    if ranges is None:
        return {name: float(x) for name, x in scores.items()}
    checked = _check_ranges(ranges, "normalize_scores")
    missing = [name for name in scores if name not in checked]
    if missing:
        raise ValueError(f"`ranges` should give a (low, high) for every score, missing {missing}")
    out = {}
    for name, x in scores.items():
        low, high = checked[name]
        s = (float(x) - low) / (high - low)
        out[name] = min(max(s, 0.0), 1.0) if clip and math.isfinite(s) else s
    return out


def composite(
    scores: Mapping[str, float],
    ranges: Mapping[str, Sequence[float]] | None = None,
    weights: Mapping[str, float] | None = None,
    clip: bool = False,
) -> float:
    """The composite score: a weighted mean of (normalised) per-reward scores.

    With ``s_k`` the score of reward ``k`` after :func:`normalize_scores` and ``w_k`` its weight::

        composite = sum_k w_k s_k / sum_k w_k        over the rewards with a finite s_k

    Rewards with a non-finite score (NaN: the reward applied to no sample) are left out of both
    sums; with none left (or zero total weight) the result is NaN. The sums are exact
    (``math.fsum``), so the result does not depend on the order of the rewards; with unit
    weights it equals ``statistics.fmean`` of the finite scores.

    Uses: ``eval/mean`` of :class:`~marble_lightning.callbacks.RewardEvalCallback` (the trained
    rewards' held-out means, no ranges, unit weights), :class:`CompositeScore` (means normalised
    by known ranges) and ``benchmarks/quality.py`` (gains normalised by the base model's std).

    Args:
        scores: ``{reward name: score}``.
        ranges: see :func:`normalize_scores` (``None``: scores used as they are).
        weights: ``{reward name: weight >= 0}`` (default 1 for every reward).
        clip: clip the normalised scores to ``[0, 1]``.

    Returns:
        The composite, a Python float.
    """
    normalised = normalize_scores(scores, ranges, clip)
    w = _check_weights(weights, list(normalised), "composite")
    kept = [(w[name], s) for name, s in normalised.items() if math.isfinite(s)]
    total = math.fsum(weight for weight, _ in kept)
    if not kept or total <= 0:
        return float("nan")
    return math.fsum(weight * s for weight, s in kept) / total


# ----------------------------------------------------------------------------- metrics
class RewardMetric(Metric):
    """Mean, standard deviation and standard error of ``K`` rewards over an evaluation set.

    Only the samples where a reward applies (its mask) count for it. States (float64 ``[K]``,
    summed across ranks): ``sums``, ``squares`` and ``counts`` of :func:`masked_moments`;
    ``compute()`` returns :func:`moments_to_stats` of them.

    Args:
        names: the reward names (the columns of ``update``'s values by default); a single string
            is one reward.
        **kwargs: passed to ``torchmetrics.Metric``.

    Example::

        metric = RewardMetric(["ocr", "clip"])
        metric.update(multi_reward(images, prompts))  # a RewardBatch: values, mask and names
        stats = metric.compute()  # {"mean": [2], "std": [2], "sem": [2], "count": [2]}
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    sums: Tensor
    squares: Tensor
    counts: Tensor

    def __init__(self, names: str | Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        names = [names] if isinstance(names, str) else list(names)
        if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise ValueError(
                f"`names` should be distinct reward names (at least one), got {names!r}"
            )
        self.names = names
        k = len(names)
        for state in ("sums", "squares", "counts"):
            self.add_state(state, default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        values: Tensor | RewardBatch,
        mask: Tensor | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        """Add a batch of scores.

        Args:
            values: float ``[B, K']`` (or ``[B]`` for one column), or a :class:`RewardBatch`
                (its mask and names are used).
            mask: bool, the shape of ``values``: True where the reward applies (default: all).
                Masked entries are ignored (they may be NaN).
            names: column names of ``values``; default: the metric's names in order (then
                ``K' = K``). Columns that are not among the metric's names are ignored.
        """
        who = type(self).__name__
        if isinstance(values, RewardBatch):
            values, mask, names = values.values, values.mask, values.names
        values = torch.as_tensor(values).detach().to(self.sums.device, torch.float64)
        if values.ndim == 1:
            values = values[:, None]
            mask = None if mask is None else torch.as_tensor(mask).reshape(-1, 1)
        if values.ndim != 2:
            raise ValueError(f"{who}: values must be [B, K], got shape {tuple(values.shape)}")
        if names is None:
            if values.shape[1] != len(self.names):
                raise ValueError(
                    f"{who}: got {values.shape[1]} columns without names for {len(self.names)} "
                    "rewards"
                )
            names = self.names
        names = list(names)
        if len(names) != values.shape[1]:
            raise ValueError(f"{who}: {len(names)} names for {values.shape[1]} columns")
        mask = (
            torch.ones_like(values, dtype=torch.bool)
            if mask is None
            else torch.as_tensor(mask).to(values.device, torch.bool)
        )
        if mask.shape != values.shape:
            raise ValueError(
                f"{who}: mask shape {tuple(mask.shape)} != values shape {tuple(values.shape)}"
            )
        bad = (mask & ~torch.isfinite(values)).any(dim=0)
        if bad.any():
            bad_names = [n for n, b in zip(names, bad.tolist()) if b]
            raise ValueError(f"{who}: non-finite values for reward(s) {bad_names}")
        cols = [c for c, n in enumerate(names) if n in self.names]
        if not cols:
            return
        sums, squares, counts = masked_moments(values, mask)
        index = torch.tensor([self.names.index(names[c]) for c in cols], device=values.device)
        cols_t = torch.tensor(cols, device=values.device)
        self.sums.index_add_(0, index, sums[cols_t])
        self.squares.index_add_(0, index, squares[cols_t])
        self.counts.index_add_(0, index, counts[cols_t])

    def compute(self) -> dict[str, Tensor]:
        """``{"mean", "std", "sem", "count"}``, float64 ``[K]`` (see :func:`moments_to_stats`)."""
        return moments_to_stats(self.sums, self.squares, self.counts)


class CompositeScore(RewardMetric):
    """The :func:`composite` of several rewards' means, each mapped to ``[0, 1]`` by a known range.

    For member k with range ``(low_k, high_k)`` and weight ``w_k``, over the samples where reward
    k applies::

        m_k = mean of reward k
        s_k = (m_k - low_k) / (high_k - low_k)          clipped to [0, 1] if clip=True
        composite = sum_k w_k s_k / sum_k w_k            over members seen at least once

    Members that have not been seen (no applicable sample) are left out of both sums; with no
    member seen the result is NaN. States: those of :class:`RewardMetric` (float64 ``[K]``,
    summed across ranks).

    Args:
        ranges: ``{reward name: (low, high)}``, ``high > low`` (see :data:`NATURAL_RANGES`).
        weights: ``{reward name: weight >= 0}``, not all 0; default 1 for every member.
        clip: clip each normalised mean to ``[0, 1]``.
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    def __init__(
        self,
        ranges: Mapping[str, Sequence[float]],
        weights: Mapping[str, float] | None = None,
        clip: bool = True,
        **kwargs,
    ) -> None:
        if not ranges:
            raise ValueError("CompositeScore: ranges must name at least one reward")
        super().__init__(list(ranges), **kwargs)
        self.ranges = _check_ranges(ranges, "CompositeScore")
        self.weights = _check_weights(weights, self.names, "CompositeScore")
        if sum(self.weights.values()) <= 0:
            raise ValueError(f"CompositeScore: weights must not all be 0, got {self.weights}")
        self.clip = bool(clip)

    def _means(self) -> dict[str, float]:
        means = moments_to_stats(self.sums, self.squares, self.counts)["mean"]
        return dict(zip(self.names, means.tolist()))

    def normalized_means(self) -> Tensor:
        """``s_k`` for every member (NaN where unseen), float64 ``[K]`` (the local, unsynced
        states)."""
        s = normalize_scores(self._means(), self.ranges, self.clip)
        return torch.tensor(
            [s[n] for n in self.names], dtype=torch.float64, device=self.sums.device
        )

    def compute(self) -> Tensor:
        """The composite, a float32 scalar tensor (NaN when no member has been seen)."""
        value = composite(self._means(), self.ranges, self.weights, self.clip)
        return torch.tensor(value, dtype=torch.float32, device=self.sums.device)


NATURAL_RANGES: dict[str, tuple[float, float]] = {
    "ocr": (0.0, 1.0),
    "composition": (0.0, 1.0),
    "aesthetic": (1.0, 10.0),
}
"""Ranges fixed by a reward's definition (OCR and composition scores in [0, 1]; the aesthetic
predictor's 1-10 rating scale). Unbounded rewards (CLIP-style cosines, PickScore, HPS,
ImageReward, JPEG size) need ranges chosen for the model and data, e.g. the base model's and a
target score."""


# ----------------------------------------------------------------------------- CLIPScore
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

    An independent reference for :class:`~marble_lightning.rewards.clip_score.CLIPScoreReward`
    (the tests check that both agree). The torchmetrics metric is
    ``max(100 * mean_i cos(image_i, text_i), 0)`` (the clamp applies to the mean) and expects
    images as ``[N, 3, H, W]`` in ``[0, 255]`` (or a list of ``[3, H, W]``), e.g.
    ``metric.update(images * 255, prompts)``.

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
