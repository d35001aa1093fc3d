"""``PolicyEMACallback``: an exponential moving average of the policy LoRA weights.

After every training step ``theta_ema <- decay * theta_ema + (1 - decay) * theta`` over the policy
LoRA tensors (initialised with the policy at fit start). The average is kept in float32 on the
parameters' device, saved in the checkpoint's callback state (keyed by the checkpoint names of
the policy tensors, ``backbone.denoiser.<name>``) and restored on resume, so a resumed run
continues the same average. :meth:`PolicyEMACallback.applied` swaps it into the policy adapter
for evaluation (``RewardEvalCallback(use_ema=True)``), and ``marble export-lora --ema`` exports it
from a checkpoint (:func:`ema_state_from_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from marble_lightning.callbacks._common import check_module
from marble_lightning.checks import check_float

__all__ = ["PolicyEMACallback", "ema_state_from_checkpoint"]

_PREFIX = "backbone.denoiser."
STATE_NAME = "PolicyEMACallback"


class PolicyEMACallback(Callback):
    """EMA of the policy LoRA weights (the reference recipe's ``decay = 0.9``).

    Args:
        decay: in ``[0, 1)``; 0 keeps a copy of the latest policy.
        every_n_steps: fold the policy in every this many training steps.

    Attributes:
        weights: ``{checkpoint name: float32 tensor}`` of the average (empty before fit start).
        updates: number of policy states folded in.
    """

    def __init__(self, decay: float = 0.9, every_n_steps: int = 1) -> None:
        self.decay = check_float("decay", decay, minimum=0.0, maximum=1.0, maximum_strict=True)
        if (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(f"`every_n_steps` should be an integer >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.weights: dict[str, Tensor] = {}
        self.updates = 0

    @property
    @override
    def state_key(self) -> str:
        return STATE_NAME

    @staticmethod
    def _named(pl_module: LightningModule) -> list[tuple[str, Tensor]]:
        adapters = pl_module.adapters
        return [(_PREFIX + n, p) for n, p in zip(adapters.policy_names, adapters.policy_params)]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_module(pl_module, "PolicyEMACallback")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        named = self._named(pl_module)
        if self.weights:  # resumed: move the restored average next to the parameters
            missing = sorted({n for n, _ in named} - set(self.weights))
            if missing:
                raise ValueError(
                    f"PolicyEMACallback: the restored average lacks {len(missing)} policy tensors "
                    f"(e.g. {missing[0]!r}); was it saved with other lora_targets / lora_rank?"
                )
            self.weights = {n: self.weights[n].to(p.device, torch.float32) for n, p in named}
            return
        self.weights = {n: p.detach().to(torch.float32).clone() for n, p in named}

    @torch.no_grad()
    def update(self, pl_module: LightningModule) -> None:
        """Fold the current policy into the average."""
        for name, p in self._named(pl_module):
            self.weights[name].mul_(self.decay).add_(
                p.detach().to(torch.float32), alpha=1.0 - self.decay
            )
        self.updates += 1

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.step_index % self.every_n_steps == 0:
            self.update(pl_module)

    @contextmanager
    def applied(self, pl_module: LightningModule) -> Iterator[None]:
        """Context in which the policy adapter holds the average (restored afterwards)."""
        if not self.weights:
            yield
            return
        saved = []
        with torch.no_grad():
            for name, p in self._named(pl_module):
                saved.append(p.detach().clone())
                p.copy_(self.weights[name].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), old in zip(self._named(pl_module), saved):
                    p.copy_(old)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "weights": {n: w.detach().cpu().clone() for n, w in self.weights.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict.get("updates", 0))
        self.weights = {n: torch.as_tensor(w) for n, w in state_dict.get("weights", {}).items()}


def ema_state_from_checkpoint(checkpoint: Mapping[str, Any], path: Any = "") -> dict[str, Tensor]:
    """The EMA weights of a checkpoint, as policy-adapter entries of its ``state_dict``.

    Raises:
        ValueError: the checkpoint holds no PolicyEMACallback state (the run had no such
            callback).
    """
    callbacks = checkpoint.get("callbacks") or {}
    state = callbacks.get(STATE_NAME)
    if not state or not state.get("weights"):
        raise ValueError(
            f"checkpoint {str(path)!r} holds no policy EMA (no {STATE_NAME} state among its "
            f"callbacks {sorted(map(str, callbacks))}); train with PolicyEMACallback to export "
            "--ema"
        )
    return dict(state["weights"])
