"""Shared helpers for reward models: where weights come from and how images are prepared.

Local paths vs hub ids: a string that names an existing file or folder is local. A string that does
not exist but looks like a path (absolute, starts with ``.``/``~``, contains a backslash, has more
than one ``/``, or ends in a weight-file suffix) raises ``FileNotFoundError`` naming the path and
the reward. Anything else (``"org/name"`` or ``"name"``) is treated as a hub id and handed to the
library's ``from_pretrained``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json", ".onnx")


def looks_like_path(ref: str) -> bool:
    """True if ``ref`` is meant as a filesystem path rather than a hub id."""
    return (
        os.path.isabs(ref)
        or ref.startswith((".", "~"))
        or "\\" in ref
        or ref.count("/") > 1
        or ref.lower().endswith(_WEIGHT_SUFFIXES)
    )


def resolve_source(ref: str | os.PathLike[str], reward: str) -> tuple[str, bool]:
    """Classify a model reference.

    Args:
        ref: a local file/folder path or a hub id.
        reward: the reward's name, used in error messages.

    Returns:
        ``(ref, is_local)``; a local ``ref`` is returned expanded (``~``) and as a string.

    Raises:
        FileNotFoundError: ``ref`` looks like a path but nothing exists there.
        ValueError: ``ref`` is empty.
    """
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(
            f"reward {reward!r}: model path or hub id must be a non-empty string, got {ref!r}"
        )
    expanded = os.path.expanduser(ref)
    if os.path.exists(expanded):
        return expanded, True
    if isinstance(ref, str) and looks_like_path(ref):
        raise FileNotFoundError(f"reward {reward!r}: no such file or directory: {expanded!r}")
    return ref, False


def require_file(path: str | os.PathLike[str], reward: str) -> Path:
    """Return ``path`` as a ``Path`` if it is an existing file, else raise ``FileNotFoundError``."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.is_file():
        raise FileNotFoundError(f"reward {reward!r}: no such file: {str(p)!r}")
    return p


def load_state_dict_file(path: str | os.PathLike[str], reward: str) -> dict[str, Tensor]:
    """Load a tensor state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    A torch file holding ``{"state_dict": {...}}`` is unwrapped. Never unpickles arbitrary objects.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file does not hold a mapping of tensors, or cannot be read without
            unpickling arbitrary objects (a crafted pickle is refused, never executed).
    """
    p = require_file(path, reward)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p), device="cpu")
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else ""
            raise ValueError(
                f"reward {reward!r}: cannot load {str(p)!r} safely (torch.load weights_only=True "
                f"refused it; nothing was executed): {type(err).__name__}: {first}"
            ) from err
        if (
            isinstance(state, dict)
            and "state_dict" in state
            and isinstance(state["state_dict"], dict)
        ):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"reward {reward!r}: {str(p)!r} does not hold a state dict of tensors")
    return state


def resize_center_crop(
    images: Tensor, size: int | tuple[int, int], shortest_edge: int | None = None
) -> Tensor:
    """CLIP-style resize: shortest side to ``shortest_edge`` (bicubic, antialiased), centre crop.

    Args:
        images: float ``[B, C, H, W]``.
        size: crop size, ``int`` or ``(height, width)``.
        shortest_edge: target of the shortest side before cropping; defaults to ``min(size)``.

    Returns:
        float ``[B, C, size_h, size_w]``. Bicubic overshoot is clamped to the input range
        ``[0, 1]``.
    """
    ch, cw = (size, size) if isinstance(size, int) else size
    edge = shortest_edge if shortest_edge is not None else min(ch, cw)
    h, w = images.shape[-2:]
    if min(h, w) != edge:
        scale = edge / min(h, w)
        nh, nw = (
            max(edge, int(h * scale)),
            max(edge, int(w * scale)),
        )  # floor, as torchvision/transformers
        images = F.interpolate(
            images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False
        )
        images = images.clamp(0.0, 1.0)
        h, w = nh, nw
    if (h, w) != (ch, cw):
        if h < ch or w < cw:  # pad symmetrically with 0 when the crop is larger than the image
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            h, w = images.shape[-2:]
        top, left = (h - ch) // 2, (w - cw) // 2
        images = images[..., top : top + ch, left : left + cw]
    return images


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(images - mean) / std`` per channel; ``images`` float ``[B, 3, H, W]``."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """Float ``[B, 3, H, W]`` in ``[0, 1]`` -> uint8 numpy ``[B, H, W, 3]`` (round to nearest)."""
    arr = (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: Tensor) -> list:
    """Float ``[B, 3, H, W]`` in ``[0, 1]`` -> list of RGB ``PIL.Image``."""
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8_hwc(images)]


def model_output_features(out: object) -> Tensor:
    """Projected features from a transformers ``get_*_features`` call (tensor or output object)."""
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    raise TypeError(f"cannot read features from {type(out).__name__}")


def batched(n: int, batch_size: int | None) -> list[slice]:
    """Slices covering ``range(n)`` in chunks of ``batch_size`` (one chunk if ``None``)."""
    if batch_size is None or batch_size <= 0:
        return [slice(0, n)]
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype, reward: str) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` (or ``fp32``/``bf16``/``fp16``, or a dtype) ->
    dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(
            f"reward {reward!r}: unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}"
        )
    return _DTYPES[dtype]


class LazyModel:
    """A frozen model built on first use and kept OUTSIDE the ``nn.Module`` tree.

    Reward weights therefore never enter the training module's ``state_dict``, optimizer or DDP
    wrapper. :meth:`get` moves the model to the requested device (and dtype) when needed.

    Args:
        build: zero-argument callable returning the loaded object. If it returns a tuple, its
            first element is the ``nn.Module`` to freeze and move; the rest (tokenizers,
            processors) is returned unchanged.
    """

    def __init__(self, build) -> None:
        self._build = build
        self._value = None
        self._place: tuple[torch.device, torch.dtype | None] | None = None

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def get(self, device: torch.device | str, dtype: torch.dtype | None = None):
        """The built object, its module on ``device`` (and ``dtype`` if given), in eval mode."""
        if self._value is None:
            value = self._build()
            module = value[0] if isinstance(value, tuple) else value
            module.eval().requires_grad_(False)
            self._value = value
        module = self._value[0] if isinstance(self._value, tuple) else self._value
        place = (torch.device(device), dtype)
        if self._place != place:
            module.to(device=place[0], dtype=dtype) if dtype is not None else module.to(place[0])
            self._place = place
        return self._value


def clip_image_settings(
    image_processor: object,
) -> tuple[tuple[int, int], int, list[float], list[float]]:
    """Read ``(crop (h, w), shortest_edge, mean, std)`` from a transformers CLIP image processor."""

    def as_dict(value: object, int_key: str) -> dict:
        if value is None:
            return {}
        if isinstance(value, int):
            return (
                {int_key: value}
                if int_key == "shortest_edge"
                else {"height": value, "width": value}
            )
        pairs = (
            value.items() if isinstance(value, dict) else dict(value).items()
        )  # SizeDict iterates pairs
        return {k: v for k, v in pairs if v is not None}

    size = as_dict(getattr(image_processor, "size", None), "shortest_edge")
    crop = as_dict(getattr(image_processor, "crop_size", None), "crop")
    edge = size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224))
    if not getattr(image_processor, "do_center_crop", True) or not crop:
        crop = {"height": size.get("height", edge), "width": size.get("width", edge)}
    mean = list(getattr(image_processor, "image_mean", None) or [0.48145466, 0.4578275, 0.40821073])
    std = list(getattr(image_processor, "image_std", None) or [0.26862954, 0.26130258, 0.27577711])
    return (int(crop["height"]), int(crop["width"])), int(edge), mean, std
