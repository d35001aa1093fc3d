"""Object detections shared by detectors and the composition reward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        label: object class name, e.g. ``"circle"`` or ``"dog"``.
        box: ``(x0, y0, x1, y1)`` normalised to ``[0, 1]`` (x to the right, y down).
        score: detector confidence in ``[0, 1]``.
        color: colour name if the detector classifies colour, else ``None``.
    """

    label: str
    box: tuple[float, float, float, float]
    score: float = 1.0
    color: str | None = None

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@runtime_checkable
class Detector(Protocol):
    """Finds objects of the queried classes in images ``[B, 3, H, W]`` in ``[0, 1]``."""

    def detect(self, images: Tensor, queries: Sequence[Sequence[str]]) -> list[list[Detection]]:
        """``queries[b]`` lists the class names wanted in image ``b``; returns detections per
        image."""
        ...
