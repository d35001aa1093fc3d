"""Checks of ``MarbleDiffusionModule``'s hyperparameters, kept apart from the wiring.

:func:`validate_hparams` refuses a bad value with a ``ValueError`` naming the argument and the
value, before anything is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marble_lightning.checks import check_choice, check_float, check_int
from marble_lightning.precision import ROLLOUT_PRECISIONS
from marble_lightning.rules import MODES
from marble_lightning.sampling import SOLVERS

__all__ = ["validate_hparams"]

_POSITIVE = ("beta", "a_max", "lr", "lora_alpha")
_NON_NEGATIVE = ("cfg_scale", "kl_weight", "weight_decay")
_INTS = ("group_size", "sample_steps", "updates_per_rollout", "lora_rank")
_OPTIONAL_INTS = ("train_timesteps", "diagnostics_every", "refresh_every", "eval_sample_steps")


def validate_hparams(h: Mapping[str, Any]) -> None:
    """Check the module's scalar hyperparameters (``h``: the ``__init__`` arguments by name)."""
    check_choice("mode", h["mode"], MODES)
    for name in _INTS:
        check_int(name, h[name])
    for name in _OPTIONAL_INTS:
        if h.get(name) is not None:
            check_int(name, h[name])
    if h.get("train_timesteps") is not None and h["train_timesteps"] > h["sample_steps"]:
        raise ValueError(
            f"`train_timesteps` ({h['train_timesteps']}) should be <= sample_steps "
            f"({h['sample_steps']})"
        )
    for name in _POSITIVE:
        check_float(name, h[name], minimum=0.0, strict=True)
    for name in _NON_NEGATIVE:
        check_float(name, h[name], minimum=0.0)
    if h.get("grad_clip") is not None:
        check_float("grad_clip", h["grad_clip"], minimum=0.0, strict=True)
    check_choice("aggregate", h["aggregate"], ("r", "advantage"))
    check_choice("rollout_precision", h["rollout_precision"], ROLLOUT_PRECISIONS)
    check_choice("solver", h.get("solver", "euler"), SOLVERS)


def cli_inputs(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The backbone / rewards / optimizer configurations (``class_path`` dicts) LightningCLI used.

    Stored with the hyperparameters, they make a checkpoint self-describing:
    ``MarbleDiffusionModule.load_from_checkpoint(path)`` rebuilds the backbone (frozen weights
    re-loaded from their source, not from the checkpoint) and the rewards. Objects built in
    Python are not serialisable and are left out (pass them to ``load_from_checkpoint``).
    """
    if not given:
        return {}
    keys = ("backbone", "rewards", "optimizer", "lr_scheduler")
    return {key: given[key] for key in keys if given.get(key) is not None}


STATE_DEFINING = ("mode", "lora_rank", "lora_alpha", "lora_targets", "seed")
"""Hyperparameters whose change would make a checkpoint's saved state mean something else."""


def check_resume(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> None:
    """Raise before anything is restored if a :data:`STATE_DEFINING` value differs.

    Args:
        saved: the checkpoint's ``hyper_parameters`` (``None``: nothing to compare).
        current: the module's ``hparams``.

    Raises:
        ValueError: listing each differing key with the checkpoint's and the module's value.
    """
    if not saved:
        return
    differ = [
        f"{key}: checkpoint {saved[key]!r}, module {current.get(key)!r}"
        for key in STATE_DEFINING
        if key in saved and saved[key] != current.get(key)
    ]
    if differ:
        raise ValueError(
            "checkpoint does not match this module (nothing was restored): " + "; ".join(differ)
        )
