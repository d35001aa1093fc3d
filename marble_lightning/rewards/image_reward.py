"""ImageReward (Xu et al., 2023) through the optional ``image-reward`` package.

The package is imported lazily, on first use. Install it with
``pip install "marble-lightning[imagereward]"``. Score: ``ImageReward.score(prompt, image)`` per
image (a BLIP image-text encoder + MLP head, standardised with the training set's mean/std).

Compatibility (checked with image-reward 1.5, the latest release): it installs from the package
index, but ``import ImageReward`` also needs OpenAI's ``clip`` module (not declared as a
dependency) and helpers that transformers 5 removed from ``transformers.modeling_utils``
(``apply_chunking_to_forward``, ...), so it only imports next to ``transformers<5``. This reward
reports both problems with a clear error instead of a traceback from inside the package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from marble_lightning.rewards._loading import LazyModel, looks_like_path, require_file, to_pil
from marble_lightning.rewards.base import RewardModel

INSTALL_HINT = 'pip install "marble-lightning[imagereward]"'


def import_image_reward():
    """Import the ``ImageReward`` module of the ``image-reward`` package, or raise a clear error.

    Raises:
        ModuleNotFoundError: the package is not installed (message has the install hint).
        ImportError: it is installed but cannot be imported (missing ``clip``, transformers >= 5).
    """
    try:
        import ImageReward as RM
    except ModuleNotFoundError as err:
        if err.name in ("ImageReward", None):
            raise ModuleNotFoundError(
                f"ImageRewardReward needs the optional 'image-reward' package: {INSTALL_HINT}"
            ) from err
        raise ImportError(
            f"the 'image-reward' package is installed but imports the missing module {err.name!r}"
            + (" (OpenAI's CLIP package)" if err.name == "clip" else "")
            + f"; install it, then retry ({INSTALL_HINT})"
        ) from err
    except ImportError as err:
        raise ImportError(
            "the 'image-reward' package is installed but failed to import; image-reward 1.5 needs "
            f"transformers<5 (it imports helpers transformers 5 removed): {err}"
        ) from err
    return RM


class ImageRewardReward(RewardModel):
    """ImageReward score of each (prompt, image) pair.

    Args:
        model: ``"ImageReward-v1.0"`` (downloaded by the package into ``download_root``) or a
            local checkpoint file (``FileNotFoundError`` if missing).
        med_config: local BLIP ``med_config.json`` (else the package downloads it).
        download_root: cache folder for the package's downloads.
        name: reward name in logs.
    """

    name = "imagereward"

    def __init__(
        self,
        model: str = "ImageReward-v1.0",
        med_config: str | None = None,
        download_root: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if not isinstance(model, str) or not model:
            raise ValueError(
                f"reward {self.name!r}: model must be a non-empty string, got {model!r}"
            )
        if os.path.exists(os.path.expanduser(model)) or looks_like_path(model):
            model = str(require_file(model, self.name))
        self.model_ref = model
        self.med_config = None if med_config is None else str(require_file(med_config, self.name))
        self.download_root = download_root
        self._model = LazyModel(self._build)


    def _build(self):
        rm = import_image_reward()
        return rm.load(
            self.model_ref,
            device="cpu",
            download_root=self.download_root,
            med_config=self.med_config,
        )

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        model = self._model.get(images.device)
        if hasattr(model, "device"):
            model.device = images.device  # the package moves inputs to model.device
        values = [float(model.score(p, im)) for p, im in zip(prompts, to_pil(images))]
        return torch.tensor(values, dtype=torch.float32, device=images.device)
