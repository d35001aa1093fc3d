"""Schedules used by the training module (pure python, no Lightning).

:class:`OldPolicySchedule` gives the EMA decay ``eta`` of the old (sampling) policy after each
training step: ``theta_old <- eta * theta_old + (1 - eta) * theta``. The default is DiffusionNFT's:
``eta = 0`` (the old policy is a copy of the current one) until step ``start = 75``, then
``eta = min(rate * (step - start), max_decay)`` with ``rate = 0.0075`` and ``max_decay = 0.999``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from marble_lightning.checks import check_float, check_int

__all__ = ["OldPolicySchedule"]


@dataclass(frozen=True)
class OldPolicySchedule:
    """Piecewise-linear EMA decay of the old policy.

    Attributes:
        start: Steps before which the decay is 0 (``>= 0``).
        rate: Increase of the decay per step after ``start`` (``>= 0``).
        max_decay: Upper bound of the decay, in ``[0, 1)``.
    """

    start: int = 75
    rate: float = 0.0075
    max_decay: float = 0.999

    def __post_init__(self) -> None:
        check_int("old_policy.start", self.start, minimum=0)
        check_float("old_policy.rate", self.rate, minimum=0.0)
        check_float(
            "old_policy.max_decay", self.max_decay, minimum=0.0, maximum=1.0, maximum_strict=True
        )

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> OldPolicySchedule:
        """Build from a dict with keys ``start``, ``rate``, ``max_decay`` (``None``: defaults).

        Raises:
            ValueError: on an unknown key or an invalid value.
        """
        if config is None:
            return cls()
        if isinstance(config, OldPolicySchedule):
            return config
        if not isinstance(config, dict):
            raise TypeError(f"old_policy should be a dict or None, got {config!r}")
        known = {"start", "rate", "max_decay"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown old_policy keys {unknown}; known keys: {sorted(known)}")
        return cls(**config)

    def __call__(self, step: int) -> float:
        """Decay ``eta`` in ``[0, max_decay]`` after training step ``step`` (0-based)."""
        if step < self.start:
            return 0.0
        return min(self.rate * (step - self.start), self.max_decay)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
