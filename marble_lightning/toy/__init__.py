"""The offline toy world: procedural scenes, prompts, an exact detector and a tiny base model.

Submodules: :mod:`.world` (scene specs and rendering), :mod:`.prompts` (templates, parser,
train / held-out splits), :mod:`.detector` (:class:`ToyDetector`), :mod:`.text_encoder`,
:mod:`.backbone` (:class:`ToyBackbone`), :mod:`.pretrain` (the base-model pretraining script),
:mod:`.quality` (:class:`QualityReward`) and :mod:`.train_clip` (the tiny CLIP model).
"""

from pathlib import Path as _Path

ASSET_FILES = (
    "toy_backbone.safetensors",
    "toy_backbone.json",
    "toy_clip.safetensors",
    "toy_clip.json",
)
"""Files shipped in ``marble_lightning/toy/assets`` (the base model and the tiny CLIP)."""


def asset_path(name: str) -> _Path:
    """Filesystem path of a shipped asset, e.g. ``asset_path("toy_clip.json")``.

    Raises:
        FileNotFoundError: naming the path when the asset is missing.
    """
    path = _Path(__file__).resolve().parent / "assets" / name
    if not path.is_file():
        raise FileNotFoundError(
            f"toy asset not found: {path} (shipped assets: {', '.join(ASSET_FILES)})"
        )
    return path
