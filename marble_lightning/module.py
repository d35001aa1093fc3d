"""``MarbleDiffusionModule``: multi-reward DiffusionNFT fine-tuning with MARBLE harmonisation.

One training step (manual optimisation): a **rollout** (:mod:`marble_lightning.rollout`: the old
LoRA adapter samples ``G`` images per prompt, the ``K`` rewards score them, per-prompt advantages);
an **update** (:mod:`marble_lightning.update`: the training rule of :mod:`marble_lightning.rules`
sets the loss rows; a MARBLE refresh harmonises the ``K`` per-reward gradients, other steps take
one aggregated gradient; the gradient rows are reduced across ranks once, the direction is written
to the policy LoRA's ``p.grad`` and the optimizer steps); then the **old policy** moves towards the
policy (:class:`~marble_lightning.schedules.OldPolicySchedule`). Every noise draw is keyed
(:mod:`marble_lightning.seeding`), so resumed and multi-device runs see the same noise.
Checkpoints hold the two LoRA adapters and ``checkpoint["marble"]`` (tracker, coefficients,
counters, history); base weights come from the backbone's own source.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn

from marble_lightning.adapters import LoraAdapterPair
from marble_lightning.advantages import PerPromptStatTracker
from marble_lightning.backbone import FlowBackbone
from marble_lightning.coefficients import Coefficients
from marble_lightning.collective import Collective, LocalCollective, StrategyCollective
from marble_lightning.data import check_prompt_batch
from marble_lightning.evaluation import EvaluationSteps
from marble_lightning.generation import PolicySampling
from marble_lightning.gram import GradientEngine
from marble_lightning.harmonize import Harmonized, weights_from_alpha
from marble_lightning.hparams import check_resume, cli_inputs, validate_hparams
from marble_lightning.options import HarmonizationOptions, attach_harmonization
from marble_lightning.precision import (
    autocast_context,
    check_trainer_precision,
    resolve_rollout_precision,
)
from marble_lightning.rewards.base import MultiReward
from marble_lightning.rollout import Rollout, collect_rollout
from marble_lightning.rules import DEFAULT_REFRESH_EVERY, MODES, make_rule
from marble_lightning.sampling import (
    training_timesteps,
)
from marble_lightning.schedules import OldPolicySchedule
from marble_lightning.sharding import configure_sharding
from marble_lightning.update import (
    NFTUpdate,
    UpdateResult,
    apply_direction,
    plan_losses,
    step_metrics,
)

__all__ = ["MODES", "MarbleDiffusionModule", "Rollout", "UpdateResult"]


class MarbleDiffusionModule(EvaluationSteps, PolicySampling, LightningModule):
    """Multi-reward RL fine-tuning of a flow-matching diffusion model (MARBLE and baselines).

    Args:
        backbone: A :class:`~marble_lightning.backbone.FlowBackbone`; LoRA adapters are attached to
            its ``denoiser`` (diffusers' ``PeftAdapterMixin``). All other weights stay frozen.
        rewards: ``K >= 1`` reward modules with unique ``name``
            (``reward(images, prompts) -> [B]``).
        mode: the training rule (:func:`~marble_lightning.rules.make_rule`): ``"marble"`` (refresh
            every step), ``"amortized"`` (refresh every ``refresh_every`` steps, or as a
            :class:`~marble_lightning.callbacks.HarmonizationCallback` decides),
            ``"weighted_sum"``, ``"fixed"``, ``"single"`` or ``"sequential"``.
        group_size: ``G``, images per prompt.
        sample_steps: Euler steps of the rollout sampler; the training timesteps are its grid
            points (the backbone's ``time_grid`` when it has one, else uniform).
        train_timesteps: grid timesteps trained on per update (a random subset, the same on every
            rank); ``None``: all.
        cfg_scale: classifier-free guidance scale of the rollout (1.0: none).
        beta: NFT strength (``> 0``).
        a_max: advantage clip (``> 0``), also the NFT loss scale.
        kl_weight: ``lambda_KL >= 0`` of ``mean((v - v_ref)^2)``, outside the harmonisation.
        reward_weights: weighted_sum only: scalarisation weights (default all 1).
        fixed_alpha: fixed only: coefficients on the per-reward ``r`` (default uniform).
        single_reward: single only: the reward's name.
        stages: sequential only: ``[(reward name, steps), ...]``; the last reward is kept after.
        refresh_every: amortized only: refresh period without a callback (default 5).
        aggregate: ``"r"`` (exact ``r_bar = sum_k (w_k / W) r_k``) or ``"advantage"`` (the
            paper's ``A_bar``; exact only where no advantage is clipped).
        adv_global_std: use each reward's batch std instead of the per-prompt std.
        adv_window: per-prompt history length of the stat tracker (``None``: unbounded).
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_targets: module-name patterns for LoRA (``None``: ``backbone.lora_target_modules``).
        old_policy: :class:`~marble_lightning.schedules.OldPolicySchedule` keys; ``None``:
            DiffusionNFT's schedule.
        updates_per_rollout: optimizer steps on each rollout (fresh timestep noise each).
        lr: AdamW learning rate (the default optimizer).
        weight_decay: AdamW weight decay.
        grad_clip: max gradient norm (``None``: no clipping).
        diagnostics_every: on non-refresh steps, also compute the per-reward gradients every this
            many steps and log ``cos/<name>``, ``cos/worst`` (``None``: never).
        gram: per-reward gradient engine (:class:`~marble_lightning.gram.GradientEngine`):
            ``"auto"`` (default), ``"backward"``, ``"batched"`` or ``"per_sample"``.
        rollout_precision: sampler precision of the training rollout: ``"auto"`` (bfloat16 where
            the device has native bf16, else float32; see :mod:`marble_lightning.precision`),
            ``"float32"``, ``"bfloat16"`` or ``"float16"``. Training and evaluation stay in the
            parameters' precision (NFT is off-policy, so such rollouts are valid training data).
        optimizer: optimizer factory ``params -> Optimizer`` (LightningCLI: ``model.optimizer``
            with a ``class_path``); ``None``: ``AdamW(lr, weight_decay)``.
        lr_scheduler: scheduler factory ``optimizer -> LRScheduler``, stepped once per optimizer
            step (e.g. ``CosineAnnealingLR`` with ``eta_min`` for a cosine decay to a floor);
            ``None``: constant learning rate.
        seed: seed of the LoRA initialisation and of every noise draw.
        harmonization: :class:`~marble_lightning.options.HarmonizationOptions`.
        solver: rollout and evaluation sampler: ``"euler"`` or ``"dpm2"`` (second-order
            DPM-Solver, :func:`~marble_lightning.sampling.dpm_solver_2m_sample`).
        merge_lora: fold the LoRA into a transient copy of the frozen weights for gradient-free
            forwards (rollouts, evaluation, old / reference velocities): the same outputs to float
            rounding at the base model's cost (:meth:`LoraAdapterPair.inference
            <marble_lightning.adapters.LoraAdapterPair.inference>`); ``False`` runs the LoRA
            branches (no extra memory).
        eval_sample_steps: sampler steps of held-out evaluation, ``validate`` / ``test`` /
            ``predict`` and ``forward`` (``None``: ``sample_steps``). Rollouts may use fewer steps
            than evaluation (the MARBLE release: 25 rollout, 40 evaluation steps).

    Attributes:
        rule: the :class:`~marble_lightning.rules.TrainingRule` built from ``mode``.
        coefficients: MARBLE's :class:`~marble_lightning.coefficients.Coefficients` (the only
            interface callbacks use to steer the module).
        adapters: the :class:`~marble_lightning.adapters.LoraAdapterPair`.
        history: one dict per step (``step``, ``alpha``, ``refresh``, rewards, cosines, losses).
        step_index: rollouts done so far.
        last_update: the :class:`UpdateResult` of the last optimizer step (gradient buffers dropped
            unless ``keep_debug``).
    """

    automatic_optimization = False

    def __init__(
        self,
        backbone: nn.Module,
        rewards: list[nn.Module],
        mode: str = "amortized",
        group_size: int = 8,
        sample_steps: int = 10,
        train_timesteps: int | None = None,
        cfg_scale: float = 1.0,
        beta: float = 1.0,
        a_max: float = 5.0,
        kl_weight: float = 0.0,
        reward_weights: list[float] | None = None,
        fixed_alpha: list[float] | None = None,
        single_reward: str | None = None,
        stages: list[tuple[str, int]] | None = None,
        refresh_every: int | None = None,
        aggregate: str = "r",
        adv_global_std: bool = False,
        adv_window: int | None = None,
        lora_rank: int = 32,
        lora_alpha: int = 64,
        lora_targets: list[str] | None = None,
        old_policy: dict | None = None,
        updates_per_rollout: int = 1,
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        grad_clip: float | None = 1.0,
        diagnostics_every: int | None = None,
        gram: str = "auto",
        rollout_precision: str = "auto",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        harmonization: HarmonizationOptions | None = None,
        solver: str = "euler",
        merge_lora: bool = True,
        eval_sample_steps: int | None = None,
    ) -> None:
        super().__init__()
        given = _given_hyperparameters.get()  # LightningCLI's configuration, if it built us
        self.save_hyperparameters(ignore=["backbone", "rewards", "optimizer", "lr_scheduler"])
        self.hparams.update(cli_inputs(given))
        if not isinstance(backbone, FlowBackbone):
            raise TypeError(
                "`backbone` should implement FlowBackbone (denoiser, sample_shape, "
                "lora_target_modules, encode_prompts, velocity, decode); "
                f"got {type(backbone).__name__}"
            )
        if rewards is None or len(list(rewards)) == 0:
            raise ValueError("`rewards` should hold at least one reward model, got K=0")
        validate_hparams(self.hparams)
        self.group_size, self.sample_steps = group_size, sample_steps
        self.eval_sample_steps = eval_sample_steps
        self.train_timesteps, self.updates_per_rollout = train_timesteps, updates_per_rollout
        self.cfg_scale, self.beta, self.a_max = float(cfg_scale), float(beta), float(a_max)
        self.lr, self.weight_decay, self.grad_clip = float(lr), float(weight_decay), grad_clip
        self.kl_weight, self.diagnostics_every = float(kl_weight), diagnostics_every
        self.aggregate, self.rollout_precision, self.seed = aggregate, rollout_precision, int(seed)
        self.old_schedule = OldPolicySchedule.from_config(old_policy)
        self._optimizer_factory = optimizer
        self._scheduler_factory = lr_scheduler

        self.backbone = backbone
        self.rewards = MultiReward(list(rewards))
        self.reward_names: list[str] = list(self.rewards.names)
        self.num_rewards = len(self.reward_names)
        self.mode = mode
        self.rule = make_rule(
            mode, self.reward_names, reward_weights=reward_weights, fixed_alpha=fixed_alpha,
            single_reward=single_reward, stages=stages, refresh_every=refresh_every,
        )  # fmt: skip
        self.coefficients = Coefficients(
            self.rule.alpha(0),
            refresh_every if refresh_every is not None else DEFAULT_REFRESH_EVERY,
            every_step=self.rule.every_step,
        )

        self.adapters = LoraAdapterPair.for_backbone(
            backbone, lora_rank, lora_alpha, lora_targets, self.seed, merge=bool(merge_lora)
        )
        self.engine = GradientEngine(gram, backbone.denoiser, self.adapters.policy_params)
        self.gram = self.engine.name
        self.updater = NFTUpdate(
            backbone, self.adapters, self.engine, beta=self.beta, a_max=self.a_max,
            kl_weight=self.kl_weight, group_size=group_size, seed=self.seed,
        )  # fmt: skip
        k = self.num_rewards
        self.tracker = PerPromptStatTracker(
            k, global_std=adv_global_std, window=adv_window, reward_names=self.reward_names
        )
        self.scalar_tracker = PerPromptStatTracker(
            1, global_std=adv_global_std, window=adv_window, reward_names=["weighted_sum"]
        )
        self.solver, self.harmonization = solver, attach_harmonization(self, harmonization)
        self.step_index = 0
        self.history: list[dict[str, Any]] = []
        self.last_update: UpdateResult | None = None
        self.last_rollout: Rollout | None = None
        self.keep_debug = False
        self.strict_loading = False  # checkpoints hold the adapters only
        self._rollout_dtype: str | None = None  # rollout_precision with 'auto' resolved
        self.train(self.training)  # frozen backbone and rewards in eval mode from the start

    # ------------------------------------------------------------------ read-only views
    @property
    def current_alpha(self) -> Tensor:
        """``[K]`` float64 coefficients in use."""
        return self.coefficients.alpha

    @property
    def cached_norms(self) -> Tensor | None:
        """``[K]`` gradient norms of the last refresh (``None`` before the first)."""
        return self.coefficients.norms

    @property
    def last_harmonized(self) -> Harmonized | None:
        """The :class:`~marble_lightning.harmonize.Harmonized` of the last refresh."""
        return self.coefficients.last

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The policy LoRA parameters (the only trainable ones), in a fixed order."""
        return list(self.adapters.policy_params)

    @property
    def old_parameters(self) -> list[nn.Parameter]:
        """The old-policy LoRA parameters, aligned with :attr:`trainable_parameters`."""
        return list(self.adapters.old_params)

    weights_from = staticmethod(weights_from_alpha)

    def using_adapter(self, adapter: str) -> AbstractContextManager[None]:
        """Context in which the denoiser runs ``adapter`` ("policy", "old" or "base")."""
        return self.adapters.using(adapter)

    def train(self, mode: bool = True) -> MarbleDiffusionModule:
        """Set the training flag; backbone and rewards stay in eval mode (deterministic
        forwards)."""
        super().train(mode)
        self.backbone.eval()
        self.rewards.eval()
        return self

    def configure_model(self) -> None:  # FSDP2 under ModelParallelStrategy, else a no-op
        configure_sharding(self)

    def configure_optimizers(self) -> Any:
        params = self.adapters.policy_params
        if self._optimizer_factory is not None:
            optimizer = self._optimizer_factory(params)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self._scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self._scheduler_factory(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ------------------------------------------------------------------ the step
    def _collective(self) -> Collective:
        return StrategyCollective(self._trainer) if self._trainer is not None else LocalCollective()

    def rollout(self, prompts: list[str], *, step: int | None = None) -> Rollout:
        """Sample ``G`` images per prompt with the old policy, score them, compute advantages."""
        if self._rollout_dtype is None:
            self._rollout_dtype = resolve_rollout_precision(self.rollout_precision, self.device)
        return collect_rollout(
            check_prompt_batch(prompts), step=self.step_index if step is None else step,
            backbone=self.backbone, adapters=self.adapters, rewards=self.rewards,
            tracker=self.tracker, scalar_tracker=self.scalar_tracker, rule=self.rule,
            collective=self._collective(), grid=self.time_grid(), group_size=self.group_size,
            seed=self.seed, cfg_scale=self.cfg_scale, a_max=self.a_max, dtype=self._param_dtype(),
            autocast=autocast_context(self._rollout_dtype, self.device), solver=self.solver,
        )  # fmt: skip

    def compute_update(
        self, rollout: Rollout, *, update: int = 0, refresh: bool = False, diagnostics: bool = False
    ) -> UpdateResult:
        """The update direction for ``rollout`` (reduced across ranks, not yet applied).

        Args:
            rollout: output of :meth:`rollout`.
            update: index of the update on this rollout (seeds the timestep noise).
            refresh: harmonise the ``K`` per-reward gradients (MARBLE rules only).
            diagnostics: on a non-refresh step, also compute the per-reward gradients and the
                cosines of the direction with them.
        """
        plan = plan_losses(
            rollout, self.rule, self.coefficients, step=self.step_index, refresh=refresh,
            diagnostics=diagnostics and not refresh, aggregate=self.aggregate, a_max=self.a_max,
        )  # fmt: skip
        timesteps = training_timesteps(
            self.seed, rollout.step, update, self.sample_steps, self.train_timesteps
        )
        return self.updater.compute(
            rollout, plan, grid=self.time_grid(), update=update, refresh=refresh,
            timesteps=timesteps, coefficients=self.coefficients, collective=self._collective(),
            names=self.reward_names,
        )  # fmt: skip

    def apply_update(self, result: UpdateResult) -> dict[str, float]:
        """Write the direction into ``p.grad``, clip, step optimizer and scheduler."""
        scheduler = self.lr_schedulers() if self._trainer is not None else None
        return apply_direction(
            result, self.adapters, self.optimizers(), scheduler, self.grad_clip, self.step_index
        )

    @torch.no_grad()
    def update_old_policy(self, step: int) -> float:
        """``theta_old <- eta theta_old + (1 - eta) theta`` with ``eta = old_schedule(step)``."""
        eta = float(self.old_schedule(step))
        self.adapters.soft_update(eta)
        return eta

    def training_step(self, batch: Any, batch_idx: int) -> None:
        prompts = check_prompt_batch(batch)
        step = self.step_index
        if not self.rule.harmonizes:
            self.coefficients.alpha = self.rule.alpha(step)
        rollout = self.rollout(prompts, step=step)
        metrics = dict(rollout.metrics)
        refreshed = False
        for update in range(self.updates_per_rollout):
            refresh = self.rule.harmonizes and self.coefficients.refresh_due(update)
            diagnostics = (
                not refresh
                and self.diagnostics_every is not None
                and update == 0
                and step % self.diagnostics_every == 0
            )
            result = self.compute_update(
                rollout, update=update, refresh=refresh, diagnostics=diagnostics
            )
            metrics.update(result.metrics)
            metrics.update(self.apply_update(result))
            refreshed = refreshed or result.refreshed
            if self.keep_debug:
                self.last_rollout = rollout
            else:  # do not keep [K, P] / [P] gradient buffers alive between steps
                result.grads = None
                result.direction = result.kl_grad = result.direction.new_zeros(0)
            self.last_update = result
        eta = self.update_old_policy(step)
        self.coefficients.end_step(refreshed)
        self._log_step(step, metrics, refreshed, eta, len(rollout.prompts))

    def _log_step(
        self, step: int, metrics: dict[str, float], refreshed: bool, eta: float, batch_size: int
    ) -> None:
        assert self.last_update is not None
        used = self.last_update.alpha
        metrics.update(step_metrics(self.reward_names, used, self.coefficients, refreshed, eta))
        record: dict[str, Any] = {
            "step": step,
            "global_step": self.trainer.global_step if self._trainer is not None else 0,
            "refresh": refreshed,
            "alpha": [float(a) for a in used],
        }
        kept = ("reward/", "cos/", "loss/", "norm/", "grad/")
        record.update((k, v) for k, v in metrics.items() if k.startswith(kept))
        self.history.append(record)
        self.step_index = step + 1
        self.log_dict(
            {key: float(value) for key, value in metrics.items() if math.isfinite(value)},
            on_step=True, on_epoch=False, batch_size=batch_size,
        )  # fmt: skip

    def setup(self, stage: str) -> None:
        check_trainer_precision(self.trainer.precision)
        self.hparams.update(self.coefficients.recorded)  # the schedule the callbacks set

    # ------------------------------------------------------------------ checkpoints
    def _adapter_keys(self) -> list[str]:
        return self.adapters.state_keys("backbone.denoiser.")

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load the adapters (checkpoints hold nothing else); other keys of this module load too."""
        missing = sorted(set(self._adapter_keys()) - set(state_dict))
        if missing:
            self.adapters.check_state(state_dict, "backbone.denoiser.")  # raises, naming a key
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict and result.unexpected_keys:
            raise ValueError(
                f"unexpected keys in the state dict, e.g. {result.unexpected_keys[0]!r}"
            )
        return type(result)([], result.unexpected_keys)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = set(self._adapter_keys())
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {key: value for key, value in state.items() if key in keys}
        checkpoint["marble"] = {
            "tracker": self.tracker.state_dict(),
            "scalar_tracker": self.scalar_tracker.state_dict(),
            **self.coefficients.state_dict(),
            "step_index": self.step_index,
            "old_is_policy": self.adapters.old_is_policy,
            "history": list(self.history),
            "reward_names": list(self.reward_names),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_resume(checkpoint.get("hyper_parameters"), self.hparams)
        self.adapters.check_state(checkpoint.get("state_dict", {}), "backbone.denoiser.")
        extra = checkpoint.get("marble")
        if extra is None:
            return
        names = extra.get("reward_names", self.reward_names)
        if list(names) != self.reward_names:
            raise ValueError(
                f"checkpoint was trained with rewards {names}, this module has {self.reward_names}"
            )
        self.tracker.load_state_dict(extra.get("tracker", {}))
        self.scalar_tracker.load_state_dict(extra.get("scalar_tracker", {}))
        self.coefficients.load_state_dict(extra)
        self.step_index = int(extra.get("step_index", 0))
        self.adapters.old_is_policy = bool(extra.get("old_is_policy", False))
        self.history = list(extra.get("history", []))
