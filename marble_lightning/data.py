"""Prompt data for RL fine-tuning: each training batch is a list of ``P`` unique prompts.

The module repeats every prompt ``G`` times itself, so a group never straddles two ranks.

Order. Epoch ``e`` uses a permutation of the prompt list seeded by ``(seed, e)``; it is cut into
*global* batches of ``P * world_size`` prompts (the remainder is dropped), and rank ``r`` takes
the ``r``-th slice of ``P`` prompts of each global batch. The union of the ranks' batches at a
step is therefore the same as the single-process batch with ``prompts_per_step = P *
world_size``, which makes a multi-device run comparable with a single-device one.

Resumption. The training dataloader is stateful (``state_dict`` / ``load_state_dict``, saved by
Lightning in the fit loop's checkpoint state): it records the epoch and how many batches of it
the trainer has processed, and a resumed run skips those, so an interrupted run sees exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = ["PromptBatches", "PromptDataModule", "resolve_prompts"]

PromptSource = str | Sequence[str]


def resolve_prompts(source: PromptSource, *, what: str = "prompts") -> list[str]:
    """Turn a prompt source into a list of prompts.

    Args:
        source: a list of prompts; ``"toy:train"`` / ``"toy:heldout"`` (the toy world's splits,
            optionally restricted to templates: ``"toy:train:count,relation"``); or the path of
            a UTF-8 text file with one prompt per line (blank lines are skipped, lines stripped).
        what: the argument name used in error messages.

    Returns:
        The prompts, in file / list order.

    Raises:
        FileNotFoundError: if the file does not exist (the message names the path).
        ValueError: if the source yields no prompt, a list holds a non-string, or a ``toy:``
            split is unknown.
    """
    if isinstance(source, str):
        if source.startswith("toy:"):
            _, split, *rest = source.split(":")
            from marble_lightning.toy import prompts as toy_prompts

            templates = rest[0].split(",") if rest and rest[0] else None
            if split == "train":
                prompts = toy_prompts.train_prompts(templates)
            elif split == "heldout":
                prompts = toy_prompts.heldout_prompts(templates)
            else:
                raise ValueError(f"`{what}`: unknown toy split {split!r} in {source!r}; use 'toy:train' or 'toy:heldout'")
            if not prompts:
                raise ValueError(f"`{what}`: {source!r} yields no prompts")
            return list(prompts)
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"`{what}`: prompt file {str(path)!r} does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p]
        if not prompts:
            raise ValueError(f"`{what}`: prompt file {str(path)!r} is empty (no non-blank line)")
        return prompts
    prompts = list(source)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"`{what}`: every prompt should be a string, got {bad[0]!r}")
    if not prompts:
        raise ValueError(f"`{what}`: the prompt list is empty")
    return prompts


def _identity(batch: Any) -> Any:
    return batch


class PromptBatches(IterableDataset):
    """The batches of one rank: a deterministic, epoch-shuffled stream of prompt lists.

    Args:
        prompts: all training prompts (``N``).
        prompts_per_step: ``P``, prompts per batch per rank.
        seed: shuffle seed.
        rank: this rank's index.
        world_size: number of ranks.

    Attributes:
        epoch: the epoch whose permutation :meth:`__iter__` uses.
        skip: number of batches of ``epoch`` to skip (set when resuming mid-epoch).
    """

    def __init__(self, prompts: list[str], prompts_per_step: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        global_batch = prompts_per_step * world_size
        if len(prompts) < global_batch:
            raise ValueError(
                f"{len(prompts)} prompts cannot fill one global batch of prompts_per_step={prompts_per_step} "
                f"x world_size={world_size} = {global_batch}; lower prompts_per_step or add prompts"
            )
        self.prompts = list(prompts)
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def __len__(self) -> int:
        return len(self.prompts) // (self.prompts_per_step * self.world_size)

    def batch(self, epoch: int, index: int) -> list[str]:
        """Batch ``index`` of ``epoch`` for this rank."""
        gen = torch.Generator().manual_seed(hash_seed(self.seed, epoch))
        order = torch.randperm(len(self.prompts), generator=gen).tolist()
        p = self.prompts_per_step
        start = index * p * self.world_size + self.rank * p
        return [self.prompts[i] for i in order[start : start + p]]

    def __iter__(self) -> Iterator[list[str]]:
        gen = torch.Generator().manual_seed(hash_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.prompts), generator=gen).tolist()
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        p = self.prompts_per_step
        for index in range(self.skip, len(self)):
            if (index - self.skip) % workers != worker:
                continue
            start = index * p * self.world_size + self.rank * p
            yield [self.prompts[i] for i in order[start : start + p]]


def hash_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s permutation (a fixed mixing of the two integers)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 12_345) % (2**63 - 1)


class _ResumableLoader(DataLoader):
    """A ``DataLoader`` over :class:`PromptBatches` that Lightning checkpoints and restores.

    ``progress()`` returns ``(epoch, batches processed in that epoch)`` from the trainer.
    """

    def __init__(self, dataset: PromptBatches, progress: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=_identity, **kwargs)
        self._progress = progress
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Any:
        epoch, _ = self._progress()
        dataset: PromptBatches = self.dataset  # type: ignore[assignment]
        dataset.epoch = epoch
        dataset.skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            dataset.skip = min(self._resume[1], len(dataset))
        self._resume = None
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        epoch, done = self._progress()
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state.get("epoch", 0)), int(state.get("batches_done", 0)))


class PromptDataModule(LightningDataModule):
    """Prompt lists for :class:`~marble_lightning.module.MarbleDiffusionModule`.

    Args:
        train_prompts: a list of prompts, a text file (one prompt per line) or ``"toy:train"`` /
            ``"toy:heldout"`` (resolved lazily, at :meth:`setup`).
        prompts_per_step: ``P``, unique prompts per batch per rank (``>= 1``).
        seed: seed of the per-epoch shuffle.
        heldout_prompts: optional evaluation prompts (same forms), exposed as
            :attr:`heldout` for evaluation callbacks.
        num_workers: dataloader workers (``0``: load in the main process).
    """

    def __init__(
        self,
        train_prompts: str | list[str],
        prompts_per_step: int = 4,
        seed: int = 0,
        heldout_prompts: str | list[str] | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(prompts_per_step, bool) or not isinstance(prompts_per_step, int) or prompts_per_step < 1:
            raise ValueError(f"`prompts_per_step` should be an integer >= 1, got {prompts_per_step!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` should be an integer >= 0, got {num_workers!r}")
        if not isinstance(train_prompts, str) and not isinstance(train_prompts, Sequence):
            raise TypeError(f"`train_prompts` should be a path, 'toy:<split>' or a list, got {train_prompts!r}")
        self.train_source = train_prompts
        self.heldout_source = heldout_prompts
        self.prompts_per_step = prompts_per_step
        self.seed = int(seed)
        self.num_workers = num_workers
        self._train: list[str] | None = None
        self._heldout: list[str] | None = None

    @property
    def train(self) -> list[str]:
        """The resolved training prompts."""
        if self._train is None:
            self._train = resolve_prompts(self.train_source, what="train_prompts")
        return self._train

    @property
    def heldout(self) -> list[str] | None:
        """The resolved held-out prompts (``None`` if none were given)."""
        if self.heldout_source is None:
            return None
        if self._heldout is None:
            self._heldout = resolve_prompts(self.heldout_source, what="heldout_prompts")
        return self._heldout

    def setup(self, stage: str) -> None:
        self.train  # noqa: B018  (resolve now: clear errors before training starts)
        self.heldout  # noqa: B018

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _progress(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        dataset = PromptBatches(self.train, self.prompts_per_step, self.seed, rank, world)
        return _ResumableLoader(dataset, self._progress, num_workers=self.num_workers)
