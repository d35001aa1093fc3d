"""The training rule as typed objects: how rewards become one update.

A rule answers four independent questions:

* **advantages**: per reward (each reward normalised per prompt on its own), or of one
  scalarised reward (``sum_k w_k R_k``, then normalised: the weighted-sum baseline);
* **weighting** of the per-reward losses: MARBLE's min-norm coefficients (:class:`MarbleRule`),
  fixed coefficients (:class:`FixedAlphaRule`), one-hot (:class:`SingleRewardRule`), one-hot by
  stage (:class:`SequentialRule`);
* **refresh**: when per-reward gradients are computed and harmonised (MARBLE only: every step, or
  on a schedule with amortised steps in between, see
  :class:`~marble_lightning.coefficients.Coefficients`);
* the **engine** computing per-reward gradients (:mod:`marble_lightning.gram`), chosen on the
  module (``gram=``).

:func:`make_rule` builds a rule from the module's ``mode`` string and options, and refuses
options that do not apply to that mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from marble_lightning.checks import check_int, check_weights

__all__ = [
    "MODES",
    "FixedAlphaRule",
    "MarbleRule",
    "SequentialRule",
    "SingleRewardRule",
    "TrainingRule",
    "WeightedSumRule",
    "make_rule",
]

MODES = ("marble", "amortized", "weighted_sum", "fixed", "single", "sequential")
"""The ``mode`` strings :func:`make_rule` understands."""

DEFAULT_REFRESH_EVERY = 5
"""Refresh period of amortised MARBLE when neither the module nor a callback sets one."""


@dataclass(frozen=True)
class TrainingRule:
    """Base of the rules. ``k`` rewards named ``names``.

    Attributes:
        scalarised: advantages of the weighted-sum scalar reward instead of per-reward ones.
        harmonizes: per-reward gradients are balanced by the min-norm QP (MARBLE).
        every_step: (MARBLE) refresh at every step.
    """

    names: tuple[str, ...]
    scalarised = False
    harmonizes = False
    every_step = False

    @property
    def k(self) -> int:
        return len(self.names)

    def alpha(self, step: int) -> Tensor:
        """``[K]`` float64 coefficients this rule reports at ``step`` (sum 1)."""
        return torch.full((self.k,), 1.0 / self.k, dtype=torch.float64)

    def loss_weights(self, step: int) -> Tensor | None:
        """``[K]`` float64 weights of the per-reward losses (``None``: the scalarised loss)."""
        return self.alpha(step)


@dataclass(frozen=True)
class MarbleRule(TrainingRule):
    """MARBLE: min-norm coefficients of the normalised per-reward gradients.

    Attributes:
        every_step: refresh (harmonise fresh gradients) at every step: full MARBLE. Otherwise
            amortised: refresh on a schedule, and steps in between take one backward pass with
            the cached norms and the coefficients in use.
        refresh_every: amortised refresh period when no callback decides (``None``: the
            :data:`DEFAULT_REFRESH_EVERY`).
    """

    every_step: bool = False
    refresh_every: int | None = None
    harmonizes = True

    def loss_weights(self, step: int) -> Tensor | None:
        raise RuntimeError("MARBLE's weights come from the harmonisation (Coefficients)")


@dataclass(frozen=True)
class WeightedSumRule(TrainingRule):
    """One scalar reward ``sum_k w_k R_k`` (masked entries 0), normalised per prompt, one
    backward."""

    weights: tuple[float, ...] = ()
    scalarised = True

    def alpha(self, step: int) -> Tensor:
        w = torch.tensor(self.weights, dtype=torch.float64)
        return w / w.sum()

    def loss_weights(self, step: int) -> Tensor | None:
        return None


@dataclass(frozen=True)
class FixedAlphaRule(TrainingRule):
    """Per-reward advantages combined with fixed coefficients (the loss ``sum_k alpha_k l_k``)."""

    fixed: tuple[float, ...] = ()

    def alpha(self, step: int) -> Tensor:
        w = torch.tensor(self.fixed, dtype=torch.float64)
        return w / w.sum()

    def loss_weights(self, step: int) -> Tensor | None:
        return torch.tensor(self.fixed, dtype=torch.float64)


@dataclass(frozen=True)
class SingleRewardRule(TrainingRule):
    """Train on reward ``index`` only."""

    index: int = 0

    def alpha(self, step: int) -> Tensor:
        alpha = torch.zeros(self.k, dtype=torch.float64)
        alpha[self.index] = 1.0
        return alpha

    def loss_weights(self, step: int) -> Tensor | None:
        return self.alpha(step).clone()


@dataclass(frozen=True)
class SequentialRule(TrainingRule):
    """One reward per stage: ``stages = ((index, steps), ...)``; the last reward is kept after."""

    stages: tuple[tuple[int, int], ...] = ()

    def active(self, step: int) -> int:
        """Index of the reward trained at ``step``."""
        for index, steps in self.stages:
            if step < steps:
                return index
            step -= steps
        return self.stages[-1][0]

    def alpha(self, step: int) -> Tensor:
        alpha = torch.zeros(self.k, dtype=torch.float64)
        alpha[self.active(step)] = 1.0
        return alpha

    def loss_weights(self, step: int) -> Tensor | None:
        return self.alpha(step).clone()


def _index(names: Sequence[str], name: Any, argument: str) -> int:
    if name not in names:
        raise ValueError(f"`{argument}` names unknown reward {name!r}; rewards are {list(names)}")
    return list(names).index(name)


def make_rule(
    mode: str,
    names: Sequence[str],
    *,
    reward_weights: Sequence[float] | None = None,
    fixed_alpha: Sequence[float] | None = None,
    single_reward: str | None = None,
    stages: Sequence[Any] | None = None,
    refresh_every: int | None = None,
) -> TrainingRule:
    """The rule of ``mode`` (one of :data:`MODES`); options of other modes are an error.

    Args:
        mode: ``"marble"``, ``"amortized"``, ``"weighted_sum"``, ``"fixed"``, ``"single"`` or
            ``"sequential"``.
        names: the ``K`` reward names.
        reward_weights: weighted_sum only; default all 1.
        fixed_alpha: fixed only; default uniform.
        single_reward: single only (required).
        stages: sequential only (required): ``[(reward name, steps), ...]`` or dicts with
            ``reward`` and ``steps``.
        refresh_every: amortized only; ``>= 1``.
    """
    if mode not in MODES:
        raise ValueError(f"`mode` should be one of {MODES}, got {mode!r}")
    names = tuple(names)
    k = len(names)
    given = {
        "reward_weights": (reward_weights, ("weighted_sum",)),
        "fixed_alpha": (fixed_alpha, ("fixed",)),
        "single_reward": (single_reward, ("single",)),
        "stages": (stages, ("sequential",)),
        "refresh_every": (refresh_every, ("amortized",)),
    }
    for option, (value, modes) in given.items():
        if value is not None and mode not in modes:
            raise ValueError(
                f"`{option}` applies only to mode {' / '.join(map(repr, modes))}, "
                f"not to mode {mode!r}; remove it (got {value!r})"
            )
    if mode in ("marble", "amortized"):
        if refresh_every is not None:
            check_int("refresh_every", refresh_every)
        return MarbleRule(names, every_step=mode == "marble", refresh_every=refresh_every)
    if mode == "weighted_sum":
        weights = reward_weights if reward_weights is not None else [1.0] * k
        return WeightedSumRule(names, tuple(check_weights("reward_weights", weights, k, names)))
    if mode == "fixed":
        fixed = fixed_alpha if fixed_alpha is not None else [1.0 / k] * k
        return FixedAlphaRule(names, tuple(check_weights("fixed_alpha", fixed, k, names)))
    if mode == "single":
        if single_reward is None:
            raise ValueError(f"mode 'single' needs `single_reward`, one of {list(names)}")
        return SingleRewardRule(names, _index(names, single_reward, "single_reward"))
    if not stages:
        raise ValueError("mode 'sequential' needs `stages`, a list of (reward name, steps)")
    parsed = []
    for stage in stages:
        if isinstance(stage, dict):
            stage = (stage.get("reward"), stage.get("steps"))
        if not isinstance(stage, (tuple, list)) or len(stage) != 2:
            raise ValueError(f"a stage should be (reward name, steps), got {stage!r}")
        name, steps = stage
        check_int(f"steps of stage {name!r}", steps)
        parsed.append((_index(names, name, "stages"), int(steps)))
    return SequentialRule(names, tuple(parsed))
