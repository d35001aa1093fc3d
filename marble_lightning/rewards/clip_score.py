"""CLIP-score rewards: cosine similarity of CLIP image and text embeddings.

Two back ends:

* :class:`CLIPScoreReward`: a transformers ``CLIPModel`` (e.g. CLIP ViT-L/14 as OpenAI ships it),
  loaded with ``from_pretrained`` from a local folder or a hub id.
* :class:`OpenCLIPScoreReward`: an open_clip model from a model-config JSON (registered with
  ``open_clip.add_model_config``) or a built-in architecture name, plus an optional checkpoint file.

Score: ``scale * cos(f_img, f_txt)`` (CLIPScore without the clamp; ``torchmetrics``'s CLIPScore is
``max(100 * cos, 0)``). Images are resized on their device, CLIP style (shortest side to the
model's size, bicubic with antialiasing, centre crop), then normalised with the model's mean/std.
This follows the reference preprocessing up to resampling details (the references resample uint8
PIL images).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from marble_lightning.checks import check_int
from marble_lightning.rewards._loading import (
    LazyModel,
    batched,
    clip_image_settings,
    model_output_features,
    normalize,
    parse_dtype,
    require_file,
    resize_center_crop,
    resolve_source,
)
from marble_lightning.rewards.base import RewardModel


class TransformersCLIPReward(RewardModel):
    """Base of rewards built on a transformers ``CLIPModel`` + ``CLIPProcessor``.

    Args:
        model: local folder or hub id of the ``CLIPModel`` weights.
        processor: local folder or hub id of the processor (tokenizer + image settings);
            defaults to ``model``.
        batch_size: images per forward pass (``None``: the whole batch at once).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the CLIP model.
        name: reward name in logs.
    """

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        batch_size: int | None = None,
        dtype: str = "float32",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size)
        self.model_ref, self.model_local = resolve_source(model, self.name)
        self.processor_ref, self.processor_local = (
            resolve_source(processor, self.name)
            if processor is not None
            else (self.model_ref, self.model_local)
        )
        self.dtype = parse_dtype(dtype, self.name)
        self._clip = LazyModel(self._build)

    def _build(self):
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(self.model_ref, local_files_only=self.model_local)
        processor = CLIPProcessor.from_pretrained(
            self.processor_ref, local_files_only=self.processor_local
        )
        return model, processor

    def clip(self, device: torch.device | str):
        """``(CLIPModel, CLIPProcessor)``, loaded on first use, the model on ``device``."""
        return self._clip.get(device, self.dtype)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised projected image embeddings, float32 ``[B, D]``."""
        model, processor = self.clip(images.device)
        crop, edge, mean, std = clip_image_settings(processor.image_processor)
        out = []
        for sl in batched(images.shape[0], self.batch_size):
            x = normalize(resize_center_crop(images[sl].float(), crop, edge), mean, std)
            feats = model_output_features(model.get_image_features(pixel_values=x.to(self.dtype)))
            out.append(feats.float())
        f = torch.cat(out)
        return f / f.norm(dim=-1, keepdim=True)

    def text_embeddings(self, prompts: Sequence[str], device: torch.device | str) -> Tensor:
        """L2-normalised projected text embeddings, float32 ``[B, D]`` (truncated to the
        context)."""
        model, processor = self.clip(device)
        max_len = model.config.text_config.max_position_embeddings
        out = []
        for sl in batched(len(prompts), self.batch_size):
            tok = processor.tokenizer(
                list(prompts[sl]),
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            feats = model_output_features(
                model.get_text_features(
                    input_ids=tok["input_ids"].to(device),
                    attention_mask=tok["attention_mask"].to(device),
                )
            )
            out.append(feats.float())
        f = torch.cat(out)
        return f / f.norm(dim=-1, keepdim=True)

    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``cos(f_img, f_txt)`` per pair, float32 ``[B]``."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts, images.device)).sum(
            -1
        )


class CLIPScoreReward(TransformersCLIPReward):
    """``scale * cos(image, text)`` with a transformers ``CLIPModel`` (default CLIP ViT-L/14).

    Args:
        model: local folder or hub id (``"openai/clip-vit-large-patch14"``).
        processor: processor folder or hub id (default: ``model``).
        scale: multiplies the cosine (1.0; torchmetrics' CLIPScore uses 100 and clamps at 0).
        batch_size: images per forward pass (``None``: all at once).
        dtype: CLIP model dtype.
        name: reward name in logs.
    """

    name = "clipscore"

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        scale: float = 1.0,
        batch_size: int | None = None,
        dtype: str = "float32",
        name: str | None = None,
    ) -> None:
        super().__init__(model, processor, batch_size, dtype, name)
        self.scale = float(scale)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.scale * self.cosine(images, prompts)


class OpenCLIPScoreReward(RewardModel):
    """``scale * cos(image, text)`` with an open_clip model.

    Args:
        model_config: path to an open_clip model-config JSON (keys ``embed_dim``, ``vision_cfg``,
            ``text_cfg``; registered under its file stem with ``open_clip.add_model_config``), or a
            built-in architecture name such as ``"ViT-H-14"``, or ``"local-dir:<folder>"``.
        checkpoint: weights file (``.safetensors``, or a torch file read with
            ``weights_only=True``; a ``{"state_dict": ...}`` wrapper is accepted), or an open_clip
            pretrained tag, or ``None`` for random weights (tests only).
        scale: multiplies the cosine.
        image_mean: per-channel mean overriding the model's preprocessing config.
        image_std: per-channel std overriding the model's preprocessing config.
        batch_size: images per forward pass (``None``: all at once).
        dtype: model dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).
        name: reward name in logs.
    """

    name = "openclip_score"

    def __init__(
        self,
        model_config: str,
        checkpoint: str | None = None,
        scale: float = 1.0,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        batch_size: int | None = None,
        dtype: str = "float32",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size)
        self.model_name = self._register_config(model_config)
        self.checkpoint = None
        if checkpoint is not None:
            ref, local = resolve_source(checkpoint, self.name)
            if local:
                ref = str(require_file(ref, self.name))
            self.checkpoint = ref
        self.scale = float(scale)
        self.image_mean = None if image_mean is None else [float(v) for v in image_mean]
        self.image_std = None if image_std is None else [float(v) for v in image_std]
        self.dtype = parse_dtype(dtype, self.name)
        self._clip = LazyModel(self._build)

    def _register_config(self, model_config: str) -> str:
        if not isinstance(model_config, (str, os.PathLike)) or not str(model_config).strip():
            raise ValueError(
                f"reward {self.name!r}: model_config must be a non-empty string, got "
                f"{model_config!r}"
            )
        model_config = os.fspath(model_config)
        if model_config.startswith(("local-dir:", "hf-hub:")):
            if model_config.startswith("local-dir:") and not Path(model_config[10:]).is_dir():
                raise FileNotFoundError(
                    f"reward {self.name!r}: no such directory: {model_config[10:]!r}"
                )
            return model_config
        if model_config.endswith(".json") or os.sep in model_config:
            path = require_file(model_config, self.name)
            cfg = json.loads(path.read_text())
            missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
            if missing:
                raise ValueError(
                    f"reward {self.name!r}: open_clip model config {str(path)!r} lacks keys "
                    f"{missing}"
                )
            import open_clip

            open_clip.add_model_config(path)
            return path.stem
        return model_config

    def _build(self):
        import open_clip

        model = open_clip.create_model(self.model_name, pretrained=self.checkpoint, device="cpu")
        tokenizer = open_clip.get_tokenizer(self.model_name)
        return model, tokenizer

    def clip(self, device: torch.device | str):
        """``(open_clip model, tokenizer)``, loaded on first use, the model on ``device``."""
        return self._clip.get(device, self.dtype)

    def preprocess_settings(self, model) -> tuple[tuple[int, int], list[float], list[float]]:
        """``(size (h, w), mean, std)`` from the model's preprocessing config and the overrides."""
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        size = (size, size) if isinstance(size, int) else tuple(size)
        mean = self.image_mean or list(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        std = self.image_std or list(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        return (int(size[0]), int(size[1])), mean, std

    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings, float32 ``[B, D]``."""
        model, _ = self.clip(images.device)
        size, mean, std = self.preprocess_settings(model)
        out = []
        for sl in batched(images.shape[0], self.batch_size):
            x = normalize(resize_center_crop(images[sl].float(), size), mean, std)
            out.append(model.encode_image(x.to(self.dtype)).float())
        f = torch.cat(out)
        return f / f.norm(dim=-1, keepdim=True)

    def text_embeddings(self, prompts: Sequence[str], device: torch.device | str) -> Tensor:
        """L2-normalised text embeddings, float32 ``[B, D]``."""
        model, tokenizer = self.clip(device)
        out = []
        for sl in batched(len(prompts), self.batch_size):
            out.append(model.encode_text(tokenizer(list(prompts[sl])).to(device)).float())
        f = torch.cat(out)
        return f / f.norm(dim=-1, keepdim=True)

    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``cos(f_img, f_txt)`` per pair, float32 ``[B]``."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts, images.device)).sum(
            -1
        )

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.scale * self.cosine(images, prompts)
