"""``MarbleDiffusionModule``: multi-reward DiffusionNFT fine-tuning with MARBLE harmonisation.

One training step (``training_step``, manual optimisation), DESIGN.md section 1:

1. **Rollout** (no grad). The batch holds ``P`` prompts; each is repeated ``G = group_size``
   times (``B = P * G`` samples). The *old* LoRA adapter samples them with a deterministic Euler
   solver from ``t = 1`` to ``t = 0`` (``sample_steps`` steps, classifier-free guidance against the
   empty prompt when ``cfg_scale != 1``). The ``K`` rewards score the decoded images
   (:class:`~marble_lightning.rewards.base.MultiReward`: values and applicability mask), and
   :class:`~marble_lightning.advantages.PerPromptStatTracker` turns them into per-reward
   advantages ``A[B, K]`` and interpolation coefficients ``r[K, B]``.
2. **Update** (``updates_per_rollout`` optimizer steps per rollout). For each training timestep
   ``t`` of the sampler grid (all, or a random subset of ``train_timesteps``): fresh noise,
   ``x_t = (1 - t) x0 + t eps``, one forward of the policy adapter (with grad), one of the old
   adapter (no grad; skipped when the old adapter is known to equal the policy) and, when
   ``kl_weight > 0``, one of the reference model (adapters disabled, no grad). The per-sample NFT
   terms give the per-reward losses ``l_k``; the losses are averaged over the timesteps.

   * *Refresh* (``marble`` every step; ``amortized`` when a refresh is due): the ``K`` gradients
     ``g_k`` are taken locally with ``torch.autograd.grad`` per timestep (the graph of a timestep
     is freed before the next), accumulated to a ``[K, P]`` matrix, mean-reduced ONCE across ranks
     through ``trainer.strategy.reduce`` (a no-op on one device), and harmonised identically on
     every rank (:func:`~marble_lightning.harmonize.harmonize_gram` on the Gram matrix); the
     direction is ``d = sum_k w_k g_k``.
   * *Amortised / scalar* steps: one gradient of ``W * l(r_bar)`` (``r_bar = sum_k (w_k / W) r_k``,
     exactly ``sum_k w_k l_k``), with weights from the coefficients in use and the cached norms
     (amortized), fixed weights (fixed), a scalarised reward (weighted_sum) or one reward
     (single, sequential). Same local-gradient + one-reduce path.

   The KL gradient ``grad(kl_weight * mean((v - v_ref)^2))`` is added after harmonisation. The
   direction is written to ``p.grad`` of the policy LoRA parameters, clipped to ``grad_clip`` and
   the optimizer (AdamW) steps. DDP's own gradient hooks are never used (see FACTS.md).
3. **Old policy**: ``theta_old <- eta * theta_old + (1 - eta) * theta`` with ``eta`` from
   :class:`~marble_lightning.schedules.OldPolicySchedule` of the rollout index.

Determinism. All noise is drawn from generators seeded by ``(seed, purpose, step, prompt,
occurrence of the prompt in the batch)``: it does not depend on the rank, on the order of the
prompts or on the global RNG, so a run resumed from a checkpoint, or split over more devices, sees
the same noise for the same prompt at the same step. Rewards and prompts are all-gathered before
the stat tracker so every rank holds the same tracker state (and logs the same reward means).

Checkpoints hold only the LoRA adapters (policy and old) in ``state_dict`` plus the tracker,
cached coefficients/norms, counters and the per-step history under ``checkpoint["marble"]``; base
weights come from the backbone's own configuration.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from marble_lightning.advantages import PerPromptStatTracker
from marble_lightning.backbone import Conditioning, FlowBackbone
from marble_lightning.gram import (
    ENGINES,
    PerSampleGradients,
    UnsupportedModelError,
    per_reward_gradients,
)
from marble_lightning.harmonize import Harmonized, harmonize_gram
from marble_lightning.nft import (
    aggregate_advantages,
    aggregate_coefficients,
    interpolation_coefficient,
    kl_loss,
    nft_objective,
    nft_terms,
)
from marble_lightning.rewards.base import MultiReward, RewardBatch
from marble_lightning.checks import check_choice
from marble_lightning.precision import ROLLOUT_PRECISIONS, autocast_context, resolve_rollout_precision
from marble_lightning.schedules import OldPolicySchedule
from marble_lightning.seeding import stable_seed

__all__ = ["MODES", "MarbleDiffusionModule", "Rollout", "UpdateResult"]

MODES = ("marble", "amortized", "weighted_sum", "fixed", "single", "sequential")
"""Training modes (DESIGN.md section 1, "Baselines")."""

POLICY = "policy"
OLD = "old"
BASE = "base"
_ADAPTERS = (POLICY, OLD, BASE)


log = logging.getLogger(__name__)

@dataclass
class Rollout:
    """The samples of one step and everything the update needs from them.

    Attributes:
        step: rollout index (0-based) the samples belong to.
        prompts: ``B = P * G`` prompts, each of the ``P`` batch prompts repeated ``G`` times.
        x0: ``[B, C, H, W]`` model-space samples of the old policy (the NFT regression targets).
        values: ``[B, K]`` reward values (0 where masked).
        mask: ``[B, K]`` bool applicability of each reward.
        advantages: ``[B, K]`` per-reward advantages (0 where masked).
        r: ``[K, B]`` per-reward interpolation coefficients in ``[0, 1]``.
        scalar_advantages: ``[B]`` advantages of the scalarised reward (weighted_sum mode only).
        scalar_r: ``[B]`` their interpolation coefficients (weighted_sum mode only).
        metrics: scalars to log (reward means/stds over the global batch, timings).
        cond: the encoded ``prompts`` (reused by the updates).
    """

    step: int
    prompts: list[str]
    x0: Tensor
    values: Tensor
    mask: Tensor
    advantages: Tensor
    r: Tensor
    scalar_advantages: Tensor | None = None
    scalar_r: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    cond: Conditioning | None = None


@dataclass
class UpdateResult:
    """The outcome of :meth:`MarbleDiffusionModule.compute_update` (before clipping).

    Attributes:
        direction: ``[P]`` reward direction (harmonised or aggregated), without the KL gradient.
        kl_grad: ``[P]`` gradient of the KL term (zeros when ``kl_weight == 0``).
        alpha: ``[K]`` coefficients the direction used (one-hot/normalised weights for baselines).
        weights: ``[K]`` effective weights on the per-reward gradients, or ``None`` (weighted_sum).
        refreshed: whether per-reward gradients were harmonised (a refresh).
        harmonized: the :class:`~marble_lightning.harmonize.Harmonized` of a refresh.
        grads: ``[K, P]`` per-reward gradients (refresh or diagnostics), else ``None``.
        cosines: ``[K]`` cos(direction, g_k) (refresh or diagnostics), else ``None``.
        skipped: True when every reward was dropped and the step must be skipped.
        timesteps: indices into the sampler grid that were trained on.
        metrics: scalars to log (losses, timings, diagnostics).
    """

    direction: Tensor
    kl_grad: Tensor
    alpha: Tensor
    weights: Tensor | None
    refreshed: bool
    harmonized: Harmonized | None = None
    grads: Tensor | None = None
    cosines: Tensor | None = None
    skipped: bool = False
    timesteps: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)



def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` should be an integer >= {minimum}, got {value!r}")


def _check_weights(name: str, value: Sequence[float], k: int, names: list[str]) -> list[float]:
    values = [float(v) for v in value]
    if len(values) != k:
        raise ValueError(
            f"`{name}` should have one entry per reward (K = {k}: {names}), got {len(values)}: "
            f"{values}"
        )
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"`{name}` should be finite, non-negative and not all zero, got {values}")
    return values


class MarbleDiffusionModule(LightningModule):
    """Multi-reward RL fine-tuning of a flow-matching diffusion model (MARBLE and baselines).

    Args:
        backbone: A :class:`~marble_lightning.backbone.FlowBackbone`; LoRA adapters are attached to
            its ``denoiser`` (diffusers' ``PeftAdapterMixin``: ``SD3Transformer2DModel``,
            ``UNet2DConditionModel``, ...). All other backbone weights stay frozen.
        rewards: ``K >= 1`` reward modules with unique ``name`` (``reward(images, prompts) -> [B]``).
        mode: ``"marble"`` (refresh every step), ``"amortized"`` (refresh every ``refresh_every``
            steps or when a :class:`~marble_lightning.callbacks.HarmonizationCallback` says so),
            ``"weighted_sum"`` (scalarise rewards with ``reward_weights``, one advantage),
            ``"fixed"`` (per-reward advantages, ``r_bar = sum_k fixed_alpha_k r_k``), ``"single"``
            (only ``single_reward``) or ``"sequential"`` (one reward per stage of ``stages``).
        group_size: ``G``, images per prompt.
        sample_steps: Euler steps of the rollout sampler; the training timesteps are its grid
            points ``t_0 = 1 > t_1 > ... > t_{T-1}`` (uniform ``1 - j / T``, or the backbone's
            ``time_grid(T)`` when it defines one, see :meth:`time_grid`).
        train_timesteps: how many grid timesteps to train on per update (a random subset, the
            same on every rank); ``None``: all.
        cfg_scale: classifier-free guidance scale of the rollout (1.0: no guidance).
        beta: NFT strength (``> 0``).
        a_max: advantage clip (``> 0``), also the NFT loss scale.
        kl_weight: ``lambda_KL >= 0`` of ``mean((v - v_ref)^2)``, outside the harmonisation.
        reward_weights: weighted_sum mode scalarisation weights (default: all 1). Masked entries
            contribute 0 to the weighted sum; since a mask depends on the prompt only, that
            constant cancels in the per-prompt advantage.
        fixed_alpha: fixed mode coefficients on the per-reward ``r`` (default: uniform); the loss
            is ``sum_k fixed_alpha_k l_k``.
        single_reward: single mode, the reward's name.
        stages: sequential mode, ``[(reward name, steps), ...]``; after the last stage its reward
            is kept.
        refresh_every: amortized mode refresh period when no callback decides (``>= 1``).
        aggregate: ``"r"`` (exact: ``r_bar = sum_k (w_k / W) r_k``) or ``"advantage"``
            (``A_bar = sum_k (w_k / W) A_k``, then ``r(A_bar)``; the paper's form, exact only
            where no advantage is clipped).
        adv_global_std: use the batch std of each reward instead of the per-prompt std.
        adv_window: per-prompt history length of the stat tracker (``None``: unbounded).
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_targets: module-name patterns for LoRA (``None``: ``backbone.lora_target_modules``).
        old_policy: :class:`~marble_lightning.schedules.OldPolicySchedule` keys (``start``,
            ``rate``, ``max_decay``); ``None``: DiffusionNFT's schedule.
        updates_per_rollout: optimizer steps on each rollout (fresh timestep noise each).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_clip: max gradient norm (``None``: no clipping).
        diagnostics_every: in non-MARBLE modes (and on amortised steps) also compute the ``K``
            per-reward gradients every this many steps and log ``cos/<name>``, ``cos/worst`` of the
            actual direction (``None``: never).
        gram: per-reward gradient engine (:mod:`marble_lightning.gram`): ``"backward"`` (``K``
            ``autograd.grad`` calls per timestep), ``"batched"`` (one vectorised call) or
            ``"per_sample"`` (two backward passes whatever ``K``, one of them per-sample, and only
            that one while the old adapter equals the policy: exact
            per-sample gradients of the shared NFT terms, combined with each reward's ``r``; used
            for refresh and diagnostics steps, falls back to ``"backward"`` with a warning when the
            denoiser's LoRA layers are unsupported). All give the same ``[K, P]`` matrix.
            ``"auto"`` (default):
            ``"per_sample"`` when it applies, else ``"backward"`` (the reason is logged).
        rollout_precision: dtype of the training rollout's sampler, ``"float32"`` (default) or
            ``"bfloat16"`` / ``"float16"`` (autocast; faster, the images are scored in float32).
            Training and evaluation (:meth:`sample`) stay in the parameters' precision; NFT is
            off-policy, so rollouts from a lower-precision sampler are valid training data.
        seed: seed of the LoRA initialisation and of every noise draw.

    Attributes (driven by callbacks):
        refresh_now: ``None`` (the module decides), or ``True``/``False`` set by a callback
            before a step; reset to ``None`` after each step.
        force_uniform: when True, alpha is uniform ``1/K`` (weights from the norms).
        alpha_transform: ``None`` or a callable ``alpha* -> alpha`` applied after each refresh to
            get the coefficients of the following amortised steps (the EMA callback).
        current_alpha: ``[K]`` coefficients in use.
        cached_norms: ``[K]`` gradient norms of the last refresh (``None`` before the first).
        last_harmonized: the :class:`Harmonized` of the last refresh.
        last_gram: ``[K, K]`` raw Gram matrix of the last refresh.
        history: one dict per step: ``step``, ``alpha`` (list), ``reward/<name>_mean``, ``refresh``,
            ``cos/worst`` when known. Saved in checkpoints.
        step_index: rollouts done so far.
        last_update: the :class:`UpdateResult` of the last optimizer step (its gradient buffers
            are dropped unless ``keep_debug``).
        keep_debug: keep the last :class:`Rollout` (``last_rollout``) and the full last update.
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
        refresh_every: int = 5,
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
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "rewards"])
        # --- argument validation (names the offending value) ---
        if not isinstance(backbone, FlowBackbone):
            raise TypeError(
                f"`backbone` should implement FlowBackbone (denoiser, sample_shape, "
                f"lora_target_modules, encode_prompts, velocity, decode); got {type(backbone).__name__}"
            )
        if rewards is None or len(list(rewards)) == 0:
            raise ValueError("`rewards` should hold at least one reward model, got K=0")
        if mode not in MODES:
            raise ValueError(f"unknown `mode` {mode!r}; expected one of {MODES}")
        _check_positive_int("group_size", group_size)
        _check_positive_int("sample_steps", sample_steps)
        if train_timesteps is not None:
            _check_positive_int("train_timesteps", train_timesteps)
            if train_timesteps > sample_steps:
                raise ValueError(
                    f"`train_timesteps` ({train_timesteps}) should be <= sample_steps ({sample_steps})"
                )
        if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
            raise ValueError(f"`cfg_scale` should be finite and >= 0, got {cfg_scale!r}")
        for name, value in (("beta", beta), ("a_max", a_max), ("lr", lr)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` should be finite and > 0, got {value!r}")
        for name, value in (("kl_weight", kl_weight), ("weight_decay", weight_decay)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` should be finite and >= 0, got {value!r}")
        if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
            raise ValueError(f"`grad_clip` should be None or > 0, got {grad_clip!r}")
        _check_positive_int("refresh_every", refresh_every)
        _check_positive_int("updates_per_rollout", updates_per_rollout)
        _check_positive_int("lora_rank", lora_rank)
        if not lora_alpha > 0:
            raise ValueError(f"`lora_alpha` should be > 0, got {lora_alpha!r}")
        if diagnostics_every is not None:
            _check_positive_int("diagnostics_every", diagnostics_every)
        if aggregate not in ("r", "advantage"):
            raise ValueError(f"unknown `aggregate` {aggregate!r}; expected 'r' or 'advantage'")
        check_choice("rollout_precision", rollout_precision, ROLLOUT_PRECISIONS)
        self.rollout_precision = rollout_precision
        if gram not in (*ENGINES, "auto"):
            raise ValueError(f"unknown `gram` engine {gram!r}; available: {['auto', *ENGINES]}")

        self.backbone = backbone
        self.rewards = MultiReward(list(rewards))
        self.reward_names: list[str] = list(self.rewards.names)
        k = len(self.reward_names)
        self.num_rewards = k
        self.mode = mode
        self.group_size = group_size
        self.sample_steps = sample_steps
        self.train_timesteps = train_timesteps
        self.cfg_scale = float(cfg_scale)
        self.beta = float(beta)
        self.a_max = float(a_max)
        self.kl_weight = float(kl_weight)
        self.refresh_every = refresh_every
        self.aggregate = aggregate
        self.updates_per_rollout = updates_per_rollout
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.grad_clip = grad_clip
        self.diagnostics_every = diagnostics_every
        self.seed = int(seed)
        self.old_schedule = OldPolicySchedule.from_config(old_policy)

        self.reward_weights = _check_weights(
            "reward_weights", reward_weights if reward_weights is not None else [1.0] * k, k, self.reward_names
        )
        self.fixed_alpha = _check_weights(
            "fixed_alpha", fixed_alpha if fixed_alpha is not None else [1.0 / k] * k, k, self.reward_names
        )
        self.single_index: int | None = None
        if mode == "single":
            if single_reward is None:
                raise ValueError(f"mode 'single' needs `single_reward`, one of {self.reward_names}")
            self.single_index = self._reward_index(single_reward, "single_reward")
        self.stages: list[tuple[int, int]] = []
        if mode == "sequential":
            if not stages:
                raise ValueError("mode 'sequential' needs `stages`, a list of (reward name, steps)")
            for stage in stages:
                if isinstance(stage, dict):
                    stage = (stage.get("reward"), stage.get("steps"))
                if not isinstance(stage, (tuple, list)) or len(stage) != 2:
                    raise ValueError(f"a stage should be (reward name, steps), got {stage!r}")
                name, steps = stage
                _check_positive_int(f"steps of stage {name!r}", steps)
                self.stages.append((self._reward_index(name, "stages"), int(steps)))

        # --- adapters ---
        targets = list(lora_targets) if lora_targets is not None else list(backbone.lora_target_modules)
        if not targets:
            raise ValueError("`lora_targets` is empty and the backbone names no lora_target_modules")
        self._attach_adapters(lora_rank, lora_alpha, targets)
        self.gram = gram
        self._per_sample: PerSampleGradients | None = None
        if gram in ("per_sample", "auto"):
            try:
                self._per_sample = PerSampleGradients(self.backbone.denoiser, self._policy_params)
                self.gram = "per_sample"
            except UnsupportedModelError as err:
                message = f"gram={gram!r}: the exact per-sample engine does not apply ({err}); using 'backward'"
                if gram == "per_sample":
                    warnings.warn(message, stacklevel=2)
                else:
                    log.info(message)
                self.gram = "backward"

        # --- advantages ---
        self.tracker = PerPromptStatTracker(
            k, global_std=adv_global_std, window=adv_window, reward_names=self.reward_names
        )
        self.scalar_tracker = PerPromptStatTracker(
            1, global_std=adv_global_std, window=adv_window, reward_names=["weighted_sum"]
        )

        # --- state driven by callbacks / kept across steps ---
        self.step_index: int = 0
        self.refresh_now: bool | None = None
        self.force_uniform: bool = False
        self.alpha_transform = None
        self.current_alpha: Tensor = self._baseline_alpha()
        self.cached_norms: Tensor | None = None
        self.cached_dropped: Tensor | None = None
        self.last_harmonized: Harmonized | None = None
        self.last_gram: Tensor | None = None
        self.last_update: UpdateResult | None = None
        self.last_rollout: Rollout | None = None
        self.history: list[dict[str, Any]] = []
        self._steps_since_refresh: int = 0
        self._old_is_policy: bool = True
        self.keep_debug: bool = False
        self.strict_loading = False  # checkpoints hold the adapters only
        self._rollout_dtype: str | None = None  # rollout_precision with 'auto' resolved

    # ------------------------------------------------------------------ setup helpers
    def _reward_index(self, name: Any, argument: str) -> int:
        if name not in self.reward_names:
            raise ValueError(f"`{argument}` names unknown reward {name!r}; rewards are {self.reward_names}")
        return self.reward_names.index(name)

    def _attach_adapters(self, rank: int, alpha: int, targets: list[str]) -> None:
        from peft import LoraConfig

        denoiser = self.backbone.denoiser
        for method in ("add_adapter", "set_adapter", "disable_adapters", "enable_adapters"):
            if not hasattr(denoiser, method):
                raise ValueError(
                    f"backbone.denoiser ({type(denoiser).__name__}) lacks `{method}`; it must support "
                    "diffusers' PEFT adapters (PeftAdapterMixin)"
                )
        self.backbone.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            try:
                denoiser.add_adapter(config, adapter_name=POLICY)
                with warnings.catch_warnings():  # a second adapter is intended here
                    warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                    denoiser.add_adapter(config, adapter_name=OLD)
            except ValueError as err:
                raise ValueError(f"could not attach LoRA to targets {targets}: {err}") from err
        named = dict(denoiser.named_parameters())
        self._policy_names = sorted(n for n in named if ".lora_" in n and f".{POLICY}." in n)
        self._old_names = [n.replace(f".{POLICY}.", f".{OLD}.") for n in self._policy_names]
        if not self._policy_names:
            raise ValueError(f"LoRA targets {targets} matched no module of the denoiser")
        self._policy_params = [named[n] for n in self._policy_names]
        self._old_params = [named[n] for n in self._old_names]
        with torch.no_grad():
            for old, new in zip(self._old_params, self._policy_params):
                old.copy_(new)
        self._activate(POLICY)

    def _fix_requires_grad(self) -> None:
        for p in self._policy_params:
            p.requires_grad_(True)
        for p in self._old_params:
            p.requires_grad_(False)

    def _activate(self, adapter: str) -> None:
        """Make ``adapter`` ("policy", "old" or "base" = adapters disabled) the active one."""
        denoiser = self.backbone.denoiser
        if adapter == BASE:
            denoiser.disable_adapters()
        else:
            denoiser.enable_adapters()
            denoiser.set_adapter(adapter)
        # PEFT toggles requires_grad when switching; only the policy LoRA is ever trainable.
        self._fix_requires_grad()

    @contextmanager
    def using_adapter(self, adapter: str) -> Iterator[None]:
        """Context in which the denoiser runs ``adapter``; restores the policy afterwards."""
        if adapter not in _ADAPTERS:
            raise ValueError(f"unknown adapter {adapter!r}; expected one of {_ADAPTERS}")
        self._activate(adapter)
        try:
            yield
        finally:
            self._activate(POLICY)

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The policy LoRA parameters (the only trainable ones), in a fixed order."""
        return list(self._policy_params)

    @property
    def old_parameters(self) -> list[nn.Parameter]:
        """The old-policy LoRA parameters, aligned with :attr:`trainable_parameters`."""
        return list(self._old_params)

    def train(self, mode: bool = True) -> MarbleDiffusionModule:
        """Set the training flag; backbone and rewards stay in eval mode (no dropout, so the
        policy, old and reference forwards and the sampler are deterministic)."""
        super().train(mode)
        self.backbone.eval()
        self.rewards.eval()
        return self

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self._policy_params, lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ coefficients
    def _baseline_alpha(self) -> Tensor:
        k = self.num_rewards
        if self.mode == "weighted_sum":
            w = torch.tensor(self.reward_weights, dtype=torch.float64)
            return w / w.sum()
        if self.mode == "fixed":
            w = torch.tensor(self.fixed_alpha, dtype=torch.float64)
            return w / w.sum()
        if self.mode in ("single", "sequential"):
            alpha = torch.zeros(k, dtype=torch.float64)
            alpha[self._active_reward()] = 1.0
            return alpha
        return torch.full((k,), 1.0 / k, dtype=torch.float64)

    def _active_reward(self) -> int:
        if self.mode == "single":
            assert self.single_index is not None
            return self.single_index
        step = self.step_index
        for index, steps in self.stages:
            if step < steps:
                return index
            step -= steps
        return self.stages[-1][0]

    @staticmethod
    def weights_from(alpha: Tensor, norms: Tensor, dropped: Tensor) -> Tensor:
        """Effective weights ``w_k = m alpha_k / n_k`` (``m``: mean kept norm; 0 where dropped)."""
        alpha = alpha.to(torch.float64)
        norms = norms.to(torch.float64)
        kept = ~dropped.to(torch.bool)
        weights = torch.zeros_like(alpha)
        if kept.any():
            m = norms[kept].mean()
            weights[kept] = m * alpha[kept] / norms[kept]
        return weights

    def _uniform_alpha(self, dropped: Tensor) -> Tensor:
        kept = (~dropped).to(torch.float64)
        return kept / kept.sum() if kept.sum() > 0 else kept

    # ------------------------------------------------------------------ sampling
    def _noise(self, prompts: Sequence[str], count: int, *tag: object, module_seed: bool = True) -> Tensor:
        """``[len(prompts) * count, C, H, W]`` standard normal noise keyed by (seed, tag, prompt,
        occurrence): rank- and order-independent. ``module_seed=False`` leaves the module's
        ``seed`` out of the key (evaluation noise that is the same for every training run)."""
        shape = tuple(self.backbone.sample_shape)
        seen: dict[str, int] = {}
        chunks = []
        for prompt in prompts:
            occurrence = seen.get(prompt, 0)
            seen[prompt] = occurrence + 1
            key = (self.seed, *tag) if module_seed else tuple(tag)
            gen = torch.Generator().manual_seed(stable_seed(*key, occurrence, prompt))
            chunks.append(torch.randn((count, *shape), generator=gen))
        return torch.cat(chunks).to(device=self._param_device(), dtype=self._param_dtype())

    def _param_device(self) -> torch.device:
        return self._policy_params[0].device

    def _param_dtype(self) -> torch.dtype:
        return next(self.backbone.denoiser.parameters()).dtype

    def time_grid(self, steps: int | None = None) -> Tensor:
        """``[steps + 1]`` sampler times from 1 down to 0 (float64, CPU).

        The backbone's own ``time_grid(steps)`` when it has one (e.g. SD3's shifted schedule of
        :class:`~marble_lightning.sd3.SD3Backbone`), else uniform ``1 - j / steps``. The training
        timesteps are the first ``steps`` points of this grid.

        Raises:
            ValueError: if the backbone's grid is not ``[steps + 1]``, decreasing from 1 to 0.
        """
        steps = self.sample_steps if steps is None else steps
        custom = getattr(self.backbone, "time_grid", None)
        if custom is None:
            return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        grid = torch.as_tensor(custom(steps), dtype=torch.float64).cpu()
        if (
            grid.shape != (steps + 1,)
            or abs(float(grid[0]) - 1.0) > 1e-6
            or abs(float(grid[-1])) > 1e-6
            or bool((grid[1:] >= grid[:-1]).any())
        ):
            raise ValueError(
                f"backbone.time_grid({steps}) should decrease from 1 to 0 with {steps + 1} points, "
                f"got {grid.tolist()}"
            )
        return grid

    @torch.no_grad()
    def _euler(self, noise: Tensor, cond: Conditioning, uncond: Conditioning | None, steps: int, cfg: float) -> Tensor:
        grid = self.time_grid(steps)
        x = noise
        b = x.shape[0]
        for i in range(steps):
            t, t_next = float(grid[i]), float(grid[i + 1])
            tt = torch.full((b,), t, device=x.device, dtype=x.dtype)
            if uncond is not None:
                both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
                v_u, v_c = self.backbone.velocity(torch.cat([x, x]), torch.cat([tt, tt]), both).chunk(2)
                v = v_u + cfg * (v_c - v_u)
            else:
                v = self.backbone.velocity(x, tt, cond)
            x = x + (t_next - t) * v
        return x

    @torch.no_grad()
    def sample_latents(
        self, prompts: list[str], noise: Tensor, *, adapter: str = POLICY, steps: int | None = None,
        cfg_scale: float | None = None,
    ) -> Tensor:
        """Integrate ``noise`` (``[B, C, H, W]`` at ``t = 1``) to ``t = 0`` with ``adapter``."""
        steps = self.sample_steps if steps is None else steps
        _check_positive_int("steps", steps)
        cfg = self.cfg_scale if cfg_scale is None else float(cfg_scale)
        cond = self.backbone.encode_prompts(list(prompts))
        uncond = self.backbone.encode_prompts([""] * len(prompts)) if cfg != 1.0 else None
        with self.using_adapter(adapter):
            return self._euler(noise, cond, uncond, steps, cfg)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        seed: int | Sequence[int],
        adapter: str = POLICY,
        steps: int | None = None,
        cfg_scale: float | None = None,
    ) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]``, one per prompt, with fixed noise.

        Args:
            prompts: ``B`` prompts (repeat a prompt to get several images of it).
            seed: an int: image ``i`` gets the noise of ``(seed, prompts[i], occurrence of
                prompts[i] so far in the list)``; or ``B`` ints: image ``i`` gets the noise of
                ``(seed[i], prompts[i])``, independent of the rest of the list (use this to split
                an evaluation set into chunks or across ranks). The same seed and prompt give
                the same noise for every adapter and for every training run (the module's
                ``seed`` is not part of the key, so evaluations of different runs are paired).
            adapter: ``"policy"``, ``"old"`` or ``"base"`` (adapters disabled).
            steps: Euler steps (default: ``sample_steps``).
            cfg_scale: guidance scale (default: ``cfg_scale``).
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`prompts` should be a list of strings, got {prompts!r}")
        if isinstance(seed, int):
            noise = self._noise(prompts, 1, "sample", seed, module_seed=False)
        else:
            seeds = [int(x) for x in seed]
            if len(seeds) != len(prompts):
                raise ValueError(f"`seed` should be an int or one int per prompt ({len(prompts)}), got {len(seeds)}")
            noise = torch.cat([self._noise([p], 1, "sample", x, module_seed=False) for p, x in zip(prompts, seeds)])
        x0 = self.sample_latents(list(prompts), noise, adapter=adapter, steps=steps, cfg_scale=cfg_scale)
        return self.backbone.decode(x0).float().clamp(0.0, 1.0)

    # ------------------------------------------------------------------ distributed helpers
    def _world(self) -> tuple[int, int]:
        trainer = self._trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _reduce_mean(self, tensor: Tensor) -> Tensor:
        """Mean across ranks through the strategy (identity on one device or without a trainer)."""
        world, _ = self._world()
        if world == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="mean")

    def _gather_batch(self, prompts: list[str], values: Tensor, mask: Tensor) -> tuple[list[str], Tensor, Tensor]:
        world, _ = self._world()
        if world == 1:
            return prompts, values, mask
        import torch.distributed as dist

        all_values = self.trainer.strategy.all_gather(values.contiguous())
        all_mask = self.trainer.strategy.all_gather(mask.to(torch.uint8).contiguous())
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, list(prompts))
        all_prompts = [p for chunk in gathered for p in chunk]
        return all_prompts, all_values.reshape(-1, values.shape[1]), all_mask.reshape(-1, mask.shape[1]).bool()

    # ------------------------------------------------------------------ rollout
    def _check_batch(self, batch: Any) -> list[str]:
        if isinstance(batch, str):
            batch = [batch]
        if isinstance(batch, tuple):
            batch = list(batch)
        if not isinstance(batch, list) or not batch or not all(isinstance(p, str) for p in batch):
            raise ValueError(f"a training batch should be a non-empty list of prompt strings, got {batch!r}")
        return batch

    def _rollout_autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context of the rollout sampler (``rollout_precision``; "auto" resolved once)."""
        if self._rollout_dtype is None:
            self._rollout_dtype = resolve_rollout_precision(self.rollout_precision, self.device)
        return autocast_context(self._rollout_dtype, self.device)

    def rollout(self, prompts: list[str], *, step: int | None = None) -> Rollout:
        """Sample ``G`` images per prompt with the old policy, score them, compute advantages.

        Args:
            prompts: the ``P`` prompts of this rank's batch.
            step: rollout index (seeds the noise); default :attr:`step_index`.

        Raises:
            ValueError (or the reward's own error type): when a reward fails, returns a wrong
                shape or a non-finite value; the message names the reward and the step, and no
                training state (tracker, parameters, counters) has been changed.
        """
        prompts = self._check_batch(prompts)
        step = self.step_index if step is None else step
        g = self.group_size
        repeated = [p for p in prompts for _ in range(g)]
        metrics: dict[str, float] = {}

        start = time.perf_counter()
        noise = self._noise(prompts, g, "rollout", step)
        with torch.no_grad():
            cond = self.backbone.encode_prompts(repeated)
            uncond = self.backbone.encode_prompts([""] * len(repeated)) if self.cfg_scale != 1.0 else None
            with self.using_adapter(OLD), self._rollout_autocast():
                x0 = self._euler(noise, cond, uncond, self.sample_steps, self.cfg_scale)
        x0 = x0.to(noise.dtype)
        images = self.backbone.decode(x0).float().clamp(0.0, 1.0)
        self._sync()
        metrics["time/sampling"] = time.perf_counter() - start

        start = time.perf_counter()
        try:
            batch: RewardBatch = self.rewards(images, repeated)
        except Exception as err:
            message = (
                f"reward evaluation failed at step {step} (global_step {self._global_step()}); "
                f"no training state was changed: {err}"
            )
            try:
                new = type(err)(message)
            except Exception:  # noqa: BLE001  (an exception type with a custom constructor)
                new = RuntimeError(message)
            raise new from err
        values, mask = batch.values.float(), batch.mask.bool()
        if values.shape != (len(repeated), self.num_rewards):
            raise ValueError(
                f"rewards returned values of shape {tuple(values.shape)} at step {step}, expected "
                f"({len(repeated)}, {self.num_rewards})"
            )
        self._sync()
        metrics["time/rewards"] = time.perf_counter() - start

        all_prompts, all_values, all_mask = self._gather_batch(repeated, values, mask)
        _, rank = self._world()
        local = slice(rank * len(repeated), (rank + 1) * len(repeated))
        adv = self.tracker.update(all_prompts, all_values, all_mask)[local].to(x0.device)
        r = interpolation_coefficient(adv, self.a_max).T.contiguous()
        scalar_adv = scalar_r = None
        if self.mode == "weighted_sum":
            w = torch.tensor(self.reward_weights, device=all_values.device, dtype=all_values.dtype)
            scalar = (all_values * all_mask) @ w
            scalar_mask = all_mask.any(dim=1)
            scalar_adv = self.scalar_tracker.update(all_prompts, scalar[:, None], scalar_mask[:, None])
            scalar_adv = scalar_adv[local, 0].to(x0.device)
            scalar_r = interpolation_coefficient(scalar_adv, self.a_max)

        for k, name in enumerate(self.reward_names):
            valid = all_values[all_mask[:, k], k].double()
            metrics[f"reward/{name}_mean"] = float(valid.mean()) if valid.numel() else float("nan")
            metrics[f"reward/{name}_std"] = float(valid.std(unbiased=False)) if valid.numel() else float("nan")
            metrics[f"reward/{name}_coverage"] = float(all_mask[:, k].float().mean())
        return Rollout(
            step=step, prompts=repeated, x0=x0, values=values, mask=mask, advantages=adv, r=r,
            scalar_advantages=scalar_adv, scalar_r=scalar_r, metrics=metrics, cond=cond,
        )

    def _sync(self) -> None:
        if self._param_device().type == "cuda":
            torch.cuda.synchronize(self._param_device())

    def _global_step(self) -> int:
        return self.trainer.global_step if self._trainer is not None else 0

    # ------------------------------------------------------------------ update
    def _training_timesteps(self, step: int, update: int) -> list[int]:
        steps = self.sample_steps
        if self.train_timesteps is None or self.train_timesteps >= steps:
            return list(range(steps))
        gen = torch.Generator().manual_seed(stable_seed(self.seed, "timesteps", step, update))
        return sorted(torch.randperm(steps, generator=gen)[: self.train_timesteps].tolist())

    def _flat_grads(self, losses: list[Tensor]) -> Tensor:
        """``[len(losses), P]`` local gradients of each loss w.r.t. the policy LoRA parameters.

        The graph is retained between the calls and released by the last one.
        """
        rows = []
        params = self._policy_params
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(
                loss, params, retain_graph=i < len(losses) - 1, allow_unused=True, materialize_grads=True
            )
            rows.append(torch.cat([g.reshape(-1).float() for g in grads]))
        return torch.stack(rows)

    def _plan(self, rollout: Rollout, refresh: bool, diagnostics: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The loss rows of an update: ``(r_rows [R, B], scales [R], alpha [K], weights [K] | None)``.

        A refresh uses the ``K`` per-reward rows. Otherwise row 0 is the aggregated loss; with
        ``diagnostics`` the ``K`` per-reward rows follow it.
        """
        k = self.num_rewards
        r = rollout.r
        ones = torch.ones(k, dtype=r.dtype, device=r.device)
        if refresh:
            return r, ones, self.current_alpha, None
        weights: Tensor | None
        if self.mode in ("marble", "amortized"):
            if self.cached_norms is None:
                raise RuntimeError("an amortised step needs a refresh first (no cached gradient norms)")
            alpha = self._uniform_alpha(self.cached_dropped) if self.force_uniform else self.current_alpha
            weights = self.weights_from(alpha, self.cached_norms, self.cached_dropped)
        elif self.mode == "fixed":
            alpha = self._baseline_alpha()
            weights = torch.tensor(self.fixed_alpha, dtype=torch.float64)
        elif self.mode == "weighted_sum":
            alpha = self._baseline_alpha()
            weights = None
        else:
            alpha = self._baseline_alpha()
            weights = alpha.clone()
        if weights is None:
            assert rollout.scalar_r is not None
            row, scale = rollout.scalar_r, torch.ones((), dtype=r.dtype, device=r.device)
        elif float(weights.sum()) <= 0:
            row, scale = torch.full_like(r[0], 0.5), torch.zeros((), dtype=r.dtype, device=r.device)
        elif self.aggregate == "advantage":
            w = weights.to(device=r.device, dtype=r.dtype)
            total = w.sum()
            a_bar = aggregate_advantages(rollout.advantages, w / total)
            row, scale = interpolation_coefficient(a_bar, self.a_max), total
        else:
            row, scale = aggregate_coefficients(r, weights.to(device=r.device, dtype=r.dtype))
        rows = row[None]
        scales = scale.reshape(1).to(r.dtype)
        if diagnostics:
            rows = torch.cat([rows, r])
            scales = torch.cat([scales, ones])
        return rows, scales, alpha, weights

    def compute_update(
        self, rollout: Rollout, *, update: int = 0, refresh: bool = False, diagnostics: bool = False
    ) -> UpdateResult:
        """The update direction for ``rollout`` (gradients reduced across ranks, not yet applied).

        On a refresh this also updates :attr:`current_alpha`, :attr:`cached_norms`,
        :attr:`last_harmonized` and :attr:`last_gram`.

        Args:
            rollout: output of :meth:`rollout`.
            update: index of the update on this rollout (seeds the timestep noise).
            refresh: harmonise the ``K`` per-reward gradients (MARBLE); otherwise one aggregated
                gradient with the coefficients in use.
            diagnostics: on a non-refresh step, also compute the per-reward gradients and the
                cosines of the direction with them.
        """
        k = self.num_rewards
        rows, scales, alpha, weights = self._plan(rollout, refresh, diagnostics and not refresh)
        timesteps = self._training_timesteps(rollout.step, update)
        grid = self.time_grid()
        x0 = rollout.x0
        b = x0.shape[0]
        prompts_unique = rollout.prompts[:: self.group_size]
        if rollout.cond is not None:
            cond = rollout.cond
        else:
            with torch.no_grad():
                cond = self.backbone.encode_prompts(rollout.prompts)
        use_kl = self.kl_weight > 0
        per_sample = self._per_sample if rows.shape[0] > 1 else None
        reward_acc = None
        n_rows = rows.shape[0] + (1 if use_kl else 0)
        total = None
        loss_sums = torch.zeros(n_rows, dtype=torch.float64)
        pos_sum = neg_sum = 0.0
        reuse_old = self._old_is_policy and update == 0

        start = time.perf_counter()
        for j in timesteps:
            t = float(grid[j])
            eps = self._noise(prompts_unique, self.group_size, "train", rollout.step, update, j)
            tt = torch.full((b,), t, device=x0.device, dtype=x0.dtype)
            x_t = (1.0 - t) * x0 + t * eps
            with torch.no_grad():
                v_old = None
                if not reuse_old:
                    with self.using_adapter(OLD):
                        v_old = self.backbone.velocity(x_t, tt, cond)
                v_ref = None
                if use_kl:
                    with self.using_adapter(BASE):
                        v_ref = self.backbone.velocity(x_t, tt, cond)
            if per_sample is not None:
                with per_sample.capture():
                    v = self.backbone.velocity(x_t, tt, cond)
            else:
                v = self.backbone.velocity(x_t, tt, cond)
            if v_old is None:
                v_old = v.detach()
            terms = nft_terms(v, v_old, x_t, x0, tt, self.beta)
            losses = list(nft_objective(terms, rows, self.beta, self.a_max) * scales)
            if use_kl:
                losses.append(self.kl_weight * kl_loss(v, v_ref))
            if per_sample is not None:
                # g = s * (r @ P + (1 - r) @ N) for every row r, per-sample gradients projected on the
                # rows layer by layer ([R, P] is held, never [B, P]); ONE per-sample pass:
                n_r = rows.shape[0]
                if reuse_old:
                    # v_old is v, so err- = err+ (to round-off) and L-_i has the gradient of -L+_i:
                    # r @ P + (1 - r) @ N = (2 r - 1) @ P, and no other backward is needed
                    part = per_sample.gradients(
                        terms.positive.sum(), retain_graph=use_kl, project=2.0 * rows.detach() - 1.0
                    ).float()
                    grads = self._flat_grads(losses[n_r:]) if use_kl else None
                else:
                    # r @ P + (1 - r) @ N = r @ (P - N) + sum_i N_i: the per-sample pass on L+ - L-,
                    # plus one ordinary backward of sum_i L-_i, a [P] vector shared by every row
                    part = per_sample.gradients(
                        (terms.positive - terms.negative).sum(), retain_graph=True, project=rows.detach()
                    ).float()
                    plain = self._flat_grads([terms.negative.sum(), *losses[n_r:]])
                    part += plain[0]
                    grads = plain[1:] if use_kl else None
                    del plain
                reward_acc = part if reward_acc is None else reward_acc + part
                del part
            elif self.gram == "batched":
                grads = per_reward_gradients(torch.stack(losses), self._policy_params, engine="batched").float()
            else:
                grads = self._flat_grads(losses)
            if grads is not None:
                total = grads if total is None else total + grads
            loss_sums += torch.stack([loss.detach().double().cpu() for loss in losses])
            pos_sum += float(terms.positive.detach().mean())
            neg_sum += float(terms.negative.detach().mean())
            del v, v_old, v_ref, terms, losses, grads
        n_t = len(timesteps)
        if per_sample is not None:
            assert reward_acc is not None
            # (a_max / (beta B)) * (r @ P + (1 - r) @ N), summed over the timesteps in the loop
            reward_part = (self.a_max / (self.beta * b)) * reward_acc / n_t
            reward_part = reward_part * scales[:, None].to(reward_acc.dtype)
            total = torch.cat([reward_part, total / n_t]) if total is not None else reward_part
            del reward_acc
        else:
            total = total / n_t
        # ONE reduction of every gradient row across ranks (identity on one device).
        total = self._reduce_mean(total)
        self._sync()
        metrics: dict[str, float] = {"time/backward": time.perf_counter() - start}
        mean_losses = loss_sums / n_t
        metrics["loss/positive"] = pos_sum / n_t
        metrics["loss/negative"] = neg_sum / n_t
        metrics["loss/kl"] = float(mean_losses[-1]) if use_kl else 0.0
        kl_grad = total[-1] if use_kl else torch.zeros_like(total[0])
        reward_rows = total[:-1] if use_kl else total

        result: UpdateResult
        start = time.perf_counter()
        if refresh:
            grads_k = reward_rows
            h = self._harmonize(grads_k)
            if self.force_uniform:
                alpha_used = self._uniform_alpha(h.dropped)
                weights_used = self.weights_from(alpha_used, h.norms, h.dropped)
            else:
                alpha_used, weights_used = h.alpha, h.weights
            direction = weights_used.to(grads_k.dtype) @ grads_k
            cosines = self._cosines(direction, grads_k, h.dropped)
            metrics["norm/direction"] = float(direction.double().norm())
            skipped = bool(h.dropped.all())
            for i, name in enumerate(self.reward_names):
                metrics[f"loss/{name}"] = float(mean_losses[i])
            metrics["loss/nft"] = float((weights_used.double() * mean_losses[:k]).sum())
            result = UpdateResult(
                direction=direction, kl_grad=kl_grad, alpha=alpha_used.double(), weights=weights_used.double(),
                refreshed=True, harmonized=h, grads=grads_k, cosines=cosines, skipped=skipped,
            )
        else:
            direction = reward_rows[0]
            grads_k = reward_rows[1 : 1 + k] if diagnostics else None
            cosines = None
            if grads_k is not None:
                norms = grads_k.double().norm(dim=1)
                dropped = norms <= 1e-6 * norms.max().clamp_min(1e-300)
                cosines = self._cosines(direction, grads_k, dropped)
                for i, name in enumerate(self.reward_names):
                    metrics[f"loss/{name}"] = float(mean_losses[1 + i])
                    metrics[f"norm/{name}"] = float(norms[i])
            metrics["loss/nft"] = float(mean_losses[0])
            skipped = weights is not None and float(weights.sum()) <= 0
            result = UpdateResult(
                direction=direction, kl_grad=kl_grad, alpha=alpha.double(),
                weights=None if weights is None else weights.double(), refreshed=False,
                grads=grads_k, cosines=cosines, skipped=skipped,
            )
        metrics["time/qp"] = time.perf_counter() - start
        if result.cosines is not None:
            kept = result.cosines[~torch.isnan(result.cosines)]
            for i, name in enumerate(self.reward_names):
                metrics[f"cos/{name}"] = float(result.cosines[i])
            metrics["cos/worst"] = float(kept.min()) if kept.numel() else float("nan")
        result.timesteps = timesteps
        result.metrics = metrics
        return result

    def _harmonize(self, grads: Tensor) -> Harmonized:
        g64 = grads.double()
        gram = g64 @ g64.T
        h = harmonize_gram(gram)
        h.direction = None
        self.last_harmonized = h
        self.last_gram = gram.detach().cpu()
        self.cached_norms = h.norms.detach().cpu()
        self.cached_dropped = h.dropped.detach().cpu()
        alpha_star = h.alpha.detach().cpu().double()
        if self.force_uniform:
            self.current_alpha = self._uniform_alpha(self.cached_dropped)
        elif self.alpha_transform is not None:
            self.current_alpha = torch.as_tensor(self.alpha_transform(alpha_star), dtype=torch.float64).cpu()
        else:
            self.current_alpha = alpha_star
        self._steps_since_refresh = 0
        return h

    @staticmethod
    def _cosines(direction: Tensor, grads: Tensor, dropped: Tensor) -> Tensor:
        d = direction.double()
        g = grads.double()
        denom = d.norm() * g.norm(dim=1)
        cos = torch.where(denom > 0, (g @ d) / denom.clamp_min(1e-300), torch.zeros_like(denom))
        cos = cos.cpu()
        cos[dropped.cpu()] = float("nan")
        return cos

    def apply_update(self, result: UpdateResult) -> dict[str, float]:
        """Write ``direction + kl_grad`` into ``p.grad``, clip, step the optimizer, zero grads.

        Returns:
            metrics (``grad/norm`` before clipping; ``skipped``).
        """
        if result.skipped:
            warnings.warn(
                f"step {self.step_index}: every reward gradient is ~0 (all rewards dropped); "
                "skipping the optimizer step", RuntimeWarning, stacklevel=2,
            )
            return {"skipped": 1.0}
        full = result.direction + result.kl_grad
        if not bool(torch.isfinite(full).all()):
            raise FloatingPointError(
                f"non-finite update direction at step {self.step_index}; parameters left unchanged"
            )
        offset = 0
        for p in self._policy_params:
            n = p.numel()
            p.grad = full[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        if self.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._policy_params, self.grad_clip)
        else:
            norm = full.norm()
        opt = self.optimizers()
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._old_is_policy = False
        return {"grad/norm": float(norm), "skipped": 0.0}

    @torch.no_grad()
    def update_old_policy(self, step: int) -> float:
        """``theta_old <- eta theta_old + (1 - eta) theta`` with ``eta = old_schedule(step)``."""
        eta = float(self.old_schedule(step))
        for old, new in zip(self._old_params, self._policy_params):
            old.mul_(eta).add_(new.detach(), alpha=1.0 - eta)
        self._old_is_policy = eta == 0.0
        return eta

    # ------------------------------------------------------------------ the step
    def _decide_refresh(self, update: int) -> bool:
        if self.mode == "marble":
            return True
        if self.mode != "amortized":
            return False
        if update > 0:
            return False
        if self.cached_norms is None:
            return True
        if self.refresh_now is not None:
            return bool(self.refresh_now)
        return self._steps_since_refresh >= self.refresh_every

    def training_step(self, batch: Any, batch_idx: int) -> None:
        prompts = self._check_batch(batch)
        step = self.step_index
        if self.mode in ("single", "sequential", "weighted_sum", "fixed"):
            self.current_alpha = self._baseline_alpha()
        rollout = self.rollout(prompts, step=step)
        metrics = dict(rollout.metrics)
        refreshed = False
        for update in range(self.updates_per_rollout):
            refresh = self._decide_refresh(update)
            diagnostics = (
                not refresh and self.diagnostics_every is not None and update == 0
                and step % self.diagnostics_every == 0
            )
            result = self.compute_update(rollout, update=update, refresh=refresh, diagnostics=diagnostics)
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
        if self.mode == "amortized" and not refreshed:
            self._steps_since_refresh += 1
        elif self.mode == "amortized":
            self._steps_since_refresh = 1
        used = self.last_update.alpha
        for i, name in enumerate(self.reward_names):
            metrics[f"alpha/{name}"] = float(used[i])
        if refreshed and self.last_harmonized is not None:
            h = self.last_harmonized
            for i, name in enumerate(self.reward_names):
                metrics[f"norm/{name}"] = float(h.norms[i])
                metrics[f"alpha_star/{name}"] = float(h.alpha[i])
            for i in range(self.num_rewards):
                for j in range(i, self.num_rewards):
                    metrics[f"gram/{self.reward_names[i]}_{self.reward_names[j]}"] = float(self.last_gram[i, j])
        metrics["refresh"] = float(refreshed)
        metrics["old_policy/eta"] = eta
        record: dict[str, Any] = {
            "step": step,
            "global_step": self._global_step(),
            "refresh": refreshed,
            "alpha": [float(a) for a in used],
        }
        for key, value in metrics.items():
            if key.startswith(("reward/", "cos/", "loss/", "norm/")):
                record[key] = value
        self.history.append(record)
        self.step_index = step + 1
        self.refresh_now = None
        self.log_dict(
            {key: float(value) for key, value in metrics.items() if math.isfinite(value)},
            on_step=True, on_epoch=False, batch_size=len(rollout.prompts),
        )

    # ------------------------------------------------------------------ checkpoints
    def _adapter_keys(self) -> list[str]:
        prefix = "backbone.denoiser."
        return [prefix + n for n in self._policy_names + self._old_names]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = set(self._adapter_keys())
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {key: value for key, value in state.items() if key in keys}
        checkpoint["marble"] = {
            "tracker": self.tracker.state_dict(),
            "scalar_tracker": self.scalar_tracker.state_dict(),
            "current_alpha": self.current_alpha.clone(),
            "cached_norms": None if self.cached_norms is None else self.cached_norms.clone(),
            "cached_dropped": None if self.cached_dropped is None else self.cached_dropped.clone(),
            "last_gram": None if self.last_gram is None else self.last_gram.clone(),
            "step_index": self.step_index,
            "steps_since_refresh": self._steps_since_refresh,
            "old_is_policy": self._old_is_policy,
            "force_uniform": self.force_uniform,
            "history": list(self.history),
            "reward_names": list(self.reward_names),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        expected = set(self._adapter_keys())
        missing = sorted(expected - set(state))
        unexpected = sorted(key for key in state if key not in expected)
        if missing or unexpected:
            example = (missing or unexpected)[0]
            raise ValueError(
                f"checkpoint does not match this module's LoRA adapter tensors ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, e.g. {example!r}); was it written with other "
                "lora_targets / lora_rank?"
            )
        extra = checkpoint.get("marble")
        if extra is None:
            return
        names = extra.get("reward_names", self.reward_names)
        if list(names) != self.reward_names:
            raise ValueError(f"checkpoint was trained with rewards {names}, this module has {self.reward_names}")
        self.tracker.load_state_dict(extra.get("tracker", {}))
        self.scalar_tracker.load_state_dict(extra.get("scalar_tracker", {}))
        self.current_alpha = torch.as_tensor(extra.get("current_alpha", self.current_alpha), dtype=torch.float64)
        self.cached_norms = extra.get("cached_norms")
        self.cached_dropped = extra.get("cached_dropped")
        self.last_gram = extra.get("last_gram")
        self.step_index = int(extra.get("step_index", 0))
        self._steps_since_refresh = int(extra.get("steps_since_refresh", 0))
        self._old_is_policy = bool(extra.get("old_is_policy", False))
        self.force_uniform = bool(extra.get("force_uniform", False))
        self.history = list(extra.get("history", []))
