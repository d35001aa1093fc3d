"""Options of MARBLE's harmonisation beyond the plain QP, and of reward normalisation.

:class:`HarmonizationOptions` is the module's ``harmonization`` argument (one object for all of
them, so the module's signature stays small):

* **groups** ``{group: [reward, ...]}``: rewards balanced as one entry of the QP (e.g. PickScore,
  HPSv2 and CLIPScore as one "aesthetic" group); each group's gradient is the fixed combination
  (``member_weights``, default equal) of its members' normalised gradients, normalised like a
  reward. Rewards in no group are groups of one.
* **preference** ``{group or reward: p}``: preference weights of the QP's entries
  (:func:`~marble_lightning.harmonize.harmonize_groups_gram`: the guaranteed progress of an entry
  is proportional to its preference).
* **alpha_floor**: lower bound of every entry's QP coefficient (``J * floor <= 1``, else a
  ``ValueError`` naming the numbers).
* **reward_dropout** ``{reward: probability}`` (or one probability for all) with a linear
  **dropout_warmup** ramp (probability ``p * min(1, step / warmup)``): before each refresh's QP,
  dropped rewards' gradients are removed (their Gram rows zeroed, so the QP drops them; the
  following amortised steps keep them dropped until the next refresh). Draws are keyed by
  ``(seed, "reward_dropout", step, update)`` (:mod:`marble_lightning.seeding`): every DDP rank
  drops the same rewards and a resumed run repeats them. At least one reward is always kept.
* **reward_ema**: EMA normalisation of the rewards (decay in ``[0, 1)``): the gathered batch's
  values of reward ``k`` become ``(R - mu_k) / (sigma_k + eps)`` with running means of the
  batches' means and variances (state in the stat tracker's checkpoint). Per-prompt advantages
  are invariant to it (up to ``eps``); the weighted-sum baseline's scalar reward is not.

Defaults change nothing: a module built with ``harmonization=None`` (or all defaults) runs the
code path it ran before these options existed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from marble_lightning.checks import check_float, check_int
from marble_lightning.harmonize import Harmonized, harmonize_gram, harmonize_groups_gram
from marble_lightning.seeding import generator

__all__ = ["HarmonizationOptions", "ResolvedHarmonization", "attach_harmonization"]


@dataclass
class HarmonizationOptions:
    """See the module docstring. Every default means "off"."""

    groups: dict[str, list[str]] | None = None
    member_weights: dict[str, float] | None = None
    preference: dict[str, float] | None = None
    alpha_floor: float = 0.0
    reward_dropout: dict[str, float] | float | None = None
    dropout_warmup: int = 0
    reward_ema: float | None = None

    def resolve(self, names: Sequence[str]) -> ResolvedHarmonization:
        """Check the options against the reward ``names`` and index them."""
        names = list(names)
        k = len(names)

        def index(name: Any, what: str) -> int:
            if name not in names:
                raise ValueError(
                    f"`harmonization.{what}` names unknown reward {name!r}; rewards are {names}"
                )
            return names.index(name)

        groups: list[list[int]] = []
        labels: list[str] = []
        taken: set[int] = set()
        for label, members in (self.groups or {}).items():
            if label in names and list(members) != [label]:
                raise ValueError(
                    f"`harmonization.groups`: group name {label!r} is also a reward name"
                )
            if not members:
                raise ValueError(f"`harmonization.groups`: group {label!r} is empty")
            idx = [index(m, "groups") for m in members]
            clash = taken.intersection(idx)
            if clash or len(set(idx)) != len(idx):
                raise ValueError(
                    f"`harmonization.groups`: reward(s) {sorted(names[i] for i in clash or idx)} "
                    "appear in more than one group"
                )
            taken.update(idx)
            groups.append(idx)
            labels.append(str(label))
        for i, name in enumerate(names):
            if i not in taken:
                groups.append([i])
                labels.append(name)
        order = sorted(range(len(groups)), key=lambda j: min(groups[j]))
        groups = [groups[j] for j in order]
        labels = [labels[j] for j in order]

        members = [1.0] * k
        for name, value in (self.member_weights or {}).items():
            members[index(name, "member_weights")] = check_float(
                f"harmonization.member_weights[{name!r}]", value, minimum=0.0, strict=True
            )
        preference = [1.0] * len(groups)
        for label, value in (self.preference or {}).items():
            if label not in labels:
                raise ValueError(
                    f"`harmonization.preference` names {label!r}, which is neither a group nor an "
                    f"ungrouped reward; entries of the QP are {labels}"
                )
            preference[labels.index(label)] = check_float(
                f"harmonization.preference[{label!r}]", value, minimum=0.0, strict=True
            )
        floor = check_float("harmonization.alpha_floor", self.alpha_floor, minimum=0.0, maximum=1.0)
        if len(groups) * floor > 1.0 + 1e-12:
            raise ValueError(
                f"`harmonization.alpha_floor` = {floor} is infeasible for the {len(groups)} "
                f"entries of the QP {labels}: it needs {len(groups)} * alpha_floor <= 1"
            )
        dropout = [0.0] * k
        if isinstance(self.reward_dropout, Mapping):
            for name, value in self.reward_dropout.items():
                dropout[index(name, "reward_dropout")] = check_float(
                    f"harmonization.reward_dropout[{name!r}]",
                    value,
                    minimum=0.0,
                    maximum=1.0,
                    maximum_strict=True,
                )
        elif self.reward_dropout is not None:
            p = check_float(
                "harmonization.reward_dropout",
                self.reward_dropout,
                minimum=0.0,
                maximum=1.0,
                maximum_strict=True,
            )
            dropout = [p] * k
        warmup = check_int("harmonization.dropout_warmup", self.dropout_warmup, 0)
        if self.reward_ema is not None:
            check_float(
                "harmonization.reward_ema",
                self.reward_ema,
                minimum=0.0,
                maximum=1.0,
                maximum_strict=True,
            )
        return ResolvedHarmonization(
            names=names,
            groups=groups,
            labels=labels,
            member_weights=members,
            preference=preference,
            floor=floor,
            dropout=dropout,
            warmup=warmup,
        )


@dataclass
class ResolvedHarmonization:
    """:class:`HarmonizationOptions` indexed against the module's rewards (what the update uses)."""

    names: list[str]
    groups: list[list[int]]
    labels: list[str]
    member_weights: list[float]
    preference: list[float]
    floor: float = 0.0
    dropout: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def changes_qp(self) -> bool:
        """Whether anything differs from plain MARBLE's QP."""
        return (
            any(len(g) > 1 for g in self.groups)
            or any(p != 1.0 for p in self.preference)
            or self.floor > 0.0
            or any(p > 0.0 for p in self.dropout)
        )

    def dropout_probabilities(self, step: int) -> list[float]:
        """Per-reward dropout probabilities at ``step`` (the warm-up ramp applied)."""
        ramp = 1.0 if self.warmup == 0 else min(1.0, step / self.warmup)
        return [p * ramp for p in self.dropout]

    def dropout_mask(self, *, step: int, update: int, seed: int) -> Tensor:
        """``[K]`` bool, rewards dropped before the QP of ``(step, update)``; never all of them."""
        k = len(self.names)
        probs = torch.tensor(self.dropout_probabilities(step), dtype=torch.float64)
        if not bool((probs > 0).any()):
            return torch.zeros(k, dtype=torch.bool)
        draws = torch.rand(
            k, generator=generator(seed, "reward_dropout", step, update), dtype=torch.float64
        )
        drop = draws < probs
        if bool(drop.all()):
            drop[int(torch.argmax(draws - probs))] = False
        return drop

    def harmonize(self, gram: Tensor, *, step: int, update: int, seed: int) -> Harmonized:
        """The refresh's harmonisation of the raw ``[K, K]`` Gram matrix under these options."""
        drop = self.dropout_mask(step=step, update=update, seed=seed)
        if bool(drop.any()):
            gram = gram.clone()
            keep = (~drop).to(gram.dtype).to(gram.device)
            gram = gram * keep[:, None] * keep[None, :]
        if (
            all(len(g) == 1 for g in self.groups)
            and all(p == 1.0 for p in self.preference)
            and self.floor == 0.0
        ):
            return harmonize_gram(gram)
        return harmonize_groups_gram(
            gram,
            groups=self.groups,
            member_weights=self.member_weights,
            preference=self.preference,
            floor=self.floor,
        )


def attach_harmonization(
    module: Any, options: HarmonizationOptions | Mapping[str, Any] | None
) -> ResolvedHarmonization | None:
    """Wire ``options`` into a :class:`~marble_lightning.module.MarbleDiffusionModule`.

    Sets ``module.updater.harmonization`` (the refresh's QP) and the stat tracker's reward EMA,
    and stores the options as a plain dict in ``module.hparams`` (checkpoints stay loadable with
    ``weights_only=True``).

    Raises:
        ValueError: on invalid options, or QP options with a rule that does not harmonise.
    """
    if options is None:
        return None
    if isinstance(options, Mapping):
        options = HarmonizationOptions(**dict(options))
    if not isinstance(options, HarmonizationOptions):
        raise TypeError(
            f"`harmonization` should be HarmonizationOptions, a dict or None, got {options!r}"
        )
    resolved = options.resolve(module.reward_names)
    if resolved.changes_qp:
        if not module.rule.harmonizes:
            raise ValueError(
                "`harmonization` groups / preference / alpha_floor / reward_dropout apply to the "
                f"MARBLE modes ('marble', 'amortized') only, not to mode {module.mode!r}"
            )
        module.updater.harmonization = resolved
    if options.reward_ema is not None:
        module.tracker.reward_ema = float(options.reward_ema)
    if "harmonization" in module.hparams:
        module.hparams["harmonization"] = asdict(options)
    return resolved
