"""``DiffusersBackbone``: what every diffusers-pipeline backbone shares.

A family backbone (:class:`~marble_lightning.backbones.flux.FluxBackbone`,
:class:`~marble_lightning.backbones.qwen_image.QwenImageBackbone`,
:class:`~marble_lightning.backbones.wan.WanBackbone`) subclasses :class:`DiffusersBackbone` and
adds only what is particular to the family: how prompts are encoded, how the transformer is
called (packing, ids, guidance embedding, time scale), how latents are decoded and which
sample shape the model space has. ``SD3Backbone`` (:mod:`marble_lightning.sd3`) is one of
them too. The base does the rest:

* loading: a local pipeline directory (``model_index.json`` inside) or a hub id, with
  ``torch_dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``) and an optional weight
  ``variant``; clear errors naming ``pretrained``;
* freezing: ``denoiser`` (the pipeline's transformer) is the only registered submodule, all its
  base weights have ``requires_grad=False`` (LoRA adapters added later are the only trainable
  parameters); the VAE and text encoders are frozen, in eval mode and NOT registered, so they
  never reach ``parameters()``, ``state_dict()``, checkpoints, optimizers or DDP; ``.to()`` /
  ``.half()`` still move them (:meth:`DiffusersBackbone._apply`);
* ``lora_target_modules``: the family's attention projections;
* ``gradient_checkpointing``: diffusers' ``enable_gradient_checkpointing()`` on the denoiser
  (activation checkpointing of the transformer blocks; only forwards with gradients are
  affected, so sampling is unchanged);
* :meth:`time_grid`: the family's flow-matching scheduler grid (``sigmas``) for ``steps`` Euler
  steps, computed exactly as the family's pipeline computes it (including the
  resolution-dependent shift ``mu`` of SD3 with dynamic shifting, FLUX and Qwen-Image:
  :meth:`DiffusersBackbone._resolution_shift`);
* decoding: :meth:`DiffusersBackbone.decode` for an ``AutoencoderKL`` (SD3, FLUX) and
  :meth:`DiffusersBackbone._decode_normalized` for the Wan-style VAEs (Wan, Qwen-Image);
* the image families' options (``resolution``, ``max_sequence_length``, the latent sample shape):
  :meth:`DiffusersBackbone._configure_image`.

Flow convention: every family here uses diffusers' ``FlowMatchEulerDiscreteScheduler`` flow,
``x_sigma = sigma eps + (1 - sigma) x0`` and ``x_{sigma'} = x_sigma + (sigma' - sigma) v`` with
the transformer predicting ``v = eps - x0``: ``sigma`` is our ``t`` and the transformer output
is our velocity, unchanged (see :mod:`marble_lightning.sd3`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DTYPES",
    "MMDIT_LORA_TARGET_MODULES",
    "DiffusersBackbone",
    "load_pipeline",
    "looks_local",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``torch_dtype`` names accepted by the backbones."""

MMDIT_LORA_TARGET_MODULES: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
"""Attention projections of a dual-stream (image + text) MMDiT block, as diffusers names them
(SD3, FLUX, Qwen-Image): the image stream's ``to_*`` and the text stream's ``add_*`` /
``to_add_out``."""


def looks_local(pretrained: str) -> bool:
    """Whether ``pretrained`` must be a local path (a hub id is ``name`` or ``owner/name``)."""
    return (
        os.path.isabs(pretrained)
        or pretrained.startswith((".", "~"))
        or "\\" in pretrained
        or pretrained.count("/") > 1
    )


def load_pipeline(
    pipeline_class: str,
    pretrained: str,
    *,
    torch_dtype: torch.dtype,
    variant: str | None = None,
    who: str = "backbone",
    **kwargs: Any,
) -> Any:
    """``diffusers.<pipeline_class>.from_pretrained(pretrained, ...)`` with clear errors.

    Args:
        pipeline_class: name of the diffusers pipeline class (e.g. ``"FluxPipeline"``).
        pretrained: local pipeline directory or hub id.
        torch_dtype: dtype of every loaded weight.
        variant: weight-file variant (e.g. ``"fp16"``).
        who: name used in error messages.
        kwargs: passed to ``from_pretrained`` (e.g. components to replace or drop).

    Raises:
        FileNotFoundError: ``pretrained`` looks like a path but does not exist, or has no
            ``model_index.json``.
        OSError: loading failed (the message names ``pretrained``).
    """
    import diffusers

    path = Path(pretrained).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{who}: {str(path)!r} is not a diffusers pipeline directory (no model_index.json)"
            )
        source = str(path)
    elif looks_local(pretrained):
        raise FileNotFoundError(
            f"{who}: pretrained pipeline directory {pretrained!r} does not exist"
        )
    else:
        source = pretrained
    options: dict[str, Any] = {"torch_dtype": torch_dtype, **kwargs}
    if variant is not None:
        options["variant"] = variant
    try:
        cls = getattr(diffusers, pipeline_class)
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype -> dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return cls.from_pretrained(source, **options)
    except Exception as err:  # re-raise with the offending path/id in the message
        raise OSError(
            f"{who}: could not load a {pipeline_class} from {pretrained!r}: {err}"
        ) from err


def read_model_index(pretrained: str) -> dict[str, Any]:
    """``model_index.json`` of a local pipeline directory (``{}`` for a hub id)."""
    index = Path(pretrained).expanduser() / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


class DiffusersBackbone(nn.Module):
    """Base of the diffusers-pipeline backbones (see the module docstring).

    Subclasses set the class attributes and implement :meth:`_configure`,
    :meth:`encode_prompts`, :meth:`velocity` and :meth:`decode`.

    Class attributes:
        pipeline_class: the diffusers pipeline class name.
        frozen_names: pipeline attributes holding frozen components (VAE, text encoders).
        default_lora_targets: LoRA target patterns on the transformer.
    """

    pipeline_class: ClassVar[str] = ""
    frozen_names: ClassVar[tuple[str, ...]] = ("vae", "text_encoder")
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    denoiser: nn.Module
    sample_shape: tuple[int, ...]
    lora_target_modules: list[str]

    def __init__(
        self,
        pretrained: str,
        *,
        torch_dtype: str = "float32",
        variant: str | None = None,
        gradient_checkpointing: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if torch_dtype not in DTYPES:
            raise ValueError(
                f"{name}: torch_dtype={torch_dtype!r}; expected one of {sorted(DTYPES)}"
            )
        kwargs = self._load_kwargs(str(pretrained), options)
        pipeline = load_pipeline(
            self.pipeline_class,
            str(pretrained),
            torch_dtype=DTYPES[torch_dtype],
            variant=variant,
            who=name,
            **kwargs,
        )
        self._setup(pipeline, gradient_checkpointing=gradient_checkpointing, **options)
        self.pretrained = str(pretrained)

    @classmethod
    def from_pipeline(cls, pipeline: Any, *, gradient_checkpointing: bool = False, **options: Any):
        """Wrap an already constructed pipeline of the family (its modules are shared, not
        copied)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(pipeline, gradient_checkpointing=gradient_checkpointing, **options)
        self.pretrained = None
        return self

    # -- hooks of the subclasses -----------------------------------------------------------------

    def _load_kwargs(self, pretrained: str, options: dict[str, Any]) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments (e.g. components to drop)."""
        return {}

    def _configure(self, pipeline: Any, **options: Any) -> None:
        """Check the family's options; set ``sample_shape`` and any other attribute."""
        raise NotImplementedError(f"{type(self).__name__} must implement _configure()")

    # -- shared set-up ---------------------------------------------------------------------------

    def _setup(
        self, pipeline: Any, *, gradient_checkpointing: bool = False, **options: Any
    ) -> None:
        name = type(self).__name__
        transformer = getattr(pipeline, "transformer", None)
        if transformer is None or getattr(pipeline, "vae", None) is None:
            raise ValueError(f"{name}: the pipeline has no transformer or no VAE")
        if not isinstance(gradient_checkpointing, bool):
            raise TypeError(
                f"{name}: gradient_checkpointing={gradient_checkpointing!r} must be a bool"
            )
        self.pipeline = pipeline
        self.denoiser = transformer
        self._configure(pipeline, **options)  # checks the options before anything is frozen
        self.denoiser.requires_grad_(False)
        frozen = {n: getattr(pipeline, n, None) for n in self.frozen_names}
        self._frozen: dict[str, nn.Module] = {
            k: m for k, m in frozen.items() if isinstance(m, nn.Module)
        }
        for module in self._frozen.values():
            module.requires_grad_(False)
            module.eval()
        self.lora_target_modules = list(self.default_lora_targets)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            if not getattr(transformer, "_supports_gradient_checkpointing", False):
                raise ValueError(
                    f"{name}: {type(transformer).__name__} has no gradient checkpointing"
                )
            transformer.enable_gradient_checkpointing()

    def _check_resolution(
        self, value: Any, multiple: int, what: str = "resolution", why: str = ""
    ) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple:
            reason = f" ({why})" if why else ""
            raise ValueError(
                f"{type(self).__name__}: {what}={value!r} must be a positive multiple of "
                f"{multiple}{reason}"
            )
        return value

    def _check_positive_int(self, value: Any, what: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(self).__name__}: {what}={value!r} must be a positive int")
        return value

    def _configure_image(
        self,
        resolution: Any,
        max_sequence_length: Any,
        *,
        vae_factor: int,
        patch: int,
        channels: int,
    ) -> None:
        """Check and set ``resolution`` (a multiple of ``vae_factor * patch``) and
        ``max_sequence_length``; set ``vae_scale_factor`` and the square latent ``sample_shape``
        ``(channels, resolution / vae_factor, resolution / vae_factor)``."""
        self.resolution = self._check_resolution(
            resolution, vae_factor * patch, why=f"VAE factor {vae_factor} x patch size {patch}"
        )
        self.max_sequence_length = self._check_positive_int(
            max_sequence_length, "max_sequence_length"
        )
        self.vae_scale_factor = vae_factor
        side = resolution // vae_factor
        self.sample_shape = (int(channels), side, side)

    def _check_prompts(self, prompts: Any) -> list[str]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(
                f"{type(self).__name__}.encode_prompts: expected a list of str, got {prompts!r}"
            )
        return list(prompts)

    def _check_xt(self, x: Tensor, t: Tensor) -> Tensor:
        """``t`` as float32 ``[B]`` on ``x``'s device; checks ``x``'s shape against
        ``sample_shape``."""
        name = type(self).__name__
        if x.ndim != len(self.sample_shape) + 1:
            dims = "B, C, F, H, W" if len(self.sample_shape) == 4 else "B, C, H, W"
            raise ValueError(f"{name}.velocity: x must be [{dims}], got shape {tuple(x.shape)}")
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.numel() == 1:
            t = t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(
                f"{name}.velocity: t must be [B]={batch} or a scalar, got shape {tuple(t.shape)}"
            )
        return t

    # -- frozen components: moved with the module, never registered ---------------------------

    @property
    def vae(self) -> nn.Module:
        """The frozen VAE."""
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

    def train(self, mode: bool = True):
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

    # -- decoding --------------------------------------------------------------------------------

    def decode(self, x: Tensor) -> Tensor:
        """Decode latents ``[B, C, H, W]`` with an ``AutoencoderKL`` (SD3, FLUX).

        The transformer's latent space is the VAE's, scaled and shifted:
        ``latents / scaling_factor + shift_factor`` goes through the VAE.

        Returns:
            float32 images ``[B, 3, H f, W f]`` in ``[0, 1]`` (``f`` = VAE factor).
        """
        vae = self.vae
        config = vae.config
        shift = config.shift_factor if config.shift_factor is not None else 0.0
        images = vae.decode(x.to(vae.dtype) / config.scaling_factor + shift, return_dict=False)[0]
        return _to_unit(images)

    def _decode_normalized(self, x: Tensor) -> Tensor:
        """Decode 5-D latents ``[B, C, F, H, W]`` with a Wan-style VAE (Wan, Qwen-Image).

        ``latents * latents_std + latents_mean`` (per channel) goes through the VAE.

        Returns:
            float32 ``[B, 3, F', H', W']`` in ``[0, 1]``.
        """
        vae = self.vae
        config = vae.config
        z = config.z_dim
        mean = torch.tensor(config.latents_mean).view(1, z, 1, 1, 1).to(x.device, vae.dtype)
        std = torch.tensor(config.latents_std).view(1, z, 1, 1, 1).to(x.device, vae.dtype)
        return _to_unit(vae.decode(x.to(vae.dtype) / (1.0 / std) + mean, return_dict=False)[0])

    # -- the sampler's grid ----------------------------------------------------------------------

    def _shift_mu(self, scheduler: Any) -> float | None:
        """The resolution-dependent shift ``mu`` the pipeline passes (``None``: the family has
        none)."""
        return None

    def _pipeline_sigmas(self, steps: int) -> Any:
        """``sigmas`` the pipeline passes to ``set_timesteps`` (``None``: the scheduler's own)."""
        return None

    def time_grid(self, steps: int) -> Tensor:
        """The pipeline scheduler's sampling times for ``steps`` Euler steps.

        Computed as the family's pipeline computes them (same scheduler config, same ``sigmas``
        and shift ``mu``), so our Euler sampler on this grid is the pipeline's own sampler.

        Returns:
            float64 ``[steps + 1]`` from ``1`` down to ``0`` (CPU).
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(
                f"{type(self).__name__}.time_grid: steps={steps!r} must be a positive int"
            )
        scheduler = self._euler_scheduler()
        kwargs: dict[str, Any] = {}
        sigmas = self._pipeline_sigmas(steps)
        if sigmas is not None:
            kwargs["sigmas"] = sigmas
        mu = self._shift_mu(scheduler)
        if mu is not None:
            kwargs["mu"] = mu
        if sigmas is None:
            scheduler.set_timesteps(steps, device="cpu", **kwargs)
        else:
            scheduler.set_timesteps(device="cpu", **kwargs)
        return scheduler.sigmas.detach().to(torch.float64).cpu()

    def _euler_scheduler(self) -> Any:
        """A fresh ``FlowMatchEulerDiscreteScheduler`` with the pipeline scheduler's config."""
        template = self.pipeline.scheduler
        return type(template).from_config(template.config)

    def _resolution_shift(self, scheduler: Any, patch: int, max_shift: float) -> float:
        """The pipelines' ``calculate_shift`` of the image-token count (``patch x patch`` patches
        of the latent), with the scheduler config's shift parameters (``max_shift``: the default
        when the config has none; SD3 uses 1.16, FLUX and Qwen-Image 1.15)."""
        # SD3's, FLUX's and Qwen-Image's ``calculate_shift`` are one function, copied
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = scheduler.config
        seq_len = (self.sample_shape[1] // patch) * (self.sample_shape[2] // patch)
        return calculate_shift(
            seq_len,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", max_shift),
        )

    @staticmethod
    def _flux_sigmas(steps: int) -> np.ndarray:
        """FLUX / Qwen-Image pipelines' ``sigmas``: ``linspace(1, 1 / steps, steps)``."""
        return np.linspace(1.0, 1 / steps, steps)

    def extra_repr(self) -> str:
        return (
            f"pretrained={self.pretrained!r}, sample_shape={self.sample_shape}, "
            f"frozen={sorted(self._frozen)}, gradient_checkpointing={self.gradient_checkpointing}"
        )


def _to_unit(images: Tensor) -> Tensor:
    """VAE output in ``[-1, 1]`` -> float32 in ``[0, 1]``."""
    return (images.float() / 2 + 0.5).clamp(0.0, 1.0)
