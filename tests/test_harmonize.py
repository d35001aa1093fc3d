"""Tests of the min-norm QP and of gradient harmonisation (marble_lightning.harmonize)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from marble_lightning.harmonize import (
    Harmonized,
    harmonize,
    harmonize_gram,
    min_norm_coefficients,
)

SETTINGS = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------- samplers and references


@st.composite
def gradient_matrices(draw: st.DrawFn, min_k: int = 1, max_k: int = 16) -> np.ndarray:
    """A ``[K, P]`` float64 gradient matrix with controlled rank, structure and scale.

    Covers full rank, low rank (collinear/coplanar gradients), duplicated rows, negated rows
    (exactly opposed rewards), very different row norms and global scales from 1e-12 to 1e12.
    """
    k = draw(st.integers(min_k, max_k))
    p = draw(st.integers(1, 40))
    rank = draw(st.integers(1, min(k, p)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    grads = rng.standard_normal((k, rank)) @ rng.standard_normal((rank, p))
    if k > 1 and draw(st.booleans()):  # duplicate or negate a row
        i, j = rng.choice(k, size=2, replace=False)
        grads[i] = grads[j] * (draw(st.sampled_from([1.0, -1.0, 3.0])))
    if draw(st.booleans()):  # per-row norms spread over 4 orders of magnitude
        grads *= 10.0 ** rng.uniform(-2, 2, size=(k, 1))
    scale = 10.0 ** draw(st.integers(-12, 12))
    return grads * scale


def normalized(grads: np.ndarray) -> np.ndarray:
    return grads / np.linalg.norm(grads, axis=1, keepdims=True)


def reference_min_norm(matrix: np.ndarray) -> float:
    """Minimum of ``a^T M a`` on the simplex by SLSQP (scipy), best of several starts."""
    k = matrix.shape[0]
    starts = [np.full(k, 1.0 / k)] + [np.eye(k)[i] for i in range(min(k, 4))]
    best = np.inf
    for start in starts:
        result = minimize(
            lambda a: a @ matrix @ a,
            start,
            jac=lambda a: 2.0 * matrix @ a,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * k,
            constraints=[
                {"type": "eq", "fun": lambda a: a.sum() - 1.0, "jac": lambda a: np.ones(k)}
            ],
            options={"ftol": 1e-16, "maxiter": 2000},
        )
        alpha = np.clip(result.x, 0.0, None)
        alpha /= alpha.sum()
        best = min(best, float(alpha @ matrix @ alpha))
    return best


def min_norm_point(result: Harmonized, grads: np.ndarray) -> np.ndarray:
    """``d* = sum_k alpha_k g^_k`` over the non-dropped rewards."""
    kept = ~result.dropped.numpy()
    return result.alpha.numpy()[kept] @ normalized(grads[kept])


# ---------------------------------------------------------------- min_norm_coefficients


@SETTINGS
@given(gradient_matrices())
def test_min_norm_on_simplex_and_optimal(grads: np.ndarray) -> None:
    """On any PSD Gram matrix (raw, unnormalised, rank-deficient, any scale): simplex + optimal."""
    gram = grads @ grads.T
    alpha = min_norm_coefficients(torch.from_numpy(gram)).numpy()
    assert alpha.shape == (grads.shape[0],)
    assert (alpha >= 0).all()
    assert alpha.sum() == pytest.approx(1.0, abs=1e-12)
    scale = np.trace(gram) / len(gram)  # compare objectives on the unit-mean-diagonal scale
    ours = alpha @ gram @ alpha / scale
    reference = reference_min_norm(gram / scale)
    assert ours <= reference + 1e-6
    assert ours >= reference - 1e-6
    assert ours <= np.diag(gram).min() / scale + 1e-9  # no worse than any vertex
    uniform = np.full(len(gram), 1.0 / len(gram))
    assert ours <= uniform @ gram @ uniform / scale + 1e-9


def test_min_norm_known_values() -> None:
    # Orthogonal unit vectors: the midpoint.
    alpha = min_norm_coefficients(torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(alpha, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # Obtuse pair g1 = (1, 0), g2 = (-1, 2): min-norm point (0.5, 0.5) = 0.75 g1 + 0.25 g2.
    alpha = min_norm_coefficients(torch.tensor([[1.0, -1.0], [-1.0, 5.0]], dtype=torch.float64))
    torch.testing.assert_close(alpha, torch.tensor([0.75, 0.25], dtype=torch.float64))
    # Acute pair where a vertex is optimal: g1 = (1, 0), g2 = (2, 1), g1 . g2 >= ||g1||^2.
    alpha = min_norm_coefficients(torch.tensor([[1.0, 2.0], [2.0, 5.0]], dtype=torch.float64))
    torch.testing.assert_close(
        alpha, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0
    )
    # Standard basis of R^3.
    alpha = min_norm_coefficients(torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(alpha, torch.full((3,), 1.0 / 3, dtype=torch.float64))
    # Exactly opposed unit vectors: the zero vector, reached at the midpoint.
    alpha = min_norm_coefficients(torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(
        alpha, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_min_norm_singular_inputs() -> None:
    # Duplicated gradients (singular Gram): the weight is split equally between duplicates.
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    alpha = min_norm_coefficients(g @ g.T)
    torch.testing.assert_close(alpha, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    # A zero gradient has norm 0: all the weight goes to it.
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    alpha = min_norm_coefficients(g @ g.T)
    torch.testing.assert_close(
        alpha, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-9, rtol=0
    )
    # All zero: every alpha is optimal; uniform is returned.
    torch.testing.assert_close(min_norm_coefficients(torch.zeros(4, 4)), torch.full((4,), 0.25))
    # Rank one, 64 collinear gradients of different signs: the optimum is 0.
    rng = np.random.default_rng(0)
    g = np.outer(rng.standard_normal(64), rng.standard_normal(7))
    alpha = min_norm_coefficients(torch.from_numpy(g @ g.T)).numpy()
    assert np.linalg.norm(alpha @ g) <= 1e-4 * np.linalg.norm(g, axis=1).mean()


def test_min_norm_k1_dtype_device() -> None:
    torch.testing.assert_close(min_norm_coefficients(torch.tensor([[4.0]])), torch.tensor([1.0]))
    torch.testing.assert_close(min_norm_coefficients(torch.zeros(1, 1)), torch.tensor([1.0]))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        alpha = min_norm_coefficients(torch.eye(3, dtype=dtype))
        assert alpha.dtype == dtype and alpha.device == torch.device("cpu")


@pytest.mark.parametrize(
    ("gram", "match"),
    [
        (torch.ones(2, 3), "square"),
        (torch.ones(3), "square"),
        (torch.zeros(0, 0), "at least one row"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "finite"),
        (torch.tensor([[1.0, 0.0], [0.0, float("inf")]]), "finite"),
        (torch.tensor([[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
        (torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), "non-negative diagonal"),
    ],
)
def test_min_norm_rejects_invalid(gram: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        min_norm_coefficients(gram)
    with pytest.raises(ValueError, match=match):
        harmonize_gram(gram)


def test_min_norm_rejects_bad_options() -> None:
    with pytest.raises(TypeError, match="torch.Tensor"):
        min_norm_coefficients(np.eye(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="regularization"):
        min_norm_coefficients(torch.eye(2), regularization=-1.0)
    with pytest.raises(ValueError, match="rescale"):
        harmonize(torch.eye(2), rescale="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="norm_tol"):
        harmonize(torch.eye(2), norm_tol=-1.0)


def test_min_norm_tolerates_float32_asymmetry() -> None:
    """A Gram matrix computed in float32 need not be bitwise symmetric; small asymmetry is fine."""
    gram = torch.tensor([[1.0, 0.3], [0.3 + 1e-7, 2.0]])
    alpha = min_norm_coefficients(gram)
    assert alpha.dtype == torch.float32 and float(alpha.sum()) == pytest.approx(1.0)


# ---------------------------------------------------------------- harmonize: properties


@SETTINGS
@given(gradient_matrices())
def test_harmonize_kkt_and_objective(grads: np.ndarray) -> None:
    """KKT of the QP on the normalised gradients; objective <= vertices and uniform; SLSQP
    agrees."""
    result = harmonize(torch.from_numpy(grads))
    k = grads.shape[0]
    assert not result.dropped.any()
    alpha = result.alpha.numpy()
    assert (alpha >= 0).all() and alpha.sum() == pytest.approx(1.0, abs=1e-12)

    unit = normalized(grads)
    d_star = alpha @ unit
    objective = d_star @ d_star
    projections = unit @ d_star  # g^_k . d*
    assert (projections >= objective - 1e-7).all()  # stationarity + dual feasibility
    support = alpha > 1e-6
    np.testing.assert_allclose(projections[support], objective, atol=1e-6)  # complementarity

    assert objective <= 1.0 + 1e-9  # every vertex has objective ||g^_k||^2 = 1
    uniform = unit.mean(axis=0)
    assert objective <= uniform @ uniform + 1e-9
    assert objective == pytest.approx(reference_min_norm(unit @ unit.T), abs=1e-6)

    # The worst-reward cosine is never negative: cos_k >= ||d*|| >= 0 (up to round-off).
    assert float(result.worst_cosine) >= -1e-6
    assert result.cosines.shape == (k,)


@SETTINGS
@given(gradient_matrices(), st.sampled_from(["mean_norm", "none"]))
def test_harmonize_direction_weights_cosines_consistent(grads: np.ndarray, rescale: str) -> None:
    result = harmonize(torch.from_numpy(grads), rescale=rescale)  # type: ignore[arg-type]
    norms = np.linalg.norm(grads, axis=1)
    np.testing.assert_allclose(result.norms.numpy(), norms, rtol=1e-12)
    direction = result.direction.numpy()
    weights = result.weights.numpy()
    bound = np.abs(weights) @ np.abs(grads)  # round-off scale of each entry of sum_k w_k g_k
    np.testing.assert_allclose(direction, weights @ grads, rtol=0, atol=1e-12 * bound.max())
    m = norms.mean() if rescale == "mean_norm" else 1.0
    np.testing.assert_allclose(result.weights.numpy(), m * result.alpha.numpy() / norms, rtol=1e-12)
    d_star = min_norm_point(result, grads)
    np.testing.assert_allclose(
        direction, m * d_star, rtol=1e-9, atol=1e-9 * m * max(1.0, norms.mean() / m)
    )
    # cosines are reported as 0 at a numerically stationary point: ||d*||^2 <= 100 x the QP's
    # regularisation (1e-10), i.e. ||d*|| <= 1e-4 (hypothesis found ||d*|| ~ 1e-5 cases)
    if np.linalg.norm(d_star) ** 2 > 100 * 1e-10 * (1 + 1e-6):
        cos = grads @ direction / (norms * np.linalg.norm(direction))
        np.testing.assert_allclose(result.cosines.numpy(), cos, atol=1e-6)
    np.testing.assert_allclose(
        result.gram.numpy(), grads @ grads.T, rtol=1e-12, atol=1e-12 * norms.max() ** 2
    )


@SETTINGS
@given(gradient_matrices(min_k=2), st.integers(0, 2**32 - 1))
def test_harmonize_permutation_equivariant(grads: np.ndarray, seed: int) -> None:
    perm = np.random.default_rng(seed).permutation(grads.shape[0])
    base = harmonize(torch.from_numpy(grads))
    permuted = harmonize(torch.from_numpy(grads[perm]))
    m = np.linalg.norm(grads, axis=1).mean()  # direction = m d* with ||d*|| <= 1
    np.testing.assert_allclose(permuted.direction.numpy(), base.direction.numpy(), atol=1e-6 * m)
    np.testing.assert_allclose(permuted.alpha.numpy(), base.alpha.numpy()[perm], atol=1e-4)
    np.testing.assert_allclose(permuted.norms.numpy(), base.norms.numpy()[perm], rtol=1e-12)


@SETTINGS
@given(gradient_matrices(), st.integers(0, 15), st.floats(-6, 6))
def test_harmonize_invariant_to_rescaling_one_gradient(
    grads: np.ndarray, index: int, log_c: float
) -> None:
    """alpha, d* and the cosines depend only on the directions of the gradients."""
    k = index % grads.shape[0]
    scaled = grads.copy()
    scaled[k] *= 10.0**log_c
    # norm_tol=0: a 1e6 rescaling must not make the relative drop rule kick in here.
    base = harmonize(torch.from_numpy(grads), rescale="none", norm_tol=0.0)
    other = harmonize(torch.from_numpy(scaled), rescale="none", norm_tol=0.0)
    np.testing.assert_allclose(
        other.direction.numpy(), base.direction.numpy(), atol=1e-6
    )  # d* (unit)
    np.testing.assert_allclose(other.alpha.numpy(), base.alpha.numpy(), atol=1e-4)
    if np.linalg.norm(base.direction.numpy()) > 1e-6:
        np.testing.assert_allclose(other.cosines.numpy(), base.cosines.numpy(), atol=1e-6)


@SETTINGS
@given(gradient_matrices())
def test_harmonize_gram_matches_harmonize(grads: np.ndarray) -> None:
    tensor = torch.from_numpy(grads)
    full = harmonize(tensor)
    from_gram = harmonize_gram(tensor @ tensor.T)
    assert from_gram.direction is None
    for name in ("alpha", "norms", "weights", "cosines", "dropped", "gram"):
        torch.testing.assert_close(getattr(from_gram, name), getattr(full, name), rtol=0, atol=0)


# ---------------------------------------------------------------- harmonize: known values and edges


def test_harmonize_known_values() -> None:
    result = harmonize(torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64))

    def t(*x):
        return torch.tensor(x, dtype=torch.float64)

    torch.testing.assert_close(result.alpha, t(0.5, 0.5))
    torch.testing.assert_close(result.norms, t(1.0, 3.0))
    torch.testing.assert_close(result.weights, t(1.0, 1.0 / 3.0))  # m = 2
    torch.testing.assert_close(result.direction, t(1.0, 1.0))
    torch.testing.assert_close(result.cosines, t(2**-0.5, 2**-0.5))
    torch.testing.assert_close(result.worst_cosine, t(2**-0.5)[0])

    # Obtuse pair at 120 degrees with norms 2 and 4: d* bisects them, cos = sqrt((1 + c) / 2) = 1/2.
    g = torch.tensor([[2.0, 0.0], [-2.0, 2.0 * 3**0.5]], dtype=torch.float64)
    result = harmonize(g, rescale="none")
    torch.testing.assert_close(result.alpha, t(0.5, 0.5))
    torch.testing.assert_close(result.direction, t(0.25, 3**0.5 / 4))
    torch.testing.assert_close(result.cosines, t(0.5, 0.5))


def test_harmonize_conflicting_pair_gives_zero_direction() -> None:
    g = torch.tensor([[1.0, 2.0, 3.0], [-2.0, -4.0, -6.0]], dtype=torch.float64)
    result = harmonize(g)
    torch.testing.assert_close(
        result.alpha, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert float(result.direction.norm()) <= 1e-6
    assert torch.isfinite(result.cosines).all()


def test_harmonize_drops_negligible_rewards() -> None:
    rng = np.random.default_rng(1)
    grads = rng.standard_normal((3, 10))
    with_zero = np.concatenate([grads[:1], np.zeros((1, 10)), grads[1:], 1e-9 * grads[:1]])
    result = harmonize(torch.from_numpy(with_zero))
    reference = harmonize(torch.from_numpy(grads))
    assert result.dropped.tolist() == [False, True, False, False, True]
    kept = ~result.dropped
    torch.testing.assert_close(result.alpha[kept], reference.alpha)
    torch.testing.assert_close(result.weights[kept], reference.weights)
    torch.testing.assert_close(result.cosines[kept], reference.cosines)
    torch.testing.assert_close(result.direction, reference.direction)
    assert result.alpha[~kept].eq(0).all() and result.weights[~kept].eq(0).all()
    assert result.cosines[~kept].eq(0).all()
    torch.testing.assert_close(result.worst_cosine, reference.worst_cosine)
    # An absolute tolerance drops small but otherwise valid gradients.
    small = harmonize(torch.from_numpy(grads * [[1.0], [1e-3], [1.0]]), abs_norm_tol=1e-2)
    assert small.dropped.tolist() == [False, True, False]


def test_harmonize_all_dropped_is_zero_not_nan() -> None:
    result = harmonize(torch.zeros(3, 7))
    assert result.dropped.all()
    for name in ("alpha", "weights", "cosines", "direction"):
        assert getattr(result, name).eq(0).all(), name
    assert float(result.worst_cosine) == 0.0


def test_harmonize_k1() -> None:
    g = torch.tensor([[3.0, 4.0]])
    result = harmonize(g)
    torch.testing.assert_close(result.alpha, torch.tensor([1.0]))
    torch.testing.assert_close(result.direction, g[0])  # m * g^ = n * g / n
    torch.testing.assert_close(result.cosines, torch.tensor([1.0]))


def test_harmonize_sequence_and_shapes() -> None:
    rng = np.random.default_rng(2)
    rows = [
        torch.from_numpy(rng.standard_normal((3, 4))),
        torch.from_numpy(rng.standard_normal(12)),
    ]
    from_list = harmonize(rows)
    from_matrix = harmonize(torch.stack([r.reshape(-1) for r in rows]))
    torch.testing.assert_close(from_list.direction, from_matrix.direction)
    from_3d = harmonize(torch.stack([rows[0], rows[1].reshape(3, 4)]))
    torch.testing.assert_close(from_3d.direction, from_matrix.direction)
    with pytest.raises(ValueError, match="same number of elements"):
        harmonize([torch.ones(3), torch.ones(4)])
    with pytest.raises(ValueError, match="at least one"):
        harmonize([])
    with pytest.raises(ValueError, match=r"\[K, P\]"):
        harmonize(torch.ones(5))
    with pytest.raises(ValueError, match=r"reward\(s\) \[1\]"):
        harmonize(torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]))


def test_harmonize_float32_dtype_device_and_accuracy() -> None:
    rng = np.random.default_rng(3)
    grads = rng.standard_normal((5, 1000))
    result32 = harmonize(torch.from_numpy(grads).float())
    result64 = harmonize(torch.from_numpy(grads))
    for name in ("alpha", "norms", "weights", "cosines", "direction"):
        assert getattr(result32, name).dtype == torch.float32, name
        np.testing.assert_allclose(
            getattr(result32, name).numpy(), getattr(result64, name).numpy(), atol=1e-4
        )
    assert result32.dropped.dtype == torch.bool


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_harmonize_on_cuda() -> None:
    grads = torch.randn(4, 100, device="cuda")
    result = harmonize(grads)
    for name in ("alpha", "norms", "weights", "cosines", "direction", "dropped"):
        assert getattr(result, name).device.type == "cuda", name
    cpu = harmonize(grads.cpu())
    torch.testing.assert_close(result.alpha.cpu(), cpu.alpha, atol=1e-5, rtol=1e-4)
