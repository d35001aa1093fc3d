"""The contract between :class:`~marble_lightning.module.MarbleDiffusionModule` and a denoiser.

Conventions (rectified flow, as in SD3 and DiffusionNFT):

* ``t`` in ``[0, 1]``; ``t = 0`` is data, ``t = 1`` is pure noise.
* ``x_t = (1 - t) * x0 + t * eps``; the model predicts the velocity ``v = eps - x0``,
  so ``x0 = x_t - t * v``.
* Sampling integrates from ``t = 1`` down to ``t = 0``:
  ``x_{t'} = x_t + (t' - t) * v``.

A backbone owns the trainable ``denoiser`` (LoRA adapters are attached to it by the module),
the frozen text conditioning and the decoder from the model space to images in ``[0, 1]``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Conditioning = dict[str, Tensor]
"""Batch-first tensors produced by :meth:`FlowBackbone.encode_prompts` (row ``i`` is prompt
``i``)."""


@runtime_checkable
class FlowBackbone(Protocol):
    """A flow-matching text-to-image model seen through four calls.

    Attributes:
        denoiser: the network LoRA adapters are attached to; only ``velocity`` calls it.
        sample_shape: shape of one model-space sample ``x``: ``(C, H, W)`` for images,
            ``(C, F, H, W)`` for videos (e.g. :class:`~marble_lightning.backbones.WanBackbone`);
            the sampler, the noise and the NFT loss work for any shape.
        lora_target_modules: default module-name patterns for LoRA on ``denoiser``.
    """

    denoiser: nn.Module
    sample_shape: tuple[int, ...]
    lora_target_modules: list[str]

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encode ``B`` prompts (``""`` is the unconditional prompt) into batch-first tensors."""
        ...

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Predict ``v = eps - x0``. ``x``: ``[B, *sample_shape]``; ``t``: ``[B]`` in ``[0, 1]``."""
        ...

    def decode(self, x: Tensor) -> Tensor:
        """Map model-space samples ``[B, *sample_shape]`` to images ``[B, 3, H', W']`` (videos:
        ``[B, F, 3, H', W']``) in ``[0, 1]``; rewards receive exactly this."""
        ...


def index_conditioning(cond: Conditioning, index: Tensor | slice) -> Conditioning:
    """Select rows of every tensor in ``cond``."""
    return {k: v[index] for k, v in cond.items()}


def cat_conditioning(conds: list[Conditioning]) -> Conditioning:
    """Concatenate conditionings along the batch dimension."""
    keys = conds[0].keys()
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in keys}
