"""Per-reward gradient engines: the ``[K, P]`` matrix whose rows are ``g_k = grad l_k``.

MARBLE needs the Gram matrix of the per-reward gradients ``g_k`` (see
:mod:`marble_lightning.harmonize`) and then the combination ``sum_k w_k g_k``. Three engines produce
the same ``[K, P]`` matrix ``G`` (rows in the order of the trainable parameter list, each parameter
flattened), so everything downstream (the single cross-rank mean reduction, ``harmonize``, writing
``.grad``) is shared:

* ``"backward"``: ``K`` ``torch.autograd.grad`` calls over one retained graph (the paper's way).
* ``"batched"``: one vectorised ``torch.autograd.grad(..., is_grads_batched=True)`` call.
* ``"per_sample"``: exploits the structure of the NFT loss. With per-sample terms ``L+_i, L-_i``
  shared by every reward, ``l_k = s * sum_i (r_ik L+_i + (1 - r_ik) L-_i)`` (``s = a_max /
  (beta B)``), so ``g_k = s * (r_k @ P + (1 - r_k) @ N)`` where ``P[i]`` and ``N[i]`` are the
  per-sample gradients of ``L+_i`` and ``L-_i``. Rewritten ``g_k = s * (r_k @ (P - N) + sum_i
  N[i])``, it needs ONE per-sample pass, on ``sum_i (L+_i - L-_i)``, whatever ``K`` is, plus one
  ordinary backward of ``sum_i L-_i`` (a single ``[P]`` vector shared by every reward). For the
  per-sample pass, forward hooks keep each trainable layer's input, one ``autograd.grad`` returns
  the gradient at each layer's output, and per-sample weight gradients follow in closed form (an
  outer product for ``nn.Linear``, one batched product per kernel offset for ``nn.Conv2d``; LoRA
  adapters are made of exactly these), projected on the ``r_k`` layer by layer so that ``[K, P]``
  is held, never ``[B, P]``. It is exact (float round-off only) when samples do not interact in
  the forward pass (no batch norm) and every trainable parameter is the weight or bias of a
  supported layer; :class:`PerSampleGradients` raises
  :class:`UnsupportedModelError` with the reason otherwise, and callers fall back to ``"backward"``.

Sharded parameters (FSDP, or any split of the trainable parameters over ranks): ``G = g g^T`` is
a sum over column blocks, so with ``g = [g_1 | ... | g_R]`` (rank ``r`` holding the columns
``g_r`` of the parameters or parameter shards it owns), ``G = sum_r g_r g_r^T``.
:func:`sharded_gram` forms the local ``[K, K]`` block product and sum-all-reduces it: ``K^2``
numbers cross the network, never a gradient. Every rank then computes the same weights ``w`` from
``G`` (norms are ``sqrt(diag G)``), and its own part of the update is ``w @ g_r``
(:func:`shard_direction`); concatenating the parts in column order gives ``w @ g``.

No Lightning import: this is pure autograd plumbing, tested against the ``"backward"`` engine.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = [
    "GradientAccumulator",
    "GradientEngine",
    "ENGINES",
    "PerSampleGradients",
    "UnsupportedModelError",
    "flat_gradients",
    "per_reward_gradients",
    "process_group_sum",
    "shard_direction",
    "sharded_gram",
]

ENGINES = ("backward", "batched", "per_sample")
"""Names accepted by ``MarbleDiffusionModule(gram=...)``."""


class UnsupportedModelError(ValueError):
    """The per-sample engine cannot handle this model; the message says why."""


def flat_gradients(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """Concatenate per-parameter gradients into one ``[P]`` vector (``None`` -> zeros)."""
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def per_reward_gradients(
    losses: Tensor | Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    engine: str = "backward",
    retain_graph: bool = False,
) -> Tensor:
    """Gradients of ``K`` losses sharing one graph, as a ``[K, P]`` matrix.

    Args:
        losses: ``[K]`` losses (one forward graph), or a list of ``K`` scalar losses (the
            ``"backward"`` engine then differentiates each one directly, without a stack).
        params: the trainable parameters, in the order of the flattened columns.
        engine: ``"backward"`` (K calls) or ``"batched"`` (one vectorised call).
        retain_graph: keep the graph after the last call (e.g. to differentiate a KL term next).

    Returns:
        ``[K, P]`` float tensor, row ``k`` = flattened ``grad losses[k]``.
    """
    if not isinstance(losses, Tensor):
        losses = list(losses)
        if not losses or engine != "backward":
            losses = torch.stack(losses) if losses else torch.zeros(0)
    if isinstance(losses, Tensor) and (losses.ndim != 1 or losses.numel() == 0):
        raise ValueError(f"`losses` should have shape [K], K >= 1, got {tuple(losses.shape)}")
    params = list(params)
    k = len(losses)
    if engine == "backward":
        rows = []
        for i in range(k):
            grads = torch.autograd.grad(
                losses[i], params, retain_graph=retain_graph or i < k - 1, allow_unused=True
            )
            rows.append(flat_gradients(grads, params))
        return torch.stack(rows)
    if engine == "batched":
        eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(
            losses,
            params,
            grad_outputs=eye,
            is_grads_batched=True,
            retain_graph=retain_graph,
            allow_unused=True,
        )
        return torch.cat(
            [
                (
                    torch.zeros((k, p.numel()), dtype=p.dtype, device=p.device)
                    if g is None
                    else g.reshape(k, -1)
                )
                for g, p in zip(grads, params, strict=True)
            ],
            dim=1,
        )
    raise ValueError(f"`engine` should be one of ('backward', 'batched'), got {engine!r}")


@dataclass
class _Capture:
    """Inputs and outputs of one trainable layer, one entry per call in the captured forward."""

    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


class PerSampleGradients:
    """Exact per-sample gradients of the weights/biases of ``nn.Linear`` and ``nn.Conv2d`` layers.

    Usage, once per training timestep::

        engine = PerSampleGradients(model, params)
        with engine.capture():
            v = model(x)                                  # forward with gradients enabled
        terms = nft_terms(v, ...)
        pos = engine.gradients(terms.positive.sum(), retain_graph=True)   # [B, P]
        neg = engine.gradients(terms.negative.sum())                      # [B, P]

    ``gradients(sum_i L_i)`` returns row ``i`` = flattened gradient of ``L_i`` alone, provided the
    forward pass treats samples independently (batch dimension 0 everywhere).

    Args:
        model: module containing every parameter in ``params``.
        params: trainable parameters (the column order of the results).

    Raises:
        UnsupportedModelError: a parameter is not the weight/bias of a supported layer (grouped or
            non-zero-padded convolutions included), or is not inside ``model``.
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        owner: dict[int, tuple[nn.Module, str]] = {}
        for module_name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                owner.setdefault(
                    id(p), (module, f"{module_name}.{pname}" if module_name else pname)
                )
        self._layers: list[nn.Module] = []
        self._slots: list[tuple[nn.Module, str]] = []  # (layer, "weight" | "bias") per param
        for p in self.params:
            if id(p) not in owner:
                raise UnsupportedModelError("a trainable parameter is not a parameter of `model`")
            module, qualified = owner[id(p)]
            if isinstance(module, nn.Conv2d):
                if (
                    module.groups != 1
                    or module.padding_mode != "zeros"
                    or isinstance(module.padding, str)
                ):
                    raise UnsupportedModelError(
                        f"{qualified}: only ungrouped, zero-padded Conv2d with explicit padding is "
                        "supported"
                    )
            elif not isinstance(module, nn.Linear):
                raise UnsupportedModelError(
                    f"{qualified} belongs to a {type(module).__name__}; per-sample gradients are "
                    "implemented for nn.Linear and nn.Conv2d (LoRA adapters use only these)"
                )
            slot = (
                "weight"
                if p is module.weight
                else "bias"
                if p is getattr(module, "bias", None)
                else None
            )
            if slot is None:
                raise UnsupportedModelError(
                    f"{qualified} is neither the weight nor the bias of its layer"
                )
            if module not in self._layers:
                self._layers.append(module)
            self._slots.append((module, slot))
        self._wanted = set(self._slots)
        self._captures: dict[nn.Module, _Capture] = {}

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record inputs/outputs of the trainable layers during the enclosed forward pass."""
        self._captures = {layer: _Capture() for layer in self._layers}
        handles = [layer.register_forward_hook(self._hook) for layer in self._layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if output.requires_grad:  # skip no-grad forwards (old policy, reference)
            cap = self._captures[module]
            cap.inputs.append(args[0].detach())
            cap.outputs.append(output)

    def gradients(
        self, total: Tensor, *, retain_graph: bool = False, project: Tensor | None = None
    ) -> Tensor:
        """Per-sample gradients ``[B, P]`` of the summands of ``total = sum_i L_i``.

        Args:
            total: ``sum_i L_i`` over the captured batch.
            retain_graph: keep the graph (for a second pass over the same forward).
            project: optional ``[R, B]`` matrix; returns ``project @ per_sample`` (``[R, P]``)
                computed layer by layer, so the full ``[B, P]`` matrix is never held (peak extra
                memory ``R x P`` plus one layer's ``B x P_layer``).
        """
        layers = [m for m in self._layers for _ in self._captures[m].outputs]
        outputs = [o for m in self._layers for o in self._captures[m].outputs]
        if not outputs:
            raise RuntimeError("no trainable layer ran with gradients inside `capture()`")
        grads_out = torch.autograd.grad(
            total, outputs, retain_graph=retain_graph, allow_unused=True
        )
        per_layer: dict[tuple[nn.Module, str], Tensor] = {}
        call_index: dict[nn.Module, int] = {}
        for layer, delta in zip(layers, grads_out):
            i = call_index.get(layer, 0)
            call_index[layer] = i + 1
            x = self._captures[layer].inputs[i]
            if delta is None:
                delta = torch.zeros_like(self._captures[layer].outputs[i])
            weight, bias = self._layer_gradients(layer, x, delta)
            for slot, value in (("weight", weight), ("bias", bias)):
                key = (layer, slot)
                if key not in self._wanted:
                    continue
                value = value.reshape(value.shape[0], -1)
                if project is not None:
                    value = project.to(value.dtype) @ value
                per_layer[key] = per_layer[key] + value if key in per_layer else value
        return torch.cat([per_layer[slot] for slot in self._slots], dim=1)

    @staticmethod
    def _layer_gradients(layer: nn.Module, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample ``(weight_grad [B, *W], bias_grad [B, out])`` of one call of ``layer``."""
        b = x.shape[0]
        if isinstance(layer, nn.Linear):
            x2 = x.reshape(b, -1, x.shape[-1])
            d2 = delta.reshape(b, -1, delta.shape[-1])
            return torch.einsum("bto,bti->boi", d2, x2), d2.sum(dim=1)
        assert isinstance(layer, nn.Conv2d)
        bias = delta.reshape(b, delta.shape[1], -1).sum(dim=2)
        return _conv2d_weight_per_sample(layer, x, delta), bias


def _conv2d_weight_per_sample(layer: nn.Conv2d, x: Tensor, delta: Tensor) -> Tensor:
    """Per-sample weight gradient ``[B, O, C, kh, kw]`` of an ungrouped, zero-padded ``Conv2d``.

    ``W[b, o, c, i, j] = sum_{h, w} delta[b, o, h, w] * x_pad[b, c, s_h h + d_h i, s_w w + d_w j]``:
    one batched matrix product ``[B, O, L] @ [B, L, C]`` per kernel offset ``(i, j)``, on a shifted
    view of the input. This is the sum ``unfold(x)`` followed by one product would give, without
    materialising the ``[B, C kh kw, L]`` unfolded input (``kh kw`` times the input). With stride 1
    the shift is applied to ``delta`` instead when it has fewer channels (LoRA down-projections:
    ``O = rank``), so only the smaller tensor is copied.

    Args:
        layer: the convolution (its geometry only).
        x: ``[B, C, H, W]`` layer input.
        delta: ``[B, O, H', W']`` gradient at the layer output.
    """
    b, c, h, w = x.shape
    o, ho, wo = delta.shape[1:]
    kh, kw = layer.kernel_size
    sh, sw = layer.stride
    dh, dw = layer.dilation
    ph, pw = layer.padding  # type: ignore[misc]  # str padding is rejected at construction
    out = x.new_empty(b, o, c, kh, kw)
    if (sh, sw) == (1, 1) and o < c:
        # W[.., i, j] = sum_p x[p] delta[p + pad - i d] (zero outside delta): shift a padded delta
        lo_h, lo_w = (kh - 1) * dh, (kw - 1) * dw
        d_pad = F.pad(delta, (lo_w, max(0, w + pw - wo), lo_h, max(0, h + ph - ho)))
        x2 = x.reshape(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        for i in range(kh):
            for j in range(kw):
                top, left = lo_h + ph - i * dh, lo_w + pw - j * dw
                shifted = d_pad[:, :, top : top + h, left : left + w].reshape(b, o, h * w)
                out[:, :, :, i, j] = torch.bmm(shifted, x2)
        return out
    x_pad = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    d2 = delta.reshape(b, o, ho * wo)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dh, j * dw
            window = x_pad[
                :, :, top : top + sh * (ho - 1) + 1 : sh, left : left + sw * (wo - 1) + 1 : sw
            ]
            out[:, :, :, i, j] = torch.bmm(d2, window.reshape(b, c, ho * wo).transpose(1, 2))
    return out


def process_group_sum(group: dist.ProcessGroup | None = None) -> Callable[[Tensor], Tensor]:
    """An ``all_reduce_sum`` for :func:`sharded_gram` backed by ``torch.distributed``.

    Args:
        group: process group to reduce over (``None``: the default group, i.e. every rank).

    Returns:
        A function that takes a tensor and returns a new tensor holding its elementwise sum over
        the ranks of ``group`` (the input is not modified). Every rank of the group must call it
        with a tensor of the same shape and dtype (collective call). The tensor must live on a
        device the backend supports (CPU for gloo, CUDA for NCCL).

    Raises:
        RuntimeError: when ``torch.distributed`` is not initialised (at call time, not here, so the
            function can be built before ``init_process_group``).
    """

    def all_reduce_sum(tensor: Tensor) -> Tensor:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "process_group_sum: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first or pass `all_reduce_sum=None`."
            )
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    return all_reduce_sum


def sharded_gram(rows: Tensor, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Global Gram matrix ``G = g g^T`` from this rank's columns of the per-reward gradients.

    Rank ``r`` holds ``rows = g_r``, the ``[K, P_r]`` columns of the per-reward gradient matrix
    for the parameters (or parameter shards, e.g. ``param.grad.to_local()`` under FSDP) it owns;
    the column blocks of all ranks must partition the trainable parameters (no column on two
    ranks, none missing). Then ``G = sum_r g_r g_r^T``: the local product is computed in float64
    and summed over ranks by ``all_reduce_sum`` (one collective of ``K * K`` numbers). Every rank
    gets the same ``G``; feed it to :func:`marble_lightning.harmonize.harmonize_gram` and form this
    rank's update with :func:`shard_direction`.

    Args:
        rows: ``[K, P_r]`` per-reward gradient columns of this rank (any float dtype and device;
            ``P_r = 0`` is allowed for a rank that owns nothing). Every rank must pass the same
            ``K`` in the same reward order.
        all_reduce_sum: collective that returns the elementwise sum of a tensor over the ranks,
            e.g. :func:`process_group_sum`; ``None`` for a single process (``G = rows rows^T``).

    Returns:
        ``[K, K]`` float64 Gram matrix on ``rows``' device (units: gradient squared).

    Raises:
        ValueError: ``rows`` is not a 2-D floating tensor with ``K >= 1``, or ``all_reduce_sum``
            returned a tensor of another shape.
    """
    if not isinstance(rows, Tensor) or rows.ndim != 2 or rows.shape[0] == 0:
        shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(
            "Parameter `rows` should have shape [K, P_local] with K >= 1. Found `rows.shape = "
            f"{shape}`."
        )
    if not rows.is_floating_point():
        raise ValueError(
            f"Parameter `rows` should be a floating tensor. Found `rows.dtype = {rows.dtype}`."
        )
    local = rows.detach().to(torch.float64)
    gram = local @ local.T
    if all_reduce_sum is None:
        return gram
    total = all_reduce_sum(gram)
    if not isinstance(total, Tensor) or total.shape != gram.shape:
        found = tuple(total.shape) if isinstance(total, Tensor) else type(total).__name__
        raise ValueError(
            "Parameter `all_reduce_sum` should return a tensor of the shape it was given "
            f"{tuple(gram.shape)}. Found {found}."
        )
    return total.to(torch.float64)


def shard_direction(weights: Tensor, rows: Tensor) -> Tensor:
    """This rank's part ``w @ g_r`` of the update direction ``d = sum_k w_k g_k``.

    Args:
        weights: ``[K]`` effective weights (``harmonize_gram(G).weights``), identical on every rank.
        rows: ``[K, P_r]`` this rank's per-reward gradient columns, as given to
            :func:`sharded_gram`.

    Returns:
        ``[P_r]`` direction columns in ``rows``' dtype and device; concatenating the ranks' parts
        in column order gives the full ``[P]`` direction.

    Raises:
        ValueError: ``weights`` is not ``[K]`` or ``rows`` is not ``[K, P_r]`` with the same ``K``.
    """
    if weights.ndim != 1 or rows.ndim != 2 or rows.shape[0] != weights.shape[0]:
        raise ValueError(
            "Parameters `weights` and `rows` should have shapes [K] and [K, P_local]. "
            f"Found `weights.shape = {tuple(weights.shape)}` and `rows.shape = "
            f"{tuple(rows.shape)}`."
        )
    return weights.to(dtype=rows.dtype, device=rows.device) @ rows.detach()


class GradientAccumulator(abc.ABC):
    """Sums, over the training timesteps of one update, the gradient rows of the loss rows.

    Per timestep :meth:`add` gets the NFT terms and the losses (``R`` reward rows, then the KL
    loss when ``use_kl``); :meth:`result` returns ``[R (+1), P]`` averaged over timesteps.
    """

    def capture(self) -> contextlib.AbstractContextManager:
        """Context for the policy's forward pass of a timestep (hooks of the per-sample engine)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def add(
        self, terms: Any, losses: list[Tensor], rows: Tensor, use_kl: bool, reuse_old: bool
    ) -> None:
        """Accumulate one timestep's gradient rows."""

    @abc.abstractmethod
    def result(self, n_timesteps: int, scales: Tensor, nft_scale: float) -> Tensor:
        """``[R (+1), P]`` rows averaged over ``n_timesteps``."""


class _LossGradients(GradientAccumulator):
    """One autograd pass per loss row (``batched``: one vectorised call for all rows)."""

    def __init__(self, params: Sequence[Tensor], batched: bool) -> None:
        self.params = list(params)
        self.batched = batched
        self.total: Tensor | None = None

    def add(
        self, terms: Any, losses: list[Tensor], rows: Tensor, use_kl: bool, reuse_old: bool
    ) -> None:
        if self.batched:
            grads = per_reward_gradients(torch.stack(losses), self.params, engine="batched").float()
        else:
            grads = per_reward_gradients(losses, self.params).float()
        self.total = grads if self.total is None else self.total + grads

    def result(self, n_timesteps: int, scales: Tensor, nft_scale: float) -> Tensor:
        assert self.total is not None
        return self.total / n_timesteps


class _PerSampleRows(GradientAccumulator):
    """The exact per-sample engine: two backward passes per timestep whatever ``R``.

    Every NFT loss row is ``s * (r @ P + (1 - r) @ N) * nft_scale`` with ``P``/``N`` the
    per-sample gradients of ``L+_i``/``L-_i``; the rows are projected layer by layer, so ``[R, P]``
    is held, never ``[B, P]``.
    """

    def __init__(self, engine: PerSampleGradients, params: Sequence[Tensor]) -> None:
        self.engine = engine
        self.params = list(params)
        self.reward: Tensor | None = None
        self.total: Tensor | None = None

    def capture(self) -> contextlib.AbstractContextManager:
        return self.engine.capture()

    def add(
        self, terms: Any, losses: list[Tensor], rows: Tensor, use_kl: bool, reuse_old: bool
    ) -> None:
        n_r = rows.shape[0]
        if reuse_old:
            # v_old is v, so err- = err+ (to round-off) and L-_i has the gradient of -L+_i:
            # r @ P + (1 - r) @ N = (2 r - 1) @ P, and no other backward is needed
            part = self.engine.gradients(
                terms.positive.sum(), retain_graph=use_kl, project=2.0 * rows.detach() - 1.0
            ).float()
            grads = per_reward_gradients(losses[n_r:], self.params).float() if use_kl else None
        else:
            # r @ P + (1 - r) @ N = r @ (P - N) + sum_i N_i: the per-sample pass on L+ - L-, plus
            # one ordinary backward of sum_i L-_i, a [P] vector shared by every row
            part = self.engine.gradients(
                (terms.positive - terms.negative).sum(), retain_graph=True, project=rows.detach()
            ).float()
            plain = per_reward_gradients([terms.negative.sum(), *losses[n_r:]], self.params).float()
            part += plain[0]
            grads = plain[1:] if use_kl else None
        self.reward = part if self.reward is None else self.reward + part
        if grads is not None:
            self.total = grads if self.total is None else self.total + grads

    def result(self, n_timesteps: int, scales: Tensor, nft_scale: float) -> Tensor:
        assert self.reward is not None
        reward_part = nft_scale * self.reward / n_timesteps
        reward_part = reward_part * scales[:, None].to(self.reward.dtype)
        if self.total is None:
            return reward_part
        return torch.cat([reward_part, self.total / n_timesteps])


class GradientEngine:
    """How the gradient rows of an update are computed (one object per module).

    Args:
        name: ``"backward"``, ``"batched"``, ``"per_sample"`` or ``"auto"`` (``"per_sample"``
            when it applies to the model, else ``"backward"``; the reason is logged).
        model: the denoiser (for the per-sample engine's layer hooks).
        params: the trainable parameters (column order of the rows).

    Attributes:
        name: the engine in use after ``"auto"`` / fallback.
    """

    def __init__(self, name: str, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
        if name not in (*ENGINES, "auto"):
            raise ValueError(f"`gram` should be one of {('auto', *ENGINES)}, got {name!r}")
        self.params = list(params)
        self.per_sample: PerSampleGradients | None = None
        self.name = name
        if name in ("per_sample", "auto"):
            try:
                self.per_sample = PerSampleGradients(model, self.params)
                self.name = "per_sample"
            except UnsupportedModelError as err:
                message = (
                    f"gram={name!r}: the exact per-sample engine does not apply ({err}); "
                    "using 'backward'"
                )
                if name == "per_sample":
                    warnings.warn(message, stacklevel=3)
                else:
                    log.info(message)
                self.name = "backward"

    def accumulator(self, n_rows: int) -> GradientAccumulator:
        """An accumulator for an update with ``n_rows`` loss rows.

        A single row (an aggregated step) never needs per-reward gradients: one ordinary
        backward (or the batched call) does it.
        """
        if self.per_sample is not None and n_rows > 1:
            return _PerSampleRows(self.per_sample, self.params)
        return _LossGradients(self.params, self.name == "batched")
