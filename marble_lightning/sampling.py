"""Keyed noise, the sampler's time grid and the deterministic samplers (pure functions).

Conventions of :mod:`marble_lightning.backbone`: ``t = 1`` is noise, ``t = 0`` is data, and the
sampler integrates ``x_{t'} = x_t + (t' - t) v`` from 1 down to 0 on a decreasing grid.

Noise is keyed: the noise of the ``c``-th copy of a prompt is drawn from a generator seeded by
``(key..., occurrence of the prompt so far, prompt)``, so it depends neither on the rank nor on
the order of the batch nor on the global RNG.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from marble_lightning.backbone import Conditioning
from marble_lightning.seeding import generator

__all__ = [
    "Velocity",
    "SOLVERS",
    "check_time_grid",
    "dpm_solver_2m_sample",
    "euler_sample",
    "guided_velocity",
    "flow_sample",
    "evaluation_noise",
    "keyed_noise",
    "training_timesteps",
    "uniform_time_grid",
]

Velocity = Callable[[Tensor, Tensor, Conditioning], Tensor]
"""``velocity(x [B, ...], t [B], cond) -> v [B, ...]``."""


def keyed_noise(
    prompts: Sequence[str],
    count: int,
    shape: Sequence[int],
    key: tuple[object, ...],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[len(prompts) * count, *shape]`` standard normal noise keyed by
    ``(key, occurrence, prompt)``.

    Args:
        prompts: prompts, in batch order; a repeated prompt gets its next occurrence's noise.
        count: samples per prompt (rows ``i * count ... (i + 1) * count - 1`` belong to prompt i).
        shape: shape of one sample (e.g. ``(C, H, W)``).
        key: what identifies the draw (seed, purpose, step, ...).
        device: device of the result (drawn on the CPU, then moved).
        dtype: dtype of the result.
    """
    seen: dict[str, int] = {}
    chunks = []
    for prompt in prompts:
        occurrence = seen.get(prompt, 0)
        seen[prompt] = occurrence + 1
        gen = generator(*key, occurrence, prompt)
        chunks.append(torch.randn((count, *shape), generator=gen))
    return torch.cat(chunks).to(device=device, dtype=dtype)


def evaluation_noise(
    prompts: Sequence[str],
    seed: int | Sequence[int],
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[B, *shape]`` noise of evaluation images, independent of any training run's seed.

    Args:
        prompts: ``B`` prompts.
        seed: an int (image ``i`` gets the noise of ``(seed, prompts[i], occurrence)``), or ``B``
            ints (image ``i`` gets ``(seed[i], prompts[i])``, independent of the rest of the list:
            use this to split an evaluation set into chunks or across ranks).
    """
    if isinstance(seed, numbers.Integral) or (isinstance(seed, Tensor) and seed.ndim == 0):
        return keyed_noise(prompts, 1, shape, ("sample", int(seed)), device=device, dtype=dtype)
    seeds = [int(x) for x in seed]
    if len(seeds) != len(prompts):
        raise ValueError(
            f"`seed` should be an int or one int per prompt ({len(prompts)}), got {len(seeds)}"
        )
    return torch.cat(
        [
            keyed_noise([p], 1, shape, ("sample", x), device=device, dtype=dtype)
            for p, x in zip(prompts, seeds)
        ]
    )


def uniform_time_grid(steps: int) -> Tensor:
    """``[steps + 1]`` times ``1 - j / steps`` (float64)."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def check_time_grid(grid: Tensor, steps: int, source: str = "time_grid") -> Tensor:
    """``grid`` as float64 on the CPU, checked to decrease from 1 to 0 with ``steps + 1`` points."""
    grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
    if (
        grid.shape != (steps + 1,)
        or abs(float(grid[0]) - 1.0) > 1e-6
        or abs(float(grid[-1])) > 1e-6
        or bool((grid[1:] >= grid[:-1]).any())
    ):
        raise ValueError(
            f"{source}({steps}) should decrease from 1 to 0 with {steps + 1} points, "
            f"got {grid.tolist()}"
        )
    return grid


def guided_velocity(
    velocity: Velocity,
    x: Tensor,
    t: float,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    cfg_scale: float = 1.0,
) -> Tensor:
    """``v(x, t)``; with ``uncond``, ``v_u + cfg_scale (v_c - v_u)`` (both halves in one call)."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
    if uncond is None:
        return velocity(x, tt, cond)
    both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
    v_u, v_c = velocity(torch.cat([x, x]), torch.cat([tt, tt]), both).chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


@torch.no_grad()
def euler_sample(
    velocity: Velocity,
    noise: Tensor,
    cond: Conditioning,
    grid: Tensor,
    *,
    uncond: Conditioning | None = None,
    cfg_scale: float = 1.0,
) -> Tensor:
    """Integrate ``noise`` (at ``t = grid[0] = 1``) to ``t = 0`` with Euler steps on ``grid``.

    With ``uncond`` the velocity is ``v_u + cfg_scale (v_c - v_u)`` (classifier-free guidance;
    both halves in one batched call).

    Returns:
        ``[B, ...]`` samples at ``t = 0``, same shape and dtype as ``noise``.
    """
    x = noise
    for i in range(grid.shape[0] - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        x = x + (t_next - t) * guided_velocity(velocity, x, t, cond, uncond, cfg_scale)
    return x


SOLVERS = ("euler", "dpm2")
"""Rollout/evaluation samplers: ``"euler"`` (first order) and ``"dpm2"`` (DPM-Solver++(2M))."""


@torch.no_grad()
def dpm_solver_2m_sample(
    velocity: Velocity,
    noise: Tensor,
    cond: Conditioning,
    grid: Tensor,
    *,
    uncond: Conditioning | None = None,
    cfg_scale: float = 1.0,
) -> Tensor:
    """Integrate the flow ODE from ``grid[0]`` to ``grid[-1] = 0`` with DPM-Solver++(2M).

    Deterministic, second order, one velocity evaluation per step (the cost of Euler). With
    ``x_t = (1 - t) x0 + t eps`` (``alpha_t = 1 - t``, ``sigma_t = t``,
    ``lambda_t = log(alpha_t / sigma_t)``) the data prediction is ``D_i = x - t_i v`` and a step
    ``t -> t'`` (``h = lambda_t' - lambda_t``) is

    .. math::

        x' = \\frac{t'}{t} x - (1 - t') (e^{-h} - 1)
             \\Big(D_i + \\frac{1}{2 r} (D_i - D_{i-1})\\Big), \\qquad
        r = \\frac{\\lambda_t - \\lambda_{t_{i-1}}}{h}

    (first order, without the ``r`` term, on the first step, on a step from ``t = 1`` where
    ``lambda = -inf``, right after it, and on the final step to ``t = 0``, which returns the data
    prediction ``D``): what diffusers' ``DPMSolverMultistepScheduler`` computes with
    ``use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver++",
    solver_order=2`` and ``lower_order_final``, on any decreasing grid ending at 0.

    Returns:
        ``[B, ...]`` samples at ``t = grid[-1]``, same shape and dtype as ``noise``.
    """
    x = noise
    prev_d: Tensor | None = None
    prev_lambda = -math.inf
    for i in range(grid.shape[0] - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        v = guided_velocity(velocity, x, t, cond, uncond, cfg_scale)
        d = x - t * v
        if t_next <= 0.0:
            x = d
            break
        lam = math.log((1.0 - t) / t) if t < 1.0 else -math.inf
        lam_next = math.log((1.0 - t_next) / t_next)
        if lam == -math.inf:  # alpha_t = 0: the exact limit of the first-order step
            x = t_next * x + (1.0 - t_next) * d
        else:
            h = lam_next - lam
            correction = d
            if prev_d is not None and prev_lambda > -math.inf:
                r = (lam - prev_lambda) / h
                correction = d + (d - prev_d) / (2.0 * r)
            x = (t_next / t) * x - (1.0 - t_next) * math.expm1(-h) * correction
        prev_d, prev_lambda = d, lam
    return x


def flow_sample(
    velocity: Velocity,
    noise: Tensor,
    cond: Conditioning,
    grid: Tensor,
    *,
    uncond: Conditioning | None = None,
    cfg_scale: float = 1.0,
    solver: str = "euler",
) -> Tensor:
    """:func:`euler_sample` or :func:`dpm_solver_2m_sample`, as ``solver`` (one of :data:`SOLVERS`)
    says."""
    if solver == "euler":
        return euler_sample(velocity, noise, cond, grid, uncond=uncond, cfg_scale=cfg_scale)
    if solver == "dpm2":
        return dpm_solver_2m_sample(velocity, noise, cond, grid, uncond=uncond, cfg_scale=cfg_scale)
    raise ValueError(f"`solver` should be one of {SOLVERS}, got {solver!r}")


def training_timesteps(
    seed: int, step: int, update: int, steps: int, count: int | None
) -> list[int]:
    """Indices into the sampler grid trained on at ``(step, update)``: all, or ``count`` random
    ones.

    The subset is keyed by ``(seed, step, update)``, so every rank picks the same one.
    """
    if count is not None and count < 1:
        raise ValueError(f"`train_timesteps` should be None or an integer >= 1, got {count!r}")
    if count is None or count >= steps:
        return list(range(steps))
    gen = generator(seed, "timesteps", step, update)
    return sorted(torch.randperm(steps, generator=gen)[:count].tolist())
