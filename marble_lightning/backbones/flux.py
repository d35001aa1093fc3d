"""``FluxBackbone``: FLUX.1-dev / FLUX.1-schnell (diffusers ``FluxPipeline``) as a
:class:`FlowBackbone`.

What the pipeline does and we reproduce (checked against ``FluxPipeline`` by
``tests/test_backbones_flux.py``):

* the model space is the VAE latent ``[C, H, W]`` (``C = 16`` for FLUX.1, ``H = W = res / 8``);
  the transformer sees it **packed**: 2x2 patches flattened to a sequence ``[B, H W / 4, 4 C]``
  with 3-axis position ids ``img_ids`` (``0, row, column``); ``velocity`` packs, calls, unpacks,
  so everything else (noise, NFT targets, rewards) works on the unpacked latent;
* prompts: pooled CLIP-L (``pooled_projections``) plus T5 tokens (``encoder_hidden_states``,
  ``max_sequence_length`` of them); text ids are zeros;
* time: the transformer takes ``timestep = sigma`` (the pipeline divides its ``1000 sigma`` back);
* guidance: FLUX.1-dev is guidance-distilled, the guidance scale is an *input*
  (``guidance_embeds=True``; ``guidance_scale``, 3.5 by default); schnell has none. True CFG
  (the pipeline's ``true_cfg_scale`` with a negative prompt) is the module's ``cfg_scale``
  with the empty prompt as negative;
* the grid: ``sigmas = linspace(1, 1/N, N)`` shifted with the resolution-dependent ``mu``
  (``calculate_shift`` of the packed sequence length) when the scheduler uses dynamic shifting
  (FLUX.1-dev), then a final 0;
* decoding: ``latents / scaling_factor + shift_factor`` through the VAE, ``[-1, 1] -> [0, 1]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from marble_lightning.backbone import Conditioning
from marble_lightning.backbones._diffusers import MMDIT_LORA_TARGET_MODULES, DiffusersBackbone

__all__ = ["FLUX_LORA_TARGET_MODULES", "FluxBackbone", "pack_latents", "unpack_latents"]

FLUX_LORA_TARGET_MODULES: list[str] = list(MMDIT_LORA_TARGET_MODULES)
"""Attention projections of FLUX's double-stream (image + text) and single-stream blocks."""


def pack_latents(x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, H W / 4, 4 C]`` (2x2 patches, as ``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height x width``."""
    b, _, d = x.shape
    x = x.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[(H/2) (W/2), 3]`` position ids ``(0, row, column)`` of the packed sequence."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxBackbone(DiffusersBackbone):
    """FLUX.1 latent flow model implementing :class:`~marble_lightning.backbone.FlowBackbone`.

    Args:
        pretrained: a local ``FluxPipeline`` directory or a hub id (FLUX.1-dev / schnell).
        resolution: image side in pixels, a multiple of ``2 * vae_scale_factor`` (16).
        torch_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (inputs are cast to it and
            outputs cast back).
        max_sequence_length: T5 tokens per prompt (FLUX.1-dev: up to 512, schnell 256).
        guidance_scale: the distilled guidance input of guidance-embedding models (FLUX.1-dev);
            ignored when the transformer has no guidance embedding (schnell).
        variant: weight-file variant.
        gradient_checkpointing: activation checkpointing of the transformer blocks.

    Attributes:
        denoiser: the ``FluxTransformer2DModel`` (base weights frozen).
        sample_shape: ``(C, resolution / f, resolution / f)``: the unpacked latent.
        lora_target_modules: :data:`FLUX_LORA_TARGET_MODULES`.
        pipeline: the underlying ``FluxPipeline``.
    """

    pipeline_class = "FluxPipeline"
    frozen_names = ("vae", "text_encoder", "text_encoder_2")
    default_lora_targets = tuple(FLUX_LORA_TARGET_MODULES)

    def __init__(
        self,
        pretrained: str,
        *,
        resolution: int = 512,
        torch_dtype: str = "float32",
        max_sequence_length: int = 512,
        guidance_scale: float = 3.5,
        variant: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            pretrained,
            torch_dtype=torch_dtype,
            variant=variant,
            gradient_checkpointing=gradient_checkpointing,
            resolution=resolution,
            max_sequence_length=max_sequence_length,
            guidance_scale=guidance_scale,
        )

    def _configure(
        self,
        pipeline: Any,
        *,
        resolution: int = 512,
        max_sequence_length: int = 512,
        guidance_scale: float = 3.5,
    ) -> None:
        config = self.denoiser.config
        self._configure_image(
            resolution,
            max_sequence_length,
            vae_factor=2 ** (len(pipeline.vae.config.block_out_channels) - 1),
            patch=2,
            channels=config.in_channels // 4,
        )
        self.guidance_scale = float(guidance_scale)
        self.guidance_embeds = bool(config.guidance_embeds)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """``{"prompt_embeds": [B, max_sequence_length, D_t5],
        "pooled_prompt_embeds": [B, D_clip]}``."""
        prompts = self._check_prompts(prompts)
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=prompts,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``v = eps - x0`` for unpacked latents ``x`` ``[B, C, H, W]`` at times ``t`` ``[B]``."""
        t = self._check_xt(x, t)
        b, _, h, w = x.shape
        dtype = self.denoiser.dtype
        embeds = cond["prompt_embeds"].to(dtype)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32)
        out = self.denoiser(
            hidden_states=pack_latents(x.to(dtype)),
            timestep=t.to(dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype),
            img_ids=latent_image_ids(h, w, x.device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x.dtype)

    def _pipeline_sigmas(self, steps: int) -> Any:
        if self.pipeline.scheduler.config.get("use_flow_sigmas", False):
            return None
        return self._flux_sigmas(steps)

    def _shift_mu(self, scheduler: Any) -> float | None:
        return self._resolution_shift(scheduler, patch=2, max_shift=1.15)
