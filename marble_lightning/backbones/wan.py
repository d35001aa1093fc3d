"""``WanBackbone``: Wan 2.1 / 2.2 text-to-video (diffusers ``WanPipeline``) as a
:class:`FlowBackbone`.

What the pipeline does and we reproduce (checked against ``WanPipeline`` by
``tests/test_backbones_wan.py``):

* the model space is the video VAE's latent ``[C, F, H, W]`` (Wan 2.1: ``C = 16``, ``F = (frames
  - 1) / 4 + 1``, ``H = height / 8``, ``W = width / 8``); samples are 5-D ``[B, C, F, H, W]``
  everywhere (noise, rollouts, NFT targets): nothing in the sampler or the update assumes images;
* prompts: UMT5 token states, ``max_sequence_length`` of them, zero beyond each prompt's length
  (exactly the pipeline's padding, which the transformer attends to unmasked);
* time: the transformer takes ``timestep = 1000 sigma`` (per token for Wan 2.2 TI2V's
  ``expand_timesteps``); CFG is the pipeline's ``guidance_scale`` with the empty negative prompt,
  i.e. the module's ``cfg_scale``;
* the grid: the flow-matching Euler scheduler's shifted sigmas (``shift``; Wan's released
  pipelines ship a UniPC scheduler with ``flow_shift``: we then integrate with Euler on the grid
  of a ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``, the sampler the module trains);
* decoding: ``latents * latents_std + latents_mean`` through ``AutoencoderKLWan``, giving
  **videos** ``[B, F', 3, H', W']`` in ``[0, 1]`` (``F' = 4 (F - 1) + 1``): rewards see videos
  (:mod:`marble_lightning.rewards.video`).

Wan 2.2 A14B (two experts switched at ``boundary_ratio``) is not supported: LoRA would have to
live on both transformers; :class:`WanBackbone` raises a clear error for such a pipeline.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from marble_lightning.backbone import Conditioning
from marble_lightning.backbones._diffusers import DiffusersBackbone

__all__ = ["WAN_LORA_TARGET_MODULES", "WanBackbone"]

WAN_LORA_TARGET_MODULES: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
"""Self- and cross-attention projections of Wan's DiT blocks (``attn1`` and ``attn2``)."""


class WanBackbone(DiffusersBackbone):
    """Wan text-to-video latent flow model implementing
    :class:`~marble_lightning.backbone.FlowBackbone`.

    Args:
        pretrained: a local ``WanPipeline`` directory or a hub id (e.g. Wan2.1-T2V-1.3B-Diffusers).
        height: frame height in pixels, a multiple of ``vae_scale_factor_spatial * patch`` (16).
        width: frame width in pixels, same constraint.
        num_frames: frames per clip, ``1 + 4 k`` (the VAE's temporal factor 4).
        torch_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        max_sequence_length: UMT5 tokens per prompt (Wan: 512).
        variant: weight-file variant.
        gradient_checkpointing: activation checkpointing of the transformer blocks.

    Attributes:
        denoiser: the ``WanTransformer3DModel`` (base weights frozen).
        sample_shape: ``(C, F, H, W)`` of the latent video.
        lora_target_modules: :data:`WAN_LORA_TARGET_MODULES`.
        num_frames: frames of a decoded clip.
    """

    pipeline_class = "WanPipeline"
    frozen_names = ("vae", "text_encoder")
    default_lora_targets = tuple(WAN_LORA_TARGET_MODULES)

    def __init__(
        self,
        pretrained: str,
        *,
        height: int = 480,
        width: int = 832,
        num_frames: int = 33,
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
            height=height,
            width=width,
            num_frames=num_frames,
            max_sequence_length=max_sequence_length,
        )

    def _configure(
        self,
        pipeline: Any,
        *,
        height: int = 480,
        width: int = 832,
        num_frames: int = 33,
        max_sequence_length: int = 512,
    ) -> None:
        if getattr(pipeline, "transformer_2", None) is not None:
            raise ValueError(
                "WanBackbone: two-expert Wan 2.2 pipelines (transformer_2, boundary_ratio) are not "
                "supported; use a single-transformer Wan 2.1 / Wan 2.2 TI2V pipeline"
            )
        spatial = int(pipeline.vae_scale_factor_spatial)
        temporal = int(pipeline.vae_scale_factor_temporal)
        patch = tuple(self.denoiser.config.patch_size)
        self.height = self._check_resolution(height, spatial * patch[1], "height")
        self.width = self._check_resolution(width, spatial * patch[2], "width")
        self.num_frames = self._check_positive_int(num_frames, "num_frames")
        if (num_frames - 1) % temporal:
            raise ValueError(f"WanBackbone: num_frames={num_frames} must be 1 + {temporal} k")
        self.max_sequence_length = self._check_positive_int(
            max_sequence_length, "max_sequence_length"
        )
        self.expand_timesteps = bool(pipeline.config.get("expand_timesteps", False))
        self.vae_scale_factor_spatial = spatial
        self.vae_scale_factor_temporal = temporal
        self.timestep_scale = float(pipeline.scheduler.config.num_train_timesteps)
        self.sample_shape = (
            int(self.denoiser.config.in_channels),
            (num_frames - 1) // temporal + 1,
            height // spatial,
            width // spatial,
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """``{"prompt_embeds": [B, max_sequence_length, D]}`` (zeros after each prompt's tokens)."""
        prompts = self._check_prompts(prompts)
        embeds = self.pipeline._get_t5_prompt_embeds(
            prompt=prompts,
            num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"prompt_embeds": embeds}

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``v = eps - x0`` for latent videos ``x`` ``[B, C, F, H, W]`` at times ``t`` ``[B]``."""
        t = self._check_xt(x, t)
        b, _, f, h, w = x.shape
        dtype = self.denoiser.dtype
        timestep = t * self.timestep_scale
        if self.expand_timesteps:  # Wan 2.2 TI2V: one timestep per (2x2-patched) token
            _, ph, pw = self.denoiser.config.patch_size
            timestep = timestep[:, None].expand(b, f * (h // ph) * (w // pw))
        out = self.denoiser(
            hidden_states=x.to(dtype),
            timestep=timestep,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    def decode(self, x: Tensor) -> Tensor:
        """Latent videos ``[B, C, F, H, W]`` -> float32 videos ``[B, F', 3, H', W']`` in
        ``[0, 1]``."""
        return self._decode_normalized(x).permute(0, 2, 1, 3, 4)

    def _euler_scheduler(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        template = self.pipeline.scheduler
        if isinstance(template, FlowMatchEulerDiscreteScheduler):
            return FlowMatchEulerDiscreteScheduler.from_config(template.config)
        shift = template.config.get("flow_shift", None) or template.config.get("shift", 1.0)
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=template.config.get("num_train_timesteps", 1000), shift=float(shift)
        )
