"""The DiffusionNFT objective, split so that one forward pass serves every reward.

Conventions (rectified flow, see :mod:`marble_lightning.backbone`): ``t`` in ``[0, 1]`` with
``t = 1`` pure noise, ``x_t = (1 - t) x0 + t eps``, the model predicts the velocity
``v = eps - x0`` and ``x0 = x_t - t v``.

For a policy velocity ``v`` and the frozen old policy's ``v_old`` at the same ``(x_t, t, c)``, NFT
defines an implicit positive and negative policy with strength ``beta``,
``v+ = beta v + (1 - beta) v_old`` and ``v- = (1 + beta) v_old - beta v``, and per sample ``i``
the normalised reconstruction errors of their ``x0`` predictions::

    L+_i = mean((x0+ - x0)^2) / sg(max(mean|x0+ - x0|, 1e-5))      (x0+ = x_t - t v+)
    L-_i = likewise with x0- = x_t - t v-

A reward's interpolation coefficients ``r_i in [0, 1]`` (from its advantages, see
:func:`interpolation_coefficient`) weight them::

    l(r) = a_max * mean_i(r_i L+_i + (1 - r_i) L-_i) / beta

``l`` is affine in ``r``, so ``sum_k w_k l(r_k) = W l(r_bar)`` with ``W = sum_k w_k`` and
``r_bar = sum_k (w_k / W) r_k`` (:func:`aggregate_coefficients`): one backward pass on
``l(r_bar)`` reproduces any non-negative combination of per-reward losses exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from marble_lightning.checks import check_float

__all__ = [
    "NFTTerms",
    "aggregate_advantages",
    "aggregate_coefficients",
    "interpolation_coefficient",
    "kl_loss",
    "nft_loss",
    "nft_objective",
    "nft_terms",
]

_NORMALIZER_FLOOR = 1e-5
"""Lower bound of the per-sample adaptive normaliser ``mean|x0± - x0|``."""


@dataclass
class NFTTerms:
    """Per-sample positive and negative NFT terms, differentiable w.r.t. the policy velocity.

    Attributes:
        positive: ``[B]`` ``L+_i``, the normalised squared error of the positive policy's ``x0``.
        negative: ``[B]`` ``L-_i``, the same for the negative policy.
    """

    positive: Tensor
    negative: Tensor


def interpolation_coefficient(adv: Tensor, a_max: float = 5.0) -> Tensor:
    """Map advantages to NFT interpolation coefficients ``r = clamp(1/2 + A / (2 a_max), 0, 1)``.

    The advantage is first clipped to ``[-a_max, a_max]``, so ``r`` is exactly 0 or 1 beyond the
    clip; ``A = 0`` (no signal, e.g. a masked sample) gives ``r = 1/2``.

    Args:
        adv: Advantages of any shape (dimensionless, in standard deviations).
        a_max: Clip value, ``> 0``.

    Returns:
        Tensor of ``adv``'s shape with values in ``[0, 1]``.

    Raises:
        ValueError: if ``a_max <= 0``.
    """
    check_float("a_max", a_max, minimum=0.0, strict=True)
    clipped = adv.clamp(-a_max, a_max)
    return (0.5 + clipped / (2.0 * a_max)).clamp(0.0, 1.0)


def _time_like(t: Tensor | float, reference: Tensor) -> Tensor:
    """Broadcast a per-sample time ``[B]`` (or a scalar, or any broadcastable shape) to
    ``reference``."""
    t = torch.as_tensor(t, dtype=reference.dtype, device=reference.device)
    if t.ndim == 1:
        if t.shape[0] not in (1, reference.shape[0]):
            raise ValueError(
                f"Parameter `t` should have shape [B] with B = {reference.shape[0]}. "
                f"Found `t.shape = {tuple(t.shape)}`."
            )
        t = t.reshape(-1, *([1] * (reference.ndim - 1)))
    try:
        torch.broadcast_shapes(t.shape, reference.shape)
    except RuntimeError as error:
        raise ValueError(
            "Parameter `t` should have shape [B] or be broadcastable to the velocity's shape "
            f"{tuple(reference.shape)}. Found `t.shape = {tuple(t.shape)}`."
        ) from error
    return t


def nft_terms(
    v: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    t: Tensor | float,
    beta: float = 1.0,
) -> NFTTerms:
    """Per-sample positive and negative NFT terms ``L+_i`` and ``L-_i``.

    Args:
        v: ``[B, C, H, W]`` (any ``[B, ...]``) velocity of the trained policy at ``(x_t, t, c)``;
            gradients flow through it.
        v_old: Same shape, the old (sampling) policy's velocity; detached here.
        x_t: Same shape, the noised sample ``(1 - t) x0 + t eps``.
        x0: Same shape, the clean sample the rollout produced (the regression target).
        t: ``[B]`` times in ``[0, 1]`` (or a scalar, or a tensor broadcastable to ``v``).
        beta: NFT strength, ``> 0``.

    Returns:
        :class:`NFTTerms` with ``positive`` and ``negative`` of shape ``[B]``, in ``v``'s dtype.
        The adaptive normaliser ``max(mean|x0± - x0|, 1e-5)`` is detached, as in DiffusionNFT.

    Raises:
        ValueError: on mismatched shapes, ``v.ndim < 2``, or ``beta <= 0``.
    """
    check_float("beta", beta, minimum=0.0, strict=True)
    if v.ndim < 2:
        raise ValueError(
            "Parameter `v` should have shape [B, ...] with at least 2 dims. Found `v.shape = "
            f"{tuple(v.shape)}`."
        )
    for name, other in (("v_old", v_old), ("x_t", x_t), ("x0", x0)):
        if other.shape != v.shape:
            raise ValueError(
                f"Parameter `{name}` should have the shape of `v`, {tuple(v.shape)}. "
                f"Found `{name}.shape = {tuple(other.shape)}`."
            )
    v_old = v_old.detach()
    time = _time_like(t, v)
    v_pos = beta * v + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v
    err_pos = (x_t - time * v_pos) - x0
    err_neg = (x_t - time * v_neg) - x0
    sample_dims = tuple(range(1, v.ndim))

    def term(err: Tensor) -> Tensor:
        scale = err.abs().mean(dim=sample_dims).clamp_min(_NORMALIZER_FLOOR).detach()
        return err.square().mean(dim=sample_dims) / scale

    return NFTTerms(positive=term(err_pos), negative=term(err_neg))


def nft_objective(terms: NFTTerms, r: Tensor, beta: float = 1.0, a_max: float = 5.0) -> Tensor:
    """NFT loss ``l(r) = a_max * mean_i(r_i L+_i + (1 - r_i) L-_i) / beta`` from precomputed terms.

    Args:
        terms: Output of :func:`nft_terms` for a batch of ``B`` samples.
        r: ``[B]`` interpolation coefficients (normally in ``[0, 1]``), or ``[K, B]`` for ``K``
            rewards at once. Treated as constants (no gradient is expected through ``r``).
        beta: NFT strength used to build ``terms``, ``> 0``.
        a_max: Advantage clip value, ``> 0`` (the loss scale of DiffusionNFT).

    Returns:
        Scalar loss for ``r`` of shape ``[B]``; ``[K]`` losses (one per reward, sharing the same
        graph) for ``r`` of shape ``[K, B]``.

    Raises:
        ValueError: on shape mismatch, ``beta <= 0`` or ``a_max <= 0``.
    """
    check_float("beta", beta, minimum=0.0, strict=True)
    check_float("a_max", a_max, minimum=0.0, strict=True)
    batch = terms.positive.shape[0]
    if terms.positive.ndim != 1 or terms.negative.shape != terms.positive.shape:
        raise ValueError(
            "Parameter `terms` should hold two [B] tensors. Found shapes "
            f"{tuple(terms.positive.shape)} and {tuple(terms.negative.shape)}."
        )
    if r.ndim not in (1, 2) or r.shape[-1] != batch:
        raise ValueError(
            f"Parameter `r` should have shape [B] or [K, B] with B = {batch}. "
            f"Found `r.shape = {tuple(r.shape)}`."
        )
    r = r.detach().to(terms.positive.dtype)
    per_sample = r * terms.positive + (1.0 - r) * terms.negative
    return per_sample.mean(dim=-1) * (a_max / beta)


def nft_loss(
    v: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    t: Tensor | float,
    r: Tensor,
    beta: float = 1.0,
    a_max: float = 5.0,
) -> tuple[Tensor, NFTTerms]:
    """DiffusionNFT loss: :func:`nft_terms` followed by :func:`nft_objective`.

    Args:
        v, v_old, x_t, x0, t, beta: See :func:`nft_terms`.
        r: ``[B]`` or ``[K, B]`` interpolation coefficients, see :func:`nft_objective`.
        a_max: Advantage clip value, ``> 0``.

    Returns:
        ``(loss, terms)``: the scalar (or ``[K]``) loss and the per-sample terms, which callers
        reuse to form losses for other coefficients without another forward pass.
    """
    terms = nft_terms(v, v_old, x_t, x0, t, beta)
    return nft_objective(terms, r, beta, a_max), terms


def kl_loss(v: Tensor, v_ref: Tensor) -> Tensor:
    """Velocity-space KL surrogate ``mean((v - v_ref)^2)`` against the frozen reference model.

    The multiplier ``lambda_KL`` is applied by the caller; this term is kept outside the reward
    harmonisation.

    Args:
        v: ``[B, ...]`` policy velocity.
        v_ref: Same shape, reference velocity (detached here).

    Returns:
        Scalar tensor.

    Raises:
        ValueError: if the shapes differ.
    """
    if v.shape != v_ref.shape:
        raise ValueError(
            f"Parameter `v_ref` should have the shape of `v`, {tuple(v.shape)}. "
            f"Found `v_ref.shape = {tuple(v_ref.shape)}`."
        )
    return (v - v_ref.detach()).square().mean()


def aggregate_coefficients(r: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Fold ``K`` per-reward coefficients into one, exactly: ``sum_k w_k l(r_k) = W l(r_bar)``.

    Args:
        r: ``[K, B]`` per-reward interpolation coefficients.
        weights: ``[K]`` non-negative weights (e.g. MARBLE's effective weights
            ``w_k = m alpha_k / n_k``, or fixed user weights).

    Returns:
        ``(r_bar, W)``: ``[B]`` coefficients ``sum_k (w_k / W) r_k`` (a convex combination, so in
        ``[0, 1]`` when every ``r_k`` is), in ``r``'s dtype, and the 0-dim total weight
        ``W = sum_k w_k``. Multiply the loss on ``r_bar`` by ``W`` to reproduce the weighted sum.

    Raises:
        ValueError: on shape mismatch, a negative or non-finite weight, or ``W == 0`` (all weights
            zero: every reward was dropped and the step should be skipped).
    """
    if r.ndim != 2:
        raise ValueError(
            f"Parameter `r` should have shape [K, B]. Found `r.shape = {tuple(r.shape)}`."
        )
    if weights.shape != (r.shape[0],):
        raise ValueError(
            f"Parameter `weights` should have shape [K] = [{r.shape[0]}]. "
            f"Found `weights.shape = {tuple(weights.shape)}`."
        )
    host = weights.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(host).all()) or bool((host < 0).any()):
        raise ValueError(
            "Parameter `weights` should be finite and non-negative. Found `weights = "
            f"{host.tolist()}`."
        )
    if float(host.sum()) <= 0.0:
        raise ValueError(
            "Parameter `weights` should have a positive sum; all weights are zero (every reward "
            "was dropped): skip the step instead."
        )
    weights = weights.detach().to(device=r.device, dtype=r.dtype)
    total = weights.sum()
    r_bar = (weights / total) @ r
    return r_bar, total


def aggregate_advantages(adv: Tensor, alpha: Tensor) -> Tensor:
    """The paper's aggregated advantage ``A_bar = sum_k alpha_k A_k``.

    ``interpolation_coefficient(A_bar)`` equals the exact :func:`aggregate_coefficients` form
    (with weights proportional to ``alpha``) only where no advantage hits the clip ``a_max``; it
    is kept for fidelity to the paper.

    Args:
        adv: ``[B, K]`` per-reward advantages (the layout of
            :meth:`~marble_lightning.advantages.PerPromptStatTracker.update`).
        alpha: ``[K]`` coefficients (normally on the simplex).

    Returns:
        ``[B]`` aggregated advantages in ``adv``'s dtype.

    Raises:
        ValueError: on shape mismatch.
    """
    if adv.ndim != 2:
        raise ValueError(
            f"Parameter `adv` should have shape [B, K]. Found `adv.shape = {tuple(adv.shape)}`."
        )
    if alpha.shape != (adv.shape[1],):
        raise ValueError(
            f"Parameter `alpha` should have shape [K] = [{adv.shape[1]}]. "
            f"Found `alpha.shape = {tuple(alpha.shape)}`."
        )
    return adv @ alpha.detach().to(device=adv.device, dtype=adv.dtype)
