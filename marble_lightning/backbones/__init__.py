"""Diffusers-pipeline backbones beyond SD3: one per model family, sharing :mod:`._diffusers`.

* :class:`FluxBackbone` -- FLUX.1-dev / schnell (``FluxPipeline``);
* :class:`QwenImageBackbone` -- Qwen-Image (``QwenImagePipeline``);
* :class:`WanBackbone` -- Wan 2.1 / 2.2 text-to-video (``WanPipeline``; 5-D latents, video output).

``SD3Backbone`` (a :class:`DiffusersBackbone` too) stays in :mod:`marble_lightning.sd3`; it is
re-exported here lazily, since :mod:`marble_lightning.sd3` imports this package's base.
"""

from typing import Any

from marble_lightning.backbones._diffusers import DiffusersBackbone
from marble_lightning.backbones.flux import FluxBackbone
from marble_lightning.backbones.qwen_image import QwenImageBackbone
from marble_lightning.backbones.wan import WanBackbone

__all__ = ["DiffusersBackbone", "FluxBackbone", "QwenImageBackbone", "SD3Backbone", "WanBackbone"]


def __getattr__(name: str) -> Any:
    if name == "SD3Backbone":
        from marble_lightning.sd3 import SD3Backbone

        return SD3Backbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
