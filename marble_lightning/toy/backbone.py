"""``ToyBackbone``: the toy world's tiny pixel-space flow model (implements ``FlowBackbone``).

A diffusers ``UNet2DConditionModel`` on ``32 x 32`` RGB pixels (scaled to ``[-1, 1]``), three
resolution levels with channels ``(32, 64, 128)``, one ResNet layer per block and cross-attention
to the prompt only at the lowest (``8 x 8``) level and in the middle block, conditioned on
:class:`~marble_lightning.toy.text_encoder.ToyTextEncoder`. Flow conventions are those of
:mod:`marble_lightning.backbone`: ``x_t = (1 - t) x0 + t eps``, ``v = eps - x0``; the UNet sees
the timestep ``1000 * t``.

A checkpoint is two files: ``<name>.safetensors`` (weights; keys prefixed ``denoiser.`` and
``text_encoder.``) and ``<name>.json`` (the :class:`ToyModelConfig`). The shipped base model is
``marble_lightning/toy/assets/toy_backbone.{safetensors,json}``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from marble_lightning.checks import check_int
from marble_lightning.sampling import uniform_time_grid
from marble_lightning.toy.text_encoder import ToyTextEncoder, WordTokenizer, default_vocabulary
from marble_lightning.toy.world import IMAGE_SIZE

ASSET_NAME = "toy_backbone"
"""Stem of the shipped checkpoint files in ``marble_lightning/toy/assets``."""

TIMESTEP_SCALE = 1000.0
"""The UNet is called with ``timestep = TIMESTEP_SCALE * t``."""

LORA_TARGET_MODULES: tuple[str, ...] = (
    "conv1",
    "conv2",
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
)
"""Default LoRA targets on the UNet: ResNet convolutions, attention projections (self- and
cross-attention), transformer in/out projections and feed-forward layers."""


@dataclass
class ToyModelConfig:
    """Architecture of a :class:`ToyBackbone` (stored as JSON next to the weights).

    Attributes:
        block_out_channels: UNet channels per resolution level (32, 16, 8 pixels).
        layers_per_block: ResNet layers per UNet block.
        attention_heads: number of attention heads (diffusers' ``attention_head_dim``).
        norm_num_groups: GroupNorm groups in the UNet.
        text_width: text-encoder width (the UNet's ``cross_attention_dim``).
        text_layers: text-encoder transformer layers.
        text_heads: text-encoder attention heads.
        max_length: token sequence length.
        vocabulary: the tokenizer's vocabulary.
    """

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_heads: int = 2
    norm_num_groups: int = 8
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 16
    vocabulary: list[str] = field(default_factory=default_vocabulary)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToyModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ToyModelConfig keys {unknown}; known: {sorted(known)}")
        data = dict(data)
        if "block_out_channels" in data:
            data["block_out_channels"] = tuple(data["block_out_channels"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d


def build_unet(config: ToyModelConfig) -> UNet2DConditionModel:
    """The randomly initialised denoiser of ``config``."""
    levels = len(config.block_out_channels)
    down = ["DownBlock2D"] * (levels - 1) + ["CrossAttnDownBlock2D"]
    up = ["CrossAttnUpBlock2D"] + ["UpBlock2D"] * (levels - 1)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_width,
        attention_head_dim=config.attention_heads,
        norm_num_groups=config.norm_num_groups,
    )


def _resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, Path]:
    """``(weights, config)`` paths of a checkpoint given as a ``.safetensors`` file or a folder."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / f"{ASSET_NAME}.safetensors"
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    config = path.with_suffix(".json")
    for p in (path, config):
        if not p.is_file():
            raise FileNotFoundError(
                f"ToyBackbone checkpoint file not found: {p} (from {checkpoint!r})"
            )
    return path, config


class ToyBackbone(nn.Module):
    """The toy world's text-to-image flow model.

    Args:
        checkpoint: ``None`` loads the shipped base model; otherwise a path to a
            ``<name>.safetensors`` file (with ``<name>.json`` beside it) or to a folder holding
            ``toy_backbone.safetensors`` and ``toy_backbone.json``.
        config: with ``checkpoint`` ignored, build a randomly initialised model of this
            architecture (prefer :meth:`from_config`).
        freeze_text_encoder: set ``requires_grad=False`` on the text encoder (RL keeps it frozen;
            pretraining trains it).

    Attributes:
        denoiser: the ``UNet2DConditionModel`` (LoRA attaches here).
        text_encoder: :class:`ToyTextEncoder`.
        tokenizer: :class:`WordTokenizer`.
        sample_shape: ``(3, 32, 32)``.
        lora_target_modules: ResNet convolutions, attention projections, transformer in/out
            projections and feed-forward layers of the UNet.
    """

    sample_shape: tuple[int, int, int] = (3, IMAGE_SIZE, IMAGE_SIZE)
    lora_target_modules: list[str]

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        config: ToyModelConfig | None = None,
        freeze_text_encoder: bool = True,
    ) -> None:
        super().__init__()
        self.lora_target_modules = list(LORA_TARGET_MODULES)
        state = None
        if config is None:
            if checkpoint is None:
                assets = importlib.resources.files("marble_lightning.toy") / "assets"
                weights = assets / f"{ASSET_NAME}.safetensors"
                if not weights.is_file():
                    raise FileNotFoundError(
                        f"the shipped toy base model {weights} is missing; train one with "
                        "`python -m marble_lightning.toy.pretrain` and export it, or pass "
                        "checkpoint="
                    )
                with importlib.resources.as_file(weights) as w:
                    weights_path, config_path = _resolve_checkpoint(w)
                    config = ToyModelConfig.from_dict(json.loads(config_path.read_text()))
                    state = load_file(str(weights_path))
            else:
                weights_path, config_path = _resolve_checkpoint(checkpoint)
                config = ToyModelConfig.from_dict(json.loads(config_path.read_text()))
                state = load_file(str(weights_path))
        self.config = config
        self.tokenizer = WordTokenizer(config.vocabulary, config.max_length)
        self.denoiser = build_unet(config)
        self.text_encoder = ToyTextEncoder(
            len(config.vocabulary),
            config.text_width,
            config.text_layers,
            config.text_heads,
            config.max_length,
        )
        if state is not None:
            own = self.state_dict()
            missing = sorted(set(own) - set(state))
            unexpected = sorted(set(state) - set(own))
            if missing or unexpected:
                raise ValueError(
                    f"checkpoint does not match its config: missing {missing[:5]}, unexpected "
                    f"{unexpected[:5]}"
                )
            self.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        if freeze_text_encoder:
            self.text_encoder.requires_grad_(False)

    @classmethod
    def from_config(
        cls,
        config: ToyModelConfig | dict[str, Any] | None = None,
        *,
        freeze_text_encoder: bool = True,
        seed: int | None = None,
    ) -> ToyBackbone:
        """A randomly initialised model (``config`` default: the shipped architecture)."""
        if config is None:
            config = ToyModelConfig()
        elif isinstance(config, dict):
            config = ToyModelConfig.from_dict(config)
        if seed is not None:
            torch.manual_seed(seed)
        return cls(config=config, freeze_text_encoder=freeze_text_encoder)

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json``; returns the weights path."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()
        }
        save_file(tensors, str(path))
        path.with_suffix(".json").write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
        return path

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Encode ``B`` prompts (``""`` is unconditional).

        Returns:
            ``{"hidden": float [B, L, D], "mask": bool [B, L]}`` on the model's device.
        """
        ids, mask = self.tokenizer(list(prompts))
        ids, mask = ids.to(self.device), mask.to(self.device)
        return {"hidden": self.text_encoder(ids, mask), "mask": mask}

    def velocity(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Predicted velocity ``[B, 3, 32, 32]`` for ``x`` ``[B, 3, 32, 32]`` at ``t`` ``[B]`` in
        ``[0, 1]``."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"ToyBackbone.velocity: expected x of shape [B, {self.sample_shape}], got "
                f"{tuple(x.shape)}"
            )
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(
                f"ToyBackbone.velocity: t must have shape [{x.shape[0]}], got {tuple(t.shape)}"
            )
        hidden, mask = cond["hidden"], cond["mask"]
        if hidden.shape[0] != x.shape[0]:
            raise ValueError(
                f"ToyBackbone.velocity: {x.shape[0]} samples but conditioning for {hidden.shape[0]}"
            )
        return self.denoiser(
            x,
            t * TIMESTEP_SCALE,
            encoder_hidden_states=hidden.to(x.dtype),
            encoder_attention_mask=mask.to(x.dtype),
        ).sample

    def time_grid(self, steps: int) -> Tensor:
        """Uniform sampler times ``1 - j / steps`` (``[steps + 1]``, float64)."""
        return uniform_time_grid(steps)

    def decode(self, x: Tensor) -> Tensor:
        """Pixels in ``[-1, 1]`` ``[B, 3, 32, 32]`` -> images in ``[0, 1]`` (clamped)."""
        return ((x + 1) / 2).clamp(0, 1)

    @staticmethod
    def encode_images(images: Tensor) -> Tensor:
        """Images ``[B, 3, 32, 32]`` in ``[0, 1]`` -> model space ``[-1, 1]`` (inverse of
        :meth:`decode`)."""
        return images * 2 - 1


@torch.no_grad()
def sample(
    backbone: ToyBackbone,
    prompts: Sequence[str],
    steps: int = 15,
    cfg: float = 1.0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Euler sampling from ``t = 1`` to ``0`` on a uniform grid, with classifier-free guidance.

    Args:
        backbone: the model.
        prompts: ``B`` prompts.
        steps: Euler steps.
        cfg: guidance scale ``w``: ``v = v_uncond + w (v_cond - v_uncond)``; 1 disables it.
        generator: randomness of the initial noise.
        noise: optional initial noise ``[B, 3, 32, 32]`` (overrides ``generator``).

    Returns:
        Images ``[B, 3, 32, 32]`` in ``[0, 1]``.
    """
    check_int("steps", steps)
    b = len(prompts)
    device = backbone.device
    x = (
        noise.to(device)
        if noise is not None
        else torch.randn(b, *backbone.sample_shape, generator=generator).to(device)
    )
    cond = backbone.encode_prompts(list(prompts))
    if cfg != 1.0:
        uncond = backbone.encode_prompts([""] * b)
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    grid = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t, t_next = float(grid[i]), float(grid[i + 1])
        if cfg != 1.0:
            v_u, v_c = backbone.velocity(
                torch.cat([x, x]), torch.full((2 * b,), t, device=device), both
            ).chunk(2)
            v = v_u + cfg * (v_c - v_u)
        else:
            v = backbone.velocity(x, torch.full((b,), t, device=device), cond)
        x = x + (t_next - t) * v
    return backbone.decode(x)
