"""ImageReward (Xu et al., 2023) rebuilt on transformers' BLIP modules; no ``image-reward`` package.

The ``image-reward`` package (1.5, its latest release) does not import next to transformers 5 (it
imports helpers transformers 5 removed, and OpenAI's ``clip`` module it does not declare). This
module rebuilds the scorer from the original ``ImageReward.pt`` state dict instead:

* image encoder: BLIP's ViT (timm layout; ViT-L/16 at 224 px for ImageReward-v1.0) as a
  transformers :class:`~transformers.BlipVisionModel` (LayerNorm eps 1e-6, as BLIP's ViT);
* text encoder: BLIP's BERT with cross-attention in every layer (``med_config.json``) as a
  transformers :class:`~transformers.BlipTextModel` run as a bidirectional encoder, with the image
  tokens as cross-attention context;
* head: the MLP ``mlp.layers.{0,2,4,6,7}`` (five linear layers, no activations; the dropouts in
  between are inactive at inference) on the text encoder's ``[CLS]`` output;
* score: ``(mlp(cls) - 0.16717362830052426) / 1.0333394966054072`` (the constants of the release).

Text: BERT uncased WordPiece (``bert-base-uncased`` plus BLIP's added ``[DEC]``/``[ENC]`` tokens),
padded/truncated to 35 tokens, ``[CLS]`` first (ImageReward does not swap in ``[ENC]``). Images:
shortest side resized to 224 (bicubic, antialiased), centre crop, CLIP mean/std normalisation; the
release resizes 8-bit PIL images, so scores agree with it up to resampling/rounding differences.

The checkpoint is read with ``torch.load(..., weights_only=True)``; a file that needs arbitrary
unpickling is refused (never executed). Architecture sizes (widths, depths, patch, image size,
vocabulary, MLP widths) are read from the tensor shapes; head counts and the text LayerNorm eps from
``med_config.json`` when given, else ``width // 64`` heads (16 for ViT-L, 12 for BERT-base) and
1e-12.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from marble_lightning.rewards._loading import (
    LazyModel,
    batched,
    load_state_dict_file,
    looks_like_path,
    normalize,
    parse_dtype,
    require_file,
    resize_center_crop,
)
from marble_lightning.rewards.base import RewardModel

IMAGE_REWARD_MEAN = 0.16717362830052426
"""Mean of the raw MLP output the release standardises with (``ImageReward.mean``)."""
IMAGE_REWARD_STD = 1.0333394966054072
"""Standard deviation of the raw MLP output (``ImageReward.std``)."""
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TOKENS = 35
"""Prompt length of the release (``padding="max_length", truncation=True, max_length=35``)."""

HUB_MODELS = {"ImageReward-v1.0": "THUDM/ImageReward"}
"""Release names -> hub repositories holding ``ImageReward.pt`` and ``med_config.json``."""
DEFAULT_TOKENIZER = "bert-base-uncased"

_VISION = "blip.visual_encoder."
_TEXT = "blip.text_encoder."
_MLP = re.compile(r"^mlp\.layers\.(\d+)\.(weight|bias)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_VISION_BLOCK_KEYS = {
    "norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}  # fmt: skip
_VISION_TOP_KEYS = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}


def _vision_key(key: str) -> str | None:
    """BLIP ViT key (without prefix) -> ``BlipVisionModel`` key (``None``: not a ViT weight)."""
    if key in _VISION_TOP_KEYS:
        return _VISION_TOP_KEYS[key]
    m = _BLOCK.match(key)
    if m is None:
        return None
    rest = m.group(2)
    for old, new in _VISION_BLOCK_KEYS.items():
        if rest.startswith(old + "."):
            return f"encoder.layers.{m.group(1)}.{new}{rest[len(old) :]}"
    return None


def _vision_key_back(key: str) -> str:
    """``BlipVisionModel`` key -> the release's key (for error messages)."""
    for old, new in _VISION_TOP_KEYS.items():
        if key == new:
            return _VISION + old
    m = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", key)
    if m is not None:
        for old, new in _VISION_BLOCK_KEYS.items():
            if m.group(2).startswith(new + "."):
                return f"{_VISION}blocks.{m.group(1)}.{old}{m.group(2)[len(new) :]}"
    return _VISION + key


def _load_strict(module: nn.Module, state: dict[str, Tensor], original_key) -> None:
    """``load_state_dict`` that reports missing/unexpected keys by their names in the release."""
    result = module.load_state_dict(state, strict=False)
    problems = [f"missing {original_key(k)}" for k in result.missing_keys]
    problems += [f"unexpected {original_key(k)}" for k in result.unexpected_keys]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("; ".join(problems[:5]) + more)


def split_image_reward_state_dict(
    state: dict[str, Tensor], where: str = "checkpoint"
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[tuple[Tensor, Tensor]]]:
    """Map an original ``ImageReward.pt`` state dict onto transformers' BLIP key layout.

    Args:
        state: tensors keyed like the release (``blip.visual_encoder.*``, ``blip.text_encoder.*``,
            ``mlp.layers.*``; ``blip.vision_proj``/``blip.text_proj`` and the text
            ``position_ids`` buffer are not used by the score and are ignored).
        where: what to name in errors (the checkpoint path).

    Returns:
        ``(vision, text, mlp)``: ``BlipVisionModel`` and ``BlipTextModel`` state dicts and the MLP
        head's ``(weight, bias)`` pairs in order.

    Raises:
        ValueError: a part is missing or a ViT key is not recognised.
    """
    vision: dict[str, Tensor] = {}
    text: dict[str, Tensor] = {}
    mlp: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.startswith(_VISION):
            new = _vision_key(key[len(_VISION) :])
            if new is None:
                raise ValueError(f"{where}: unexpected image-encoder key {key!r} (not BLIP's ViT)")
            vision[new] = value
        elif key.startswith(_TEXT):
            sub = key[len(_TEXT) :]
            if sub != "embeddings.position_ids" and not sub.startswith("pooler."):
                text[sub] = value
        elif (m := _MLP.match(key)) is not None:
            mlp.setdefault(int(m.group(1)), {})[m.group(2)] = value
    missing = [
        name
        for name, part in (
            ("blip.visual_encoder", vision),
            ("blip.text_encoder", text),
            ("mlp", mlp),
        )
        if not part
    ]
    if missing:
        sample = ", ".join(sorted(state)[:5])
        raise ValueError(
            f"{where}: not an ImageReward state dict: no {' / '.join(missing)} weights "
            f"(keys start with: {sample or 'nothing'})"
        )
    layers = []
    for index in sorted(mlp):
        if set(mlp[index]) != {"weight", "bias"}:
            raise ValueError(f"{where}: mlp.layers.{index} needs both weight and bias")
        layers.append((mlp[index]["weight"], mlp[index]["bias"]))
    return vision, text, layers


def _count_layers(keys: Sequence[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise ValueError(f"layers are not numbered 0..n-1: {sorted(found)}")
    return len(found)


class ImageRewardScorer(nn.Module):
    """BLIP image encoder + cross-attending BERT + MLP head -> raw ImageReward score ``[B]``.

    Built by :meth:`from_state_dict` from the release's state dict. ``forward`` returns the raw
    head output; the reward standardises it with :data:`IMAGE_REWARD_MEAN`/:data:`IMAGE_REWARD_STD`.
    """

    def __init__(self, vision_config: Any, text_config: Any, mlp_dims: Sequence[int]) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = nn.Sequential(
            *[nn.Linear(a, b) for a, b in itertools.pairwise(mlp_dims)]
        )  # the release's layers 0,2,4,6,7 (dropouts in between, no activations)
        self.image_size = int(vision_config.image_size)

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, Tensor],
        *,
        text_heads: int | None = None,
        vision_heads: int | None = None,
        text_layer_norm_eps: float = 1e-12,
        text_hidden_act: str = "gelu",
        where: str = "checkpoint",
    ) -> ImageRewardScorer:
        """Infer the sizes from the tensor shapes, build the modules, load the weights (strict).

        Args:
            state: the release's state dict (see :func:`split_image_reward_state_dict`).
            text_heads, vision_heads: attention heads; default ``width // 64``.
            text_layer_norm_eps, text_hidden_act: BERT settings from ``med_config.json``.
            where: what to name in errors.

        Raises:
            ValueError: the state dict does not fit the architecture (names ``where``).
        """
        from transformers import BlipTextConfig, BlipVisionConfig

        vision, text, layers = split_image_reward_state_dict(state, where)

        def v(key: str) -> Tensor:
            if key not in vision:
                raise ValueError(f"missing {_vision_key_back(key)}")
            return vision[key]

        def t(key: str) -> Tensor:
            if key not in text:
                raise ValueError(f"missing {_TEXT}{key}")
            return text[key]

        try:
            patch = v("embeddings.patch_embedding.weight")
            positions = v("embeddings.position_embedding").shape[1]
            v_width, v_patch = int(patch.shape[0]), int(patch.shape[-1])
            grid = round((positions - 1) ** 0.5)
            if grid * grid != positions - 1:
                raise ValueError(f"{positions - 1} patch positions are not a square grid")
            v_layers = _count_layers(list(vision), r"encoder\.layers\.(\d+)\.")
            words = t("embeddings.word_embeddings.weight")
            t_width = int(words.shape[1])
            cross = t("encoder.layer.0.crossattention.self.key.weight")
            vision_config = BlipVisionConfig(
                hidden_size=v_width,
                intermediate_size=int(v("encoder.layers.0.mlp.fc1.weight").shape[0]),
                num_hidden_layers=v_layers,
                num_attention_heads=vision_heads or max(v_width // 64, 1),
                image_size=grid * v_patch,
                patch_size=v_patch,
                hidden_act="gelu",
                layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
                attention_dropout=0.0,
            )
            text_config = BlipTextConfig(
                vocab_size=int(words.shape[0]),
                hidden_size=t_width,
                encoder_hidden_size=int(cross.shape[1]),
                intermediate_size=int(t("encoder.layer.0.intermediate.dense.weight").shape[0]),
                num_hidden_layers=_count_layers(list(text), r"encoder\.layer\.(\d+)\."),
                num_attention_heads=text_heads or max(t_width // 64, 1),
                max_position_embeddings=int(t("embeddings.position_embeddings.weight").shape[0]),
                hidden_act=text_hidden_act,
                layer_norm_eps=text_layer_norm_eps,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                is_decoder=True,  # builds the cross-attention blocks; run with is_decoder=False
                use_cache=False,
                pad_token_id=0,
                bos_token_id=None,
                eos_token_id=None,
                sep_token_id=None,
            )
            mlp_dims = [int(layers[0][0].shape[1])] + [int(w.shape[0]) for w, _ in layers]
            if mlp_dims[0] != t_width or mlp_dims[-1] != 1:
                raise ValueError(f"MLP head widths {mlp_dims} do not map {t_width} features to 1")
            model = cls(vision_config, text_config, mlp_dims)
            _load_strict(model.vision, vision, _vision_key_back)
            _load_strict(model.text, text, lambda k: _TEXT + k)
            mlp = {
                f"{i}.{n}": t
                for i, pair in enumerate(layers)
                for n, t in zip(("weight", "bias"), pair)
            }
            model.mlp.load_state_dict(mlp, strict=True)
        except (RuntimeError, ValueError) as err:
            detail = " ".join(str(err).split())
            raise ValueError(
                f"{where}: does not fit the ImageReward architecture: {detail}"
            ) from err
        return model

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Raw scores ``[B]`` of normalised images ``[B, 3, S, S]`` and padded token ids
        ``[B, L]``."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(
            image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
        )
        hidden = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state
        return self.mlp(hidden[:, 0, :]).squeeze(-1)


def read_med_config(path: str | os.PathLike[str] | None, reward: str) -> dict[str, Any]:
    """``num_attention_heads``/``layer_norm_eps``/``hidden_act`` of a BLIP ``med_config.json``."""
    if path is None:
        return {}
    p = require_file(path, reward)
    try:
        config = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"reward {reward!r}: {str(p)!r} is not a JSON med_config: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"reward {reward!r}: {str(p)!r} is not a JSON object")
    out = {}
    if "num_attention_heads" in config:
        out["text_heads"] = int(config["num_attention_heads"])
    if "layer_norm_eps" in config:
        out["text_layer_norm_eps"] = float(config["layer_norm_eps"])
    if "hidden_act" in config:
        out["text_hidden_act"] = str(config["hidden_act"])
    return out


class ImageRewardReward(RewardModel):
    """ImageReward score of each (prompt, image) pair, standardised as in the release.

    Args:
        model: a local ``ImageReward.pt`` (the release's state dict; ``FileNotFoundError`` naming
            the path if missing), or ``"ImageReward-v1.0"`` / a hub repository holding
            ``ImageReward.pt`` (downloaded on first use into ``download_root``).
        med_config: the BLIP ``med_config.json`` (text heads, LayerNorm eps). Default: a
            ``med_config.json`` next to a local checkpoint, the hub repository's for a hub model,
            else ``width // 64`` heads and eps 1e-12 (the release's values).
        tokenizer: BERT uncased tokenizer (local folder or hub id); ``[DEC]``/``[ENC]`` are added
            as in BLIP when missing.
        download_root: cache folder for hub downloads.
        vision_heads: heads of the image encoder (default ``width // 64``: 16 for ViT-L).
        max_length: prompt tokens (35 in the release).
        batch_size: images per forward pass (``None``: the whole batch).
        dtype: compute dtype of the BLIP encoders (``"float32"`` as the release).
        name: reward name in logs.
    """

    name = "imagereward"

    def __init__(
        self,
        model: str = "ImageReward-v1.0",
        med_config: str | None = None,
        tokenizer: str = DEFAULT_TOKENIZER,
        download_root: str | None = None,
        vision_heads: int | None = None,
        max_length: int = MAX_TOKENS,
        batch_size: int | None = None,
        dtype: str = "float32",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if not isinstance(model, str) or not model.strip():
            raise ValueError(
                f"reward {self.name!r}: model must be a non-empty string, got {model!r}"
            )
        self.is_local = os.path.exists(os.path.expanduser(model)) or looks_like_path(model)
        if self.is_local:
            model = str(require_file(model, self.name))
            sibling = os.path.join(os.path.dirname(model), "med_config.json")
            if med_config is None and os.path.isfile(sibling):
                med_config = sibling
        self.model_ref = model
        self.med_config = None if med_config is None else str(require_file(med_config, self.name))
        self.tokenizer_ref = tokenizer
        self.download_root = download_root
        for label, value in (("vision_heads", vision_heads), ("batch_size", batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"reward {self.name!r}: {label} must be a positive int, got {value!r}"
                )
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(
                f"reward {self.name!r}: max_length must be an int >= 2, got {max_length!r}"
            )
        self.vision_heads = vision_heads
        self.max_length = max_length
        self.batch_size = batch_size
        self.dtype = parse_dtype(dtype, self.name)
        self.mean = IMAGE_REWARD_MEAN
        self.std = IMAGE_REWARD_STD
        self._model = LazyModel(self._build)

    def _hub_file(self, filename: str) -> str:
        from huggingface_hub import hf_hub_download

        repo = HUB_MODELS.get(self.model_ref, self.model_ref)
        return hf_hub_download(repo_id=repo, filename=filename, cache_dir=self.download_root)

    def _build(self):
        from transformers import AutoTokenizer

        checkpoint = self.model_ref if self.is_local else self._hub_file("ImageReward.pt")
        med_config = self.med_config
        if med_config is None and not self.is_local:
            med_config = self._hub_file("med_config.json")
        settings = read_med_config(med_config, self.name)
        state = load_state_dict_file(checkpoint, self.name)
        scorer = ImageRewardScorer.from_state_dict(
            state,
            vision_heads=self.vision_heads,
            where=f"reward {self.name!r}: {checkpoint!r}",
            **settings,
        )
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_ref, cache_dir=self.download_root)
        if "[DEC]" not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        if "[ENC]" not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        vocab = scorer.text.config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(
                f"reward {self.name!r}: tokenizer {self.tokenizer_ref!r} has {len(tokenizer)} "
                f"tokens but {checkpoint!r} embeds only {vocab}"
            )
        return scorer, tokenizer

    def preprocess(self, images: Tensor, image_size: int) -> Tensor:
        """Images in ``[0, 1]`` -> shortest side ``image_size``, centre crop, CLIP normalisation."""
        images = resize_center_crop(images.float(), image_size)
        return normalize(images, IMAGE_MEAN, IMAGE_STD)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        scorer, tokenizer = self._model.get(images.device, self.dtype)
        out = []
        for part in batched(images.shape[0], self.batch_size):
            tokens = tokenizer(
                list(prompts[part]),
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(images.device)
            pixels = self.preprocess(images[part], scorer.image_size).to(self.dtype)
            out.append(scorer(pixels, tokens["input_ids"], tokens["attention_mask"]).float())
        return (torch.cat(out) - self.mean) / self.std
