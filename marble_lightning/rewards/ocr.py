"""OCR reward: does the image show the text quoted in the prompt?

Target text: the double-quoted span(s) of the prompt (``'a sign that says "cat"'`` -> ``cat``;
several spans are concatenated). Prompts without a non-empty quoted span are masked.

Score, on lowercased strings with all whitespace removed (``t`` = target, ``r`` = text read)::

    d = 0                       if t is a substring of r
    d = levenshtein(r, t)       otherwise
    score = 1 - min(d, len(t)) / len(t)          in [0, 1]

The reader is RapidOCR (PaddleOCR ONNX models shipped with ``rapidocr-onnxruntime``), by default in
recognition-only mode (``use_det=False, use_cls=False``): the whole image is read as one text line,
which suits small renders (32-64 px) with one word. With detection on it reads every detected line
and concatenates them (slower; worse on tiny images).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from marble_lightning.rewards._loading import to_uint8_hwc
from marble_lightning.rewards.base import RewardModel

_QUOTED = re.compile(r"\"([^\"]*)\"|\u201c([^\u201d]*)\u201d")


def quoted_text(prompt: str) -> str | None:
    """The text inside the prompt's double quotes (``"..."`` or curly), or ``None`` if there is none.

    Several quoted spans are joined with a space. An empty or all-whitespace span counts as none.
    """
    spans = [a or b for a, b in _QUOTED.findall(prompt)]
    text = " ".join(s for s in spans if s.strip())
    return text if text.strip() else None


def normalize_text(text: str) -> str:
    """Lowercase and remove all whitespace."""
    return "".join(text.lower().split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insert, delete, substitute)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_similarity(read: str, target: str) -> float:
    """``1 - min(d, len(t)) / len(t)`` on normalised strings (see module docstring).

    Raises:
        ValueError: the target is empty after normalisation.
    """
    r, t = normalize_text(read), normalize_text(target)
    if not t:
        raise ValueError(f"OCR target text is empty after removing whitespace: {target!r}")
    d = 0 if t in r else edit_distance(r, t)
    return 1.0 - min(d, len(t)) / len(t)


class OCRReward(RewardModel):
    """RapidOCR text-match reward; masked on prompts with no quoted text.

    Args:
        upscale: resize factor applied to the images before reading (bicubic, antialiased);
            ``1.0`` reads them as they are. Helps on very small renders.
        use_det: run RapidOCR's text detector first (default ``False``: recognition only).
        use_cls: run the text-direction classifier (default ``False``).
        min_confidence: recognised strings with a lower confidence are treated as empty.
        num_threads: ONNX Runtime intra-op threads (default 1; ``None``: ONNX Runtime's default,
            all cores, which was 2.5x slower on a busy 2-core machine).
        name: reward name in logs.

    Measured (2-core CPU shared with other jobs, load ~5, recognition only, one thread, after
    warm-up): 23 ms per 32 x 32 toy-world render, 27 ms per 64 x 64 render, 28-32 ms with
    ``upscale=2``; about 13-15 ms on an idle core. Ground-truth renders score 1.0.
    """

    name = "ocr"

    def __init__(
        self,
        upscale: float = 1.0,
        use_det: bool = False,
        use_cls: bool = False,
        min_confidence: float = 0.0,
        num_threads: int | None = 1,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if not upscale > 0:
            raise ValueError(f"OCRReward: upscale must be > 0, got {upscale!r}")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(
                f"OCRReward: min_confidence must lie in [0, 1], got {min_confidence!r}"
            )
        self.upscale = float(upscale)
        self.use_det = bool(use_det)
        self.use_cls = bool(use_cls)
        self.min_confidence = float(min_confidence)
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(
                f"OCRReward: num_threads must be a positive int or None, got {num_threads!r}"
            )
        self.num_threads = num_threads
        self._engine = None


    @property
    def engine(self):
        """The RapidOCR engine, created on first use."""
        if self._engine is None:
            from rapidocr_onnxruntime import RapidOCR

            kwargs = {}
            if self.num_threads is not None:
                kwargs = {"intra_op_num_threads": int(self.num_threads), "inter_op_num_threads": 1}
            self._engine = RapidOCR(**kwargs)
        return self._engine

    def applies_to(self, prompts: Sequence[str]) -> Tensor:
        return torch.tensor([quoted_text(p) is not None for p in prompts], dtype=torch.bool)

    def read(self, images: Tensor) -> list[str]:
        """Text read in each image ``[B, 3, H, W]`` in ``[0, 1]`` -> ``B`` strings."""
        if self.upscale != 1.0:
            h, w = images.shape[-2:]
            size = (max(1, round(h * self.upscale)), max(1, round(w * self.upscale)))
            images = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True)
        arrays = [a[..., ::-1].copy() for a in to_uint8_hwc(images)]  # RapidOCR takes BGR arrays
        texts = []
        for arr in arrays:
            result, _ = self.engine(arr, use_det=self.use_det, use_cls=self.use_cls, use_rec=True)
            parts = []
            for item in result or []:
                text, conf = (item[1], item[2]) if self.use_det else (item[0], item[1])
                if float(conf) >= self.min_confidence:
                    parts.append(str(text))
            texts.append(" ".join(parts))
        return texts

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        targets = [quoted_text(p) for p in prompts]
        values = torch.zeros(len(prompts), dtype=torch.float32)
        idx = [i for i, t in enumerate(targets) if t is not None]
        if idx:
            texts = self.read(images[idx])
            for i, text in zip(idx, texts):
                values[i] = ocr_similarity(text, targets[i])
        return values.to(images.device)
