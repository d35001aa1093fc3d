"""``RewardEvalCallback``: held-out evaluation of the policy at fixed seeds."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from marble_lightning.callbacks._common import check_module
from marble_lightning.checks import check_int
from marble_lightning.data import resolve_prompts
from marble_lightning.metrics import RewardMetric, composite
from marble_lightning.rewards.base import MultiReward

__all__ = ["RewardEvalCallback"]


class RewardEvalCallback(Callback):
    """Held-out evaluation: per-reward means of the policy's images at fixed seeds.

    At train start (after any validation sanity check) it evaluates the base model (adapters
    disabled) once, then the policy every ``every_n_steps`` training steps and at fit end. Logs
    ``eval/<name>`` (mean over the samples where the reward applies; NaN is not logged when it
    applies to none), ``eval/mean`` (mean of the per-reward means of the trained rewards,
    :func:`~marble_lightning.metrics.composite`) and an image grid (``eval/images``, TensorBoard).
    Prompts are split across ranks and the metric states
    (:class:`~marble_lightning.metrics.RewardMetric`) summed by torchmetrics, so every rank gets the
    same numbers.

    The numbers also go into ``trainer.callback_metrics`` (the base evaluation as
    ``eval/<name>_base`` and ``eval/mean_base``), so they can be monitored::

        Trainer(callbacks=[RewardEvalCallback("toy:heldout", every_n_steps=50),
                           ModelCheckpoint(monitor="eval/mean", mode="max", every_n_train_steps=50),
                           EarlyStopping(monitor="eval/mean", mode="max")])

    ``ModelCheckpoint`` should check on evaluation steps (``every_n_train_steps`` a multiple of
    ``every_n_steps``); between evaluations the latest numbers stay in ``callback_metrics``.

    Args:
        prompts: a list, a text file or ``"toy:heldout"`` (see
            :func:`~marble_lightning.data.resolve_prompts`).
        every_n_steps: evaluation period in training steps, ``>= 1``.
        seed: noise seed; copy ``c`` of a prompt uses seed ``seed + c`` (see
            :meth:`~marble_lightning.module.MarbleDiffusionModule.sample`), whatever the chunking
            or the number of ranks.
        images_per_prompt: samples per prompt, ``>= 1``.
        rewards: reward modules to evaluate (``None``: the module's own rewards).
        extra_rewards: reward modules evaluated after ``rewards`` but never trained on (e.g. a
            stricter variant of a trained reward, to watch for reward hacking); their names must
            differ from the others'.
        log_images: log an image grid (first ``max_grid`` images) to loggers that support it.
        batch_size: images per sampling batch.
        max_grid: images in the grid.
        use_ema: evaluate the policy with the weights of the trainer's
            :class:`~marble_lightning.callbacks.PolicyEMACallback` (same metric names).
        sample_steps: sampler steps of the evaluation (``None``: the module's
            ``eval_sample_steps``, else its ``sample_steps``).

    Attributes:
        history: one dict per evaluation: ``step`` (rollouts done), ``global_step``, ``adapter``,
            ``eval/<name>``, ``eval/<name>_sem`` (standard error over the images) and ``eval/mean``.
        samples: per evaluation, this rank's per-image scores ``[N, K]`` (NaN where a reward does
            not apply), in the order of the prompts and seeds: paired comparisons between
            evaluations (base vs final) use them.
        names: the reward names of the columns of ``samples`` (evaluated, then extra rewards).
        first_images / last_images: grids of the first (base) and latest evaluation.
    """

    def __init__(
        self,
        prompts: str | list[str],
        every_n_steps: int = 50,
        seed: int = 0,
        images_per_prompt: int = 1,
        rewards: list[nn.Module] | None = None,
        extra_rewards: list[nn.Module] | None = None,
        log_images: bool = True,
        batch_size: int = 32,
        max_grid: int = 16,
        use_ema: bool = False,
        sample_steps: int | None = None,
    ) -> None:
        if not isinstance(prompts, (str, list, tuple)):
            raise TypeError(
                f"`prompts` should be a path, 'toy:<split>' or a list of prompts, got {prompts!r}"
            )
        if isinstance(prompts, (list, tuple)):
            resolve_prompts(list(prompts), what="prompts")  # validate lists now
        self.source = prompts
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1)
        self.seed = int(seed)
        self.images_per_prompt = check_int("images_per_prompt", images_per_prompt, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.max_grid = check_int("max_grid", max_grid, 0)
        self.log_images = bool(log_images)
        self.use_ema = bool(use_ema)
        self.sample_steps = (
            None if sample_steps is None else check_int("sample_steps", sample_steps)
        )
        self.rewards = None if rewards is None else MultiReward(rewards)
        self.extra_rewards = MultiReward(extra_rewards) if extra_rewards else None
        self.prompts: list[str] = []
        self.history: list[dict[str, Any]] = []
        self.samples: list[Tensor] = []
        self.names: list[str] = []
        self.first_images: Tensor | None = None
        self.last_images: Tensor | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, seed=self.seed)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_module(pl_module, "RewardEvalCallback")
        self.prompts = resolve_prompts(self.source, what="prompts")
        if self.extra_rewards is not None:
            main = self.rewards if self.rewards is not None else pl_module.rewards
            clash = sorted(set(main.names) & set(self.extra_rewards.names))
            if clash:
                raise ValueError(
                    f"RewardEvalCallback: extra_rewards reuse the names {clash} of the evaluated "
                    "rewards; give them their own `name`"
                )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after Lightning's validation sanity check, which resets `trainer.callback_metrics`
        for own in (self.rewards, self.extra_rewards):
            if own is not None:
                own.to(pl_module.device)
        if not any(entry.get("adapter") == "base" for entry in self.history):
            self.evaluate(trainer, pl_module, adapter="base")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.step_index % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module, adapter="policy")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        done = any(
            e.get("adapter") == "policy" and e.get("step") == pl_module.step_index
            for e in self.history
        )
        if not done:
            self.evaluate(trainer, pl_module, adapter="policy")

    @torch.no_grad()
    def evaluate(
        self, trainer: Trainer, pl_module: LightningModule, adapter: str = "policy"
    ) -> dict[str, float]:
        """Sample, score and log; every rank must call it (the metric states are synced across
        ranks).

        Means and standard errors are :class:`~marble_lightning.metrics.RewardMetric`'s (its
        states are summed over the ranks by torchmetrics in ``compute()``), ``eval/mean`` is
        :func:`~marble_lightning.metrics.composite` of the trained rewards' means. The finite
        values are logged to the loggers and written into ``trainer.callback_metrics`` (keys
        suffixed ``_<adapter>`` unless ``adapter`` is ``"policy"``), where ``ModelCheckpoint`` and
        ``EarlyStopping`` read them.

        Args:
            trainer: the trainer (ranks, loggers, ``callback_metrics``).
            pl_module: the module to sample from.
            adapter: ``"policy"``, ``"old"`` or ``"base"``.

        Returns:
            ``{"eval/<name>": mean, ..., "eval/mean": ...}`` (NaN for a reward that applied to no
            sample).
        """
        rewards: MultiReward = self.rewards if self.rewards is not None else pl_module.rewards
        names = list(rewards.names) + (list(self.extra_rewards.names) if self.extra_rewards else [])
        self.names = names
        world, rank = trainer.world_size, trainer.global_rank
        everything = [
            (p, self.seed + c) for p in self.prompts for c in range(self.images_per_prompt)
        ]
        mine = everything[rank::world]
        steps = self.sample_steps
        if steps is None:
            steps = getattr(pl_module, "eval_sample_steps", None)
        device = pl_module.device
        metric = RewardMetric(names).to(device)
        per_sample: list[Tensor] = []
        grid: list[Tensor] = []
        for start in range(0, len(mine), self.batch_size):
            chunk = [p for p, _ in mine[start : start + self.batch_size]]
            seeds = [x for _, x in mine[start : start + self.batch_size]]
            with self._weights(trainer, pl_module, adapter):
                images = pl_module.sample(chunk, seed=seeds, adapter=adapter, steps=steps)
            scored = [rewards(images, chunk)]
            if self.extra_rewards is not None:
                scored.append(self.extra_rewards(images, chunk))
            mask = torch.cat([s.mask.to(device) for s in scored], dim=1)
            values = torch.cat([s.values.to(device).double() for s in scored], dim=1)
            metric.update(values, mask)
            per_sample.append(
                torch.where(mask, values, torch.full_like(values, float("nan"))).cpu()
            )
            if len(grid) * images.shape[0] < self.max_grid:
                grid.append(images.detach().cpu())
        if not mine:  # fewer samples than ranks: this rank still takes part in the sync
            metric.update(
                torch.zeros(0, len(names), device=device),
                torch.zeros(0, len(names), dtype=torch.bool, device=device),
            )
        stats = metric.compute()  # sums reduced across ranks (dist_reduce_fx="sum")
        means, sems = stats["mean"], stats["sem"]
        metrics = {f"eval/{name}": float(means[i]) for i, name in enumerate(names)}
        metrics["eval/mean"] = composite({n: metrics[f"eval/{n}"] for n in rewards.names})
        suffix = "" if adapter == "policy" else f"_{adapter}"
        self._publish(trainer, {key + suffix: value for key, value in metrics.items()})
        if grid and self.max_grid > 0:
            images = torch.cat(grid)[: self.max_grid]
            if self.first_images is None:
                self.first_images = images
            self.last_images = images
            if self.log_images:
                self._log_grid(trainer, images, f"eval/images{suffix}")
        sem_metrics = {f"eval/{name}_sem": float(sems[i]) for i, name in enumerate(names)}
        self.history.append(
            {
                "step": pl_module.step_index,
                "global_step": trainer.global_step,
                "adapter": adapter,
                **metrics,
                **sem_metrics,
            }
        )
        # rank-local per-image scores ([N, K], NaN where a reward does not apply), in prompt order
        self.samples.append(
            torch.cat(per_sample) if per_sample else torch.zeros(0, len(names), dtype=torch.float64)
        )
        return metrics

    def _weights(self, trainer: Trainer, pl_module: LightningModule, adapter: str) -> Any:
        """The policy EMA's weights swapped in (``use_ema``, policy adapter), else a no-op."""
        from contextlib import nullcontext

        from marble_lightning.callbacks.policy_ema import PolicyEMACallback

        if not self.use_ema or adapter != "policy":
            return nullcontext()
        ema = next((c for c in trainer.callbacks if isinstance(c, PolicyEMACallback)), None)
        if ema is None:
            raise ValueError(
                "RewardEvalCallback(use_ema=True) needs a PolicyEMACallback in the trainer"
            )
        return ema.applied(pl_module)

    @staticmethod
    def _publish(trainer: Trainer, metrics: dict[str, float]) -> None:
        """Log the finite values to the loggers and put them into ``trainer.callback_metrics``.

        The values are already the same on every rank (synced), so no further reduction is
        needed. ``callback_metrics`` keeps them until the next evaluation replaces them (a key
        whose new value is NaN is removed), which is what ``ModelCheckpoint(monitor=...)`` and
        ``EarlyStopping(monitor=...)`` read; Lightning runs checkpoint callbacks after the
        others, so on an evaluation step they see this step's numbers.
        """
        finite = {key: value for key, value in metrics.items() if math.isfinite(value)}
        for logger in trainer.loggers:
            logger.log_metrics(finite, step=trainer.global_step)
        callback_metrics = trainer.callback_metrics
        for key, value in metrics.items():
            if key in finite:
                callback_metrics[key] = torch.tensor(value, dtype=torch.float64)
            else:
                callback_metrics.pop(key, None)

    @staticmethod
    def _log_grid(trainer: Trainer, images: Tensor, tag: str) -> None:
        if trainer.global_rank != 0:
            return
        from torchvision.utils import make_grid

        if images.ndim == 5:  # videos [N, F, 3, H, W] (issue 20): a frame strip, one row per clip
            grid = make_grid(images.flatten(0, 1), nrow=images.shape[1], padding=1)
        else:
            grid = make_grid(images, nrow=math.ceil(math.sqrt(images.shape[0])), padding=1)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(tag, grid, global_step=trainer.global_step)
            if images.ndim == 5 and hasattr(experiment, "add_video") and _has_moviepy():
                experiment.add_video(f"{tag}_video", images, global_step=trainer.global_step, fps=8)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "samples": [s.clone() for s in self.samples]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.samples = [torch.as_tensor(s) for s in state_dict.get("samples", [])]


def _has_moviepy() -> bool:
    """TensorBoard's ``add_video`` encodes GIFs with moviepy; without it only the frame strip is
    logged."""
    import importlib.util

    return importlib.util.find_spec("moviepy") is not None
