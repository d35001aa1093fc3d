"""``HarmonizationCallback``: when the module refreshes its MARBLE coefficients, and the uniform
stage."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from marble_lightning.callbacks._common import check_module
from marble_lightning.checks import check_int

__all__ = ["HarmonizationCallback"]


class HarmonizationCallback(Callback):
    """When to refresh the MARBLE coefficients, and when to switch to uniform alpha.

    Before every training step it tells the module's
    :class:`~marble_lightning.coefficients.Coefficients` to refresh when
    ``step % refresh_every == 0`` (so step 0 always refreshes) and whether
    ``step >= uniform_after`` (the uniform stage, this project's option: the paper's method has no
    final uniform stage). The callback owns the refresh period: a different ``refresh_every`` on
    the module is an error, and the module's hyperparameters record the callback's. In the uniform
    stage alpha is ``1/K`` over the non-dropped rewards, with the gradient norms of the latest
    refresh.

    Args:
        refresh_every: refresh period in training steps (rollouts), ``>= 1``.
        uniform_after: first step of the uniform stage (``None``: never).
    """

    def __init__(self, refresh_every: int = 5, uniform_after: int | None = None) -> None:
        self.refresh_every = check_int("refresh_every", refresh_every, 1)
        self.uniform_after = (
            None if uniform_after is None else check_int("uniform_after", uniform_after, 0)
        )
        self.refreshes = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            refresh_every=self.refresh_every, uniform_after=self.uniform_after
        )

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_module(pl_module, "HarmonizationCallback", harmonizing=True)
        own = pl_module.hparams.get("refresh_every")
        if own is not None and own != self.refresh_every:
            raise ValueError(
                f"HarmonizationCallback(refresh_every={self.refresh_every}) conflicts with the "
                f"module's refresh_every={own}; set it in one place (the callback)"
            )
        # the module's hyperparameters record the schedule that runs
        pl_module.coefficients.set_refresh_every(
            self.refresh_every, "HarmonizationCallback", uniform_after=self.uniform_after
        )

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = pl_module.step_index
        refresh = step % self.refresh_every == 0
        uniform = self.uniform_after is not None and step >= self.uniform_after
        pl_module.coefficients.schedule(refresh=refresh, uniform=uniform)
        self.refreshes += int(refresh)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "refresh_every": self.refresh_every,
            "uniform_after": self.uniform_after,
            "refreshes": self.refreshes,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.refreshes = int(state_dict.get("refreshes", 0))
