"""Per-prompt, per-reward advantage normalisation for ``K`` rewards at once.

For reward ``k`` and prompt ``p``, ``A_k(x) = (R_k(x) - mu_k(p)) / (sigma_k(p) + eps)`` where
``mu_k(p)`` and ``sigma_k(p)`` (population std) are taken over the history of ``R_k`` values seen
for ``p``: the current batch's values are appended first, then the statistics are computed over
the most recent ``window`` values (all of them when ``window`` is ``None``). With ``global_std``
the std is instead that of every valid value of reward ``k`` in the current batch (the
DiffusionNFT default), while the mean stays per prompt.

Rewards may not apply to every sample: a ``mask[B, K]`` marks valid entries; masked entries get
advantage 0 and never enter the statistics. When a prompt's windowed history of a reward has zero
variance (all values equal, including a single value), its advantages are exactly 0 rather than
round-off divided by ``eps``; with ``global_std`` the same holds when the batch's values of that
reward all coincide.

Advantages are not clipped here; :func:`marble_lightning.nft.interpolation_coefficient` clips.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from marble_lightning.checks import check_choice, check_float, check_int

__all__ = ["PerPromptStatTracker"]

NonFinitePolicy = Literal["raise", "drop"]


class PerPromptStatTracker:
    """Running per-prompt mean/std of ``K`` rewards, turning rewards into advantages.

    Args:
        num_rewards: ``K``, the number of rewards (columns of ``rewards``), ``>= 1``.
        global_std: Divide by the std of the current batch's valid values of each reward
            instead of the per-prompt std.
        eps: Added to the std (reward units), ``>= 0``. DiffusionNFT uses ``1e-4``.
        window: Keep at most this many most recent values per prompt and reward (``>= 1``);
            ``None`` keeps all (call :meth:`reset` e.g. every epoch).
        on_nonfinite: What to do with a NaN/inf reward on a valid (unmasked) entry:
            ``"raise"`` a ``ValueError`` naming the reward and the prompt (nothing is recorded),
            or ``"drop"`` it with a warning, treating it as masked.
        reward_names: Optional ``K`` names used in error messages.

    Raises:
        ValueError: on an invalid argument.
    """

    def __init__(
        self,
        num_rewards: int,
        *,
        global_std: bool = False,
        eps: float = 1e-4,
        window: int | None = None,
        on_nonfinite: NonFinitePolicy = "raise",
        reward_names: Sequence[str] | None = None,
    ) -> None:
        check_int("num_rewards", num_rewards)
        check_float("eps", eps, minimum=0.0)
        if window is not None:
            check_int("window", window)
        check_choice("on_nonfinite", on_nonfinite, ("raise", "drop"))
        if reward_names is not None and len(reward_names) != num_rewards:
            raise ValueError(
                f"Parameter `reward_names` should have {num_rewards} names (one per reward). "
                f"Found {len(reward_names)}: {list(reward_names)}."
            )
        self.num_rewards = num_rewards
        self.global_std = bool(global_std)
        self.eps = float(eps)
        self.window = window
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self.reward_names: list[str] | None = None if reward_names is None else list(reward_names)
        self._history: dict[str, list[list[float]]] = {}
        self.reward_ema: float | None = None  # decay of normalize_rewards (None: off)
        self._ema_mean: Tensor | None = None
        self._ema_var: Tensor | None = None
        self._ema_seen: Tensor | None = None

    @property
    def prompts(self) -> list[str]:
        """Prompts with recorded history, in first-seen order."""
        return list(self._history)

    def history(self, prompt: str, reward: int) -> list[float]:
        """A copy of the recorded values of reward ``reward`` for ``prompt`` (oldest first)."""
        return list(self._history.get(prompt, [[] for _ in range(self.num_rewards)])[reward])

    def reset(self) -> None:
        """Forget every prompt's history."""
        self._history.clear()

    def _reward_label(self, k: int) -> str:
        if self.reward_names is None:
            return f"reward {k}"
        return f"reward {k} ({self.reward_names[k]!r})"

    def update(
        self,
        prompts: Sequence[str],
        rewards: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Record a batch of rewards and return their advantages.

        Args:
            prompts: ``B`` prompts; samples with equal prompts form a group.
            rewards: ``[B, K]`` reward values (any real dtype, any device).
            mask: ``[B, K]`` bool, ``True`` where reward ``k`` applies to sample ``i``;
                ``None`` means all valid.

        Returns:
            ``[B, K]`` float32 advantages on ``rewards``' device; 0 on masked entries.

        Raises:
            ValueError: on shape mismatches, or a non-finite valid reward when
                ``on_nonfinite="raise"`` (the tracker is then left unchanged).
        """
        prompts = list(prompts)
        if rewards.ndim != 2 or rewards.shape[1] != self.num_rewards:
            raise ValueError(
                f"Parameter `rewards` should have shape [B, K] with K = {self.num_rewards}. "
                f"Found `rewards.shape = {tuple(rewards.shape)}`."
            )
        batch = rewards.shape[0]
        if len(prompts) != batch:
            raise ValueError(
                f"Parameter `prompts` should have one prompt per row of `rewards` ({batch}). "
                f"Found {len(prompts)} prompts."
            )
        values = rewards.detach().to(device="cpu", dtype=torch.float64).numpy()
        if mask is None:
            valid = np.ones(values.shape, dtype=bool)
        else:
            if mask.shape != rewards.shape:
                raise ValueError(
                    f"Parameter `mask` should have the shape of `rewards`, {tuple(rewards.shape)}. "
                    f"Found `mask.shape = {tuple(mask.shape)}`."
                )
            valid = mask.detach().to("cpu").numpy().astype(bool)

        nonfinite = valid & ~np.isfinite(values)
        if nonfinite.any():
            rows, cols = np.nonzero(nonfinite)
            where = "; ".join(
                f"{self._reward_label(int(k))} = {values[i, k]} for prompt {prompts[i]!r}"
                for i, k in list(zip(rows, cols))[:5]
            )
            if self.on_nonfinite == "raise":
                raise ValueError(
                    f"Non-finite reward values on {len(rows)} valid entries: {where}. "
                    "Mask them, fix the reward, or use on_nonfinite='drop'."
                )
            warnings.warn(
                f"Dropping {len(rows)} non-finite reward values (treated as masked): {where}.",
                RuntimeWarning,
                stacklevel=2,
            )
            valid = valid & ~nonfinite

        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(i)
        index = {prompt: np.asarray(rows) for prompt, rows in groups.items()}

        # Record first, then compute statistics over the (windowed) history.
        for prompt, rows in index.items():
            history = self._history.setdefault(prompt, [[] for _ in range(self.num_rewards)])
            for k in range(self.num_rewards):
                seen = history[k]
                seen.extend(values[rows[valid[rows, k]], k].tolist())
                if self.window is not None and len(seen) > self.window:
                    del seen[: len(seen) - self.window]

        advantages = np.zeros(values.shape, dtype=np.float64)
        for k in range(self.num_rewards):
            batch_std: float | None = None
            if self.global_std:
                batch_values = values[valid[:, k], k]
                if batch_values.size == 0 or batch_values.max() == batch_values.min():
                    batch_std = 0.0
                else:
                    batch_std = float(batch_values.std())
            for prompt, rows in index.items():
                rows_k = rows[valid[rows, k]]
                seen = np.asarray(self._history[prompt][k])
                if rows_k.size == 0 or seen.size == 0:
                    continue
                if seen.max() == seen.min():
                    continue  # zero variance: every value equals the mean
                if batch_std is None:
                    std = float(seen.std())
                elif batch_std == 0.0:
                    continue  # the batch std is zero: no scale to measure deviations with
                else:
                    std = batch_std
                advantages[rows_k, k] = (values[rows_k, k] - seen.mean()) / (std + self.eps)
        return torch.as_tensor(advantages, dtype=torch.float32).to(rewards.device)

    @torch.no_grad()
    def normalize_rewards(self, values: Tensor, mask: Tensor) -> Tensor:
        """EMA normalisation of ``[B, K]`` rewards when ``reward_ema`` is set (else ``values``).

        Per reward, the running mean and variance fold in the batch's valid values
        (``m <- d m + (1 - d) mean``, ``v <- d v + (1 - d) var``; the first batch initialises
        them), then ``(values - m) / (sqrt(v) + eps)``; masked entries become 0. Call it once per
        step on the gathered batch (every rank then holds the same state).
        """
        if self.reward_ema is None:
            return values
        x = values.detach().to(torch.float64).cpu()
        valid = mask.detach().cpu().bool()
        count = valid.sum(dim=0)
        safe = torch.where(valid, x, torch.zeros_like(x))
        mean = safe.sum(dim=0) / count.clamp_min(1)
        var = (torch.where(valid, x - mean, torch.zeros_like(x)) ** 2).sum(dim=0) / count.clamp_min(
            1
        )
        seen = count > 0
        if self._ema_mean is None or self._ema_var is None or self._ema_seen is None:
            self._ema_mean, self._ema_var = mean.clone(), var.clone()
            self._ema_seen = seen.clone()
        else:
            d = float(self.reward_ema)
            first = seen & ~self._ema_seen
            blend = seen & self._ema_seen
            self._ema_mean = torch.where(
                first, mean, torch.where(blend, d * self._ema_mean + (1 - d) * mean, self._ema_mean)
            )
            self._ema_var = torch.where(
                first, var, torch.where(blend, d * self._ema_var + (1 - d) * var, self._ema_var)
            )
            self._ema_seen = self._ema_seen | seen
        out = (x - self._ema_mean) / (self._ema_var.sqrt() + self.eps)
        out = torch.where(valid, out, torch.zeros_like(out))
        return out.to(device=values.device, dtype=values.dtype)

    def state_dict(self) -> dict[str, Any]:
        """Plain-python state: the options and every prompt's history."""
        extra: dict[str, Any] = {}
        if self.reward_ema is not None and self._ema_seen is not None:
            assert self._ema_mean is not None and self._ema_var is not None
            extra["reward_ema"] = {
                "mean": self._ema_mean.tolist(),
                "var": self._ema_var.tolist(),
                "seen": self._ema_seen.tolist(),
            }
        return {
            **extra,
            "num_rewards": self.num_rewards,
            "global_std": self.global_std,
            "eps": self.eps,
            "window": self.window,
            "history": {
                prompt: [list(v) for v in per_reward]
                for prompt, per_reward in self._history.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the history saved by :meth:`state_dict`.

        Options given to the constructor are kept (a checkpoint does not override them); a
        missing ``history`` loads as empty. Histories longer than ``window`` are truncated to the
        most recent values.

        Raises:
            ValueError: if the saved number of rewards differs from ``num_rewards``.
        """
        saved_k = state.get("num_rewards", self.num_rewards)
        if saved_k != self.num_rewards:
            raise ValueError(
                f"Cannot load a PerPromptStatTracker state for {saved_k} rewards into one for "
                f"{self.num_rewards}."
            )
        history: dict[str, list[list[float]]] = {}
        for prompt, per_reward in state.get("history", {}).items():
            if len(per_reward) != self.num_rewards:
                raise ValueError(
                    f"Saved history of prompt {prompt!r} has {len(per_reward)} rewards; expected "
                    f"{self.num_rewards}."
                )
            restored = [[float(x) for x in values] for values in per_reward]
            if self.window is not None:
                restored = [values[-self.window :] for values in restored]
            history[prompt] = restored
        self._history = history
        ema = state.get("reward_ema")
        if ema is not None:
            self._ema_mean = torch.tensor(ema["mean"], dtype=torch.float64)
            self._ema_var = torch.tensor(ema["var"], dtype=torch.float64)
            self._ema_seen = torch.tensor(ema["seen"], dtype=torch.bool)
