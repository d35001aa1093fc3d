"""The toy world's five rewards, preconfigured (the K = 5 of ``configs/marble.yaml``).

=============== ================================================== ====================
name            what it measures                                   applies to
=============== ================================================== ====================
``composition`` GenEval-style graded credit for counts, colours,   count / relation
                shapes and left/right, read by the exact toy       prompts
                detector (:class:`~.detector.ToyDetector`)
``ocr``         RapidOCR reading of the quoted word: half          text prompts
                ``1 - min(edit distance, len) / len``, half the
                recogniser's CTC likelihood of the word
``quality``     no-reference quality: sharpness, contrast,         count / relation
                colourfulness, clean background (:mod:`.quality`;  prompts
                it misjudges black text, so text is masked)
``jpeg``        JPEG compressibility, ``-kB`` at quality 95,       all
                capped at ``JPEG_CAP`` (see :class:`ToyJPEGReward`)
``clip``        cosine of a tiny open_clip model trained on toy    all
                image-caption pairs (shipped in ``assets/``)
=============== ================================================== ====================

``composition`` and ``ocr`` are specialists: each is masked on the other's prompts, which is the
specialist-sample situation MARBLE is designed for; ``quality`` covers the shape scenes.
"""

from __future__ import annotations

from marble_lightning.rewards.base import RewardModel
from marble_lightning.rewards.clip_score import OpenCLIPScoreReward
from marble_lightning.rewards.composition import CompositionReward
from marble_lightning.rewards.jpeg import JPEGCompressibilityReward
from marble_lightning.rewards.ocr import OCRReward
from marble_lightning.toy import asset_path
from marble_lightning.toy.detector import ToyDetector
from marble_lightning.toy.prompts import COLORS
from marble_lightning.toy.quality import QualityReward
from marble_lightning.toy.world import SHAPES

__all__ = [
    "JPEG_CAP",
    "ToyCLIPReward",
    "ToyCompositionReward",
    "ToyJPEGReward",
    "ToyOCRReward",
    "default_rewards",
]


class ToyCompositionReward(CompositionReward):
    """:class:`CompositionReward` with the exact toy detector and the toy world's vocabulary.

    Exact counts (an extra object costs credit) and the axis position rule (the toy layout only
    fixes x), as measured to give 1.0 on every ground-truth render.
    """

    def __init__(self, mode: str = "graded", name: str = "composition") -> None:
        super().__init__(
            ToyDetector(),
            mode=mode,
            count_mode="exact",
            position_rule="axis",
            colors=list(COLORS),
            classes=list(SHAPES),
            name=name,
        )


class ToyOCRReward(OCRReward):
    """:class:`OCRReward` (RapidOCR, recognition only) named ``ocr``, half edit score, half CTC
    likelihood.

    A 3-letter word's edit score takes 4 values and most of a group of 6 images often share one,
    which leaves the group no advantage to learn from; the likelihood term (``likelihood_weight``,
    see :class:`OCRReward`) grades every image. Measured on 192 base-model samples of the training
    text prompts: edit score 0.0 / 0.33 / 0.67 / 1.0 on 47 / 53 / 74 / 18 images; within those
    groups the likelihood term spreads 0.01 / 0.05 / 0.17 / 0.92 (mean) with std 0.01-0.2.
    ``likelihood_weight=0`` gives the plain edit score (the ``ocr_edit`` evaluation reward of
    ``configs/marble.yaml``).
    """

    def __init__(
        self, upscale: float = 1.0, likelihood_weight: float = 0.5, name: str = "ocr"
    ) -> None:
        super().__init__(upscale=upscale, likelihood_weight=likelihood_weight, name=name)


JPEG_CAP = -1.13
"""Cap of the toy ``jpeg`` reward, in -kB: the mean size of ground-truth renders of the training
prompts (-1.14 kB over 3 renders per prompt: counts -1.16, relations -1.15, text -1.12; single
renders range from -1.55 to -0.83), a blank image measures -0.64. Without a cap, RL reached
-0.83 kB in 40 steps by erasing objects and text (composition fell from 0.79 to 0.43); with a cap
of -1.10 (above every family's mean) it still gained by thinning text, and held-out OCR fell:
compressibility past a clean render's typical size only rewards removing content."""


class ToyJPEGReward(JPEGCompressibilityReward):
    """:class:`JPEGCompressibilityReward` at quality 95, capped at :data:`JPEG_CAP`, named
    ``jpeg``."""

    def __init__(self, max_score: float | None = JPEG_CAP, name: str = "jpeg") -> None:
        super().__init__(quality=95, max_score=max_score, name=name)


class ToyCLIPReward(OpenCLIPScoreReward):
    """CLIP score from the tiny open_clip model shipped in ``marble_lightning/toy/assets``."""

    def __init__(self, scale: float = 1.0, name: str = "clip") -> None:
        super().__init__(
            model_config=str(asset_path("toy_clip.json")),
            checkpoint=str(asset_path("toy_clip.safetensors")),
            scale=scale,
            name=name,
        )

    def _build(self):
        # open_clip's model-config registry is per process: ``__init__`` registered the toy config
        # in the process that built this reward, but a process that only unpickled it (a
        # ``ddp_spawn`` / ``forkserver`` worker) has an empty registry, so register it here, lazily,
        # in whichever process loads the model
        import open_clip

        if self.model_name not in open_clip.list_models():
            open_clip.add_model_config(asset_path("toy_clip.json"))
        return super()._build()


def default_rewards() -> list[RewardModel]:
    """The five toy rewards in the order of ``configs/marble.yaml``."""
    return [
        ToyCompositionReward(),
        ToyOCRReward(),
        QualityReward(name="quality"),
        ToyJPEGReward(),
        ToyCLIPReward(),
    ]
