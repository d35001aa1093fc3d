"""Gradient-space reward balancing: the min-norm point of the normalised reward gradients.

Given ``K`` per-reward gradients ``g_k`` (rows of a ``[K, P]`` matrix), MARBLE normalises them,
``g^_k = g_k / n_k`` with ``n_k = ||g_k||``, and finds the convex combination of smallest norm:

.. math::

    \\alpha^* = \\arg\\min_{\\alpha \\in \\Delta_K} \\| \\sum_k \\alpha_k \\hat g_k \\|^2
             = \\arg\\min_{\\alpha \\in \\Delta_K} \\alpha^\\top M \\alpha,
    \\qquad M_{kl} = \\hat g_k \\cdot \\hat g_l .

The update direction is ``d = m * d*`` with ``d* = sum_k alpha_k g^_k`` and ``m`` the mean gradient
norm, so ``d = sum_k w_k g_k`` with effective weights ``w_k = m * alpha_k / n_k``. By the optimality
conditions of the QP, ``g^_k . d* >= ||d*||^2`` for every ``k``: the direction never conflicts with
any reward.

Everything except the final ``direction`` is a function of the raw Gram matrix
``G_kl = g_k . g_l`` alone, so :func:`harmonize_gram` maps a ``[K, K]`` Gram matrix to the weights
(this is what callers use when they compute the Gram matrix some faster way, or across ranks), and
:func:`harmonize` composes "Gram matrix of the rows" with it and forms the direction.

The QP is solved with ``quadprog`` in float64 numpy; tensors are converted only at that boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import quadprog
import torch
from torch import Tensor

from marble_lightning.checks import check_choice, check_float

__all__ = [
    "Harmonized",
    "GroupHarmonized",
    "bounded_min_norm_coefficients",
    "direction_cosines",
    "gram_cosines",
    "harmonize",
    "harmonize_gram",
    "harmonize_groups_gram",
    "min_norm_coefficients",
    "uniform_alpha",
    "weights_from_alpha",
]

Rescale = Literal["mean_norm", "none"]

_SYMMETRY_RTOL = 1e-4
"""Allowed asymmetry ``|G - G^T|``, relative to the largest diagonal entry of ``G``."""

_STATIONARY_TOL = 1e-12
"""``||d*||^2`` (unit gradients) at or below which the min-norm point counts as zero."""

_MAX_REGULARIZATION = 1e-4
"""Largest regularisation tried before :func:`min_norm_coefficients` gives up."""


@dataclass
class Harmonized:
    """The result of harmonising ``K`` reward gradients.

    Attributes:
        direction: ``[P]`` update direction ``d = sum_k weights_k g_k``, in the dtype and on the
            device of the gradients; ``None`` when only the Gram matrix was given
            (:func:`harmonize_gram`).
        alpha: ``[K]`` min-norm coefficients of the normalised gradients. Non-negative, summing to
            one over the non-dropped rewards, zero for dropped rewards (all zero if every reward
            was dropped).
        norms: ``[K]`` gradient norms ``n_k = ||g_k||`` (units of the gradients).
        weights: ``[K]`` effective weights ``w_k = m * alpha_k / n_k`` on the raw gradients
            (zero for dropped rewards), so that ``direction == sum_k w_k g_k``.
        cosines: ``[K]`` cosine between ``direction`` and ``g_k``; zero for dropped rewards and
            when the direction is numerically zero (``||d*||^2 <= max(100 * regularization,
            1e-12)``: the gradients are Pareto-stationary and the angle is round-off).
        dropped: ``[K]`` bool, rewards whose gradient norm was below the tolerance.
        gram: ``[K, K]`` raw Gram matrix ``G_kl = g_k . g_l`` the weights were computed from.
    """

    direction: Tensor | None
    alpha: Tensor
    norms: Tensor
    weights: Tensor
    cosines: Tensor
    dropped: Tensor
    gram: Tensor

    @property
    def worst_cosine(self) -> Tensor:
        """Smallest cosine between the direction and a non-dropped reward gradient.

        Returns:
            0-dim tensor; ``0`` if every reward was dropped.
        """
        kept = self.cosines[~self.dropped]
        if kept.numel() == 0:
            return self.cosines.new_zeros(())
        return kept.min()


def _gram_to_numpy(gram: Tensor) -> np.ndarray:
    """Validate a Gram-like matrix and return it as a float64 numpy array.

    Raises:
        TypeError: if ``gram`` is not a tensor.
        ValueError: if ``gram`` is not a square 2-D tensor, has a non-finite entry, is not
            symmetric within tolerance, or has a negative diagonal entry.
    """
    if not isinstance(gram, Tensor):
        raise TypeError(
            f"Parameter `gram` should be a torch.Tensor. Found `type(gram) = {type(gram)}`."
        )
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(
            f"Parameter `gram` should be a square matrix. Found `gram.shape = {tuple(gram.shape)}`."
        )
    if gram.shape[0] == 0:
        raise ValueError(
            "Parameter `gram` should have at least one row. Found `gram.shape = (0, 0)`."
        )
    array = gram.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(
            "Parameter `gram` should have finite entries. "
            f"Found `gram[{bad[0]}, {bad[1]}] = {array[bad[0], bad[1]]}`."
        )
    diagonal = np.diag(array)
    if (diagonal < 0).any():
        k = int(np.argmin(diagonal))
        raise ValueError(
            "Parameter `gram` should have a non-negative diagonal (squared norms). "
            f"Found `gram[{k}, {k}] = {diagonal[k]}`."
        )
    asymmetry = np.abs(array - array.T)
    tolerance = _SYMMETRY_RTOL * float(diagonal.max(initial=0.0))
    if asymmetry.max() > tolerance:
        i, j = np.unravel_index(int(np.argmax(asymmetry)), asymmetry.shape)
        raise ValueError(
            "Parameter `gram` should be symmetric. "
            f"Found `gram[{i}, {j}] = {array[i, j]}` and `gram[{j}, {i}] = {array[j, i]}` "
            f"(tolerance {tolerance:.3g})."
        )
    return 0.5 * (array + array.T)


def _solve_min_norm(matrix: np.ndarray, regularization: float) -> np.ndarray:
    """Solve ``min alpha^T M alpha`` over the simplex for a validated symmetric PSD ``M``.

    ``M`` is first divided by ``trace(M) / K`` (unit mean diagonal), which makes the problem
    scale-free, then ``regularization * I`` is added so that ``quadprog``'s Cholesky factorisation
    exists even when ``M`` is singular (duplicated, collinear or zero gradients). Among several
    optimal ``alpha`` of a singular problem this selects the one of smallest Euclidean norm, which
    splits weight equally between duplicated gradients. The regularisation moves the objective by
    at most ``regularization * trace(M) / K``. If ``quadprog`` still fails (round-off made the
    matrix indefinite), the regularisation is multiplied by 100 and the solve retried, up to
    ``1e-4``.
    """
    k = matrix.shape[0]
    if k == 1:
        return np.ones(1)
    scale = np.trace(matrix) / k
    if scale <= 0.0:  # Every gradient is zero: every alpha is optimal; take the uniform one.
        return np.full(k, 1.0 / k)
    normalized = matrix / scale
    # quadprog minimises 1/2 x^T G x - a^T x subject to C^T x >= b, the first `meq` as equalities.
    constraints = np.concatenate([np.ones((k, 1)), np.eye(k)], axis=1)
    bounds = np.concatenate([np.ones(1), np.zeros(k)])
    linear = np.zeros(k)
    eps = regularization
    while True:
        try:
            regularized = normalized + eps * np.eye(k)
            alpha = quadprog.solve_qp(regularized, linear, constraints, bounds, 1)[0]
            break
        except ValueError as error:
            eps = max(eps * 100.0, 1e-12)
            if eps > _MAX_REGULARIZATION:
                raise ValueError(
                    "quadprog failed on the min-norm problem even with regularization "
                    f"{eps / 100:.1g}: {error}. Eigenvalues of the normalised `gram`: "
                    f"{np.linalg.eigvalsh(normalized)}."
                ) from error
    alpha = np.clip(alpha, 0.0, None)
    return alpha / alpha.sum()


def min_norm_coefficients(gram: Tensor, *, regularization: float = 1e-10) -> Tensor:
    """Coefficients on the simplex of the min-norm point of the convex hull of ``K`` vectors.

    Solves ``min_alpha alpha^T gram alpha`` subject to ``alpha >= 0`` and ``sum(alpha) = 1``. With
    ``gram`` the Gram matrix of normalised gradients this is MARBLE's ``alpha*``; any positive
    semi-definite matrix (e.g. the raw Gram matrix, for MGDA) is accepted.

    Singular matrices (duplicated, collinear or zero vectors) are handled by regularisation, not
    by reducing the problem: ``gram`` is scaled to unit mean diagonal and ``regularization * I`` is
    added before the solve (retried with 100x larger values, up to ``1e-4``, if ``quadprog``
    rejects the matrix). The returned ``alpha`` is then the optimum of smallest Euclidean norm,
    and its objective exceeds the true minimum by at most ``regularization * trace(gram) / K``.

    Args:
        gram: ``[K, K]`` symmetric positive semi-definite matrix, ``K >= 1``, any floating dtype
            and device. Asymmetry up to ``1e-4`` times the largest diagonal entry is tolerated
            (and symmetrised away).
        regularization: Ridge added to the unit-mean-diagonal matrix; must be ``>= 0``.

    Returns:
        ``[K]`` tensor ``alpha`` (non-negative, sums to 1), with ``gram``'s dtype and device. If
        ``gram`` is all zero, the uniform vector.

    Raises:
        TypeError: if ``gram`` is not a tensor.
        ValueError: if ``gram`` is not square, is empty, has a non-finite entry, a negative diagonal
            entry or is not symmetric; if ``regularization`` is negative; if the solver fails.
    """
    check_float("regularization", regularization, minimum=0.0)
    matrix = _gram_to_numpy(gram)
    alpha = _solve_min_norm(matrix, regularization)
    return torch.as_tensor(alpha, dtype=_float_dtype(gram), device=gram.device)


def _float_dtype(tensor: Tensor) -> torch.dtype:
    return tensor.dtype if tensor.is_floating_point() else torch.get_default_dtype()


def _check_options(
    rescale: str, norm_tol: float, abs_norm_tol: float, regularization: float
) -> None:
    check_choice("rescale", rescale, ("mean_norm", "none"))
    for name, value in (
        ("norm_tol", norm_tol),
        ("abs_norm_tol", abs_norm_tol),
        ("regularization", regularization),
    ):
        check_float(name, value, minimum=0.0)


def harmonize_gram(
    gram: Tensor,
    *,
    rescale: Rescale = "mean_norm",
    norm_tol: float = 1e-6,
    abs_norm_tol: float = 0.0,
    regularization: float = 1e-10,
) -> Harmonized:
    """MARBLE's weights from the raw Gram matrix of the reward gradients.

    Computes ``n_k = sqrt(G_kk)``, drops rewards with a negligible norm, solves the min-norm QP on
    the normalised Gram matrix ``M_kl = G_kl / (n_k n_l)`` of the remaining rewards, and returns
    ``alpha``, the effective weights ``w_k = m alpha_k / n_k`` and the cosines
    ``cos(d, g_k) = (M alpha)_k / sqrt(alpha^T M alpha)`` (equal to
    ``(w^T G)_k / (sqrt(w^T G w) n_k)``). The result's ``direction`` is ``None``; the caller forms
    ``sum_k w_k g_k`` itself.

    A reward is dropped when ``n_k <= norm_tol * max_l n_l`` or ``n_k <= abs_norm_tol``. If every
    reward is dropped (e.g. all gradients are zero), alpha, weights and cosines are all zero, so
    the direction is zero (the caller should skip the step).

    Args:
        gram: ``[K, K]`` raw Gram matrix ``G_kl = g_k . g_l`` (units: gradient squared), any
            floating dtype and device. It is validated as in :func:`min_norm_coefficients`.
        rescale: ``"mean_norm"`` (the paper): ``m`` is the mean norm of the non-dropped rewards, so
            ``||d||`` is on the scale of the gradients; ``"none"``: ``m = 1`` and ``d = d*``, the
            min-norm point of the unit gradients (``||d|| <= 1``).
        norm_tol: Relative drop tolerance (fraction of the largest norm), ``>= 0``.
        abs_norm_tol: Absolute drop tolerance in gradient units, ``>= 0``.
        regularization: Passed to the QP, see :func:`min_norm_coefficients`.

    Returns:
        :class:`Harmonized` with ``direction=None``; tensors in ``gram``'s dtype and on its
        device (``dropped`` is bool).

    Raises:
        ValueError: on an invalid ``gram`` or option.
    """
    _check_options(rescale, norm_tol, abs_norm_tol, regularization)
    matrix = _gram_to_numpy(gram)
    k = matrix.shape[0]
    norms = np.sqrt(np.diag(matrix))
    largest = norms.max()
    dropped = (norms <= norm_tol * largest) | (norms <= abs_norm_tol) | (norms == 0.0)
    kept = np.flatnonzero(~dropped)

    alpha = np.zeros(k)
    weights = np.zeros(k)
    cosines = np.zeros(k)
    if kept.size > 0:
        kept_norms = norms[kept]
        normalized = matrix[np.ix_(kept, kept)] / np.outer(kept_norms, kept_norms)
        kept_alpha = _solve_min_norm(normalized, regularization)
        m = kept_norms.mean() if rescale == "mean_norm" else 1.0
        alpha[kept] = kept_alpha
        weights[kept] = m * kept_alpha / kept_norms
        projections = normalized @ kept_alpha  # g^_k . d*
        squared_norm = float(kept_alpha @ projections)  # ||d*||^2, in [0, 1]
        if squared_norm > max(100.0 * regularization, _STATIONARY_TOL):
            cosines[kept] = np.clip(projections / np.sqrt(squared_norm), -1.0, 1.0)

    dtype, device = _float_dtype(gram), gram.device
    return Harmonized(
        direction=None,
        alpha=torch.as_tensor(alpha, dtype=dtype, device=device),
        norms=torch.as_tensor(norms, dtype=dtype, device=device),
        weights=torch.as_tensor(weights, dtype=dtype, device=device),
        cosines=torch.as_tensor(cosines, dtype=dtype, device=device),
        dropped=torch.as_tensor(dropped, dtype=torch.bool, device=device),
        gram=gram.detach(),
    )


def _stack_gradients(grads: Tensor | Sequence[Tensor]) -> Tensor:
    """Return a ``[K, P]`` matrix from a ``[K, ...]`` tensor or a sequence of ``K`` tensors."""
    if isinstance(grads, Tensor):
        if grads.ndim < 2:
            raise ValueError(
                "Parameter `grads` should be a [K, P] tensor (one row per reward). "
                f"Found `grads.shape = {tuple(grads.shape)}`."
            )
        matrix = grads.flatten(start_dim=1)
    else:
        rows = list(grads)
        if not all(isinstance(row, Tensor) for row in rows):
            raise TypeError("Parameter `grads` should be a tensor or a sequence of tensors.")
        sizes = [row.numel() for row in rows]
        if len(set(sizes)) > 1:
            raise ValueError(
                "Parameter `grads` should hold one gradient per reward, all with the same number "
                f"of elements. Found sizes {sizes}."
            )
        if not rows:
            raise ValueError(
                "Parameter `grads` should hold at least one gradient. Found an empty sequence."
            )
        matrix = torch.stack([row.reshape(-1) for row in rows])
    if matrix.shape[0] == 0:
        raise ValueError(
            "Parameter `grads` should have at least one row. Found `grads.shape = "
            f"{tuple(matrix.shape)}`."
        )
    return matrix


def harmonize(
    grads: Tensor | Sequence[Tensor],
    *,
    rescale: Rescale = "mean_norm",
    norm_tol: float = 1e-6,
    abs_norm_tol: float = 0.0,
    regularization: float = 1e-10,
) -> Harmonized:
    """Harmonise ``K`` reward gradients into one non-conflicting update direction.

    Composes "Gram matrix of the rows" (``G = g g^T`` in the gradients' dtype, on their device)
    with :func:`harmonize_gram`, then forms ``direction = weights @ g``.

    Args:
        grads: ``[K, P]`` tensor (a ``[K, ...]`` tensor is flattened after the first dimension), or
            a sequence of ``K`` tensors of any shapes with equal numbers of elements, each the
            gradient of one reward (flattened and stacked).
        rescale: See :func:`harmonize_gram`.
        norm_tol: See :func:`harmonize_gram`.
        abs_norm_tol: See :func:`harmonize_gram`.
        regularization: See :func:`min_norm_coefficients`.

    Returns:
        :class:`Harmonized` with ``direction`` of shape ``[P]`` (dtype/device of the gradients;
        zero when every reward is dropped). The other fields have the gradients' dtype and device.

    Raises:
        ValueError: on malformed ``grads`` (including non-finite entries, reported through the Gram
            matrix) or options.
    """
    matrix = _stack_gradients(grads).detach()
    if not matrix.is_floating_point():
        matrix = matrix.to(torch.get_default_dtype())
    gram = matrix @ matrix.T
    if not bool(torch.isfinite(gram).all()):
        bad_rows = torch.nonzero(~torch.isfinite(matrix).all(dim=1)).flatten().tolist()
        if bad_rows:
            raise ValueError(
                "Parameter `grads` should have finite entries. "
                f"Found non-finite values in the gradient(s) of reward(s) {bad_rows}."
            )
        raise ValueError(
            f"The Gram matrix of `grads` overflowed in {matrix.dtype}. Found "
            f"`grads.abs().max() = {matrix.abs().max().item():.3g}`; pass float64 gradients."
        )
    result = harmonize_gram(
        gram,
        rescale=rescale,
        norm_tol=norm_tol,
        abs_norm_tol=abs_norm_tol,
        regularization=regularization,
    )
    result.direction = result.weights.to(matrix.dtype) @ matrix
    return result


def weights_from_alpha(alpha: Tensor, norms: Tensor, dropped: Tensor) -> Tensor:
    """Effective weights ``w_k = m alpha_k / n_k`` on the raw gradients (float64).

    Args:
        alpha: ``[K]`` coefficients of the normalised gradients.
        norms: ``[K]`` gradient norms ``n_k``.
        dropped: ``[K]`` bool; dropped rewards get weight 0 and are left out of ``m``.

    Returns:
        ``[K]`` float64; ``m`` is the mean norm of the kept rewards (all zero if none is kept).
    """
    alpha = alpha.to(torch.float64)
    norms = norms.to(torch.float64)
    kept = ~dropped.to(torch.bool)
    weights = torch.zeros_like(alpha)
    if kept.any():
        m = norms[kept].mean()
        weights[kept] = m * alpha[kept] / norms[kept]
    return weights


def uniform_alpha(dropped: Tensor) -> Tensor:
    """``[K]`` float64 coefficients ``1 / K_kept`` on the kept rewards, 0 on dropped ones."""
    kept = (~dropped.to(torch.bool)).to(torch.float64)
    return kept / kept.sum() if kept.sum() > 0 else kept


def direction_cosines(direction: Tensor, grads: Tensor, dropped: Tensor) -> Tensor:
    """``[K]`` float64 cosines ``cos(direction, g_k)`` on the CPU; NaN for dropped rewards.

    Args:
        direction: ``[P]`` update direction.
        grads: ``[K, P]`` reward gradients.
        dropped: ``[K]`` bool.
    """
    d = direction.double()
    g = grads.double()
    denom = d.norm() * g.norm(dim=1)
    cos = torch.where(denom > 0, (g @ d) / denom.clamp_min(1e-300), torch.zeros_like(denom))
    cos = cos.cpu()
    cos[dropped.cpu()] = float("nan")
    return cos


def gram_cosines(gram: Tensor, weights: Tensor, dropped: Tensor) -> Tensor:
    """``cos(d, g_k)`` for ``d = sum_l w_l g_l``, from the Gram matrix alone (float64, CPU).

    ``cos_k = (G w)_k / (sqrt(w^T G w) n_k)``: what :func:`direction_cosines` gives, without the
    ``[K, P]`` gradients (this is what ranks of a sharded model can compute). NaN for dropped
    rewards; 0 when the direction is zero.

    Args:
        gram: ``[K, K]`` raw Gram matrix.
        weights: ``[K]`` weights of the direction.
        dropped: ``[K]`` bool.
    """
    g = gram.detach().double().cpu()
    w = weights.detach().double().cpu()
    projections = g @ w
    d_norm = float(w @ projections) ** 0.5 if float(w @ projections) > 0 else 0.0
    norms = g.diagonal().clamp_min(0).sqrt()
    denom = d_norm * norms
    cos = torch.where(denom > 0, projections / denom.clamp_min(1e-300), torch.zeros_like(denom))
    cos[dropped.cpu().bool()] = float("nan")
    return cos


# ---------------------------------------------------------------- groups, preferences, floor


@dataclass
class GroupHarmonized(Harmonized):
    """:class:`Harmonized` of :func:`harmonize_groups_gram`, with the group-level solution.

    Attributes:
        group_alpha: ``[J]`` QP solution over the groups (``>= floor`` on kept groups, sum 1 over
            them, 0 for groups whose members were all dropped or cancel out).
        group_norms: ``[J]`` norms ``||h_j||`` of the combined normalised member gradients.
    """

    group_alpha: Tensor | None = None
    group_norms: Tensor | None = None


def _solve_bounded_min_norm(matrix: np.ndarray, floor: float, regularization: float) -> np.ndarray:
    """``min x^T M x`` subject to ``sum(x) = 1`` and ``x >= floor`` (``K * floor <= 1``)."""
    k = matrix.shape[0]
    if floor == 0.0:
        return _solve_min_norm(matrix, regularization)
    if k == 1 or k * floor >= 1.0 - 1e-12:
        return np.full(k, 1.0 / k)
    scale = np.trace(matrix) / k
    if scale <= 0.0:
        return np.full(k, 1.0 / k)
    normalized = matrix / scale
    constraints = np.concatenate([np.ones((k, 1)), np.eye(k)], axis=1)
    bounds = np.concatenate([np.ones(1), np.full(k, floor)])
    eps = regularization
    while True:
        try:
            x = quadprog.solve_qp(
                normalized + eps * np.eye(k), np.zeros(k), constraints, bounds, 1
            )[0]
            break
        except ValueError as error:
            eps = max(eps * 100.0, 1e-12)
            if eps > _MAX_REGULARIZATION:
                raise ValueError(
                    f"quadprog failed on the bounded min-norm problem (floor {floor}) even with "
                    f"regularization {eps / 100:.1g}: {error}"
                ) from error
    excess = np.clip(x - floor, 0.0, None)
    if excess.sum() <= 0.0:
        return np.full(k, 1.0 / k)
    return floor + (1.0 - k * floor) * excess / excess.sum()


def _check_floor(floor: float, count: int) -> float:
    check_float("floor", floor, minimum=0.0, maximum=1.0)
    if count * floor > 1.0 + 1e-12:
        raise ValueError(
            f"`floor` is infeasible: {count} coefficients of at least {floor} cannot sum "
            f"to 1 (needs `{count} * floor <= 1`, i.e. floor <= {1.0 / count:.6g})."
        )
    return float(floor)


def bounded_min_norm_coefficients(
    gram: Tensor, *, floor: float = 0.0, regularization: float = 1e-10
) -> Tensor:
    """:func:`min_norm_coefficients` with lower bounds: ``min a^T G a``, ``sum(a) = 1``,
    ``a >= floor``.

    With ``floor = 0`` this is exactly :func:`min_norm_coefficients`.

    Raises:
        ValueError: as :func:`min_norm_coefficients`, and when ``K * floor > 1`` (infeasible).
    """
    matrix = _gram_to_numpy(gram)
    floor = _check_floor(floor, matrix.shape[0])
    alpha = _solve_bounded_min_norm(matrix, floor, regularization)
    return torch.as_tensor(alpha, dtype=_float_dtype(gram), device=gram.device)


def _check_groups(groups: Sequence[Sequence[int]] | None, k: int) -> list[list[int]]:
    if groups is None:
        return [[i] for i in range(k)]
    parsed = [[int(i) for i in group] for group in groups]
    flat = [i for group in parsed for i in group]
    if any(not group for group in parsed):
        raise ValueError(
            f"Parameter `groups` should hold non-empty groups. Found `groups = {parsed}`."
        )
    if sorted(flat) != list(range(k)):
        raise ValueError(
            f"Parameter `groups` should partition the rewards 0..{k - 1} (each in exactly one "
            f"group). Found `groups = {parsed}`."
        )
    return parsed


def _check_positive(name: str, values: Sequence[float] | None, count: int) -> np.ndarray:
    if values is None:
        return np.ones(count)
    array = np.asarray([float(v) for v in values], dtype=np.float64)
    if array.shape != (count,) or not np.isfinite(array).all() or (array <= 0).any():
        raise ValueError(
            f"Parameter `{name}` should hold {count} positive finite numbers. Found `{name} = "
            f"{list(values)}`."
        )
    return array


def harmonize_groups_gram(
    gram: Tensor,
    *,
    groups: Sequence[Sequence[int]] | None = None,
    member_weights: Sequence[float] | None = None,
    preference: Sequence[float] | None = None,
    floor: float = 0.0,
    rescale: Rescale = "mean_norm",
    norm_tol: float = 1e-6,
    abs_norm_tol: float = 0.0,
    regularization: float = 1e-10,
) -> GroupHarmonized:
    """MARBLE over reward groups, with preference weights and a floor on the coefficients.

    Rewards are dropped as in :func:`harmonize_gram`; the kept rewards' gradients are normalised,
    ``g^_k = g_k / n_k``. Group ``j`` (a list of reward indices) gets the fixed combination of its
    kept members ``h_j = sum_{k in j} c_k g^_k`` (``c`` = ``member_weights`` renormalised over the
    kept members of each group; default equal), normalised like a reward: ``h^_j = h_j / ||h_j||``.
    A preference weight ``p_j > 0`` enters the QP as ``u_j = h^_j / p_j``, and the QP is

    .. math::

        \\beta^* = \\arg\\min \\| \\sum_j \\beta_j u_j \\|^2 \\quad
        \\text{s.t.}\\ \\sum_j \\beta_j = 1,\\ \\beta_j \\ge \\text{floor}.

    With ``floor = 0`` its optimality conditions give ``h^_j . d >= p_j ||d||^2`` for ``d = sum_j
    beta_j u_j``, with equality on the groups of positive weight: the guaranteed first-order
    progress of each group is proportional to its preference (``p`` all equal: plain MARBLE on the
    groups). ``floor > 0`` forces every kept group to get ``beta_j >= floor`` (feasible iff
    ``J * floor <= 1``; ``J`` the number of groups).

    The per-reward result is expressed on the normalised reward gradients: ``d = s * sum_k alpha_k
    g^_k`` with ``alpha_k = beta_j c_k / (p_j ||h_j|| s)`` (``s`` makes ``alpha`` sum to 1), and
    ``weights = m alpha / n`` as in :func:`harmonize_gram` (``m``: mean kept norm with
    ``"mean_norm"``), so :func:`weights_from_alpha` reproduces them from ``alpha`` and the norms.
    Groups of one reward with equal preferences and ``floor = 0`` reduce to :func:`harmonize_gram`.

    Args:
        gram: ``[K, K]`` raw Gram matrix of the reward gradients.
        groups: a partition of ``range(K)`` into ``J`` groups (default: one group per reward).
        member_weights: ``[K]`` positive fixed weights of each reward inside its group.
        preference: ``[J]`` positive preference weights of the groups (default all 1).
        floor: lower bound of every kept group's QP coefficient, ``0 <= floor``, ``J * floor <= 1``.
        rescale, norm_tol, abs_norm_tol, regularization: as in :func:`harmonize_gram`.

    Returns:
        :class:`GroupHarmonized` (``direction=None``); ``cosines`` are those of the direction with
        each reward gradient.

    Raises:
        ValueError: on an invalid ``gram``, groups, weights or an infeasible floor.
    """
    _check_options(rescale, norm_tol, abs_norm_tol, regularization)
    matrix = _gram_to_numpy(gram)
    k = matrix.shape[0]
    parsed = _check_groups(groups, k)
    j_count = len(parsed)
    members = _check_positive("member_weights", member_weights, k)
    prefs = _check_positive("preference", preference, j_count)
    floor = _check_floor(floor, j_count)

    norms = np.sqrt(np.diag(matrix))
    largest = norms.max()
    dropped = (norms <= norm_tol * largest) | (norms <= abs_norm_tol) | (norms == 0.0)
    safe = np.where(dropped, 1.0, norms)
    unit = matrix / np.outer(safe, safe)  # normalised Gram of all rewards (dropped rows unused)
    unit[dropped, :] = 0.0
    unit[:, dropped] = 0.0

    # C [K, J]: h_j = sum_k C_kj g^_k
    combo = np.zeros((k, j_count))
    for j, group in enumerate(parsed):
        kept = [i for i in group if not dropped[i]]
        if kept:
            c = members[kept]
            combo[kept, j] = c / c.sum()
    group_gram = combo.T @ unit @ combo
    group_norms = np.sqrt(np.clip(np.diag(group_gram), 0.0, None))
    for j, group in enumerate(parsed):  # a kept reward alone is a unit vector by definition
        if len(group) == 1 and not dropped[group[0]]:
            group_norms[j] = 1.0
    live = group_norms > max(norm_tol, 1e-12)  # all members dropped, or members cancel exactly
    alpha = np.zeros(k)
    weights = np.zeros(k)
    cosines = np.zeros(k)
    beta = np.zeros(j_count)
    kept_rewards = ~dropped
    if live.any():
        idx = np.flatnonzero(live)
        scaled = combo[:, idx] / (group_norms[idx] * prefs[idx])[None, :]  # u_j in g^ coordinates
        u_gram = scaled.T @ unit @ scaled
        beta[idx] = _solve_bounded_min_norm(u_gram, floor, regularization)
        raw = scaled @ beta[idx]  # coefficients of d on the g^_k
        alpha = raw / raw.sum()
        m = norms[kept_rewards].mean() if rescale == "mean_norm" else 1.0
        weights[kept_rewards] = m * alpha[kept_rewards] / norms[kept_rewards]
        projections = unit @ alpha
        squared_norm = float(alpha @ projections)
        if squared_norm > max(100.0 * regularization, _STATIONARY_TOL):
            cosines[kept_rewards] = np.clip(
                projections[kept_rewards] / np.sqrt(squared_norm), -1.0, 1.0
            )

    dtype, device = _float_dtype(gram), gram.device
    return GroupHarmonized(
        direction=None,
        alpha=torch.as_tensor(alpha, dtype=dtype, device=device),
        norms=torch.as_tensor(norms, dtype=dtype, device=device),
        weights=torch.as_tensor(weights, dtype=dtype, device=device),
        cosines=torch.as_tensor(cosines, dtype=dtype, device=device),
        dropped=torch.as_tensor(dropped, dtype=torch.bool, device=device),
        gram=gram.detach(),
        group_alpha=torch.as_tensor(beta, dtype=dtype, device=device),
        group_norms=torch.as_tensor(group_norms, dtype=dtype, device=device),
    )
