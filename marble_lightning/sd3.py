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
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from marble_lightning.backbone import Conditioning

__all__ = ["SD3_LORA_TARGET_MODULES", "SD3Backbone"]

SD3_LORA_TARGET_MODULES: list[str] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]
"""Attention projections of the MMDiT blocks (image stream and text stream) that get LoRA."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FROZEN_NAMES = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def _looks_local(pretrained: str) -> bool:
    """Whether ``pretrained`` must be a local path (a hub id is ``name`` or ``owner/name``)."""
    return (
        os.path.isabs(pretrained)
        or pretrained.startswith((".", "~"))
        or "\\" in pretrained
        or pretrained.count("/") > 1
    )


def _load_pipeline(pretrained: str, torch_dtype: torch.dtype, variant: str | None, use_t5: bool):
    from diffusers import StableDiffusion3Pipeline

    path = Path(pretrained).expanduser()
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}
    if variant is not None:
        kwargs["variant"] = variant
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"SD3Backbone: {str(path)!r} is not a diffusers pipeline directory (no model_index.json)"
            )
        entries = json.loads(index.read_text())
        has_t5 = entries.get("text_encoder_3", [None, None])[0] is not None
        source = str(path)
    elif _looks_local(pretrained):
        raise FileNotFoundError(
            f"SD3Backbone: pretrained pipeline directory {pretrained!r} does not exist"
        )
    else:
        has_t5 = True  # hub checkpoints of SD3/SD3.5 ship T5
        source = pretrained
    if not (use_t5 and has_t5):
        kwargs["text_encoder_3"] = None
        kwargs["tokenizer_3"] = None
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype -> dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return StableDiffusion3Pipeline.from_pretrained(source, **kwargs)
    except Exception as err:  # re-raise with the offending path/id in the message
        raise OSError(
            f"SD3Backbone: could not load a StableDiffusion3Pipeline from {pretrained!r}: {err}"
        ) from err


class SD3Backbone(nn.Module):
    """Stable Diffusion 3 / 3.5 latent flow model implementing :class:`~marble_lightning.backbone.FlowBackbone`.

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
        sample_shape: ``(latent_channels, resolution / f, resolution / f)`` with ``f`` the VAE factor.
        lora_target_modules: :data:`SD3_LORA_TARGET_MODULES`.
        pipeline: the underlying ``StableDiffusion3Pipeline`` (shares the modules above).
    """

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
        super().__init__()
        if torch_dtype not in _DTYPES:
            raise ValueError(
                f"SD3Backbone: torch_dtype={torch_dtype!r}; expected one of {sorted(_DTYPES)}"
            )
        pipeline = _load_pipeline(str(pretrained), _DTYPES[torch_dtype], variant, use_t5)
        self._setup(pipeline, resolution=resolution, max_sequence_length=max_sequence_length)
        self.pretrained = str(pretrained)

    @classmethod
    def from_pipeline(
        cls, pipeline: Any, *, resolution: int = 512, max_sequence_length: int = 128
    ) -> SD3Backbone:
        """Wrap an already constructed ``StableDiffusion3Pipeline`` (its modules are shared, not copied)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(pipeline, resolution=resolution, max_sequence_length=max_sequence_length)
        self.pretrained = None
        return self

    def _setup(self, pipeline: Any, *, resolution: int, max_sequence_length: int) -> None:
        transformer = pipeline.transformer
        if transformer is None or pipeline.vae is None:
            raise ValueError("SD3Backbone: the pipeline has no transformer or no VAE")
        vae_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        multiple = vae_factor * transformer.config.patch_size
        if not isinstance(resolution, int) or resolution <= 0 or resolution % multiple:
            raise ValueError(
                f"SD3Backbone: resolution={resolution!r} must be a positive multiple of {multiple} "
                f"(VAE factor {vae_factor} x patch size {transformer.config.patch_size})"
            )
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(
                f"SD3Backbone: max_sequence_length={max_sequence_length!r} must be a positive int"
            )
        self.pipeline = pipeline
        self.resolution = resolution
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = vae_factor
        self.timestep_scale = float(pipeline.scheduler.config.num_train_timesteps)
        self.denoiser = transformer
        self.denoiser.requires_grad_(False)
        frozen = {name: getattr(pipeline, name, None) for name in _FROZEN_NAMES}
        self._frozen: dict[str, nn.Module] = {k: m for k, m in frozen.items() if m is not None}
        for module in self._frozen.values():
            module.requires_grad_(False)
            module.eval()
        side = resolution // vae_factor
        self.sample_shape: tuple[int, int, int] = (int(transformer.config.in_channels), side, side)
        self.lora_target_modules: list[str] = list(SD3_LORA_TARGET_MODULES)

    # -- frozen components: moved with the module, never registered ---------------------------

    @property
    def vae(self) -> nn.Module:
        """The frozen ``AutoencoderKL``."""
        return self._frozen["vae"]

    @property
    def frozen_modules(self) -> dict[str, nn.Module]:
        """The frozen, unregistered components (VAE and text encoders) by pipeline name."""
        return dict(self._frozen)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if recurse:
            for module in self._frozen.values():
                module._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> SD3Backbone:
        """Set the denoiser's mode; the frozen components always stay in eval mode."""
        super().train(mode)
        for module in self._frozen.values():
            module.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

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
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"SD3Backbone.encode_prompts: expected a list of str, got {prompts!r}")
        prompts = list(prompts)
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
        if x.ndim != 4:
            raise ValueError(
                f"SD3Backbone.velocity: x must be [B, C, H, W], got shape {tuple(x.shape)}"
            )
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.numel() == 1:
            t = t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(
                f"SD3Backbone.velocity: t must be [B]={batch} or a scalar, got shape {tuple(t.shape)}"
            )
        dtype = self.denoiser.dtype
        out = self.denoiser(
            hidden_states=x.to(dtype),
            timestep=t * self.timestep_scale,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    def decode(self, x: Tensor) -> Tensor:
        """Decode latents to images in ``[0, 1]``.

        Args:
            x: latents ``[B, C, H, W]`` in the transformer's (scaled, shifted) space.

        Returns:
            float32 images ``[B, 3, H * f, W * f]`` in ``[0, 1]`` (``f`` = VAE factor, 8 for SD3).
        """
        vae = self.vae
        config = vae.config
        shift = config.shift_factor if config.shift_factor is not None else 0.0
        latents = x.to(vae.dtype) / config.scaling_factor + shift
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0.0, 1.0)

    def time_grid(self, steps: int) -> Tensor:
        """The pipeline scheduler's sampling times for ``steps`` Euler steps (SD3's shifted grid).

        SD3's ``FlowMatchEulerDiscreteScheduler`` spaces ``t`` uniformly and then shifts it,
        ``t' = s t / (1 + (s - 1) t)`` (``s = 3`` for SD3/SD3.5), spending more steps at high noise;
        with ``use_dynamic_shifting`` the shift depends on the image size as in the pipeline.
        A sampler that wants diffusers' default SD3 schedule integrates over this grid.

        Args:
            steps: number of Euler steps (``>= 1``).

        Returns:
            float64 ``[steps + 1]`` from ``1`` down to ``0`` (CPU).
        """
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"SD3Backbone.time_grid: steps={steps!r} must be a positive int")
        template = self.pipeline.scheduler
        scheduler = type(template).from_config(template.config)
        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
                calculate_shift,
            )

            patch = self.denoiser.config.patch_size
            seq_len = (self.sample_shape[1] // patch) * (self.sample_shape[2] // patch)
            config = scheduler.config
            kwargs["mu"] = calculate_shift(
                seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(steps, device="cpu", **kwargs)
        return scheduler.sigmas.detach().to(torch.float64).cpu()

    def extra_repr(self) -> str:
        return (
            f"pretrained={self.pretrained!r}, resolution={self.resolution}, sample_shape={self.sample_shape}, "
            f"frozen={sorted(self._frozen)}"
        )
