"""Tests of the DiffusionNFT objective (marble_lightning.nft) against an independent derivation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_lightning.nft import (
    NFTTerms,
    aggregate_advantages,
    aggregate_coefficients,
    interpolation_coefficient,
    kl_loss,
    nft_loss,
    nft_objective,
    nft_terms,
)


def make_batch(seed: int, b: int = 4, shape: tuple[int, ...] = (2, 3, 3), dtype=torch.float64):
    """A flow-matching batch: x_t = (1 - t) x0 + t eps, velocities near the target eps - x0."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *shape, generator=gen, dtype=dtype)
    eps = torch.randn(b, *shape, generator=gen, dtype=dtype)
    t = torch.rand(b, generator=gen, dtype=dtype) * 0.9 + 0.05
    tb = t.reshape(-1, *([1] * len(shape)))
    x_t = (1 - tb) * x0 + tb * eps
    v_old = eps - x0 + 0.3 * torch.randn(b, *shape, generator=gen, dtype=dtype)
    v = v_old + 0.2 * torch.randn(b, *shape, generator=gen, dtype=dtype)
    return v, v_old, x_t, x0, t


def reference_loss(v, v_old, x_t, x0, t, r, beta, a_max) -> float:
    """The NFT loss (marble_lightning/nft.py) per sample in numpy, independently of the module."""
    v, v_old, x_t, x0, t, r = (np.asarray(a, dtype=np.float64) for a in (v, v_old, x_t, x0, t, r))
    total = 0.0
    for i in range(v.shape[0]):
        v_pos = beta * v[i] + (1 - beta) * v_old[i]
        v_neg = (1 + beta) * v_old[i] - beta * v[i]
        x0_pos = x_t[i] - t[i] * v_pos
        x0_neg = x_t[i] - t[i] * v_neg
        l_pos = np.mean((x0_pos - x0[i]) ** 2) / max(np.mean(np.abs(x0_pos - x0[i])), 1e-5)
        l_neg = np.mean((x0_neg - x0[i]) ** 2) / max(np.mean(np.abs(x0_neg - x0[i])), 1e-5)
        total += r[i] * l_pos + (1 - r[i]) * l_neg
    return a_max * total / v.shape[0] / beta


# ---------------------------------------------------------------- interpolation coefficient


def test_interpolation_coefficient_values() -> None:
    adv = torch.tensor([-100.0, -5.0, -2.5, 0.0, 1.0, 2.5, 5.0, 7.0, float("inf")])
    expected = torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 0.75, 1.0, 1.0, 1.0])
    torch.testing.assert_close(interpolation_coefficient(adv, 5.0), expected)
    torch.testing.assert_close(
        interpolation_coefficient(torch.tensor([1.0]), 2.0), torch.tensor([0.75])
    )
    with pytest.raises(ValueError, match="a_max"):
        interpolation_coefficient(adv, 0.0)


# ---------------------------------------------------------------- the loss


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 10_000),
    st.sampled_from([1.0, 0.1, 0.5, 2.0]),
    st.sampled_from([5.0, 1.0]),
    st.booleans(),
)
def test_nft_loss_matches_rederivation(seed: int, beta: float, a_max: float, clamp: bool) -> None:
    v, v_old, x_t, x0, t = make_batch(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    adv = torch.randn(v.shape[0], generator=gen, dtype=torch.float64) * (8.0 if clamp else 1.0)
    r = interpolation_coefficient(adv, a_max)
    loss, terms = nft_loss(v, v_old, x_t, x0, t, r, beta=beta, a_max=a_max)
    expected = reference_loss(v, v_old, x_t, x0, t, r, beta, a_max)
    assert loss.shape == ()
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert terms.positive.shape == terms.negative.shape == (v.shape[0],)


def test_nft_loss_normaliser_floor_and_symmetry() -> None:
    _, v_old, x_t, x0, t = make_batch(0)
    # An exact positive policy: x0+ == x0 for sample 0 with beta = 1 -> L+_0 = 0 (floor, no NaN).
    tb = t.reshape(-1, 1, 1, 1)
    v_exact = (x_t - x0) / tb
    terms = nft_terms(v_exact, v_old, x_t, x0, t, beta=1.0)
    torch.testing.assert_close(terms.positive, torch.zeros_like(terms.positive), atol=1e-12, rtol=0)
    assert torch.isfinite(terms.negative).all() and (terms.negative > 0).all()
    # v == v_old: both implicit policies coincide, L+ == L-, and l does not depend on r.
    terms = nft_terms(v_old, v_old, x_t, x0, t, beta=0.3)
    torch.testing.assert_close(terms.positive, terms.negative)
    r = torch.stack([torch.zeros(4), torch.ones(4), torch.rand(4)]).double()
    losses = nft_objective(terms, r, beta=0.3)
    torch.testing.assert_close(losses, losses[0].expand(3))


def test_nft_objective_batched_rewards_equal_separate_calls() -> None:
    v, v_old, x_t, x0, t = make_batch(1)
    terms = nft_terms(v, v_old, x_t, x0, t, beta=0.5)
    r = torch.rand(3, 4, dtype=torch.float64)
    losses = nft_objective(terms, r, beta=0.5, a_max=5.0)
    assert losses.shape == (3,)
    for k in range(3):
        torch.testing.assert_close(losses[k], nft_objective(terms, r[k], beta=0.5, a_max=5.0))


def test_nft_time_shapes_are_equivalent() -> None:
    v, v_old, x_t, x0, t = make_batch(2)
    base = nft_terms(v, v_old, x_t, x0, t)
    full = nft_terms(v, v_old, x_t, x0, t.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(full.positive, base.positive)
    same_t = nft_terms(v, v_old, x_t, x0, 0.4)
    torch.testing.assert_close(
        same_t.positive, nft_terms(v, v_old, x_t, x0, torch.full((4,), 0.4)).positive
    )


def test_nft_v_old_is_detached() -> None:
    v, v_old, x_t, x0, t = make_batch(3)
    v = v.clone().requires_grad_(True)
    v_old = v_old.clone().requires_grad_(True)
    loss, _ = nft_loss(v, v_old, x_t, x0, t, torch.full((4,), 0.7, dtype=torch.float64))
    loss.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert v_old.grad is None


def test_nft_gradcheck_float64() -> None:
    """torch.autograd.gradcheck w.r.t. v where the adaptive normaliser sits at its floor.

    There the normaliser is the constant 1e-5, so its stop-gradient does not change the
    derivative and finite differences see the same function: every input is scaled to ~1e-6 so
    that ``mean|x0± - x0| < 1e-5`` (and no digits are lost to cancellation).
    """
    v, v_old, x_t, x0, t = make_batch(4)
    v, v_old, x_t, x0 = (a * 1e-6 for a in (v, v_old, x_t, x0))
    v = v.clone().requires_grad_(True)
    r = torch.tensor([0.0, 0.3, 0.8, 1.0], dtype=torch.float64)
    beta = 0.7
    tb = t.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        for v_policy in (beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v):
            assert float((x_t - tb * v_policy - x0).abs().mean(dim=(1, 2, 3)).max()) < 1e-5

    def fn(v_: torch.Tensor) -> torch.Tensor:
        return nft_loss(v_, v_old, x_t, x0, t, r, beta=beta, a_max=5.0)[0]

    assert torch.autograd.gradcheck(fn, (v,), eps=1e-9, atol=1e-10, rtol=1e-6)


def test_nft_gradient_matches_frozen_normaliser_finite_differences() -> None:
    """In the normal regime the gradient is that of the loss with the normaliser held fixed."""
    v, v_old, x_t, x0, t = make_batch(6, b=3, shape=(1, 2, 2))
    r = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    beta, a_max = 0.6, 5.0
    v = v.clone().requires_grad_(True)
    loss, _ = nft_loss(v, v_old, x_t, x0, t, r, beta=beta, a_max=a_max)
    (grad,) = torch.autograd.grad(loss, v)

    tb = t.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        scale_pos = (x_t - tb * (beta * v + (1 - beta) * v_old) - x0).abs().mean(dim=(1, 2, 3))
        scale_neg = (x_t - tb * ((1 + beta) * v_old - beta * v) - x0).abs().mean(dim=(1, 2, 3))

    def frozen(vv: torch.Tensor) -> float:
        err_pos = x_t - tb * (beta * vv + (1 - beta) * v_old) - x0
        err_neg = x_t - tb * ((1 + beta) * v_old - beta * vv) - x0
        l_pos = err_pos.square().mean(dim=(1, 2, 3)) / scale_pos
        l_neg = err_neg.square().mean(dim=(1, 2, 3)) / scale_neg
        return float(a_max * (r * l_pos + (1 - r) * l_neg).mean() / beta)

    numeric = torch.zeros_like(v)
    h = 1e-6
    flat = numeric.view(-1)
    base = v.detach().clone()
    for j in range(base.numel()):
        plus, minus = base.clone(), base.clone()
        plus.view(-1)[j] += h
        minus.view(-1)[j] -= h
        flat[j] = (frozen(plus) - frozen(minus)) / (2 * h)
    torch.testing.assert_close(grad, numeric, atol=1e-8, rtol=1e-6)


def test_kl_loss() -> None:
    v = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    v_ref = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    assert float(kl_loss(v, v_ref).detach()) == pytest.approx(
        float(((v - v_ref) ** 2).sum().detach() / v.numel())
    )
    assert torch.autograd.gradcheck(lambda x: kl_loss(x, v_ref), (v,))
    with pytest.raises(ValueError, match="v_ref"):
        kl_loss(v, v_ref[:2])


def test_nft_validation() -> None:
    v, v_old, x_t, x0, t = make_batch(7)
    r = torch.full((4,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v, v_old, x_t, x0, t, r, beta=0.0)
    with pytest.raises(ValueError, match="a_max"):
        nft_loss(v, v_old, x_t, x0, t, r, a_max=-1.0)
    with pytest.raises(ValueError, match="v_old"):
        nft_terms(v, v_old[:, :1], x_t, x0, t)
    with pytest.raises(ValueError, match="x0"):
        nft_terms(v, v_old, x_t, x0[:3], t)
    with pytest.raises(ValueError, match="`t`"):
        nft_terms(v, v_old, x_t, x0, torch.rand(3))
    with pytest.raises(ValueError, match="`v`"):
        nft_terms(v[0, 0, 0], v_old[0, 0, 0], x_t[0, 0, 0], x0[0, 0, 0], 0.5)
    terms = nft_terms(v, v_old, x_t, x0, t)
    with pytest.raises(ValueError, match=r"\[B\] or \[K, B\]"):
        nft_objective(terms, torch.rand(5))
    with pytest.raises(ValueError, match=r"\[B\] or \[K, B\]"):
        nft_objective(terms, torch.rand(2, 2, 4))
    with pytest.raises(ValueError, match="terms"):
        nft_objective(NFTTerms(torch.rand(4), torch.rand(3)), r)


# ---------------------------------------------------------------- aggregation


def test_aggregate_coefficients_values() -> None:
    r = torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 0.25]], dtype=torch.float64)
    weights = torch.tensor([1.0, 3.0])
    r_bar, total = aggregate_coefficients(r, weights)
    torch.testing.assert_close(r_bar, torch.tensor([0.75, 1.0, 0.3125], dtype=torch.float64))
    assert total.dtype == torch.float64 and float(total) == 4.0
    # A zero weight (dropped reward) simply removes that reward.
    r_bar, total = aggregate_coefficients(r, torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(r_bar, r[1])
    assert float(total) == 2.0


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        (torch.tensor([0.0, 0.0]), "positive sum"),
        (torch.tensor([1.0, -0.5]), "non-negative"),
        (torch.tensor([1.0, float("nan")]), "finite"),
        (torch.tensor([1.0, 2.0, 3.0]), r"shape \[K\]"),
    ],
)
def test_aggregate_coefficients_rejects(weights: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aggregate_coefficients(torch.rand(2, 5), weights)


def test_aggregate_advantages_values() -> None:
    adv = torch.tensor([[1.0, -2.0, 4.0], [0.0, 0.0, 10.0]])
    alpha = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    torch.testing.assert_close(aggregate_advantages(adv, alpha), torch.tensor([1.0, 2.5]))
    with pytest.raises(ValueError, match="alpha"):
        aggregate_advantages(adv, alpha[:2])
    with pytest.raises(ValueError, match="adv"):
        aggregate_advantages(adv[0], alpha)
