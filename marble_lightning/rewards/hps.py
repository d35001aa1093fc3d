"""HPS v2.1 (Human Preference Score v2.1, Wu et al., 2023).

An open_clip ViT-H-14 whose weights are replaced by the HPS v2.1 checkpoint
(``HPS_v2.1_compressed.pt``, a ``{"state_dict": ...}`` torch file, read with
``weights_only=True``). As in the reference ``hpsv2`` scorer, the score is the diagonal of
``image_features @ text_features.T`` with both L2-normalised, i.e. the plain cosine (no logit
scale); typical values are 0.2-0.35.
"""

from __future__ import annotations

from collections.abc import Sequence

from marble_lightning.rewards._loading import require_file
from marble_lightning.rewards.clip_score import OpenCLIPScoreReward


class HPSv21Reward(OpenCLIPScoreReward):
    """HPS v2.1 score: cosine of the fine-tuned open_clip ViT-H-14 embeddings.

    Args:
        checkpoint: the HPS v2.1 checkpoint file (required; ``FileNotFoundError`` if missing).
        model_config: open_clip architecture (``"ViT-H-14"``) or a model-config JSON path.
        image_mean: per-channel mean override (default: the architecture's, OpenAI CLIP's).
        image_std: per-channel std override.
        batch_size: images per forward pass (``None``: all at once).
        dtype: model dtype.
        name: reward name in logs.
    """

    name = "hpsv21"

    def __init__(
        self,
        checkpoint: str,
        model_config: str = "ViT-H-14",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        batch_size: int | None = None,
        dtype: str = "float32",
        name: str | None = None,
    ) -> None:
        if checkpoint is None:
            raise ValueError("HPSv21Reward: checkpoint (the HPS v2.1 weights file) is required")
        path = require_file(checkpoint, name or self.name)
        super().__init__(
            model_config=model_config,
            checkpoint=str(path),
            scale=1.0,
            image_mean=image_mean,
            image_std=image_std,
            batch_size=batch_size,
            dtype=dtype,
            name=name,
        )
