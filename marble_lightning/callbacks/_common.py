"""What the callbacks of this package share: the check that they drive a
``MarbleDiffusionModule``."""

from __future__ import annotations

from lightning.pytorch import LightningModule


def check_module(pl_module: LightningModule, who: str, harmonizing: bool = False) -> None:
    """Raise unless ``pl_module`` is a MarbleDiffusionModule (with a MARBLE rule if
    ``harmonizing``)."""
    from marble_lightning.module import MarbleDiffusionModule

    if not isinstance(pl_module, MarbleDiffusionModule):
        raise TypeError(f"{who} needs a MarbleDiffusionModule, got {type(pl_module).__name__}")
    if harmonizing and not pl_module.rule.harmonizes:
        raise ValueError(
            f"{who} needs a MARBLE rule (mode 'marble' or 'amortized'), got mode {pl_module.mode!r}"
        )
