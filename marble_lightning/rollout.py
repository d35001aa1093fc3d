"""One rollout: sample with the old policy, score with every reward, turn scores into advantages."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from marble_lightning.adapters import OLD, LoraAdapterPair
from marble_lightning.advantages import PerPromptStatTracker
from marble_lightning.backbone import Conditioning, FlowBackbone
from marble_lightning.collective import Collective
from marble_lightning.nft import interpolation_coefficient
from marble_lightning.rewards.base import MultiReward, RewardBatch
from marble_lightning.rules import TrainingRule, WeightedSumRule
from marble_lightning.sampling import flow_sample, keyed_noise

__all__ = ["Rollout", "collect_rollout", "sync_device"]


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
        scalar_advantages: ``[B]`` advantages of the scalarised reward (weighted sum only).
        scalar_r: ``[B]`` their interpolation coefficients (weighted sum only).
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


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def collect_rollout(
    prompts: list[str],
    *,
    step: int,
    backbone: FlowBackbone,
    adapters: LoraAdapterPair,
    rewards: MultiReward,
    tracker: PerPromptStatTracker,
    scalar_tracker: PerPromptStatTracker,
    rule: TrainingRule,
    collective: Collective,
    grid: Tensor,
    group_size: int,
    seed: int,
    cfg_scale: float,
    a_max: float,
    dtype: torch.dtype,
    autocast: contextlib.AbstractContextManager,
    solver: str = "euler",
) -> Rollout:
    """Sample ``G`` images per prompt with the old policy, score them, compute advantages.

    Rewards and prompts are gathered from every rank before the stat trackers update, so every
    rank holds the same tracker state and logs the same reward means.

    Raises:
        the reward's own exception (with a note naming the step) when a reward fails, and
        ValueError on a wrong value shape; no training state has been changed then.
    """
    g = group_size
    repeated = [p for p in prompts for _ in range(g)]
    device = adapters.policy_params[0].device
    k = len(rewards)
    metrics: dict[str, float] = {}

    start = time.perf_counter()
    noise = keyed_noise(
        prompts, g, backbone.sample_shape, (seed, "rollout", step), device=device, dtype=dtype
    )
    with torch.no_grad():
        cond = backbone.encode_prompts(repeated)
        uncond = backbone.encode_prompts([""] * len(repeated)) if cfg_scale != 1.0 else None
        with adapters.inference(OLD), autocast:
            x0 = flow_sample(
                backbone.velocity,
                noise,
                cond,
                grid,
                uncond=uncond,
                cfg_scale=cfg_scale,
                solver=solver,
            )
    x0 = x0.to(noise.dtype)
    images = backbone.decode(x0).float().clamp(0.0, 1.0)
    sync_device(device)
    metrics["time/sampling"] = time.perf_counter() - start

    start = time.perf_counter()
    try:
        batch: RewardBatch = rewards(images, repeated, step=step)
    except Exception as err:
        if hasattr(err, "add_note"):
            err.add_note(f"while scoring the rollout of step {step}; no training state was changed")
        raise
    values, mask = batch.values.float(), batch.mask.bool()
    if values.shape != (len(repeated), k):
        raise ValueError(
            f"rewards returned values of shape {tuple(values.shape)} at step {step}, expected "
            f"({len(repeated)}, {k})"
        )
    sync_device(device)
    metrics["time/rewards"] = time.perf_counter() - start

    all_prompts = collective.gather_objects(repeated)
    all_values = collective.gather_rows(values).reshape(-1, k)
    all_mask = collective.gather_rows(mask.to(torch.uint8)).reshape(-1, k).bool()
    raw_values = all_values  # the logged reward means stay in reward units
    all_values = tracker.normalize_rewards(
        all_values, all_mask
    )  # identity unless reward_ema is set
    local = slice(collective.rank * len(repeated), (collective.rank + 1) * len(repeated))
    adv = tracker.update(all_prompts, all_values, all_mask)[local].to(x0.device)
    r = interpolation_coefficient(adv, a_max).T.contiguous()
    scalar_adv = scalar_r = None
    if rule.scalarised:
        assert isinstance(rule, WeightedSumRule)
        w = torch.tensor(rule.weights, device=all_values.device, dtype=all_values.dtype)
        scalar = (all_values * all_mask) @ w
        scalar_mask = all_mask.any(dim=1)
        scalar_adv = scalar_tracker.update(all_prompts, scalar[:, None], scalar_mask[:, None])
        scalar_adv = scalar_adv[local, 0].to(x0.device)
        scalar_r = interpolation_coefficient(scalar_adv, a_max)

    for i, name in enumerate(rewards.names):
        valid = raw_values[all_mask[:, i], i].double()
        metrics[f"reward/{name}_mean"] = float(valid.mean()) if valid.numel() else float("nan")
        metrics[f"reward/{name}_std"] = (
            float(valid.std(unbiased=False)) if valid.numel() else float("nan")
        )
        metrics[f"reward/{name}_coverage"] = float(all_mask[:, i].float().mean())
    return Rollout(
        step=step,
        prompts=repeated,
        x0=x0,
        values=values,
        mask=mask,
        advantages=adv,
        r=r,
        scalar_advantages=scalar_adv,
        scalar_r=scalar_r,
        metrics=metrics,
        cond=cond,
    )
