"""LAION improved aesthetic predictor (the "sac+logos+ava1-l14-linearMSE" MLP).

``score = MLP(f / ||f||)`` with ``f`` the CLIP ViT-L/14 projected image embedding (768-d). The
MLP is the reference's stack, with no activations between the linear layers (as published)::

    layers = Sequential(Linear(d, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
                        Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))

so its state-dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``. Scores are on the predictor's
1-10 rating scale (typical generated images: 5-7).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from marble_lightning.rewards._loading import LazyModel, load_state_dict_file, require_file
from marble_lightning.rewards.clip_score import TransformersCLIPReward


class AestheticMLP(nn.Module):
    """The aesthetic predictor head: ``[B, input_dim] -> [B, 1]`` (see module docstring)."""

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class AestheticReward(TransformersCLIPReward):
    """LAION aesthetic score of the image (the prompt is ignored).

    Args:
        mlp: path to the MLP weights (``.safetensors``, or a torch file read with
            ``weights_only=True``).
        clip_model: local folder or hub id of the CLIP ViT-L/14 ``CLIPModel``.
        processor: processor folder or hub id (default: ``clip_model``).
        batch_size: images per forward pass (``None``: all at once).
        dtype: CLIP model dtype (the MLP runs in float32).
        name: reward name in logs.
    """

    name = "aesthetic"

    def __init__(
        self,
        mlp: str,
        clip_model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        batch_size: int | None = None,
        dtype: str = "float32",
        name: str | None = None,
    ) -> None:
        super().__init__(clip_model, processor, batch_size, dtype, name)
        self.mlp_path = require_file(mlp, self.name)
        self._mlp = LazyModel(self._build_mlp)

    def _build_mlp(self) -> AestheticMLP:
        state = load_state_dict_file(self.mlp_path, self.name)
        weight = state.get("layers.0.weight")
        if weight is None or weight.ndim != 2:
            raise ValueError(
                f"reward {self.name!r}: {str(self.mlp_path)!r} is not an aesthetic MLP state dict "
                f"(no 'layers.0.weight'; keys: {sorted(state)[:6]})"
            )
        mlp = AestheticMLP(int(weight.shape[1]))
        try:
            mlp.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"reward {self.name!r}: cannot load {str(self.mlp_path)!r}: {err}"
            ) from err
        return mlp

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        emb = self.image_embeddings(images)
        mlp = self._mlp.get(images.device)
        if emb.shape[1] != mlp.input_dim:
            raise ValueError(
                f"reward {self.name!r}: CLIP embedding size {emb.shape[1]} does not match the MLP "
                f"input size {mlp.input_dim} ({str(self.mlp_path)!r})"
            )
        return mlp(emb).squeeze(-1).float()
