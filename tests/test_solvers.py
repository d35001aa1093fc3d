"""The rollout samplers on a flow ODE with a known solution: order of convergence, and the DPM
solver against diffusers' DPMSolverMultistepScheduler (flow sigmas, flow prediction)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from marble_lightning.sampling import (
    dpm_solver_2m_sample,
    euler_sample,
    flow_sample,
    uniform_time_grid,
)

MU, S = 1.5, 0.3  # data ~ N(MU, S^2) per coordinate


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """Exact marginal velocity of x_t = (1 - t) x0 + t eps with x0 ~ N(MU, S^2), eps ~ N(0, 1).

    E[x0 | x_t] = MU + (1 - t) S^2 (x_t - (1 - t) MU) / ((1 - t)^2 S^2 + t^2) and
    v = E[eps - x0 | x_t] = (x_t - E[x0 | x_t]) / t; the ODE maps eps at t = 1 to MU + S eps.
    """
    t = t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    var = (1 - t) ** 2 * S**2 + t**2
    x0 = MU + (1 - t) * S**2 * (x - (1 - t) * MU) / var
    return (x - x0) / t


def exact_solution(eps: torch.Tensor, t: float) -> torch.Tensor:
    """The ODE's trajectory through ``eps`` at t = 1: (1 - t) MU + sqrt((1 - t)^2 S^2 + t^2) eps."""
    return (1 - t) * MU + math.sqrt((1 - t) ** 2 * S**2 + t**2) * eps


def errors(sampler, steps_list, start=0.9, end=0.05, dtype=torch.float64):
    """Max error at ``end`` after integrating the exact state at ``start`` on a uniform grid.

    The order is measured away from t = 1 and t = 0, where lambda = log((1 - t) / t) is infinite:
    a grid uniform in t keeps steps of about log 2 in lambda next to the end points whatever N.
    """
    eps = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    out = []
    for n in steps_list:
        grid = torch.linspace(start, end, n + 1, dtype=torch.float64)
        x = sampler(gaussian_velocity, exact_solution(eps, start), {}, grid)
        out.append(float((x - exact_solution(eps, end)).abs().max()))
    return np.array(out)


def measured_order(errs: np.ndarray, steps: list[int]) -> float:
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    return -float(slope)


def test_orders_of_convergence() -> None:
    steps = [16, 32, 64, 128]
    euler = measured_order(errors(euler_sample, steps), steps)
    dpm_errs = errors(dpm_solver_2m_sample, steps)
    dpm = measured_order(dpm_errs, steps)
    assert euler == pytest.approx(1.0, abs=0.15)
    assert dpm == pytest.approx(2.0, abs=0.2)
    assert dpm_errs[0] < errors(euler_sample, [steps[0]])[0] / 2  # more accurate at equal cost


def test_full_interval_dpm_beats_euler_at_equal_cost() -> None:
    """From noise (t = 1) to data (t = 0): 10 DPM steps beat 10 Euler steps by a wide margin."""
    eps = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = MU + S * eps
    grid = uniform_time_grid(10)
    dpm = float((dpm_solver_2m_sample(gaussian_velocity, eps, {}, grid) - exact).abs().max())
    euler = float((euler_sample(gaussian_velocity, eps, {}, grid) - exact).abs().max())
    assert dpm < euler / 2


def test_flow_sample_dispatch_and_cfg() -> None:
    eps = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = uniform_time_grid(7)
    assert torch.equal(
        flow_sample(gaussian_velocity, eps, {}, grid),
        euler_sample(gaussian_velocity, eps, {}, grid),
    )
    assert torch.equal(
        flow_sample(gaussian_velocity, eps, {}, grid, solver="dpm2"),
        dpm_solver_2m_sample(gaussian_velocity, eps, {}, grid),
    )
    with pytest.raises(ValueError, match="solver"):
        flow_sample(gaussian_velocity, eps, {}, grid, solver="rk4")

    # guidance: v_u + w (v_c - v_u) evaluated in one batched call
    def cond_velocity(x, t, cond):
        return gaussian_velocity(x, t, {}) + cond["shift"]

    cond = {"shift": torch.ones(4, 2, dtype=torch.float64)}
    uncond = {"shift": torch.zeros(4, 2, dtype=torch.float64)}
    guided = dpm_solver_2m_sample(cond_velocity, eps, cond, grid, uncond=uncond, cfg_scale=2.0)
    direct = dpm_solver_2m_sample(lambda x, t, c: gaussian_velocity(x, t, {}) + 2.0, eps, {}, grid)
    torch.testing.assert_close(guided, direct)


@pytest.mark.parametrize("steps", [3, 5, 10, 14])
def test_matches_diffusers_dpm_multistep_flow(steps: int) -> None:
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0,
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero",
    )  # fmt: skip
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double()
    eps = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    x = eps * sigmas[0].float()  # any start works; both integrate the same ODE from sigmas[0]
    ours = dpm_solver_2m_sample(gaussian_velocity, x.double(), {}, sigmas)
    sample = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        v = gaussian_velocity(sample.double(), sigmas[i].expand(sample.shape[0]), {}).float()
        sample = scheduler.step(v, t, sample).prev_sample
    torch.testing.assert_close(ours.float(), sample, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(ours.abs().max()))
