"""The few collectives training needs, behind one small interface.

:class:`LocalCollective` is the single-process identity (tests, notebooks, a module used without a
trainer); :class:`StrategyCollective` goes through a Lightning trainer's strategy (DDP and
friends). Every rank must make the same calls in the same order.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Collective", "LocalCollective", "StrategyCollective"]


@runtime_checkable
class Collective(Protocol):
    """``world_size`` ranks; this one is ``rank``."""

    world_size: int
    rank: int

    def mean(self, tensor: Tensor) -> Tensor:
        """Element-wise mean of ``tensor`` over the ranks."""
        ...

    def sum(self, tensor: Tensor) -> Tensor:
        """Element-wise sum of ``tensor`` over the ranks."""
        ...

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """``[world * N, ...]``: every rank's ``[N, ...]`` tensor, in rank order."""
        ...

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every rank's list, concatenated in rank order."""
        ...


class LocalCollective:
    """One process: every collective is the identity."""

    world_size = 1
    rank = 0

    def mean(self, tensor: Tensor) -> Tensor:
        return tensor

    def sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def gather_rows(self, tensor: Tensor) -> Tensor:
        return tensor

    def gather_objects(self, items: list[Any]) -> list[Any]:
        return list(items)


class StrategyCollective:
    """Collectives of a Lightning trainer's strategy (the identity on one device).

    ``mean`` and ``sum`` may reduce their argument in place (Lightning's reduce does on more than
    one rank): use the returned tensor, not the argument, afterwards.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.world_size = int(trainer.world_size)
        self.rank = int(trainer.global_rank)

    def mean(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="mean")

    def sum(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def gather_rows(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1:
            return tensor
        gathered = self.trainer.strategy.all_gather(tensor.contiguous())
        return gathered.reshape(-1, *tensor.shape[1:])

    def gather_objects(self, items: list[Any]) -> list[Any]:
        if self.world_size == 1:
            return list(items)
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, list(items))
        return [item for chunk in gathered for item in chunk]
