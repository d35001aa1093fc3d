"""PickScore (Kirstain et al., 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

``score = exp(logit_scale) * cos(f_img, f_txt)`` (the model's own logit, about 15-25 for real
images), optionally divided by ``normalize`` (DiffusionNFT uses 26 to bring it near [0, 1]).
Checkpoint: a transformers ``CLIPModel`` folder/hub id (``yuvalkirstain/PickScore_v1``); the
processor comes from the base model (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from marble_lightning.checks import check_float
from marble_lightning.rewards.clip_score import TransformersCLIPReward


class PickScoreReward(TransformersCLIPReward):
    """PickScore reward.

    Args:
        model: local folder or hub id of the PickScore ``CLIPModel``.
        processor: local folder or hub id of the processor (tokenizer + image settings).
        normalize: if given, the score is divided by it (e.g. ``26.0``).
        batch_size: images per forward pass (``None``: all at once).
        dtype: model dtype.
        name: reward name in logs.
    """

    name = "pickscore"

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        normalize: float | None = None,
        batch_size: int | None = None,
        dtype: str = "float32",
        name: str | None = None,
    ) -> None:
        super().__init__(model, processor, batch_size, dtype, name)
        self.normalize = (
            None
            if normalize is None
            else check_float("normalize", normalize, minimum=0.0, strict=True)
        )

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        model, _ = self.clip(images.device)
        values = model.logit_scale.detach().float().exp() * self.cosine(images, prompts)
        return values / self.normalize if self.normalize is not None else values
