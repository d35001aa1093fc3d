"""Groups, preference weights and the alpha floor (marble_lightning.harmonize), TorchJD-style
property tests against independent computations (explicit group vectors, scipy, brute force)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from marble_lightning.harmonize import (
    bounded_min_norm_coefficients,
    harmonize_gram,
    harmonize_groups_gram,
    min_norm_coefficients,
    weights_from_alpha,
)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def grads_and_groups(draw: st.DrawFn, max_k: int = 7):
    k = draw(st.integers(1, max_k))
    p = draw(st.integers(2, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    grads = rng.standard_normal((k, p)) * 10.0 ** rng.uniform(-2, 2, size=(k, 1))
    labels = [draw(st.integers(0, k - 1)) for _ in range(k)]
    groups = [[i for i in range(k) if labels[i] == g] for g in sorted(set(labels))]
    return grads, groups


def slsqp_bounded(matrix: np.ndarray, floor: float) -> float:
    """Minimum of ``x^T M x`` over ``sum x = 1, x >= floor`` (scipy SLSQP, several starts)."""
    k = matrix.shape[0]
    best = np.inf
    starts = [np.full(k, 1.0 / k)] + [floor + (1 - k * floor) * np.eye(k)[i] for i in range(k)]
    for start in starts:
        res = minimize(
            lambda x: x @ matrix @ x,
            start,
            jac=lambda x: 2 * matrix @ x,
            method="SLSQP",
            bounds=[(floor, 1.0)] * k,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0}],
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        x = np.clip(res.x, floor, None)
        x = (
            floor + (1 - k * floor) * (x - floor) / max((x - floor).sum(), 1e-300)
            if k * floor < 1
            else x
        )
        best = min(best, float(x @ matrix @ x))
    return best


def explicit_group_direction(grads, groups, member_weights, preference, beta):
    """d = sum_j beta_j h^_j / p_j from explicit vectors (no Gram matrices)."""
    unit = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    d = np.zeros(grads.shape[1])
    for j, group in enumerate(groups):
        c = np.array([member_weights[i] for i in group])
        h = (c / c.sum()) @ unit[group]
        d += beta[j] * h / np.linalg.norm(h) / preference[j]
    return d


# ---------------------------------------------------------------- bounded QP


@SETTINGS
@given(st.integers(1, 6), st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_bounded_kkt_and_slsqp(k: int, seed: int, fraction: float) -> None:
    """KKT with bounds: free coordinates share the smallest (M x)_j, those at the floor have a
    larger one; objective equals scipy's bounded minimum."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((k, max(1, k - 1)))  # rank-deficient on purpose
    m = g @ g.T + 1e-3 * np.eye(k)
    floor = fraction / k
    x = bounded_min_norm_coefficients(torch.from_numpy(m), floor=floor).numpy()
    assert x.sum() == pytest.approx(1.0, abs=1e-10)
    assert (x >= floor - 1e-10).all()
    grad = m @ x
    free = x > floor + 1e-6
    if free.any():
        lam = grad[free].min()
        np.testing.assert_allclose(grad[free], lam, rtol=1e-5, atol=1e-6)
        assert (grad >= lam - 1e-6 * max(1.0, abs(lam))).all()  # multipliers of the bounds >= 0
    assert x @ m @ x == pytest.approx(slsqp_bounded(m, floor), rel=1e-6, abs=1e-9)


def test_bounded_brute_force_small_k() -> None:
    """K = 3 on a fine simplex grid restricted to x >= floor: no grid point is better."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        g = rng.standard_normal((3, 2))
        m = g @ g.T
        floor = rng.uniform(0, 1 / 3)
        x = bounded_min_norm_coefficients(torch.from_numpy(m), floor=floor).numpy()
        ours = x @ m @ x
        n = 200
        best = np.inf
        for i, j in itertools.product(range(n + 1), repeat=2):
            a, b = i / n, j / n
            c = 1 - a - b
            if c < 0:
                continue
            y = floor + (1 - 3 * floor) * np.array([a, b, c])
            best = min(best, y @ m @ y)
        assert ours <= best + 1e-9


def test_floor_zero_is_plain_and_infeasible_floor_errors() -> None:
    rng = np.random.default_rng(1)
    g = rng.standard_normal((4, 6))
    m = torch.from_numpy(g @ g.T)
    assert torch.equal(bounded_min_norm_coefficients(m, floor=0.0), min_norm_coefficients(m))
    np.testing.assert_allclose(bounded_min_norm_coefficients(m, floor=0.25).numpy(), 0.25)
    with pytest.raises(ValueError, match=r"infeasible.*4 \* floor <= 1"):
        bounded_min_norm_coefficients(m, floor=0.3)
    with pytest.raises(ValueError, match="infeasible"):
        harmonize_groups_gram(m, groups=[[0, 1], [2], [3]], floor=0.34)
    harmonize_groups_gram(m, groups=[[0, 1], [2], [3]], floor=1 / 3)  # J * floor = 1 is feasible


# ---------------------------------------------------------------- groups


@SETTINGS
@given(grads_and_groups())
def test_groups_of_one_are_plain_marble(case) -> None:
    grads, _ = case
    gram = torch.from_numpy(grads @ grads.T)
    plain = harmonize_gram(gram)
    grouped = harmonize_groups_gram(gram, groups=[[i] for i in range(len(grads))])
    for field in ("alpha", "norms", "weights", "cosines"):
        np.testing.assert_allclose(
            getattr(grouped, field).numpy(), getattr(plain, field).numpy(), atol=1e-7, rtol=1e-6
        )
    assert torch.equal(grouped.dropped, plain.dropped)


@SETTINGS
@given(grads_and_groups(), st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_groups_against_explicit_vectors(case, seed: int, fraction: float) -> None:
    """The direction equals sum_j beta_j h^_j / p_j built from explicit vectors; beta is the bounded
    min-norm point of those vectors (scipy); weights/alpha are consistent with
    weights_from_alpha."""
    grads, groups = case
    k, j = len(grads), len(groups)
    rng = np.random.default_rng(seed)
    members = rng.uniform(0.2, 3.0, size=k)
    prefs = rng.uniform(0.3, 3.0, size=j)
    floor = fraction / j
    gram = torch.from_numpy(grads @ grads.T)
    h = harmonize_groups_gram(
        gram, groups=groups, member_weights=members.tolist(), preference=prefs.tolist(), floor=floor
    )
    beta = h.group_alpha.numpy()
    assert beta.sum() == pytest.approx(1.0, abs=1e-9) and (beta >= floor - 1e-9).all()
    d = explicit_group_direction(grads, groups, members, prefs, beta)
    ours = h.weights.numpy() @ grads
    # same direction up to the positive scale of the rescale
    cos = ours @ d / (np.linalg.norm(ours) * np.linalg.norm(d) + 1e-300)
    if np.linalg.norm(d) > 1e-6:
        assert cos == pytest.approx(1.0, abs=1e-6)
    # beta optimal on the explicit u_j vectors
    unit = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    u = []
    for jj, group in enumerate(groups):
        c = members[group] / members[group].sum()
        hv = c @ unit[group]
        u.append(hv / np.linalg.norm(hv) / prefs[jj])
    u = np.array(u)
    mu = u @ u.T
    assert beta @ mu @ beta == pytest.approx(slsqp_bounded(mu, floor), rel=1e-5, abs=1e-9)
    # alpha sums to 1, weights are weights_from_alpha(alpha, norms, dropped)
    assert h.alpha.sum().item() == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(
        weights_from_alpha(h.alpha, h.norms, h.dropped).numpy(), h.weights.numpy(), rtol=1e-10
    )
    # cosines are those of the direction with each reward gradient
    if np.linalg.norm(d) > 1e-4:
        expected = unit @ ours / np.linalg.norm(ours)
        np.testing.assert_allclose(h.cosines.numpy(), expected, atol=1e-6)


@SETTINGS
@given(grads_and_groups(), st.integers(0, 2**32 - 1))
def test_preference_kkt(case, seed: int) -> None:
    """floor = 0: h^_j . d >= p_j ||d||^2 with equality on groups with beta_j > 0."""
    grads, groups = case
    prefs = np.random.default_rng(seed).uniform(0.3, 3.0, size=len(groups))
    h = harmonize_groups_gram(
        torch.from_numpy(grads @ grads.T), groups=groups, preference=prefs.tolist()
    )
    beta = h.group_alpha.numpy()
    d = explicit_group_direction(grads, groups, np.ones(len(grads)), prefs, beta)
    unit = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    proj = []
    for group in groups:
        hv = unit[group].mean(axis=0)
        proj.append(hv @ d / np.linalg.norm(hv))
    proj = np.array(proj)
    dd = d @ d
    assert (proj >= prefs * dd - 1e-6).all()
    support = beta > 1e-6
    np.testing.assert_allclose(proj[support], prefs[support] * dd, atol=1e-6)


def test_group_balances_members_and_known_values() -> None:
    """Two aligned rewards grouped vs a third orthogonal one: the group counts once."""
    e = np.eye(3)
    grads = np.stack([e[0], e[0] * 5.0, e[1]])
    gram = torch.from_numpy(grads @ grads.T)
    plain = harmonize_gram(gram)  # duplicates split weight: alpha = (1/4, 1/4, 1/2)
    np.testing.assert_allclose(plain.alpha.numpy(), [0.25, 0.25, 0.5], atol=1e-6)
    grouped = harmonize_groups_gram(gram, groups=[[0, 1], [2]])
    np.testing.assert_allclose(grouped.group_alpha.numpy(), [0.5, 0.5], atol=1e-6)
    # preference 2 for the first group: h^_1 . d = 2 ||d||^2 -> beta = (4/5, 1/5) on u = (e0/2, e1)
    pref = harmonize_groups_gram(gram, groups=[[0, 1], [2]], preference=[2.0, 1.0])
    np.testing.assert_allclose(pref.group_alpha.numpy(), [0.8, 0.2], atol=1e-6)
    floor = harmonize_groups_gram(
        torch.from_numpy(np.array([[1.0, -1.0], [-1.0, 1.0]]) + 0.0), floor=0.1
    )
    np.testing.assert_allclose(floor.group_alpha.numpy(), [0.5, 0.5], atol=1e-6)


def test_groups_validation_and_dropped() -> None:
    gram = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="partition"):
        harmonize_groups_gram(gram, groups=[[0, 1]])
    with pytest.raises(ValueError, match="partition"):
        harmonize_groups_gram(gram, groups=[[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="preference"):
        harmonize_groups_gram(gram, groups=[[0, 1], [2]], preference=[1.0, -1.0])
    with pytest.raises(ValueError, match="member_weights"):
        harmonize_groups_gram(gram, member_weights=[1.0, 2.0])
    gram[1, 1] = 0.0
    h = harmonize_groups_gram(gram, groups=[[0, 1], [2]], floor=0.2)
    assert h.dropped.tolist() == [False, True, False]
    assert h.alpha[1] == 0 and h.weights[1] == 0
    zero = harmonize_groups_gram(torch.zeros(2, 2, dtype=torch.float64))
    assert zero.dropped.all() and float(zero.alpha.abs().sum()) == 0.0
