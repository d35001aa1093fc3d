"""``QwenImageBackbone``: Qwen-Image (diffusers ``QwenImagePipeline``) as a :class:`FlowBackbone`.

What the pipeline does and we reproduce (checked against ``QwenImagePipeline`` by
``tests/test_backbones_qwen_image.py``):

* the model space is the latent of Qwen-Image's VAE (``AutoencoderKLQwenImage``, a causal video
  VAE used on one frame) ``[C, H, W]`` (``C = 16``, ``H = W = res / 8``); the transformer sees
  it packed in 2x2 patches ``[B, H W / 4, 4 C]`` with ``img_shapes = (1, H / 2, W / 2)`` for
  its 3-axis RoPE; ``velocity`` packs, calls and unpacks;
* prompts: the last hidden state of the Qwen2.5-VL text encoder on the pipeline's chat template
  (its first 34 template tokens dropped). The pipeline pads to the longest prompt of the batch;
  we pad (or truncate) to ``max_sequence_length`` with ``prompt_embeds_mask`` marking the real
  tokens, so batches of different prompts concatenate (the module batches conditional and
  unconditional halves). The transformer masks padded text tokens out of attention and numbers
  text RoPE positions from the first token, so the padding changes nothing but round-off;
* time: ``timestep = sigma``; the grid: ``sigmas = linspace(1, 1/N, N)`` with the
  resolution-dependent shift ``mu`` (dynamic, exponential shifting with Qwen-Image's
  ``shift_terminal``), then 0;
* decoding: ``latents * latents_std + latents_mean`` through the VAE (one frame).

CFG: the pipeline's ``true_cfg_scale`` also rescales the guided prediction to the conditional
prediction's norm per token; the module's ``cfg_scale`` is plain CFG (``v_u + s (v_c - v_u)``)
without that rescale, so only ``cfg_scale = 1`` is the pipeline's sampler exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from marble_lightning.backbone import Conditioning
from marble_lightning.backbones._diffusers import MMDIT_LORA_TARGET_MODULES, DiffusersBackbone
from marble_lightning.backbones.flux import pack_latents, unpack_latents

__all__ = ["QWEN_IMAGE_LORA_TARGET_MODULES", "QwenImageBackbone"]

QWEN_IMAGE_LORA_TARGET_MODULES: list[str] = list(MMDIT_LORA_TARGET_MODULES)
"""Attention projections of Qwen-Image's dual-stream MMDiT blocks (image and text streams)."""


class QwenImageBackbone(DiffusersBackbone):
    """Qwen-Image latent flow model implementing :class:`~marble_lightning.backbone.FlowBackbone`.

    Args:
        pretrained: a local ``QwenImagePipeline`` directory or a hub id.
        resolution: image side in pixels, a multiple of ``2 * vae_scale_factor`` (16).
        torch_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        max_sequence_length: text tokens per prompt after the template (pad/truncate; <= 1024).
        variant: weight-file variant.
        gradient_checkpointing: activation checkpointing of the transformer blocks.

    Attributes:
        denoiser: the ``QwenImageTransformer2DModel`` (base weights frozen).
        sample_shape: ``(C, resolution / f, resolution / f)``.
        lora_target_modules: :data:`QWEN_IMAGE_LORA_TARGET_MODULES`.
    """

    pipeline_class = "QwenImagePipeline"
    frozen_names = ("vae", "text_encoder")
    default_lora_targets = tuple(QWEN_IMAGE_LORA_TARGET_MODULES)

    def __init__(
        self,
        pretrained: str,
        *,
        resolution: int = 512,
        torch_dtype: str = "float32",
        max_sequence_length: int = 512,
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
        )

    def _configure(
        self, pipeline: Any, *, resolution: int = 512, max_sequence_length: int = 512
    ) -> None:
        config = self.denoiser.config
        self._configure_image(
            resolution,
            max_sequence_length,
            vae_factor=int(pipeline.vae_scale_factor),
            patch=2,
            channels=config.in_channels // 4,
        )
        if max_sequence_length > 1024:
            raise ValueError(
                f"QwenImageBackbone: max_sequence_length={max_sequence_length} must be <= 1024"
            )
        self.guidance_embeds = bool(config.guidance_embeds)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """``{"prompt_embeds": [B, L, D], "prompt_embeds_mask": [B, L]}`` with
        ``L = max_sequence_length``."""
        prompts = self._check_prompts(prompts)
        embeds, mask = self.pipeline._get_qwen_prompt_embeds(prompts, self.device)
        embeds = embeds[:, : self.max_sequence_length]
        mask = mask[:, : self.max_sequence_length]
        pad = self.max_sequence_length - embeds.shape[1]
        if pad > 0:
            embeds = torch.cat(
                [embeds, embeds.new_zeros(embeds.shape[0], pad, embeds.shape[2])], dim=1
            )
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``v = eps - x0`` for latents ``x`` ``[B, C, H, W]`` at times ``t`` ``[B]``."""
        t = self._check_xt(x, t)
        b, _, h, w = x.shape
        dtype = self.denoiser.dtype
        guidance = None
        if self.guidance_embeds:  # no released Qwen-Image model is guidance-distilled
            guidance = torch.ones(b, device=x.device, dtype=torch.float32)
        out = self.denoiser(
            hidden_states=pack_latents(x.to(dtype)),
            timestep=t.to(dtype),
            guidance=guidance,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_hidden_states_mask=cond["prompt_embeds_mask"],
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x.dtype)

    def decode(self, x: Tensor) -> Tensor:
        """Latents ``[B, C, H, W]`` -> float32 images ``[B, 3, H f, W f]`` in ``[0, 1]``."""
        return self._decode_normalized(x[:, :, None])[:, :, 0]  # one frame of the video VAE

    def _pipeline_sigmas(self, steps: int) -> Any:
        return self._flux_sigmas(steps)

    def _shift_mu(self, scheduler: Any) -> float | None:
        return self._resolution_shift(scheduler, patch=2, max_shift=1.15)
