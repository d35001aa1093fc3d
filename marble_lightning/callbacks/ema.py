"""``EMACoefficientCallback``: exponential moving average of the MARBLE coefficients."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from marble_lightning.callbacks._common import check_module

__all__ = ["EMACoefficientCallback"]


class EMACoefficientCallback(Callback):
    """Exponential moving average of the MARBLE coefficients between refreshes.

    After each refresh with QP solution ``alpha*``:
    ``alpha_ema <- decay * alpha_ema + (1 - decay) * alpha*`` (initialised with the first
    ``alpha*``); amortised steps use ``alpha_ema`` with the norms of the last refresh. Refresh
    steps themselves use ``alpha*`` (the exact MARBLE direction).

    Args:
        decay: ``rho`` in ``[0, 1)``; 0 means no smoothing.
    """

    def __init__(self, decay: float = 0.9) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` should lie in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.alpha_ema: Tensor | None = None
        self.updates = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_module(pl_module, "EMACoefficientCallback", harmonizing=True)
        pl_module.coefficients.set_smoother(self.smooth, alpha_ema_decay=self.decay)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if pl_module.coefficients.smoother == self.smooth:
            pl_module.coefficients.set_smoother(None)

    def smooth(self, alpha: Tensor) -> Tensor:
        """Fold a fresh ``alpha*`` ``[K]`` into the average and return ``alpha_ema`` ``[K]``."""
        alpha = torch.as_tensor(alpha, dtype=torch.float64).detach().cpu()
        if self.alpha_ema is None or self.alpha_ema.shape != alpha.shape:
            self.alpha_ema = alpha.clone()
        else:
            self.alpha_ema = self.decay * self.alpha_ema + (1.0 - self.decay) * alpha
        self.updates += 1
        return self.alpha_ema.clone()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "alpha_ema": None if self.alpha_ema is None else self.alpha_ema.tolist(),
            "updates": self.updates,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ema = state_dict.get("alpha_ema")
        self.alpha_ema = None if ema is None else torch.tensor(ema, dtype=torch.float64)
        self.updates = int(state_dict.get("updates", 0))
