"""Builders for tiny, randomly initialised diffusers models in their real on-disk format.

Tests and benchmarks need SD3-style pipelines without any download. The helpers here
construct every component from a config (random weights, fixed seed), write a byte-level
CLIP tokenizer from a vocabulary generated locally, and save the result with
``save_pretrained`` so that ``StableDiffusion3Pipeline.from_pretrained(directory)`` loads it
offline exactly like a real checkpoint.

* :func:`build_tiny_sd3_pipeline` -- a complete SD3 pipeline small enough for CPU tests
  (transformer, VAE, two CLIP text encoders, no T5, flow-matching scheduler).
* :class:`BrightnessReward` -- a trivial offline reward (mean brightness) for CPU test configs.
* :func:`sd35_medium_transformer_config` / :func:`build_sd35_medium_transformer` -- a
  randomly initialised transformer with the published SD3.5-Medium architecture, for GPU
  benchmarks that measure speed and memory (the weights are random, the shapes are real).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from marble_lightning.rewards.base import RewardModel

__all__ = [
    "TINY_SD3_RESOLUTION",
    "BrightnessReward",
    "build_sd35_medium_transformer",
    "build_tiny_sd3_pipeline",
    "sd35_medium_transformer_config",
    "write_byte_level_clip_vocab",
]

TINY_SD3_RESOLUTION = 32
"""Image side (pixels) the tiny pipeline is sized for; its latent is ``16 x 16`` (VAE factor 2)."""

_TINY_CLIP_WIDTH = 32
_TINY_CLIP_PROJECTION = 32
_TINY_MAX_TOKENS = 77


class BrightnessReward(RewardModel):
    """Test reward: closeness of the mean image brightness to ``target``.

    ``R(x) = 1 - |mean(x) - target|`` with the mean over pixels and channels of an image in
    ``[0, 1]``; so ``R`` lies in ``[0, 1]``. Optionally it applies only to prompts containing
    ``keyword`` (to exercise reward masks). Offline, instant, differentiable in principle.

    Args:
        target: brightness in ``[0, 1]`` that scores 1.
        keyword: if set, the reward applies only to prompts containing this substring.
        name: reward name in logs.
    """

    name = "brightness"

    def __init__(
        self, target: float = 1.0, keyword: str | None = None, name: str | None = None
    ) -> None:
        super().__init__(name)
        if not 0.0 <= float(target) <= 1.0:
            raise ValueError(f"BrightnessReward: target must lie in [0, 1], got {target!r}")
        self.target = float(target)
        self.keyword = keyword

    def applies_to(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.keyword is None:
            return torch.ones(len(prompts), dtype=torch.bool)
        return torch.tensor([self.keyword in p for p in prompts], dtype=torch.bool)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return 1.0 - (images.float().mean(dim=(1, 2, 3)) - self.target).abs()


def sd35_medium_transformer_config() -> dict[str, Any]:
    """Architecture of the SD3.5-Medium ``SD3Transformer2DModel`` (published model config).

    Returns:
        Keyword arguments for ``SD3Transformer2DModel``: 24 MMDiT-X blocks of width
        ``24 * 64 = 1536``, dual (self + joint) attention in blocks 0-12, RMS q/k norm,
        16-channel latents in patches of 2, positional embedding table of ``384 x 384``
        patches (so up to 1536 px images at VAE factor 8). About 2.2 B parameters.
    """
    return {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(range(13)),
        "qk_norm": "rms_norm",
    }


def build_sd35_medium_transformer(
    dtype: torch.dtype | str = torch.bfloat16, device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """Randomly initialised ``SD3Transformer2DModel`` with the SD3.5-Medium architecture.

    Args:
        dtype: parameter dtype (a ``torch.dtype`` or its name, e.g. ``"bfloat16"``).
        device: where to allocate the parameters (about 4.5 GB in bf16).

    Returns:
        The transformer in eval mode. Its outputs are meaningless (random weights); use it
        for timing and memory measurements only.
    """
    from diffusers import SD3Transformer2DModel

    dtype = _resolve_dtype(dtype)
    with torch.device(device):
        model = SD3Transformer2DModel(**sd35_medium_transformer_config())
    return model.to(dtype=dtype).eval()


def write_byte_level_clip_vocab(directory: str | Path) -> tuple[Path, Path]:
    """Write a minimal byte-level BPE vocabulary usable by ``CLIPTokenizer``.

    The vocabulary holds the two CLIP special tokens and every byte-level symbol, both
    plain and with CLIP's end-of-word suffix ``</w>``; there are no merges, so any text is
    tokenised character by character (514 tokens in all).

    Args:
        directory: created if missing; receives ``vocab.json`` and ``merges.txt``.

    Returns:
        Paths of ``vocab.json`` and ``merges.txt``.
    """
    from tokenizers import pre_tokenizers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n", encoding="utf-8")
    return vocab_path, merges_path


def _tiny_clip_tokenizer(work_dir: Path):
    from transformers import CLIPTokenizer

    vocab_path, _ = write_byte_level_clip_vocab(work_dir)
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_TINY_MAX_TOKENS)


def _tiny_clip_text_encoder(seed: int, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_TINY_CLIP_WIDTH,
        intermediate_size=37,
        projection_dim=_TINY_CLIP_PROJECTION,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_TINY_MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def build_tiny_sd3_pipeline(
    directory: str | Path, *, seed: int = 0, latent_channels: int = 16
) -> str:
    """Build a tiny random ``StableDiffusion3Pipeline`` and save it to ``directory``.

    Components (all randomly initialised from ``seed``):

    * ``transformer``: ``SD3Transformer2DModel`` with 2 joint blocks (the first with dual
      attention and RMS q/k norm, as in SD3.5), 2 heads of width 16, patch 2;
    * ``vae``: ``AutoencoderKL`` with two levels (spatial factor 2), ``latent_channels``
      channels, SD3's ``scaling_factor``/``shift_factor``;
    * ``text_encoder`` / ``text_encoder_2``: 2-layer ``CLIPTextModelWithProjection`` of width
      32 sharing one byte-level ``CLIPTokenizer`` (77 tokens, as in SD3), so the joint text width is 64
      and the pooled width 64;
    * ``text_encoder_3`` / ``tokenizer_3``: ``None`` (SD3 then feeds zeros in the T5 slots);
    * ``scheduler``: ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` as in SD3.

    Images are :data:`TINY_SD3_RESOLUTION` (32) pixels, latents ``[C, 16, 16]``.

    Args:
        directory: output directory (created; existing files are overwritten).
        seed: seed of the random initialisation.
        latent_channels: VAE latent channels (= transformer in/out channels).

    Returns:
        ``str(directory)``, ready for ``StableDiffusion3Pipeline.from_pretrained``.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_clip_tokenizer(directory / "_vocab")
    vocab_size = len(tokenizer)

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_SD3_RESOLUTION // 2,
        patch_size=2,
        in_channels=latent_channels,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=2 * _TINY_CLIP_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * _TINY_CLIP_PROJECTION,
        out_channels=latent_channels,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=TINY_SD3_RESOLUTION,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=_tiny_clip_text_encoder(seed + 2, vocab_size),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_clip_text_encoder(seed + 3, vocab_size),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return str(directory)


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    known = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in known:
        raise ValueError(f"Unknown torch dtype name {dtype!r}; expected one of {sorted(known)}.")
    return known[dtype]
