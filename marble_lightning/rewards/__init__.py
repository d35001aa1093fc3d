"""Reward models: one file per family, all behind
:class:`~marble_lightning.rewards.base.RewardModel`.

Every reward maps ``images [B, 3, H, W] in [0, 1]`` and ``B`` prompts to float32 ``[B]`` and says
with ``applies_to(prompts) -> bool [B]`` where it has an opinion. Model weights load lazily on the
first call, from a local path or a hub id, and stay outside the ``nn.Module`` tree (never in a
training checkpoint).
"""

from marble_lightning.rewards.aesthetic import AestheticReward
from marble_lightning.rewards.base import (
    MultiReward,
    RewardBatch,
    RewardError,
    RewardModel,
    check_images,
)
from marble_lightning.rewards.clip_score import CLIPScoreReward, OpenCLIPScoreReward
from marble_lightning.rewards.composition import CompositionReward
from marble_lightning.rewards.detection import Detection, Detector
from marble_lightning.rewards.hps import HPSv21Reward
from marble_lightning.rewards.image_reward import ImageRewardReward
from marble_lightning.rewards.jpeg import JPEGCompressibilityReward
from marble_lightning.rewards.ocr import OCRReward
from marble_lightning.rewards.owl_detector import OwlDetector
from marble_lightning.rewards.pickscore import PickScoreReward

__all__ = [
    "AestheticReward",
    "CLIPScoreReward",
    "CompositionReward",
    "Detection",
    "Detector",
    "HPSv21Reward",
    "ImageRewardReward",
    "JPEGCompressibilityReward",
    "MultiReward",
    "OCRReward",
    "OpenCLIPScoreReward",
    "OwlDetector",
    "PickScoreReward",
    "RewardBatch",
    "RewardError",
    "RewardModel",
    "check_images",
]
