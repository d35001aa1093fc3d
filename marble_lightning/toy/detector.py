"""An exact object detector for the toy world (no learning).

Every pixel is classified to the nearest reference colour among the background, the four palette
colours and the text colour (Euclidean distance in RGB). Pixels of one palette colour that touch
(4-connectivity) form one object; components smaller than ``min_area`` pixels are dropped as
specks. The shape comes from the fill ratio ``area / bounding-box area``: a filled square fills its
box (ratio 1), a filled disc about ``pi / 4 = 0.785`` of it (0.75-0.81 for the rendered diameters
of 8-11 px); ratios below ``square_threshold`` (0.85) are read as circles. Generated squares with
rounded corners (fill 0.7-0.93 after 750 pretraining steps) are often read as circles: the judge
asks for crisp corners.

On ground-truth renders (:func:`marble_lightning.toy.world.render_scene`) the readout is exact; on
generated images it is what a strict but fair judge sees (merged blobs count as one object,
smeared colours go to the nearest palette colour).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from marble_lightning.checks import check_float, check_int
from marble_lightning.rewards.base import check_images
from marble_lightning.rewards.detection import Detection
from marble_lightning.toy.world import BACKGROUND, PALETTE, SHAPES, TEXT_COLOR

_REFERENCE_NAMES: tuple[str, ...] = ("background", *PALETTE, "text")
_REFERENCE = np.array([BACKGROUND, *PALETTE.values(), TEXT_COLOR], dtype=np.float32) / 255.0


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Nearest-reference-colour index per pixel.

    Args:
        image: float ``[H, W, 3]`` in ``[0, 1]``.

    Returns:
        int ``[H, W]``: 0 background, ``1..4`` palette colours in :data:`PALETTE` order, 5 text.
    """
    d = ((image[:, :, None, :] - _REFERENCE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean ``[H, W]`` mask, each as an int array ``[N, 2]``
    of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps: list[np.ndarray] = []
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys.tolist(), xs.tolist()):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack = [(y0, x0)]
        pix = []
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(np.array(pix, dtype=np.int64))
    return comps


class ToyDetector:
    """Exact detector of toy-world objects; implements
    :class:`~marble_lightning.rewards.detection.Detector`.

    Args:
        min_area: components with fewer pixels are ignored (the smallest rendered object has 52).
        square_threshold: fill ratio at or above which a component is a square.
    """

    labels: tuple[str, ...] = SHAPES

    def __init__(self, min_area: int = 12, square_threshold: float = 0.85) -> None:
        self.min_area = check_int("min_area", min_area)
        self.square_threshold = check_float(
            "square_threshold", square_threshold, minimum=0.0, strict=True, maximum=1.0
        )

    def read(self, image: np.ndarray) -> list[Detection]:
        """All objects in one float ``[H, W, 3]`` image in ``[0, 1]``, sorted left to right."""
        h, w, _ = image.shape
        cls = classify_pixels(image)
        out: list[Detection] = []
        for ci, color in enumerate(PALETTE, start=1):
            for comp in connected_components(cls == ci):
                if len(comp) < self.min_area:
                    continue
                y0, x0 = comp.min(0)
                y1, x1 = comp.max(0) + 1
                fill = len(comp) / float((y1 - y0) * (x1 - x0))
                label = "square" if fill >= self.square_threshold else "circle"
                box = (x0 / w, y0 / h, x1 / w, y1 / h)
                out.append(
                    Detection(label=label, box=tuple(float(v) for v in box), score=1.0, color=color)
                )
        out.sort(key=lambda d: (d.center[0], d.center[1]))
        return out

    def detect(self, images: Tensor, queries: Sequence[Sequence[str]]) -> list[list[Detection]]:
        """Detections per image, restricted to the queried labels.

        Args:
            images: float ``[B, 3, H, W]`` in ``[0, 1]``.
            queries: ``queries[b]`` lists the wanted labels for image ``b`` (``"circle"``,
                ``"square"``); other names match nothing in the toy world.

        Returns:
            ``B`` lists of :class:`Detection` with normalised boxes and ``color`` set.
        """
        check_images(images, "ToyDetector")
        if len(queries) != images.shape[0]:
            raise ValueError(
                f"ToyDetector: got {images.shape[0]} images but {len(queries)} query lists"
            )
        arr = images.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
        results = []
        for img, wanted in zip(arr, queries):
            if isinstance(wanted, str):
                raise TypeError(
                    f"ToyDetector: queries[b] must be a list of labels, got the string {wanted!r}"
                )
            wanted_set = set(wanted)
            results.append([d for d in self.read(img) if d.label in wanted_set])
        return results
