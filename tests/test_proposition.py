"""The amortisation identity on a real (tiny) torch model.

``l`` is affine in the interpolation coefficients, so for non-negative weights ``w``:
``sum_k w_k grad l(r_k) == W grad l(r_bar)`` with ``W = sum_k w_k``, ``r_bar = sum_k (w_k/W) r_k``,
even where the advantage clip is active (``r`` exactly 0 or 1). The paper's form aggregates the
advantages instead, ``r(A_bar)`` with ``A_bar = sum_k (w_k/W) A_k``; it agrees only where no
advantage is clipped.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from marble_lightning.harmonize import harmonize
from marble_lightning.nft import (
    aggregate_advantages,
    aggregate_coefficients,
    interpolation_coefficient,
    nft_objective,
    nft_terms,
)

A_MAX = 5.0
BETA = 0.4


class TinyVelocity(nn.Module):
    """A small conv velocity model v(x_t, t): the time enters as an extra input channel."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, 8, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(8, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = t.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.net(torch.cat([x, time], dim=1))


def setup_batch(seed: int = 0, b: int = 6):
    torch.manual_seed(seed)
    policy = TinyVelocity().double()
    old = TinyVelocity().double()
    old.load_state_dict(policy.state_dict())
    with torch.no_grad():  # the old policy lags the trained one
        for p in old.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0 = torch.randn(b, 2, 5, 5, dtype=torch.float64)
    eps = torch.randn(b, 2, 5, 5, dtype=torch.float64)
    t = torch.rand(b, dtype=torch.float64) * 0.8 + 0.1
    tb = t.reshape(-1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * eps
    v = policy(x_t, t)
    with torch.no_grad():
        v_old = old(x_t, t)
    terms = nft_terms(v, v_old, x_t, x0, t, beta=BETA)
    return policy, terms


def flat_grad(loss: torch.Tensor, model: nn.Module, retain: bool = True) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=retain)
    return torch.cat([g.reshape(-1) for g in grads])


def per_reward_grads(policy, terms, r: torch.Tensor) -> torch.Tensor:
    losses = nft_objective(terms, r, beta=BETA, a_max=A_MAX)  # [K], one shared forward
    return torch.stack([flat_grad(loss, policy) for loss in losses])


# Advantages [B, K] for K = 3 rewards. CLAMPED has entries beyond +-A_MAX (r exactly 0 or 1).
INACTIVE = torch.tensor(
    [
        [1.0, -2.0, 0.5],
        [-0.5, 3.0, -4.0],
        [2.5, 0.0, 1.0],
        [-1.5, -1.0, 4.5],
        [0.3, 2.0, -3.0],
        [4.9, -4.9, 0.0],
    ],
    dtype=torch.float64,
)
CLAMPED = INACTIVE.clone()
CLAMPED[0, 0] = 9.0
CLAMPED[3, 1] = -12.0
CLAMPED[5, 2] = 7.5


@pytest.mark.parametrize("adv", [INACTIVE, CLAMPED], ids=["clamp-inactive", "clamp-active"])
def test_weighted_sum_equals_one_backward_on_r_bar(adv: torch.Tensor) -> None:
    policy, terms = setup_batch()
    r = interpolation_coefficient(adv, A_MAX).T  # [K, B]
    if adv is CLAMPED:
        assert (r == 0).any() and (r == 1).any()
    grads = per_reward_grads(policy, terms, r)
    weights = torch.tensor([0.7, 2.3, 0.05], dtype=torch.float64)
    expected = weights @ grads

    r_bar, total = aggregate_coefficients(r, weights)
    assert ((r_bar >= 0) & (r_bar <= 1)).all()
    amortised = total * flat_grad(nft_objective(terms, r_bar, beta=BETA, a_max=A_MAX), policy)
    torch.testing.assert_close(amortised, expected, rtol=1e-10, atol=1e-12)


def test_harmonized_direction_from_one_backward() -> None:
    """The cached MARBLE weights reproduce the harmonised direction with a single backward."""
    policy, terms = setup_batch(seed=1)
    r = interpolation_coefficient(CLAMPED, A_MAX).T
    grads = per_reward_grads(policy, terms, r)
    result = harmonize(grads)
    assert not result.dropped.any()
    r_bar, total = aggregate_coefficients(r, result.weights)
    amortised = total * flat_grad(nft_objective(terms, r_bar, beta=BETA, a_max=A_MAX), policy)
    torch.testing.assert_close(amortised, result.direction, rtol=1e-9, atol=1e-12)
    # And the single-backward direction conflicts with no reward.
    cos = grads @ amortised / (grads.norm(dim=1) * amortised.norm())
    assert float(cos.min()) >= -1e-9


def test_aggregated_advantage_matches_only_without_clamp() -> None:
    policy, terms = setup_batch(seed=2)
    weights = torch.tensor([0.7, 2.3, 0.05], dtype=torch.float64)
    total = weights.sum()
    for adv, should_match in ((INACTIVE, True), (CLAMPED, False)):
        r = interpolation_coefficient(adv, A_MAX).T
        expected = weights @ per_reward_grads(policy, terms, r)
        a_bar = aggregate_advantages(adv, weights / total)
        r_a = interpolation_coefficient(a_bar, A_MAX)
        via_a_bar = total * flat_grad(nft_objective(terms, r_a, beta=BETA, a_max=A_MAX), policy)
        relative = float((via_a_bar - expected).norm() / expected.norm())
        if should_match:
            assert relative < 1e-10
        else:
            assert relative > 1e-3, relative


def test_paper_form_with_alpha() -> None:
    """The paper's statement: sum_k alpha_k grad l_k == grad l(r(sum_k alpha_k A_k)), clamp
    inactive."""
    policy, terms = setup_batch(seed=3)
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    r = interpolation_coefficient(INACTIVE, A_MAX).T
    expected = alpha @ per_reward_grads(policy, terms, r)
    r_a = interpolation_coefficient(aggregate_advantages(INACTIVE, alpha), A_MAX)
    got = flat_grad(nft_objective(terms, r_a, beta=BETA, a_max=A_MAX), policy)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
