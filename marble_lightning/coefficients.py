"""MARBLE's coefficients between steps, and the one interface callbacks use to steer them.

:class:`Coefficients` holds what a MARBLE run carries from step to step: the coefficients in use
(``alpha``), the gradient norms and dropped rewards of the last refresh, and the refresh
schedule. Callbacks talk to it only through three methods:

* :meth:`Coefficients.schedule` (``HarmonizationCallback``, before each step): refresh this step
  or not, and whether the uniform-alpha stage is on;
* :meth:`Coefficients.set_smoother` (``EMACoefficientCallback``): a map ``alpha* -> alpha`` applied
  after each refresh;
* :meth:`Coefficients.set_refresh_every` (``HarmonizationCallback.setup``): the refresh period, so
  the module's hyperparameters record the schedule that really runs.

Without callbacks, amortised MARBLE refreshes every ``refresh_every`` steps (default
:data:`~marble_lightning.rules.DEFAULT_REFRESH_EVERY`), with no smoothing and no uniform stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from marble_lightning.checks import check_int
from marble_lightning.harmonize import Harmonized, uniform_alpha, weights_from_alpha

__all__ = ["AlphaSmoother", "Coefficients"]

AlphaSmoother = Callable[[Tensor], Tensor]
"""``alpha* [K] -> alpha [K]``, applied after each refresh (e.g. an EMA)."""


class Coefficients:
    """Coefficients in use and the refresh schedule of one MARBLE run (``K`` rewards).

    Args:
        initial: ``[K]`` float64 coefficients before the first refresh.
        refresh_every: amortised refresh period (``>= 1``).
        every_step: refresh at every step whatever the schedule (full MARBLE).

    Attributes:
        alpha: ``[K]`` float64 coefficients in use.
        norms: ``[K]`` gradient norms of the last refresh (``None`` before the first).
        dropped: ``[K]`` bool rewards dropped at the last refresh.
        gram: ``[K, K]`` raw Gram matrix of the last refresh.
        last: the :class:`~marble_lightning.harmonize.Harmonized` of the last refresh.
        uniform: the uniform-alpha stage is on (``1/K`` over the kept rewards).
        steps_since_refresh: steps done since the last refresh.
    """

    def __init__(self, initial: Tensor, refresh_every: int, every_step: bool) -> None:
        self.alpha: Tensor = initial.to(torch.float64).clone()
        self.refresh_every = check_int("refresh_every", refresh_every)
        self.every_step = bool(every_step)
        self.norms: Tensor | None = None
        self.dropped: Tensor | None = None
        self.gram: Tensor | None = None
        self.last: Harmonized | None = None
        self.uniform = False
        self.steps_since_refresh = 0
        self._request: bool | None = None
        self._smoother: AlphaSmoother | None = None
        self.scheduled_by: str | None = None
        self.recorded: dict[str, Any] = {}  # what callbacks set, for the module's hparams

    # --------------------------------------------------------------- the callbacks' interface
    def schedule(self, *, refresh: bool | None, uniform: bool) -> None:
        """Decide the next step: ``refresh`` (``None``: the built-in period) and the uniform
        stage."""
        self._request = None if refresh is None else bool(refresh)
        self.uniform = bool(uniform)

    def set_smoother(self, smoother: AlphaSmoother | None, **record: Any) -> None:
        """Map applied to each fresh ``alpha*`` to get the coefficients of the following steps;
        ``record`` (e.g. ``alpha_ema_decay=0.8``) goes into the module's hyperparameters."""
        self._smoother = smoother
        self.recorded.update(record)

    @property
    def smoother(self) -> AlphaSmoother | None:
        return self._smoother

    def set_refresh_every(self, refresh_every: int, owner: str, **record: Any) -> None:
        """Let ``owner`` (a callback) own the refresh period; ``refresh_every`` and ``record``
        (e.g. ``uniform_after``) go into the module's hyperparameters."""
        self.refresh_every = check_int("refresh_every", refresh_every)
        self.scheduled_by = owner
        self.recorded.update(refresh_every=self.refresh_every, **record)

    # --------------------------------------------------------------- used by the module
    def refresh_due(self, update: int) -> bool:
        """Whether update ``update`` of this step harmonises fresh gradients."""
        if self.every_step:
            return True
        if update > 0:
            return False
        if self.norms is None:
            return True
        if self._request is not None:
            return self._request
        return self.steps_since_refresh >= self.refresh_every

    def in_use(self) -> Tensor:
        """``[K]`` coefficients of an amortised step (uniform in the uniform stage)."""
        if self.uniform:
            assert self.dropped is not None
            return uniform_alpha(self.dropped)
        return self.alpha

    def amortized_weights(self) -> tuple[Tensor, Tensor]:
        """``(alpha [K], weights [K])`` of an amortised step, from the cached norms."""
        if self.norms is None or self.dropped is None:
            raise RuntimeError("an amortised step needs a refresh first (no cached gradient norms)")
        alpha = self.in_use()
        return alpha, weights_from_alpha(alpha, self.norms, self.dropped)

    def record_refresh(self, h: Harmonized, gram: Tensor) -> tuple[Tensor, Tensor]:
        """Cache a refresh; returns ``(alpha [K], weights [K])`` the refresh step itself uses.

        The refresh step uses ``alpha*`` (or uniform alpha in the uniform stage); the following
        amortised steps use the smoothed ``alpha*`` when a smoother is set.
        """
        self.last = h
        self.gram = gram.detach().cpu()
        self.norms = h.norms.detach().cpu()
        self.dropped = h.dropped.detach().cpu()
        alpha_star = h.alpha.detach().cpu().double()
        if self.uniform:
            self.alpha = uniform_alpha(self.dropped)
        elif self._smoother is not None:
            self.alpha = torch.as_tensor(self._smoother(alpha_star), dtype=torch.float64).cpu()
        else:
            self.alpha = alpha_star
        self.steps_since_refresh = 0
        if self.uniform:
            alpha = uniform_alpha(h.dropped)
            return alpha, weights_from_alpha(alpha, h.norms, h.dropped)
        return h.alpha, h.weights

    def end_step(self, refreshed: bool) -> None:
        """Count the step; a callback's refresh decision applies to one step only."""
        self.steps_since_refresh = 1 if refreshed else self.steps_since_refresh + 1
        self._request = None

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "current_alpha": self.alpha.clone(),
            "cached_norms": None if self.norms is None else self.norms.clone(),
            "cached_dropped": None if self.dropped is None else self.dropped.clone(),
            "last_gram": None if self.gram is None else self.gram.clone(),
            "steps_since_refresh": self.steps_since_refresh,
            "force_uniform": self.uniform,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def copy(value: Any) -> Any:
            return value.clone() if isinstance(value, Tensor) else value

        self.alpha = torch.as_tensor(
            state.get("current_alpha", self.alpha), dtype=torch.float64
        ).clone()
        self.norms = copy(state.get("cached_norms"))
        self.dropped = copy(state.get("cached_dropped"))
        self.gram = copy(state.get("last_gram"))
        self.steps_since_refresh = int(state.get("steps_since_refresh", 0))
        self.uniform = bool(state.get("force_uniform", False))
