"""One update on a rollout: the loss rows, their gradients over the training timesteps, the
direction.

The NFT loss of a row ``r [B]`` is affine in ``r``, so every training rule is a set of loss rows:

* a **refresh** (MARBLE) differentiates the ``K`` per-reward rows ``r_k`` and harmonises them
  (:func:`~marble_lightning.harmonize.harmonize_gram` on their Gram matrix);
* an **aggregated** step differentiates one row ``r_bar = sum_k (w_k / W) r_k`` scaled by
  ``W = sum_k w_k`` (exactly ``sum_k w_k l_k``), or the scalarised reward's row (weighted sum);
  with ``diagnostics`` the ``K`` per-reward rows follow it, to log cosines.

Gradients are taken locally (:class:`~marble_lightning.gram.GradientEngine`), averaged over the
training timesteps, and mean-reduced across ranks ONCE per update (every rank must call this), so
every rank harmonises the same matrix and gets the same coefficients.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from marble_lightning.adapters import BASE, OLD, LoraAdapterPair
from marble_lightning.backbone import FlowBackbone
from marble_lightning.coefficients import Coefficients
from marble_lightning.collective import Collective
from marble_lightning.gram import GradientEngine
from marble_lightning.harmonize import Harmonized, direction_cosines, gram_cosines, harmonize_gram
from marble_lightning.nft import (
    aggregate_advantages,
    aggregate_coefficients,
    interpolation_coefficient,
    kl_loss,
    nft_objective,
    nft_terms,
)
from marble_lightning.options import ResolvedHarmonization
from marble_lightning.rollout import Rollout, sync_device
from marble_lightning.rules import TrainingRule
from marble_lightning.sampling import keyed_noise

__all__ = [
    "LossPlan",
    "NFTUpdate",
    "UpdateResult",
    "apply_direction",
    "finish_result",
    "plan_losses",
    "step_metrics",
]


@dataclass
class LossPlan:
    """The loss rows of one update.

    Attributes:
        rows: ``[R, B]`` interpolation coefficients, one row per loss.
        scales: ``[R]`` multipliers of the rows' losses.
        alpha: ``[K]`` float64 coefficients the update reports.
        weights: ``[K]`` float64 weights of the per-reward losses, ``None`` for a scalarised loss
            or a refresh (the harmonisation decides).
    """

    rows: Tensor
    scales: Tensor
    alpha: Tensor
    weights: Tensor | None


@dataclass
class UpdateResult:
    """The outcome of :meth:`NFTUpdate.compute` (before clipping).

    Attributes:
        direction: ``[P]`` reward direction (harmonised or aggregated), without the KL gradient.
        kl_grad: ``[P]`` gradient of the KL term (zeros when ``kl_weight == 0``).
        alpha: ``[K]`` coefficients the direction used (one-hot/normalised weights for baselines).
        weights: ``[K]`` effective weights on the per-reward gradients, or ``None`` (weighted sum).
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


def plan_losses(
    rollout: Rollout,
    rule: TrainingRule,
    coefficients: Coefficients | None,
    *,
    step: int,
    refresh: bool,
    diagnostics: bool,
    aggregate: str,
    a_max: float,
) -> LossPlan:
    """The loss rows of an update under ``rule`` (see the module docstring)."""
    r = rollout.r
    k = r.shape[0]
    ones = torch.ones(k, dtype=r.dtype, device=r.device)
    if refresh:
        assert coefficients is not None
        return LossPlan(r, ones, coefficients.alpha, None)
    weights: Tensor | None
    if rule.harmonizes:
        assert coefficients is not None
        alpha, weights = coefficients.amortized_weights()
    else:
        alpha, weights = rule.alpha(step), rule.loss_weights(step)
    if weights is None:
        assert rollout.scalar_r is not None
        row, scale = rollout.scalar_r, torch.ones((), dtype=r.dtype, device=r.device)
    elif float(weights.sum()) <= 0:
        row, scale = torch.full_like(r[0], 0.5), torch.zeros((), dtype=r.dtype, device=r.device)
    elif aggregate == "advantage":
        w = weights.to(device=r.device, dtype=r.dtype)
        total = w.sum()
        a_bar = aggregate_advantages(rollout.advantages, w / total)
        row, scale = interpolation_coefficient(a_bar, a_max), total
    else:
        row, scale = aggregate_coefficients(r, weights.to(device=r.device, dtype=r.dtype))
    rows = row[None]
    scales = scale.reshape(1).to(r.dtype)
    if diagnostics:
        rows = torch.cat([rows, r])
        scales = torch.cat([scales, ones])
    return LossPlan(rows, scales, alpha, weights)


class NFTUpdate:
    """Computes update directions for one module (the parts that do not change between steps).

    Args:
        backbone: the flow backbone (``velocity``, ``encode_prompts``, ``sample_shape``).
        adapters: the policy/old LoRA pair.
        engine: the per-reward gradient engine.
        beta: NFT strength.
        a_max: advantage clip and NFT loss scale.
        kl_weight: weight of ``mean((v - v_ref)^2)`` (0: no reference forward).
        group_size: ``G``.
        seed: seed of the training-timestep noise.
    """

    def __init__(
        self,
        backbone: FlowBackbone,
        adapters: LoraAdapterPair,
        engine: GradientEngine,
        *,
        beta: float,
        a_max: float,
        kl_weight: float,
        group_size: int,
        seed: int,
    ) -> None:
        self.backbone = backbone
        self.adapters = adapters
        self.engine = engine
        self.beta = beta
        self.a_max = a_max
        self.kl_weight = kl_weight
        self.group_size = group_size
        self.seed = seed
        self.harmonization: ResolvedHarmonization | None = None  # options of the refresh's QP

    def _gradient_rows(
        self, rollout: Rollout, plan: LossPlan, grid: Tensor, timesteps: list[int], update: int
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """``([R (+1), P] local gradient rows, [R (+1)] mean losses, metrics)`` over
        ``timesteps``."""
        rows, scales = plan.rows, plan.scales
        x0 = rollout.x0
        b = x0.shape[0]
        prompts = rollout.prompts[:: self.group_size]
        cond = rollout.cond
        if cond is None:
            with torch.no_grad():
                cond = self.backbone.encode_prompts(rollout.prompts)
        use_kl = self.kl_weight > 0
        acc = self.engine.accumulator(rows.shape[0])
        loss_sums = torch.zeros(rows.shape[0] + (1 if use_kl else 0), dtype=torch.float64)
        pos_sum = neg_sum = 0.0
        reuse_old = self.adapters.old_is_policy and update == 0
        velocity = self.backbone.velocity
        for j in timesteps:
            t = float(grid[j])
            eps = keyed_noise(
                prompts,
                self.group_size,
                self.backbone.sample_shape,
                (self.seed, "train", rollout.step, update, j),
                device=x0.device,
                dtype=x0.dtype,
            )
            tt = torch.full((b,), t, device=x0.device, dtype=x0.dtype)
            x_t = (1.0 - t) * x0 + t * eps
            with torch.no_grad():
                v_old = v_ref = None
                if not reuse_old:
                    with self.adapters.inference(OLD):
                        v_old = velocity(x_t, tt, cond)
                if use_kl:
                    with self.adapters.inference(BASE):
                        v_ref = velocity(x_t, tt, cond)
            with acc.capture():
                v = velocity(x_t, tt, cond)
            if v_old is None:
                v_old = v.detach()
            terms = nft_terms(v, v_old, x_t, x0, tt, self.beta)
            losses = list(nft_objective(terms, rows, self.beta, self.a_max) * scales)
            if use_kl:
                losses.append(self.kl_weight * kl_loss(v, v_ref))
            acc.add(terms, losses, rows, use_kl, reuse_old)
            loss_sums += torch.stack([loss.detach().double().cpu() for loss in losses])
            pos_sum += float(terms.positive.detach().mean())
            neg_sum += float(terms.negative.detach().mean())
            del v, v_old, v_ref, terms, losses
        n_t = len(timesteps)
        total = acc.result(n_t, scales, self.a_max / (self.beta * b))
        metrics = {"loss/positive": pos_sum / n_t, "loss/negative": neg_sum / n_t}
        return total, loss_sums / n_t, metrics

    def compute(
        self,
        rollout: Rollout,
        plan: LossPlan,
        *,
        grid: Tensor,
        timesteps: list[int],
        update: int,
        refresh: bool,
        coefficients: Coefficients | None,
        collective: Collective,
        names: list[str],
    ) -> UpdateResult:
        """The update direction for ``rollout`` (reduced across ranks, not yet applied).

        On a refresh this records the harmonisation in ``coefficients``.
        """
        k = len(names)
        use_kl = self.kl_weight > 0
        start = time.perf_counter()
        total, mean_losses, metrics = self._gradient_rows(rollout, plan, grid, timesteps, update)
        # ONE reduction of every gradient row across ranks (identity on one device).
        total = collective.mean(total)
        sync_device(total.device)
        metrics["time/backward"] = time.perf_counter() - start
        metrics["loss/kl"] = float(mean_losses[-1]) if use_kl else 0.0
        kl_grad = total[-1] if use_kl else torch.zeros_like(total[0])
        reward_rows = total[:-1] if use_kl else total

        start = time.perf_counter()
        if refresh:
            assert coefficients is not None
            g64 = reward_rows.double()
            gram = g64 @ g64.T
            if self.harmonization is None:
                h = harmonize_gram(gram)
            else:
                h = self.harmonization.harmonize(
                    gram, step=rollout.step, update=update, seed=self.seed
                )
            alpha, weights = coefficients.record_refresh(h, gram)
            direction = weights.to(reward_rows.dtype) @ reward_rows
            cosines = gram_cosines(gram, weights, h.dropped)
            metrics["norm/direction"] = float(direction.double().norm())
            for i, name in enumerate(names):
                metrics[f"loss/{name}"] = float(mean_losses[i])
            metrics["loss/nft"] = float((weights.double() * mean_losses[:k]).sum())
            result = UpdateResult(
                direction=direction,
                kl_grad=kl_grad,
                alpha=alpha.double(),
                weights=weights.double(),
                refreshed=True,
                harmonized=h,
                grads=reward_rows,
                cosines=cosines,
                skipped=bool(h.dropped.all()),
            )
        else:
            direction = reward_rows[0]
            grads = reward_rows[1 : 1 + k] if plan.rows.shape[0] > 1 else None
            cosines = None
            if grads is not None:
                norms = grads.double().norm(dim=1)
                dropped = norms <= 1e-6 * norms.max().clamp_min(1e-300)
                cosines = direction_cosines(direction, grads, dropped)
                for i, name in enumerate(names):
                    metrics[f"loss/{name}"] = float(mean_losses[1 + i])
                    metrics[f"norm/{name}"] = float(norms[i])
            metrics["loss/nft"] = float(mean_losses[0])
            weights = plan.weights
            result = UpdateResult(
                direction=direction,
                kl_grad=kl_grad,
                alpha=plan.alpha.double(),
                weights=None if weights is None else weights.double(),
                refreshed=False,
                grads=grads,
                cosines=cosines,
                skipped=weights is not None and float(weights.sum()) <= 0,
            )
        metrics["time/qp"] = time.perf_counter() - start
        return finish_result(result, metrics, names, timesteps)


def step_metrics(
    names: list[str], alpha: Tensor, coefficients: Coefficients, refreshed: bool, eta: float
) -> dict[str, float]:
    """Per-step scalars beyond the update's own: ``alpha/<k>``, and on a refresh ``norm/<k>``,
    ``alpha_star/<k>`` and the Gram matrix ``gram/<i>_<j>`` (upper triangle); ``refresh`` and
    ``old_policy/eta``."""
    metrics = {f"alpha/{name}": float(alpha[i]) for i, name in enumerate(names)}
    h, gram = coefficients.last, coefficients.gram
    if refreshed and h is not None and gram is not None:
        for i, name in enumerate(names):
            metrics[f"norm/{name}"] = float(h.norms[i])
            metrics[f"alpha_star/{name}"] = float(h.alpha[i])
        for i in range(len(names)):
            for j in range(i, len(names)):
                metrics[f"gram/{names[i]}_{names[j]}"] = float(gram[i, j])
    metrics["refresh"] = float(refreshed)
    metrics["old_policy/eta"] = eta
    return metrics


def apply_direction(
    result: UpdateResult,
    adapters: LoraAdapterPair,
    optimizer: Any,
    scheduler: Any,
    grad_clip: float | None,
    step: int,
) -> dict[str, float]:
    """Write ``direction + kl_grad`` into the policy's ``p.grad``, clip, step optimizer (and
    scheduler, once per optimizer step); returns ``grad/norm`` (before clipping) and ``skipped``.

    Raises:
        FloatingPointError: on a non-finite direction (parameters are left unchanged).
    """
    if result.skipped:
        warnings.warn(
            f"step {step}: every reward gradient is ~0 (all rewards dropped); "
            "skipping the optimizer step", RuntimeWarning, stacklevel=3,
        )  # fmt: skip
        return {"skipped": 1.0}
    full = result.direction + result.kl_grad
    if not bool(torch.isfinite(full).all()):
        raise FloatingPointError(
            f"non-finite update direction at step {step}; parameters left unchanged"
        )
    adapters.write_gradients(full)
    # the whole gradient's norm on every rank, sharded (DTensor) parameters included; max_norm inf
    # leaves the gradients as they are (scaled by exactly 1)
    limit = float("inf") if grad_clip is None else grad_clip
    norm = torch.nn.utils.clip_grad_norm_(adapters.policy_params, limit)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    adapters.old_is_policy = False
    return {"grad/norm": float(norm), "skipped": 0.0}


def finish_result(
    result: UpdateResult, metrics: dict[str, float], names: list[str], timesteps: list[int]
) -> UpdateResult:
    """Add the cosine metrics (``cos/<k>``, ``cos/worst`` over the kept rewards) and attach
    ``metrics`` and ``timesteps`` to ``result``."""
    if result.cosines is not None:
        kept = result.cosines[~torch.isnan(result.cosines)]
        for i, name in enumerate(names):
            metrics[f"cos/{name}"] = float(result.cosines[i])
        metrics["cos/worst"] = float(kept.min()) if kept.numel() else float("nan")
    result.timesteps = timesteps
    result.metrics = metrics
    return result
