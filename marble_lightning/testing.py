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

Pixel-space fixtures for the module tests (no VAE, no text encoder):

* :class:`TinySD3Backbone` implements :class:`~marble_lightning.backbone.FlowBackbone` with a
  diffusers ``SD3Transformer2DModel`` on ``3 x 8 x 8`` pixels (patch 2, 2 layers, 2 heads of
  width 8, about 20k parameters) and a fixed, hash-based prompt embedding (no text encoder to
  train; the empty prompt maps to zeros, which makes CFG well defined).
* Helpers: :func:`make_module`, :func:`make_trainer`, :func:`fit` (tiny trainer runs on
  :data:`PROMPTS`), :func:`lora_state`, :func:`base_state`.
* Rewards: :class:`ChannelMean` (mean of one RGB channel, optionally only on prompts that
  contain a keyword, i.e. masked elsewhere), :class:`Darkness` (one minus the mean brightness),
  :func:`tiny_rewards`, and rewards that misbehave (:class:`NaNReward`,
  :class:`WrongShapeReward`) for the bad-input tests.

Tiny reward checkpoints in the real on-disk formats, loaded by the rewards' public
constructors exactly as a user's downloaded checkpoint would be (nothing touches the network):
:func:`save_tiny_clip`, :func:`save_tiny_open_clip`, :func:`save_aesthetic_mlp`,
:func:`save_tiny_owlv2`, :func:`save_tiny_image_reward` (the ImageReward release's key layout).
"""

from __future__ import annotations

import json
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from marble_lightning.backbone import Conditioning
from marble_lightning.checks import check_choice, check_float
from marble_lightning.rewards.base import RewardModel
from marble_lightning.sampling import uniform_time_grid

if TYPE_CHECKING:
    from lightning.pytorch import Callback, Trainer

    from marble_lightning.module import MarbleDiffusionModule

__all__ = [
    "PROMPTS",
    "TINY",
    "TINY_OPEN_CLIP_CONFIG",
    "TINY_SD3_RESOLUTION",
    "BrightnessReward",
    "ChannelMean",
    "Darkness",
    "NaNReward",
    "TinySD3Backbone",
    "WrongShapeReward",
    "base_state",
    "build_sd35_medium_transformer",
    "build_tiny_sd3_pipeline",
    "fit",
    "lora_state",
    "make_module",
    "make_trainer",
    "save_aesthetic_mlp",
    "save_tiny_clip",
    "save_tiny_open_clip",
    "save_tiny_owlv2",
    "sd35_medium_transformer_config",
    "tiny_rewards",
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
        self.target = check_float("target", target, minimum=0.0, maximum=1.0)
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

    The vocabulary holds every byte-level symbol, both plain and with CLIP's end-of-word
    suffix ``</w>``, then the two CLIP special tokens ``<|startoftext|>`` (512) and
    ``<|endoftext|>`` (513), last as in CLIP's own vocabulary (OWL-ViT/OWLv2 treat a query
    whose first id is 0 as padding); there are no merges, so any text is tokenised character
    by character (514 tokens in all).

    Args:
        directory: created if missing; receives ``vocab.json`` and ``merges.txt``.

    Returns:
        Paths of ``vocab.json`` and ``merges.txt``.
    """
    from tokenizers import pre_tokenizers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n", encoding="utf-8")
    return vocab_path, merges_path


def _tiny_clip_tokenizer(work_dir: Path, max_tokens: int = _TINY_MAX_TOKENS):
    """A ``CLIPTokenizer`` on :func:`write_byte_level_clip_vocab` (specials are the last two
    ids)."""
    from transformers import CLIPTokenizer

    vocab_path, _ = write_byte_level_clip_vocab(work_dir)
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_tokens)


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
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def _tiny_vae(latent_channels: int, size: int, scaling: float, shift: float) -> Any:
    """A two-block ``AutoencoderKL`` (random weights from the current torch seed)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=size,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).eval()


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
      32 sharing one byte-level ``CLIPTokenizer`` (77 tokens, as in SD3), so the joint text width is
      64 and the pooled width 64;
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
    vae = _tiny_vae(latent_channels, TINY_SD3_RESOLUTION, 1.5305, 0.0609)
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
    return known[check_choice("dtype", dtype, known)]


# ------------------------------------------------------------ pixel-space module fixtures

_TOKENS = 4
"""Tokens per prompt of the tiny prompt embedding."""
_WIDTH = 16
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

    lora_target_modules: ClassVar[list[str]] = [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"
    ]  # fmt: skip

    def __init__(self, size: int = 8, seed: int = 0) -> None:
        from diffusers import SD3Transformer2DModel

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
                joint_attention_dim=_WIDTH,
                caption_projection_dim=16,
                pooled_projection_dim=_WIDTH,
                pos_embed_max_size=size,
            )
            # Diffusers zero-initialises the output projection; give it small random values so
            # that gradients reach every LoRA layer from the first step.
            nn.init.normal_(self.denoiser.proj_out.weight, std=0.02)
        self.sample_shape = (3, size, size)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Words -> fixed vectors; ``[B, 4, 16]`` tokens (zero padded) and ``[B, 16]`` pooled."""
        device = next(self.denoiser.parameters()).device
        tokens = torch.zeros(len(prompts), _TOKENS, _WIDTH)
        for i, prompt in enumerate(prompts):
            for j, word in enumerate(prompt.split()[:_TOKENS]):
                tokens[i, j] = _word_vector(word, _WIDTH)
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

    def time_grid(self, steps: int) -> Tensor:
        """Uniform sampler times ``1 - j / steps`` (``[steps + 1]``, float64)."""
        return uniform_time_grid(steps)

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

TINY: dict[str, Any] = {
    "group_size": 2, "sample_steps": 2, "lora_rank": 2, "lora_alpha": 4, "lr": 1e-3,
    "rollout_precision": "float32",
}  # fmt: skip
"""Options of :func:`make_module`: G=2, 2 sampler steps, LoRA rank 2, float32 rollouts."""


_MODE_OPTIONS: dict[str, dict[str, Any]] = {
    "single": {"single_reward": "red"},
    "sequential": {"stages": [("red", 1), ("dark", 1)]},
}
"""The options :func:`make_module` adds for the modes that require one."""


def make_module(
    mode: str = "marble", rewards: list | None = None, **kwargs: Any
) -> MarbleDiffusionModule:
    """A tiny module (8x8 SD3 transformer, G=2, 2 sampler steps, LoRA rank 2)."""
    from marble_lightning.module import MarbleDiffusionModule

    options = {**TINY, **_MODE_OPTIONS.get(mode, {}), **kwargs}
    rewards = rewards if rewards is not None else tiny_rewards()
    return MarbleDiffusionModule(TinySD3Backbone(), rewards, mode=mode, **options)


def make_trainer(max_steps: int, callbacks: list[Callback] | None = None, **kwargs: Any) -> Trainer:
    """A quiet single-CPU ``Trainer`` (no logger, checkpoints, progress bar or summary)."""
    from lightning.pytorch import Trainer

    options: dict[str, Any] = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    options.update(kwargs)
    return Trainer(callbacks=callbacks or [], **options)


def fit(
    module: MarbleDiffusionModule,
    max_steps: int,
    prompts_per_step: int = 2,
    callbacks: list[Callback] | None = None,
    ckpt_path: str | None = None,
    **kwargs: Any,
) -> Trainer:
    """Fit ``module`` on the tiny prompts for ``max_steps`` optimizer steps."""
    from marble_lightning.data import PromptDataModule

    trainer = make_trainer(max_steps, callbacks, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = PromptDataModule(PROMPTS, prompts_per_step=prompts_per_step)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def lora_state(module: MarbleDiffusionModule) -> list[torch.Tensor]:
    """Copies of the policy and old LoRA tensors."""
    return [p.detach().clone() for p in module.trainable_parameters + module.old_parameters]


def base_state(module: MarbleDiffusionModule) -> dict[str, torch.Tensor]:
    """Copies of every non-LoRA parameter, by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if ".lora_" not in n}


# ------------------------------------------------------------------ tiny reward checkpoints


def _tiny_clip_towers(vocab_size: int, context: int, image_size: int) -> tuple[dict, dict]:
    """Text and vision configs of 2-layer, width-32 CLIP towers on the byte-level vocabulary."""
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": context,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 8,
    }
    return text, vision


def save_tiny_clip(
    folder: str | Path, projection_dim: int = 16, image_size: int = 32, seed: int = 0
) -> Path:
    """Save a random tiny ``CLIPModel`` + ``CLIPProcessor`` to ``folder`` (``from_pretrained``
    format).

    Towers of 2 layers and width 32, text context 32 on the byte-level vocabulary of
    :func:`write_byte_level_clip_vocab`. The image processor resizes the shortest side to
    ``image_size`` and centre-crops to it.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    tokenizer = _tiny_clip_tokenizer(folder / "_tokenizer_src", max_tokens=32)
    text, vision = _tiny_clip_towers(len(tokenizer), 32, image_size)
    torch.manual_seed(seed)
    model = CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    ).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


TINY_OPEN_CLIP_CONFIG: dict = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""A 2-layer open_clip ViT config; the vocabulary matches open_clip's default BPE tokenizer."""


def save_tiny_open_clip(
    folder: str | Path, name: str = "tiny-open-clip", seed: int = 0
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (open_clip model config) and ``<name>.safetensors`` (random weights).

    Returns:
        ``(config_path, checkpoint_path)``.
    """
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():  # random projections instead of open_clip's near-degenerate init
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ckpt = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return config_path, ckpt


def save_aesthetic_mlp(path: str | Path, input_dim: int = 16, seed: int = 0) -> Path:
    """Save a random LAION aesthetic-predictor MLP state dict (``layers.{0,2,4,6,7}``) to ``path``.

    ``.safetensors`` suffix -> safetensors, otherwise ``torch.save``.
    """
    from marble_lightning.rewards.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    mlp = AestheticMLP(input_dim)
    path = Path(path)
    state = {k: v.contiguous() for k, v in mlp.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def save_tiny_owlv2(folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Save a random tiny ``Owlv2ForObjectDetection`` + ``Owlv2Processor`` to ``folder``.

    Vision tower: patch 8 on ``image_size`` (16 boxes at 32 px); text tower: 2 layers, context 16.
    """
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    folder = Path(folder)
    tokenizer = _tiny_clip_tokenizer(folder / "_tokenizer_src", max_tokens=16)
    text, vision = _tiny_clip_towers(len(tokenizer), 16, image_size)
    torch.manual_seed(seed)
    # OWL's class head needs projection_dim == text hidden size (as in the released models)
    model = Owlv2ForObjectDetection(
        Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    ).eval()
    with torch.no_grad():  # untrained heads saturate; shrink them so scores and boxes stay graded
        for layer in (
            model.class_head.logit_scale,
            model.class_head.logit_shift,
            model.box_head.dense2,
        ):
            layer.weight.mul_(0.01)
            layer.bias.zero_()
        model.class_head.logit_scale.bias.fill_(2.0)
    model.save_pretrained(folder)
    image_processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------
# Tiny FLUX.1 / Qwen-Image / Wan pipelines (issue 20: one backbone per family)
# --------------------------------------------------------------------------------------------

TINY_FLUX_RESOLUTION = 32
"""Image side (pixels) of :func:`build_tiny_flux_pipeline`; latent ``[4, 16, 16]``."""
TINY_QWEN_IMAGE_RESOLUTION = 32
"""Image side (pixels) of :func:`build_tiny_qwen_image_pipeline`; latent ``[4, 8, 8]``."""
TINY_WAN_RESOLUTION = 32
"""Frame side (pixels) of :func:`build_tiny_wan_pipeline`; latent ``[4, 2, 4, 4]`` for 5 frames."""
TINY_WAN_FRAMES = 5
"""Frames of a tiny Wan clip (``(5 - 1) / 4 + 1 = 2`` latent frames)."""

_TINY_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")


def _tiny_byte_tokenizer(max_length: int = 512):
    """A byte-level ``PreTrainedTokenizerFast`` (no merges: one token per byte) built locally.

    Ids 0-5 are the special tokens ``<pad>``, ``</s>``, ``<unk>``, ``<|im_start|>``,
    ``<|im_end|>``, ``<|endoftext|>``; then the 256 byte symbols (262 tokens). Stands in for
    T5's / UMT5's / Qwen2's tokenizers, which the pipelines call only through the generic
    tokenizer API.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(_TINY_SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(_TINY_SPECIAL_TOKENS[3:]),
        model_max_length=max_length,
    )


def _tiny_t5_encoder(seed: int, vocab_size: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


def _save_pipeline(pipe: Any, directory: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.save_pretrained(str(directory), safe_serialization=True)
    return str(directory)


def build_tiny_flux_pipeline(
    directory: str | Path, *, seed: int = 0, latent_channels: int = 4, guidance_embeds: bool = True
) -> str:
    """Build a tiny random ``FluxPipeline`` (FLUX.1-dev layout) and save it to ``directory``.

    * ``transformer``: ``FluxTransformer2DModel`` with 1 double- and 1 single-stream block,
      2 heads of width 16 (rope axes 4 + 6 + 6), packed input ``4 * latent_channels``,
      the guidance embedding of FLUX.1-dev (``guidance_embeds``);
    * ``vae``: ``AutoencoderKL`` with two levels (factor 2), FLUX's scaling/shift factors;
    * ``text_encoder``: 2-layer ``CLIPTextModel`` (pooled width 32) on the byte-level CLIP
      tokenizer;
    * ``text_encoder_2``: 2-layer ``T5EncoderModel`` (width 32) on a byte-level tokenizer;
    * ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's dynamic shifting.

    Images are :data:`TINY_FLUX_RESOLUTION` (32) pixels; latents ``[4, 16, 16]``, packed
    ``[64, 16]``.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clip_tokenizer = _tiny_clip_tokenizer(directory / "_vocab")
    t5_tokenizer = _tiny_byte_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=_TINY_CLIP_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(latent_channels, TINY_FLUX_RESOLUTION, 0.3611, 0.1159)
    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tokenizer),
        hidden_size=_TINY_CLIP_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_TINY_MAX_TOKENS,
        bos_token_id=len(clip_tokenizer) - 2,
        eos_token_id=len(clip_tokenizer) - 1,
        pad_token_id=len(clip_tokenizer) - 1,
        hidden_act="gelu",
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(clip_config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=_tiny_t5_encoder(seed + 3, len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    return _save_pipeline(pipe, directory)


def build_tiny_qwen_image_pipeline(
    directory: str | Path, *, seed: int = 0, latent_channels: int = 4
) -> str:
    """Build a tiny random ``QwenImagePipeline`` and save it to ``directory``.

    * ``transformer``: ``QwenImageTransformer2DModel``, 2 dual-stream blocks, 2 heads of width
      16 (rope axes 8 + 4 + 4), packed input ``4 * latent_channels``, text width 16;
    * ``vae``: ``AutoencoderKLQwenImage`` with three levels (spatial factor 4), ``latent_channels``;
    * ``text_encoder``: a 2-layer ``Qwen2_5_VLForConditionalGeneration`` of width 16 (1-block
      vision tower, unused) on a byte-level tokenizer with Qwen's chat special tokens;
    * ``scheduler``: Qwen-Image's ``FlowMatchEulerDiscreteScheduler`` config (dynamic,
      exponential shifting, ``shift_terminal`` 0.02).

    Images are :data:`TINY_QWEN_IMAGE_RESOLUTION` (32) pixels, latents ``[4, 8, 8]``.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    log3 = 1.0986122886681098  # Qwen-Image's base_shift = max_shift = log(3)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_byte_tokenizer(max_length=2048)
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=latent_channels,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1 * i for i in range(latent_channels)],
        latents_std=[1.0 + 0.1 * i for i in range(latent_channels)],
    ).eval()
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": vocab,
            "max_position_embeddings": 2048,
            "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "bos_token_id": 1,
            "eos_token_id": 1,
            "pad_token_id": 0,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
            "patch_size": 2,
            "spatial_merge_size": 1,
            "temporal_patch_size": 1,
            "in_chans": 3,
            "window_size": 8,
            "fullatt_block_indexes": [0],
        },
        vocab_size=vocab,
        hidden_size=16,
        image_token_id=vocab - 1,
        video_token_id=vocab - 2,
        vision_start_token_id=vocab - 3,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=log3,
        invert_sigmas=False,
        max_image_seq_len=8192,
        max_shift=log3,
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.02,
        stochastic_sampling=False,
        time_shift_type="exponential",
        use_beta_sigmas=False,
        use_dynamic_shifting=True,
        use_exponential_sigmas=False,
        use_karras_sigmas=False,
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return _save_pipeline(pipe, directory)


def build_tiny_wan_pipeline(
    directory: str | Path, *, seed: int = 0, latent_channels: int = 4
) -> str:
    """Build a tiny random ``WanPipeline`` (Wan 2.1 text-to-video layout) and save it to
    ``directory``.

    * ``transformer``: ``WanTransformer3DModel``, 2 blocks, 2 heads of width 12, patch
      ``(1, 2, 2)``, text width 32, ``latent_channels`` in/out;
    * ``vae``: ``AutoencoderKLWan`` with base width 3 (spatial factor 8, temporal factor 4);
    * ``text_encoder``: 2-layer ``UMT5EncoderModel`` (width 32) on a byte-level tokenizer;
    * ``scheduler``: ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.

    Clips are :data:`TINY_WAN_FRAMES` (5) frames of :data:`TINY_WAN_RESOLUTION` pixels; latents
    ``[4, 2, 4, 4]``.
    """
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_byte_tokenizer()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=latent_channels,
        out_channels=latent_channels,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=latent_channels,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1 * i for i in range(latent_channels)],
        latents_std=[1.0 + 0.1 * i for i in range(latent_channels)],
    ).eval()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_tiny_t5_encoder(seed + 2, len(tokenizer), umt5=True),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    return _save_pipeline(pipe, directory)


__all__ += [
    "TINY_FLUX_RESOLUTION",
    "TINY_QWEN_IMAGE_RESOLUTION",
    "TINY_WAN_FRAMES",
    "TINY_WAN_RESOLUTION",
    "build_tiny_flux_pipeline",
    "build_tiny_qwen_image_pipeline",
    "build_tiny_wan_pipeline",
]


# --------------------------------------------------------------------------------------------
# Tiny ImageReward checkpoint in the release's key layout (issue 19, item 8a)
# --------------------------------------------------------------------------------------------

TINY_IMAGE_REWARD: dict[str, Any] = {
    "image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 2, "vision_heads": 2,
    "text_width": 32, "text_layers": 2, "text_heads": 2, "text_positions": 40,
    "mlp": (32, 24, 16, 8, 4, 1), "embed_dim": 16,
}  # fmt: skip
"""Sizes of :func:`save_tiny_image_reward` (the release: ViT-L/16 at 224, BERT-base, MLP
768-...-1)."""

_TINY_BERT_WORDS = (
    "a",
    "an",
    "the",
    "photo",
    "of",
    "cat",
    "dog",
    "red",
    "blue",
    "on",
    "with",
    "and",
    ",",
    ".",
    '"',
)


def save_tiny_image_reward(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write a random tiny ImageReward in the release's on-disk layout (no ImageReward code used).

    ``ImageReward.pt``: ``torch.save`` of a flat dict of tensors keyed like the release
    (``blip.visual_encoder.{cls_token, pos_embed, patch_embed.proj, blocks.i.{norm1, attn.qkv,
    attn.proj, norm2, mlp.fc1, mlp.fc2}, norm}``, ``blip.text_encoder.{embeddings.*,
    encoder.layer.i.{attention, crossattention, intermediate, output}.*}``, ``blip.vision_proj``,
    ``blip.text_proj``, ``mlp.layers.{0,2,4,6,7}``) with the sizes of :data:`TINY_IMAGE_REWARD`;
    ``med_config.json`` (BLIP's BERT config: heads, eps, vocabulary incl. ``[DEC]``/``[ENC]``);
    ``tokenizer/``: a BERT uncased WordPiece tokenizer on a small vocabulary (without ``[DEC]``/
    ``[ENC]``, like ``bert-base-uncased``).

    Returns:
        ``{"checkpoint": ..., "med_config": ..., "tokenizer": ...}`` paths.
    """
    from transformers import BertTokenizer

    c = TINY_IMAGE_REWARD
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{ch}" for ch in letters)]
    words += [w for w in _TINY_BERT_WORDS if w not in words]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    vocab = len(words) + 2  # BLIP adds [DEC] and [ENC]

    g = torch.Generator().manual_seed(seed)

    def linear(prefix: str, n_out: int, n_in: int, into: dict[str, Tensor]) -> None:
        into[f"{prefix}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in**0.5
        into[f"{prefix}.bias"] = 0.1 * torch.randn(n_out, generator=g)

    def norm(prefix: str, width: int, into: dict[str, Tensor]) -> None:
        into[f"{prefix}.weight"] = 1.0 + 0.1 * torch.randn(width, generator=g)
        into[f"{prefix}.bias"] = 0.1 * torch.randn(width, generator=g)

    state: dict[str, Tensor] = {}
    vw, tw, patch = c["vision_width"], c["text_width"], c["patch_size"]
    v = "blip.visual_encoder."
    state[v + "cls_token"] = 0.5 * torch.randn(1, 1, vw, generator=g)
    state[v + "pos_embed"] = 0.5 * torch.randn(
        1, (c["image_size"] // patch) ** 2 + 1, vw, generator=g
    )
    state[v + "patch_embed.proj.weight"] = (
        torch.randn(vw, 3, patch, patch, generator=g) / (3 * patch * patch) ** 0.5
    )
    state[v + "patch_embed.proj.bias"] = 0.1 * torch.randn(vw, generator=g)
    for i in range(c["vision_layers"]):
        b = f"{v}blocks.{i}."
        norm(b + "norm1", vw, state)
        linear(b + "attn.qkv", 3 * vw, vw, state)
        linear(b + "attn.proj", vw, vw, state)
        norm(b + "norm2", vw, state)
        linear(b + "mlp.fc1", 4 * vw, vw, state)
        linear(b + "mlp.fc2", vw, 4 * vw, state)
    norm(v + "norm", vw, state)

    t = "blip.text_encoder."
    state[t + "embeddings.position_ids"] = torch.arange(c["text_positions"]).expand(1, -1).clone()
    state[t + "embeddings.word_embeddings.weight"] = torch.randn(vocab, tw, generator=g)
    state[t + "embeddings.position_embeddings.weight"] = 0.5 * torch.randn(
        c["text_positions"], tw, generator=g
    )
    norm(t + "embeddings.LayerNorm", tw, state)
    for i in range(c["text_layers"]):
        b = f"{t}encoder.layer.{i}."
        for block, kv_width in (("attention", tw), ("crossattention", vw)):
            linear(f"{b}{block}.self.query", tw, tw, state)
            linear(f"{b}{block}.self.key", tw, kv_width, state)
            linear(f"{b}{block}.self.value", tw, kv_width, state)
            linear(f"{b}{block}.output.dense", tw, tw, state)
            norm(f"{b}{block}.output.LayerNorm", tw, state)
        linear(b + "intermediate.dense", 4 * tw, tw, state)
        linear(b + "output.dense", tw, 4 * tw, state)
        norm(b + "output.LayerNorm", tw, state)
    linear("blip.vision_proj", c["embed_dim"], vw, state)
    linear("blip.text_proj", c["embed_dim"], tw, state)
    dims = c["mlp"]
    for index, n_in, n_out in zip((0, 2, 4, 6, 7), dims[:-1], dims[1:]):
        linear(f"mlp.layers.{index}", n_out, n_in, state)

    checkpoint = folder / "ImageReward.pt"
    torch.save(state, checkpoint)
    med_config = folder / "med_config.json"
    med_config.write_text(json.dumps({
        "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
        "hidden_size": tw, "intermediate_size": 4 * tw, "num_attention_heads": c["text_heads"],
        "num_hidden_layers": c["text_layers"], "layer_norm_eps": 1e-12,
        "max_position_embeddings": c["text_positions"], "vocab_size": vocab, "pad_token_id": 0,
        "type_vocab_size": 2, "encoder_width": vw, "add_cross_attention": True,
        "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1, "initializer_range": 0.02,
    }, indent=2))  # fmt: skip
    return {"checkpoint": checkpoint, "med_config": med_config, "tokenizer": folder / "tokenizer"}


__all__ += ["TINY_IMAGE_REWARD", "save_tiny_image_reward"]
