"""What the callbacks of this package share: the check that they drive a ``MarbleDiffusionModule``."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import LightningModule


def check_module(pl_module: LightningModule, who: str, modes: Sequence[str] | None = None) -> None:
    """Raise unless ``pl_module`` is a MarbleDiffusionModule (whose ``mode`` is in ``modes``)."""
    from marble_lightning.module import MarbleDiffusionModule

    if not isinstance(pl_module, MarbleDiffusionModule):
        raise TypeError(f"{who} needs a MarbleDiffusionModule, got {type(pl_module).__name__}")
    if modes is not None and pl_module.mode not in modes:
        raise ValueError(
            f"{who} needs the module's mode to be one of {tuple(modes)}, got {pl_module.mode!r}"
        )
