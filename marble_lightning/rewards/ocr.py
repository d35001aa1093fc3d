"""OCR reward: does the image show the text quoted in the prompt?

Target text: the double-quoted span(s) of the prompt (``'a sign that says "cat"'`` -> ``cat``;
several spans are concatenated). Prompts without a non-empty quoted span are masked.

Score, on lowercased strings with all whitespace removed (``t`` = target, ``r`` = text read)::

    d = 0                       if t is a substring of r
    d = levenshtein(r, t)       otherwise
    score = 1 - min(d, len(t)) / len(t)          in [0, 1]

Optional dense term (``likelihood_weight`` ``w`` > 0): the recogniser's CTC probability of the
target, ``q = p(t | image) ** (1 / len(t))`` (per-character geometric mean, letter case folded:
a character's probability is the sum over its upper- and lower-case classes), mixed in as
``score = (1 - w) * edit_score + w * q``. The edit score of a 3-letter word takes only 4 values and
is 0 for most smeared words; ``q`` moves with every change of the recogniser's per-frame
probabilities, which gives a weak generator a gradient signal before it spells the word right.
Both terms come from one forward pass of the recogniser.

The reader is RapidOCR (PaddleOCR ONNX models shipped with ``rapidocr-onnxruntime``), by default in
recognition-only mode (``use_det=False, use_cls=False``): the whole image is read as one text line,
which suits small renders (32-64 px) with one word. With detection on it reads every detected line
and concatenates them (slower; worse on tiny images).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from marble_lightning.checks import check_float, check_int
from marble_lightning.rewards._loading import to_uint8_hwc
from marble_lightning.rewards.base import RewardModel

_QUOTED = re.compile(r"\"([^\"]*)\"|\u201c([^\u201d]*)\u201d")


def quoted_text(prompt: str) -> str | None:
    """The text inside the prompt's double quotes (``"..."`` or curly), or ``None`` if there is
    none.

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


def _checked(target: str) -> str:
    """The normalised target; raises ``ValueError`` naming it when it is empty."""
    t = normalize_text(target)
    if not t:
        raise ValueError(f"OCR target text is empty after removing whitespace: {target!r}")
    return t


def ocr_similarity(read: str, target: str) -> float:
    """``1 - min(d, len(t)) / len(t)`` on normalised strings (see module docstring).

    Raises:
        ValueError: the target is empty after normalisation.
    """
    r, t = normalize_text(read), _checked(target)
    d = 0 if t in r else edit_distance(r, t)
    return 1.0 - min(d, len(t)) / len(t)


def ctc_casefold_probability(
    probs: np.ndarray, classes: Sequence[Sequence[int]], max_spellings: int = 64
) -> float:
    """CTC probability of reading a target whose position ``j`` may be any class in ``classes[j]``.

    Args:
        probs: ``[T, C]`` per-frame class probabilities, class 0 the CTC blank.
        classes: for each target character, the classes that spell it (e.g. ``c`` and ``C``).

    Returns:
        The sum, over every frame labelling that collapses (merge repeats, drop blanks) to one
        of the spellings, of its probability. States are the blank after position ``j`` and
        (position ``j``, spelling ``v``); a step from ``(j-1, v')`` to ``(j, v)`` without a blank
        is allowed only between different classes, as in CTC. Per-frame rescaling keeps it
        finite for long ``T``. 0 when a position has no class or ``T`` is too short.

    Up to ``max_spellings`` spellings (8 for a 3-letter word) it sums the CTC probability of each
    spelling (``torch.nn.functional.ctc_loss``, about 2x faster than the Python forward pass below);
    beyond, it runs the forward pass over (position, spelling) states. Both are exact.
    """
    p = np.asarray(probs, dtype=np.float64)
    if any(len(c) == 0 for c in classes):
        return 0.0
    spellings = math.prod(len(c) for c in classes)
    if (
        spellings <= max_spellings
    ):  # every spelling is a distinct string: sum their CTC probabilities
        log_probs = torch.from_numpy(p).clamp_min(1e-300).log()[:, None].expand(-1, spellings, -1)
        targets = torch.tensor(list(itertools.product(*classes)), dtype=torch.long).reshape(
            spellings, len(classes)
        )
        nll = F.ctc_loss(
            log_probs,
            targets,
            torch.full((spellings,), p.shape[0], dtype=torch.long),
            torch.full((spellings,), len(classes), dtype=torch.long),
            blank=0,
            reduction="none",
            zero_infinity=False,
        )
        total = torch.logsumexp(-nll, 0)
        return float(total.exp()) if torch.isfinite(total) else 0.0
    n = len(classes)
    blank = np.zeros(n + 1)  # blank[j + 1]: j characters read, now in a blank
    blank[0] = 1.0
    chars = [np.zeros(len(c)) for c in classes]  # chars[j][v]: reading character j as classes[j][v]
    log_scale = 0.0
    for frame in p:
        new_blank = (blank + np.array([0.0] + [c.sum() for c in chars])) * frame[0]
        new_chars = []
        for j, cls in enumerate(classes):
            enter = np.full(len(cls), blank[j])
            if j > 0:
                prev = classes[j - 1]
                for v, k in enumerate(cls):
                    enter[v] += sum(a for a, k2 in zip(chars[j - 1], prev) if k2 != k)
            new_chars.append((chars[j] + enter) * frame[list(cls)])
        total = new_blank.sum() + sum(c.sum() for c in new_chars)
        if total == 0.0:
            return 0.0
        blank, chars = new_blank / total, [c / total for c in new_chars]
        log_scale += np.log(total)
    end = blank[n] + chars[n - 1].sum()
    return float(np.exp(np.log(end) + log_scale)) if end > 0 else 0.0


class OCRReward(RewardModel):
    """RapidOCR text-match reward; masked on prompts with no quoted text.

    Args:
        upscale: resize factor applied to the images before reading (bicubic, antialiased);
            ``1.0`` reads them as they are. Helps on very small renders.
        use_det: run RapidOCR's text detector first (default ``False``: recognition only).
        use_cls: run the text-direction classifier (default ``False``).
        min_confidence: recognised strings with a lower confidence are treated as empty.
        likelihood_weight: weight ``w`` in ``[0, 1]`` of the CTC-likelihood term (see the module
            docstring; default 0: the edit score alone). Needs ``use_det=False``.
        num_threads: ONNX Runtime intra-op threads: an int (default 1), ``"torch"`` for as many
            as torch's intra-op threads when the engine is created (``torch.get_num_threads()``:
            all cores in one process, fewer per DDP rank), or ``None`` for ONNX Runtime's own
            default (all cores, 2.5x slower on a 2-core machine busy with other jobs). Two threads
            instead of one read a 32 x 32 toy render in 29 instead of 34-41 ms on an idle 2-core
            Intel Xeon; the default stays 1 because the thread count changes the float rounding of
            the scores, and with it a seeded run's trajectory.
        name: reward name in logs.

    Measured (2-core CPU shared with other jobs, load ~5, recognition only, one thread, after
    warm-up): 23 ms per 32 x 32 toy-world render, 27 ms per 64 x 64 render, 28-32 ms with
    ``upscale=2``; about 13-15 ms on an idle core. Ground-truth renders score 1.0.
    """

    name = "ocr"
    _latest: dict[tuple, tuple[str, float, np.ndarray]] = {}
    """Readings of the latest batch, shared across instances (see :meth:`_recognize`)."""

    def __init__(
        self,
        upscale: float = 1.0,
        use_det: bool = False,
        use_cls: bool = False,
        min_confidence: float = 0.0,
        num_threads: int | Literal["torch"] | None = 1,
        likelihood_weight: float = 0.0,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.upscale = check_float("upscale", upscale, minimum=0.0, strict=True)
        self.use_det = bool(use_det)
        self.use_cls = bool(use_cls)
        self.min_confidence = check_float(
            "min_confidence", min_confidence, minimum=0.0, maximum=1.0
        )
        if num_threads is None or num_threads == "torch":
            self.num_threads: int | str | None = num_threads
        else:
            self.num_threads = check_int("num_threads", num_threads)
        likelihood_weight = check_float(
            "likelihood_weight", likelihood_weight, minimum=0.0, maximum=1.0
        )
        if likelihood_weight > 0 and self.use_det:
            raise ValueError(
                "OCRReward: likelihood_weight > 0 needs use_det=False (the likelihood is of the"
                " whole image read as one line)"
            )
        self.likelihood_weight = likelihood_weight
        self._engine = None
        self._model_key: tuple = ()
        self._fold_table: dict[str, list[int]] | None = None

    @property
    def engine(self):
        """The RapidOCR engine, created on first use."""
        if self._engine is None:
            from rapidocr_onnxruntime import RapidOCR

            kwargs = {}
            if self.num_threads is not None:
                threads = self.num_threads
                if threads == "torch":
                    threads = torch.get_num_threads()
                kwargs = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
            self._engine = RapidOCR(**kwargs)
            rec = self._engine.text_rec
            onnx = getattr(rec.session, "session", None)
            self._model_key = (getattr(onnx, "_model_path", None) or id(rec), *rec.rec_image_shape)
        return self._engine

    def applies_to(self, prompts: Sequence[str]) -> Tensor:
        return torch.tensor([quoted_text(p) is not None for p in prompts], dtype=torch.bool)

    def _arrays(self, images: Tensor) -> list:
        if self.upscale != 1.0:
            h, w = images.shape[-2:]
            size = (max(1, round(h * self.upscale)), max(1, round(w * self.upscale)))
            images = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True)
        return [a[..., ::-1].copy() for a in to_uint8_hwc(images)]  # RapidOCR takes BGR arrays

    def read(self, images: Tensor) -> list[str]:
        """Text read in each image ``[B, 3, H, W]`` in ``[0, 1]`` -> ``B`` strings."""
        if not self.use_det:
            return [text for text, _ in self._recognize(images)]
        texts = []
        for arr in self._arrays(images):
            result, _ = self.engine(arr, use_det=True, use_cls=self.use_cls, use_rec=True)
            parts = [str(t) for _, t, c in result or [] if float(c) >= self.min_confidence]
            texts.append(" ".join(parts))
        return texts

    def _recognize(self, images: Tensor) -> list[tuple[str, np.ndarray]]:
        """Recognition only: ``(text, per-frame class probabilities [T, C])`` per image.

        Same steps as RapidOCR's recognition-only call (its size preprocessing, optional direction
        classifier, the recogniser's resize and normalisation, CTC greedy decoding), keeping the
        recogniser's output probabilities. The latest batch's readings are shared by every
        instance (keyed by the image bytes and the reading settings), so two OCR rewards scoring
        the same images, e.g. a trained ``ocr`` and an evaluation-only ``ocr_edit``, run the
        recogniser once per image.
        """
        engine = self.engine
        rec = engine.text_rec
        out = []
        readings: dict[tuple, tuple[str, float, np.ndarray]] = {}
        model = self._model_key
        for arr in self._arrays(images):
            digest = hashlib.blake2b(arr.tobytes(), digest_size=16).digest()
            key = (model, self.upscale, self.use_cls, arr.shape, digest)
            reading = readings.get(key) or OCRReward._latest.get(key)
            if reading is None:
                img = engine.preprocess(arr)[0]
                if self.use_cls:
                    img = engine.text_cls([img])[0][0]
                _, rec_h, rec_w = rec.rec_image_shape[:3]
                h, w = img.shape[:2]
                batch = rec.resize_norm_img(img, max(rec_w / rec_h, w / h))
                probs = rec.session(batch[None].astype(np.float32))[0]  # [1, T, C], softmax
                text, conf = rec.postprocess_op(probs)[0][:2]
                reading = (str(text), float(conf), probs[0])
            readings[key] = reading
            text, conf, frames = reading
            out.append((text if conf >= self.min_confidence else "", frames))
        OCRReward._latest = readings
        return out

    def _folded_classes(self, char: str) -> list[int]:
        """Recogniser classes that read as ``char`` after lowercasing."""
        table = self._fold_table
        if table is None:
            table = {}
            for i, c in enumerate(self.engine.text_rec.postprocess_op.character):
                if i > 0 and len(c) == 1:
                    table.setdefault(c.lower(), []).append(i)
            self._fold_table = table
        return table.get(char, [])

    def target_likelihood(self, probs: np.ndarray, target: str) -> float:
        """``p(target | frames) ** (1 / len(target))``, case folded; ``probs`` ``[T, C]``.

        ``p`` is the probability that a frame labelling drawn from ``probs`` collapses (CTC: merge
        repeats, drop blanks) to ``target`` up to letter case; see :func:`ctc_casefold_probability`.
        """
        t = _checked(target)
        return ctc_casefold_probability(probs, [self._folded_classes(c) for c in t]) ** (1 / len(t))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        targets = [quoted_text(p) for p in prompts]
        values = torch.zeros(len(prompts), dtype=torch.float32)
        idx = [i for i, t in enumerate(targets) if t is not None]
        if not idx:
            return values.to(images.device)
        w = self.likelihood_weight
        if w > 0:
            for i, (text, probs) in zip(idx, self._recognize(images[idx])):
                edit = ocr_similarity(text, targets[i])
                values[i] = (1 - w) * edit + w * self.target_likelihood(probs, targets[i])
        else:
            for i, text in zip(idx, self.read(images[idx])):
                values[i] = ocr_similarity(text, targets[i])
        return values.to(images.device)
