"""``SD3Backbone``: a diffusers Stable Diffusion 3 / 3.5 pipeline seen as a :class:`FlowBackbone`.

Flow convention (checked against diffusers, and by ``tests/test_sd3.py``). diffusers'
``FlowMatchEulerDiscreteScheduler`` noises with ``scale_noise``:
``x_sigma = sigma * eps + (1 - sigma) * x0``, calls the transformer with
``timestep = sigma * num_train_timesteps`` (1000) and steps with
``x_{sigma'} = x_sigma + (sigma' - sigma) * model_output``. So ``sigma`` is our ``t`` (1 is
noise) and the transformer's output is ``d x_t / d t = eps - x0``: exactly the velocity of
:mod:`marble_lightning.backbone`, with no sign flip. ``velocity`` therefore returns the
transformer output unchanged and only rescales the time to ``1000 * t``. (SD3's timestep
*shift* only moves the grid of ``t`` values; the sampler owns the grid.)

What is where:

* ``denoiser`` is the pipeline's ``SD3Transformer2DModel``, a registered submodule with all
  base weights frozen (``requires_grad=False``); LoRA adapters added to it later are the only
  trainable parameters.
* The VAE and the CLIP/T5 text encoders are frozen, in eval mode, and deliberately NOT
  registered submodules: they never appear in ``parameters()``, ``state_dict()`` (hence in
  checkpoints), optimizers, DDP's parameter broadcast or model summaries. Device and dtype
  moves still reach them because :meth:`SD3Backbone._apply` (the hook behind ``.to()``,
  ``.cuda()``, ``.half()``) forwards to them. Every process loads them from ``pretrained``.

Loading, freezing, the device/dtype plumbing, decoding and the time grid are those of every
diffusers-pipeline backbone: :class:`~marble_lightning.backbones._diffusers.DiffusersBackbone`;
this module adds what is particular to SD3 (T5 optional, prompt encoding, the transformer call).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from marble_lightning.backbone import Conditioning
from marble_lightning.backbones._diffusers import (
    MMDIT_LORA_TARGET_MODULES,
    DiffusersBackbone,
    read_model_index,
)

__all__ = ["SD3_LORA_TARGET_MODULES", "SD3Backbone"]

SD3_LORA_TARGET_MODULES: list[str] = list(MMDIT_LORA_TARGET_MODULES)
"""Attention projections of the MMDiT blocks (image stream and text stream) that get LoRA."""


class SD3Backbone(DiffusersBackbone):
    """Stable Diffusion 3 / 3.5 latent flow model implementing
    :class:`~marble_lightning.backbone.FlowBackbone`.

    Args:
        pretrained: a local diffusers pipeline directory (``model_index.json`` inside) or a
            hub id of an SD3-family pipeline (e.g. the SD3.5-Medium repository).
        resolution: image side in pixels; must be a multiple of ``vae_scale_factor * patch_size``
            (16 for SD3). The latent is ``[C, resolution / 8, resolution / 8]`` for SD3.
        torch_dtype: dtype of all loaded weights: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
            Inputs are cast to it inside :meth:`velocity` / :meth:`decode` and outputs cast back.
        max_sequence_length: T5 tokens per prompt. The text sequence the transformer attends to
            is ``77`` CLIP tokens plus this many T5 tokens (zeros when T5 is absent).
        variant: weight-file variant passed to ``from_pretrained`` (e.g. ``"fp16"``).
        use_t5: load the T5 encoder when the pipeline has one; ``False`` saves ~9 GB and feeds
            zeros in the T5 slots (SD3 supports this).

    Raises:
        FileNotFoundError: ``pretrained`` looks like a path but does not exist, or is not a
            pipeline directory.
        OSError: loading failed (message names ``pretrained``).
        ValueError: bad ``torch_dtype``, ``resolution`` or ``max_sequence_length``.

    Attributes:
        denoiser: the ``SD3Transformer2DModel`` (base weights frozen).
        sample_shape: ``(latent_channels, resolution / f, resolution / f)`` with ``f`` the VAE
            factor.
        lora_target_modules: :data:`SD3_LORA_TARGET_MODULES`.
        pipeline: the underlying ``StableDiffusion3Pipeline`` (shares the modules above).

    :meth:`decode` is the base's ``AutoencoderKL`` decoding (``latents / scaling_factor +
    shift_factor``); :meth:`time_grid` is the pipeline scheduler's grid: SD3's
    ``FlowMatchEulerDiscreteScheduler`` spaces ``t`` uniformly and then shifts it,
    ``t' = s t / (1 + (s - 1) t)`` (``s = 3`` for SD3/SD3.5), spending more steps at high noise;
    with ``use_dynamic_shifting`` the shift depends on the image size as in the pipeline.
    """

    pipeline_class = "StableDiffusion3Pipeline"
    frozen_names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    default_lora_targets = MMDIT_LORA_TARGET_MODULES

    def __init__(
        self,
        pretrained: str,
        *,
        resolution: int = 512,
        torch_dtype: str = "float32",
        max_sequence_length: int = 128,
        variant: str | None = None,
        use_t5: bool = True,
    ) -> None:
        super().__init__(
            pretrained,
            torch_dtype=torch_dtype,
            variant=variant,
            resolution=resolution,
            max_sequence_length=max_sequence_length,
            use_t5=use_t5,
        )

    @classmethod
    def from_pipeline(
        cls, pipeline: Any, *, resolution: int = 512, max_sequence_length: int = 128
    ) -> SD3Backbone:
        """Wrap an already constructed ``StableDiffusion3Pipeline`` (its modules are shared, not
        copied)."""
        return super().from_pipeline(
            pipeline, resolution=resolution, max_sequence_length=max_sequence_length
        )

    def _load_kwargs(self, pretrained: str, options: dict[str, Any]) -> dict[str, Any]:
        """Drop T5 (``text_encoder_3``, ``tokenizer_3``) unless ``use_t5`` and the pipeline has
        it."""
        if Path(pretrained).expanduser().exists():
            entry = read_model_index(pretrained).get("text_encoder_3", [None, None])
            has_t5 = entry[0] is not None
        else:
            has_t5 = True  # hub checkpoints of SD3/SD3.5 ship T5
        if options.get("use_t5", True) and has_t5:
            return {}
        return {"text_encoder_3": None, "tokenizer_3": None}

    def _configure(
        self,
        pipeline: Any,
        *,
        resolution: int = 512,
        max_sequence_length: int = 128,
        use_t5: bool = True,  # used when loading (:meth:`_load_kwargs`)
    ) -> None:
        config = self.denoiser.config
        self._configure_image(
            resolution,
            max_sequence_length,
            vae_factor=2 ** (len(pipeline.vae.config.block_out_channels) - 1),
            patch=config.patch_size,
            channels=config.in_channels,
        )
        self.timestep_scale = float(pipeline.scheduler.config.num_train_timesteps)

    # -- FlowBackbone ---------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encode ``B`` prompts with both CLIP encoders (and T5 when loaded).

        Args:
            prompts: ``B`` strings; ``""`` is the unconditional prompt used for CFG.

        Returns:
            ``{"prompt_embeds": [B, 77 + max_sequence_length, joint_attention_dim],
            "pooled_prompt_embeds": [B, 2 * clip_projection_dim]}`` on the denoiser's device,
            in the text encoders' dtype.
        """
        prompts = self._check_prompts(prompts)
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=prompts,
            prompt_3=prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Predict ``v = eps - x0`` with the transformer (see the module docstring).

        Args:
            x: latents ``[B, C, H, W]`` (any float dtype; cast to the model dtype).
            t: times ``[B]`` (or a scalar) in ``[0, 1]``; the transformer sees ``1000 * t``.
            cond: output of :meth:`encode_prompts` with ``B`` rows.

        Returns:
            ``[B, C, H, W]`` velocity in ``x``'s dtype.
        """
        t = self._check_xt(x, t)
        dtype = self.denoiser.dtype
        out = self.denoiser(
            hidden_states=x.to(dtype),
            timestep=t * self.timestep_scale,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    def _shift_mu(self, scheduler: Any) -> float | None:
        if not scheduler.config.get("use_dynamic_shifting", False):
            return None
        return self._resolution_shift(
            scheduler, patch=self.denoiser.config.patch_size, max_shift=1.16
        )

    def extra_repr(self) -> str:
        return (
            f"pretrained={self.pretrained!r}, resolution={self.resolution}, "
            f"sample_shape={self.sample_shape}, frozen={sorted(self._frozen)}"
        )
