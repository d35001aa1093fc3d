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

Evaluation. ``heldout_prompts`` also takes GenEval metadata ``.jsonl`` files and lists mixing
inline prompts with prompt files (:func:`resolve_prompt_records`); ``val_dataloader`` /
``test_dataloader`` / ``predict_dataloader`` serve :class:`EvaluationPrompts` batches that keep
each image's source file, GenEval tag and metadata, so ``marble validate | test`` can report the
full table (:class:`~marble_lightning.callbacks.EvaluationTableCallback`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from marble_lightning.checks import check_int
from marble_lightning.rewards.geneval import PromptRecord, read_prompt_file
from marble_lightning.seeding import generator

__all__ = [
    "PROMPT_FILE_SUFFIXES",
    "EvaluationPrompts",
    "PromptBatches",
    "PromptDataModule",
    "resolve_prompt_records",
    "resolve_prompts",
]

PromptSource = str | Sequence[str]

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")
"""Prompt files of an evaluation set: plain text (one prompt per line) and GenEval metadata."""


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
                raise ValueError(
                    f"`{what}`: unknown toy split {split!r} in {source!r}; use 'toy:train' or "
                    "'toy:heldout'"
                )
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


def _toy_records(source: str, what: str) -> list[PromptRecord]:
    return [PromptRecord(p, source) for p in resolve_prompts(source, what=what)]


def _file_records(path: str | Path, what: str) -> list[PromptRecord]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`{what}`: prompt file {str(path)!r} does not exist")
    if path.suffix.lower() not in (*PROMPT_FILE_SUFFIXES, ""):
        raise ValueError(
            f"`{what}`: prompt file {str(path)!r} has an unknown suffix {path.suffix!r}; use .txt "
            "(one prompt per line) or .jsonl (GenEval metadata, one JSON object per line)"
        )
    try:
        return read_prompt_file(path)
    except ValueError as err:
        raise ValueError(f"`{what}`: {err}") from err


def _looks_like_file(item: str) -> bool:
    """A list item names a prompt file: a known suffix, or an existing file with a suffix."""
    if item.lower().endswith(PROMPT_FILE_SUFFIXES):
        return True
    return not any(c.isspace() for c in item) and bool(Path(item).suffix) and Path(item).is_file()


def resolve_prompt_records(
    source: str | Path | Sequence[str | Path | PromptRecord], *, what: str = "heldout_prompts"
) -> list[PromptRecord]:
    """An evaluation set as :class:`~marble_lightning.rewards.geneval.PromptRecord` s.

    Args:
        source: ``"toy:<split>"`` or the path of a prompt file (``.txt`` or no suffix: one prompt
            per line, ``#`` comments skipped; ``.jsonl``: GenEval metadata, one JSON object with
            ``prompt``, ``tag``, ``include``, ... per line, see
            :func:`~marble_lightning.rewards.geneval.read_prompt_file`); or a list mixing inline
            prompts, ``toy:`` splits, records and prompt files (an item ending in ``.txt`` /
            ``.jsonl`` is a file, an existing file of another suffix an error, any other string
            a prompt), concatenated in order.
        what: the argument name used in error messages.

    Returns:
        The records in order; ``source`` is the file name (``""`` inline, the spec for ``toy:``)
        and ``metadata`` the GenEval line (``None`` for plain prompts).

    Raises:
        FileNotFoundError: a prompt file does not exist (the message names the path).
        ValueError: an unknown file suffix, a malformed jsonl line (file and line named), an
            empty file or list, or an item that is neither a string nor a record.
    """
    if isinstance(source, (str, Path)):
        if isinstance(source, str) and source.startswith("toy:"):
            return _toy_records(source, what)
        return _file_records(source, what)
    records: list[PromptRecord] = []
    for item in source:
        if isinstance(item, PromptRecord):
            records.append(item)
        elif isinstance(item, Path):
            records.extend(_file_records(item, what))
        elif isinstance(item, str) and item.startswith("toy:"):
            records.extend(_toy_records(item, what))
        elif isinstance(item, str) and _looks_like_file(item.strip()):
            records.extend(_file_records(item.strip(), what))
        elif isinstance(item, str) and item.strip():
            records.append(PromptRecord(item.strip()))
        else:
            raise ValueError(
                f"`{what}`: every item should be a prompt, a prompt file or 'toy:<split>', got "
                f"{item!r}"
            )
    if not records:
        raise ValueError(f"`{what}`: the prompt list is empty")
    return records


def _identity(batch: Any) -> Any:
    return batch


def check_prompt_batch(batch: Any) -> list[str]:
    """A training batch as a non-empty list of prompt strings (a str or tuple is accepted)."""
    if isinstance(batch, str):
        batch = [batch]
    if isinstance(batch, tuple):
        batch = list(batch)
    if not isinstance(batch, list) or not batch or not all(isinstance(p, str) for p in batch):
        raise ValueError(
            f"a training batch should be a non-empty list of prompt strings, got {batch!r}"
        )
    return batch


def _strata(
    prompts: Sequence[str] | Mapping[str, Sequence[str]], prompts_per_step: int | Mapping[str, int]
) -> list[tuple[str, list[str], int]]:
    """``[(name, prompts, P_s), ...]``: one unnamed stratum, or one per key of a mapping."""
    if isinstance(prompts, Mapping):
        if not isinstance(prompts_per_step, Mapping):
            raise ValueError(
                f"with prompt strata {list(prompts)}, `prompts_per_step` should be a mapping of "
                f"each stratum to a count, got {prompts_per_step!r}"
            )
        if set(prompts) != set(prompts_per_step):
            raise ValueError(
                f"`prompts_per_step` keys {sorted(prompts_per_step)} should equal the prompt "
                f"strata {sorted(prompts)}"
            )
        if not prompts:
            raise ValueError("`train_prompts` is an empty mapping (no stratum)")
        out = []
        for name, group in prompts.items():
            count = prompts_per_step[name]
            check_int(f"prompts_per_step[{name!r}]", count)
            out.append((str(name), list(group), int(count)))
        return out
    if isinstance(prompts_per_step, Mapping):
        raise ValueError(
            f"`prompts_per_step` is a mapping {dict(prompts_per_step)!r} but `train_prompts` is a "
            "single list; give `train_prompts` as a mapping of the same strata"
        )
    check_int("prompts_per_step", prompts_per_step)
    return [("", list(prompts), int(prompts_per_step))]


class PromptBatches(IterableDataset):
    """The batches of one rank: a deterministic, epoch-shuffled stream of prompt lists.

    With strata (``prompts`` and ``prompts_per_step`` given as mappings of the same keys), every
    batch holds exactly ``P_s`` prompts of stratum ``s``, concatenated in the mapping's order:
    each stratum is shuffled on its own and an epoch lasts as long as its shortest stratum. Use
    this so that a reward that applies to one prompt family only (OCR on text prompts) sees the
    same number of samples at every step instead of none at some.

    Args:
        prompts: all training prompts (``N``), or a mapping stratum name -> prompts.
        prompts_per_step: ``P``, prompts per batch per rank, or a mapping stratum name -> ``P_s``.
        seed: shuffle seed.
        rank: this rank's index.
        world_size: number of ranks.

    Attributes:
        epoch: the epoch whose permutation :meth:`__iter__` uses.
        skip: number of batches of ``epoch`` to skip (set when resuming mid-epoch).
        strata: ``[(name, prompts, P_s), ...]`` (one entry named ``""`` without strata).
    """

    def __init__(
        self,
        prompts: Sequence[str] | Mapping[str, Sequence[str]],
        prompts_per_step: int | Mapping[str, int],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.strata = _strata(prompts, prompts_per_step)
        for name, group, count in self.strata:
            global_batch = count * world_size
            if len(group) < global_batch:
                where = f"stratum {name!r}: " if name else ""
                raise ValueError(
                    f"{where}{len(group)} prompts cannot fill one global batch of "
                    f"prompts_per_step={count} x world_size={world_size} = {global_batch}; lower "
                    "prompts_per_step or add prompts"
                )
        self.prompts_per_step = sum(count for _, _, count in self.strata)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def __len__(self) -> int:
        return min(len(group) // (count * self.world_size) for _, group, count in self.strata)

    def _orders(self, epoch: int) -> list[list[int]]:
        orders = []
        for index, (_, group, _) in enumerate(self.strata):
            gen = generator(self.seed, "prompt-order", epoch, index)
            orders.append(torch.randperm(len(group), generator=gen).tolist())
        return orders

    def _batch(self, orders: list[list[int]], index: int) -> list[str]:
        out: list[str] = []
        for (_, group, count), order in zip(self.strata, orders):
            start = index * count * self.world_size + self.rank * count
            out.extend(group[i] for i in order[start : start + count])
        return out

    def batch(self, epoch: int, index: int) -> list[str]:
        """Batch ``index`` of ``epoch`` for this rank."""
        return self._batch(self._orders(epoch), index)

    def __iter__(self) -> Iterator[list[str]]:
        orders = self._orders(self.epoch)
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(self.skip, len(self)):
            if (index - self.skip) % workers != worker:
                continue
            yield self._batch(orders, index)


class _ResumableLoader(DataLoader):
    """A ``DataLoader`` over :class:`PromptBatches` that Lightning checkpoints and restores.

    The position in the prompt stream is the number of batches consumed since the start of
    training, ``g``: batch ``g`` is batch ``g % L`` of data epoch ``g // L`` (``L`` batches per
    epoch), whatever epoch number the trainer is at (Lightning can count an epoch twice when it
    resumes from a checkpoint written on an epoch's last batch). ``consumed()`` returns ``g`` from
    the trainer; the checkpointed value wins right after a restore.
    """

    def __init__(self, dataset: PromptBatches, consumed: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=_identity, **kwargs)
        self._consumed = consumed
        self._resume: int | None = None

    def __iter__(self) -> Any:
        start = self._consumed() if self._resume is None else self._resume
        self._resume = None
        dataset: PromptBatches = self.dataset  # type: ignore[assignment]
        dataset.epoch, dataset.skip = divmod(start, len(dataset))
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"batches_consumed": self._consumed()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "batches_consumed" in state:
            self._resume = int(state["batches_consumed"])
        else:  # checkpoints written before the stream position was global
            dataset: PromptBatches = self.dataset  # type: ignore[assignment]
            self._resume = int(state.get("epoch", 0)) * len(dataset) + int(
                state.get("batches_done", 0)
            )


class PromptDataModule(LightningDataModule):
    """Prompt lists for :class:`~marble_lightning.module.MarbleDiffusionModule`.

    Args:
        train_prompts: a list of prompts, a text file (one prompt per line) or ``"toy:train"`` /
            ``"toy:heldout"`` (resolved lazily, at :meth:`setup`); or a mapping stratum name ->
            any of those, to draw a fixed number of prompts from each stratum at every step
            (see :class:`PromptBatches`), e.g. ``{"shapes": "toy:train:count,relation",
            "text": "toy:train:text"}``.
        prompts_per_step: ``P``, unique prompts per batch per rank (``>= 1``); with strata, a
            mapping of the same keys to per-stratum counts (``P`` is their sum).
        seed: seed of the per-epoch shuffle.
        heldout_prompts: optional evaluation prompts: a list, a ``.txt`` file, ``"toy:heldout"``,
            a GenEval metadata ``.jsonl`` file, or a list mixing prompts and prompt files (see
            :func:`resolve_prompt_records`). Exposed as :attr:`heldout` (strings) and
            :attr:`heldout_records` and served by ``val_dataloader`` / ``test_dataloader`` /
            ``predict_dataloader`` (``marble validate | test | predict``).
        num_workers: dataloader workers (``0``: load in the main process).
        eval_images_per_prompt: images per held-out prompt; copy ``c`` uses seed
            ``eval_seed + c`` (``>= 1``).
        eval_seed: first noise seed of the evaluation images.
        eval_batch_size: images per evaluation batch (``>= 1``).
    """

    def __init__(
        self,
        train_prompts: str | list[str] | dict[str, str | list[str]],
        prompts_per_step: int | dict[str, int] = 4,
        seed: int = 0,
        heldout_prompts: str | list[str] | None = None,
        num_workers: int = 0,
        eval_images_per_prompt: int = 1,
        eval_seed: int = 1000,
        eval_batch_size: int = 16,
    ) -> None:
        super().__init__()
        # in checkpoints (datamodule_hyper_parameters); not merged into the loggers' hparams, where
        # a `seed` differing from the module's would make Lightning raise "Error while merging
        # hparams"
        self.save_hyperparameters(logger=False)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` should be an integer >= 0, got {num_workers!r}")
        if not isinstance(train_prompts, (str, Sequence, Mapping)):
            raise TypeError(
                "`train_prompts` should be a path, 'toy:<split>', a list or a mapping of those, "
                f"got {train_prompts!r}"
            )
        if isinstance(train_prompts, Mapping):
            for name, source in train_prompts.items():
                if not isinstance(source, (str, Sequence)):
                    raise TypeError(
                        f"`train_prompts[{name!r}]` should be a path, 'toy:<split>' or a list, got "
                        f"{source!r}"
                    )
            _strata({k: [] for k in train_prompts}, prompts_per_step)  # validates keys and counts
        else:
            _strata([], prompts_per_step)
        self.train_source = train_prompts
        self.heldout_source = heldout_prompts
        self.prompts_per_step = prompts_per_step
        self.seed = int(seed)
        self.num_workers = num_workers
        self.eval_images_per_prompt = check_int("eval_images_per_prompt", eval_images_per_prompt)
        self.eval_seed = int(eval_seed)
        self.eval_batch_size = check_int("eval_batch_size", eval_batch_size)
        self._train: list[str] | dict[str, list[str]] | None = None
        self._heldout: list[PromptRecord] | None = None

    @property
    def train_strata(self) -> list[str] | dict[str, list[str]]:
        """The resolved training prompts: a list, or a mapping stratum name -> list."""
        if self._train is None:
            source = self.train_source
            if isinstance(source, Mapping):
                self._train = {
                    str(name): resolve_prompts(part, what=f"train_prompts[{name!r}]")
                    for name, part in source.items()
                }
            else:
                self._train = resolve_prompts(source, what="train_prompts")
        return self._train

    @property
    def train(self) -> list[str]:
        """All resolved training prompts (strata concatenated in order)."""
        strata = self.train_strata
        if isinstance(strata, dict):
            return [p for part in strata.values() for p in part]
        return strata

    @property
    def heldout_records(self) -> list[PromptRecord] | None:
        """The resolved held-out set with sources and GenEval metadata (``None``: none given)."""
        if self.heldout_source is None:
            return None
        if self._heldout is None:
            self._heldout = resolve_prompt_records(self.heldout_source, what="heldout_prompts")
        return self._heldout

    @property
    def heldout(self) -> list[str] | None:
        """The resolved held-out prompts as strings (``None`` if none were given)."""
        records = self.heldout_records
        return None if records is None else [r.prompt for r in records]

    def setup(self, stage: str) -> None:
        self.train  # noqa: B018  (resolve now: clear errors before training starts)
        self.heldout  # noqa: B018

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _consumed(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        dataset = PromptBatches(self.train_strata, self.prompts_per_step, self.seed, rank, world)
        return _ResumableLoader(dataset, self._consumed, num_workers=self.num_workers)

    def _evaluation_loader(self) -> DataLoader:
        prompts = self.heldout_records
        if not prompts:
            raise ValueError(
                "evaluation needs held-out prompts: set `data.heldout_prompts` (a list, a .txt "
                "file, a GenEval .jsonl file or 'toy:heldout')"
            )
        rank, world = self._rank_world()
        dataset = EvaluationPrompts(
            prompts, self.eval_images_per_prompt, self.eval_seed, self.eval_batch_size, rank, world
        )
        return DataLoader(dataset, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader | list:
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        if fitting and not self.heldout:
            # no validation during fit without held-out prompts (Lightning would say so)
            warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
            return []
        return self._evaluation_loader()

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader()

    def predict_dataloader(self) -> DataLoader:
        return self._evaluation_loader()


class EvaluationPrompts(IterableDataset):
    """Batches of this rank's share of an evaluation set.

    The set is every prompt times ``images_per_prompt`` copies (copy ``c`` has seed ``seed + c``);
    rank ``r`` of ``W`` takes items ``r, r + W, ...``, so no item is scored twice and the union
    over ranks is the whole set, whatever ``W``.

    Each batch is a dict of ``B``-long lists: ``prompts``, ``seeds``, ``sources`` (file name,
    ``""`` inline), ``tags`` (GenEval tag or ``""``), ``metadata`` (GenEval line or ``None``) and
    ``indices`` (the prompt's index in the set).
    """

    def __init__(
        self, prompts: Sequence[str | PromptRecord], images_per_prompt: int, seed: int,
        batch_size: int, rank: int = 0, world: int = 1,
    ) -> None:  # fmt: skip
        records = [p if isinstance(p, PromptRecord) else PromptRecord(p) for p in prompts]
        items = [(i, r, seed + c) for i, r in enumerate(records) for c in range(images_per_prompt)]
        self.items = items[rank::world]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, list]]:
        for start in range(0, len(self.items), self.batch_size):
            chunk = self.items[start : start + self.batch_size]
            yield {
                "prompts": [r.prompt for _, r, _ in chunk],
                "seeds": [s for _, _, s in chunk],
                "sources": [r.source for _, r, _ in chunk],
                "tags": [r.tag or "" for _, r, _ in chunk],
                "metadata": [None if r.metadata is None else dict(r.metadata) for _, r, _ in chunk],
                "indices": [i for i, _, _ in chunk],
            }
