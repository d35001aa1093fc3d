"""Tiny deterministic test fixtures: an SD3-style pixel-space backbone and toy rewards.

* :class:`TinySD3Backbone` implements :class:`~marble_lightning.backbone.FlowBackbone` with a
  diffusers ``SD3Transformer2DModel`` on ``3 x 8 x 8`` pixels (patch 2, 2 layers, 2 heads of
  width 8, about 20k parameters) and a fixed, hash-based prompt embedding (no text encoder to
  train; the empty prompt maps to zeros, which makes CFG well defined).
* Helpers: :func:`make_module`, :func:`fit` (tiny trainer runs on :data:`PROMPTS`),
  :func:`lora_state`, :func:`base_state`.
* Rewards: :class:`ChannelMean` (mean of one RGB channel, optionally only on prompts that
  contain a keyword, i.e. masked elsewhere), :class:`Darkness` (one minus the mean brightness),
  and rewards that misbehave (:class:`NaNReward`, :class:`WrongShapeReward`) for the bad-input
  tests.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor, nn

from marble_lightning.backbone import Conditioning
from marble_lightning.rewards.base import RewardModel

if TYPE_CHECKING:
    from lightning.pytorch import Callback, Trainer

    from marble_lightning.module import MarbleDiffusionModule

TOKENS = 4
"""Tokens per prompt of the tiny prompt embedding."""
WIDTH = 16
"""Width of the token and pooled embeddings."""


def _word_vector(word: str, width: int) -> Tensor:
    """A fixed pseudo-random vector for ``word`` (independent of global RNG state)."""
    gen = torch.Generator().manual_seed(zlib.crc32(word.encode("utf-8")))
    return torch.randn(width, generator=gen)


class TinySD3Backbone(nn.Module):
    """Pixel-space tiny SD3 transformer on ``3 x size x size`` images in ``[-1, 1]``.

    Args:
        size: image side in pixels (a multiple of the patch size 2).
        seed: seed of the random initialisation of the transformer.
    """

    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]

    def __init__(self, size: int = 8, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.denoiser = SD3Transformer2DModel(
                sample_size=size,
                patch_size=2,
                in_channels=3,
                out_channels=3,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=2,
                joint_attention_dim=WIDTH,
                caption_projection_dim=16,
                pooled_projection_dim=WIDTH,
                pos_embed_max_size=size,
            )
            # Diffusers zero-initialises the output projection; give it small random values so
            # that gradients reach every LoRA layer from the first step.
            nn.init.normal_(self.denoiser.proj_out.weight, std=0.02)
        self.sample_shape = (3, size, size)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Words -> fixed vectors; ``[B, 4, 16]`` tokens (zero padded) and ``[B, 16]`` pooled."""
        device = next(self.denoiser.parameters()).device
        tokens = torch.zeros(len(prompts), TOKENS, WIDTH)
        for i, prompt in enumerate(prompts):
            for j, word in enumerate(prompt.split()[:TOKENS]):
                tokens[i, j] = _word_vector(word, WIDTH)
        pooled = tokens.mean(dim=1)
        return {"tokens": tokens.to(device), "pooled": pooled.to(device)}

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``v = eps - x0`` for ``x`` ``[B, 3, H, W]``, ``t`` ``[B]`` in ``[0, 1]``."""
        return self.denoiser(
            hidden_states=x,
            encoder_hidden_states=cond["tokens"],
            pooled_projections=cond["pooled"],
            timestep=t * 1000.0,
            return_dict=False,
        )[0]

    def decode(self, x: Tensor) -> Tensor:
        """``[-1, 1]`` pixels -> ``[0, 1]`` images (clamped)."""
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


class ChannelMean(RewardModel):
    """Mean of RGB channel ``channel``; masked (no opinion) unless the prompt contains ``keyword``.

    Args:
        channel: 0 (red), 1 (green) or 2 (blue).
        name: reward name.
        keyword: if given, the reward applies only to prompts containing this word.
    """

    def __init__(self, channel: int, name: str, keyword: str | None = None) -> None:
        super().__init__(name)
        self.channel = channel
        self.keyword = keyword

    def applies_to(self, prompts: Sequence[str]) -> Tensor:
        if self.keyword is None:
            return torch.ones(len(prompts), dtype=torch.bool)
        return torch.tensor([self.keyword in p.split() for p in prompts], dtype=torch.bool)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return images[:, self.channel].mean(dim=(1, 2))


class Darkness(RewardModel):
    """One minus the mean brightness of the image."""

    def __init__(self, name: str = "dark") -> None:
        super().__init__(name)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return 1.0 - images.mean(dim=(1, 2, 3))


class NaNReward(RewardModel):
    """Returns NaN for every image (bad input)."""

    def __init__(self, name: str = "nan") -> None:
        super().__init__(name)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return torch.full((images.shape[0],), float("nan"))


class WrongShapeReward(nn.Module):
    """A plain module (not a RewardModel) that returns ``[B, 2]`` (bad input)."""

    name = "wrong_shape"

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return torch.zeros(images.shape[0], 2)


def tiny_rewards() -> list[RewardModel]:
    """Three rewards: red (all prompts), green (only prompts with the word "green"), dark."""
    return [ChannelMean(0, "red"), ChannelMean(1, "green", keyword="green"), Darkness("dark")]


PROMPTS = [
    "a red cat",
    "a green dog",
    "green blue sky",
    "red house",
    "a dark night",
    "green field red flowers",
    "small box",
    "big green tree",
]
"""Eight training prompts (four contain "green")."""


# ----------------------------------------------------------------- module / trainer helpers

TINY = dict(group_size=2, sample_steps=2, lora_rank=2, lora_alpha=4, lr=1e-3, rollout_precision="float32")


def make_module(mode: str = "marble", rewards: list | None = None, **kwargs: Any) -> MarbleDiffusionModule:
    """A tiny module (8x8 SD3 transformer, G=2, 2 sampler steps, LoRA rank 2)."""
    from marble_lightning.module import MarbleDiffusionModule

    options = dict(TINY)
    if mode == "single":
        options["single_reward"] = "red"
    if mode == "sequential":
        options["stages"] = [("red", 1), ("dark", 1)]
    options.update(kwargs)
    return MarbleDiffusionModule(TinySD3Backbone(), rewards if rewards is not None else tiny_rewards(), mode=mode, **options)


def make_trainer(max_steps: int, callbacks: list[Callback] | None = None, **kwargs: Any) -> Trainer:
    from lightning.pytorch import Trainer

    options = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return Trainer(callbacks=callbacks or [], **options)


def fit(module: MarbleDiffusionModule, max_steps: int, prompts_per_step: int = 2, callbacks=None, ckpt_path=None, **kwargs: Any) -> Trainer:
    """Fit ``module`` on the tiny prompts for ``max_steps`` optimizer steps."""
    from marble_lightning.data import PromptDataModule

    trainer = make_trainer(max_steps, callbacks, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=PromptDataModule(PROMPTS, prompts_per_step=prompts_per_step), ckpt_path=ckpt_path)
    return trainer


def lora_state(module: MarbleDiffusionModule) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.trainable_parameters + module.old_parameters]


def base_state(module: MarbleDiffusionModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if ".lora_" not in n}
