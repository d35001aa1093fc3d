"""Sharded Gram matrix: per-shard Gram blocks sum to the full Gram, and MARBLE's weights and update
direction are the same whether the gradient columns live on one process or are split over ranks.

(a) a hypothesis property over random column partitions (no processes);
(b) two real gloo ranks that each own a disjoint subset of a LoRA model's trainable parameters and
    compute their gradient columns with ``PerSampleGradients``;
(c) two real gloo ranks running torch's FSDP2 (``fully_shard`` on a CPU device mesh), whose rows
    are the local shards ``param.grad.to_local()`` of ``K`` reward backward passes.
The single-process reference is always ``per_reward_gradients(..., engine="backward")`` followed
by :func:`harmonize`.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from marble_lightning.gram import (
    PerSampleGradients,
    per_reward_gradients,
    process_group_sum,
    shard_direction,
    sharded_gram,
)
from marble_lightning.harmonize import harmonize, harmonize_gram

torch.set_num_threads(1)

K = 3
BATCH = 4


# ----------------------------------------------------------------------------------------------
# (a) column partitions, single process


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 5),
    extra_columns=st.integers(0, 30),
    shards=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    zero_row=st.booleans(),
)
def test_shard_grams_sum_to_full_gram(
    k: int, extra_columns: int, shards: int, seed: int, zero_row: bool
) -> None:
    p = k + extra_columns  # P >= K: independent rows, so the min-norm weights are well determined
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, p, generator=gen, dtype=torch.float64)
    rows *= torch.logspace(-2, 2, k, dtype=torch.float64)[:, None]  # unequal gradient norms
    if zero_row and k > 1:
        rows[0] = 0.0  # a reward with no gradient: dropped in both computations
    owner = torch.randint(0, shards, (p,), generator=gen)  # arbitrary, non-contiguous partition
    columns = [torch.nonzero(owner == s).flatten() for s in range(shards)]  # some may be empty

    total = sum(sharded_gram(rows[:, idx]) for idx in columns)
    full = rows @ rows.T
    assert total.dtype == torch.float64 and total.shape == (k, k)
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-12 * float(full.abs().max()))

    reference = harmonize(rows)
    sharded = harmonize_gram(total)
    assert torch.equal(sharded.dropped, reference.dropped)
    scale = float(reference.weights.abs().max()) + 1e-300
    torch.testing.assert_close(sharded.weights, reference.weights, rtol=1e-7, atol=1e-9 * scale)
    torch.testing.assert_close(sharded.alpha, reference.alpha, rtol=1e-7, atol=1e-9)

    direction = torch.zeros(p, dtype=torch.float64)
    for idx in columns:
        direction[idx] = shard_direction(sharded.weights, rows[:, idx])
    assert reference.direction is not None
    torch.testing.assert_close(
        direction,
        reference.direction,
        rtol=1e-7,
        atol=1e-9 * float(reference.direction.abs().max() + 1e-300),
    )


def test_bad_shapes_are_reported() -> None:
    with pytest.raises(ValueError, match=r"rows.shape = \(3,\)"):
        sharded_gram(torch.zeros(3))
    with pytest.raises(ValueError, match=r"rows.shape = \(0, 4\)"):
        sharded_gram(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="rows.dtype = torch.int64"):
        sharded_gram(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        sharded_gram(torch.ones(2, 4), all_reduce_sum=lambda t: t.reshape(-1))
    with pytest.raises(ValueError, match=r"weights.shape = \(3,\).*rows.shape = \(2, 5\)"):
        shard_direction(torch.ones(3), torch.ones(2, 5))
    with pytest.raises(RuntimeError, match="not initialised"):
        process_group_sum()(torch.ones(2, 2))
    # a rank that owns no columns contributes a zero block
    empty = sharded_gram(torch.zeros(2, 0, dtype=torch.float32))
    assert torch.equal(empty, torch.zeros(2, 2, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# shared by the two-process tests


class LoRALinear(nn.Module):
    """Frozen ``nn.Linear`` plus a trainable low-rank update ``up(down(x))``."""

    def __init__(self, features_in: int, features_out: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(features_in, features_out)
        self.down = nn.Linear(features_in, rank, bias=False)
        self.up = nn.Linear(rank, features_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


class LoRAConv(nn.Module):
    """Frozen 3x3 ``nn.Conv2d`` plus a trainable low-rank update (3x3 down, 1x1 up)."""

    def __init__(self, channels_in: int, channels_out: int, rank: int = 2, stride: int = 1) -> None:
        super().__init__()
        self.base = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1)
        self.down = nn.Conv2d(channels_in, rank, 3, stride=stride, padding=1, bias=False)
        self.up = nn.Conv2d(rank, channels_out, 1, bias=True)  # a trainable bias as well

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = LoRAConv(3, 5)
        self.conv2 = LoRAConv(5, 4, stride=2)
        self.head = LoRALinear(4 * 3 * 3, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        return self.head(h.flatten(1))


def tiny_model() -> tuple[TinyNet, list[nn.Parameter]]:
    """The same float64 model on every call; only the LoRA ``down``/``up`` parameters train."""
    torch.manual_seed(0)
    model = TinyNet().double()
    for name, p in model.named_parameters():
        p.requires_grad_(".base." not in name)
        if ".up." in name:  # non-zero up-projections so that every LoRA matrix gets a gradient
            nn.init.normal_(p, std=0.5)
    return model, [p for p in model.parameters() if p.requires_grad]


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs ``[B, 3, 6, 6]``, targets ``[B, 7]`` and reward coefficients ``r`` ``[K, B]`` of one
    rank."""
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(BATCH, 3, 6, 6, generator=gen, dtype=torch.float64)
    target = torch.randn(BATCH, 7, generator=gen, dtype=torch.float64)
    r = torch.rand(K, BATCH, generator=gen, dtype=torch.float64)
    return x, target, r


def reward_losses(model: nn.Module, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(losses [K], per-sample losses [B], r [K, B])`` with ``losses = r @ per_sample``."""
    x, target, r = rank_batch(rank)
    per_sample = (model(x) - target).square().mean(dim=1)
    return r @ per_sample, per_sample, r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _launch(worker: Callable[..., None], tmp_path: Path, world: int = 2) -> list[dict]:
    """Run ``worker(rank, world, port, tmp_path)`` on ``world`` forked gloo ranks; load their
    dumps."""
    mp.start_processes(
        worker, args=(world, _free_port(), tmp_path), nprocs=world, start_method="fork"
    )
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


# ----------------------------------------------------------------------------------------------
# (b) disjoint parameter subsets per rank, PerSampleGradients rows


def _owned(params: list[nn.Parameter], rank: int, world: int) -> list[int]:
    """Interleaved ownership: a LoRA layer's ``down`` and ``up`` end up on different ranks."""
    return list(range(rank, len(params), world))


def _subset_worker(rank: int, world: int, port: int, tmp_path: Path) -> None:
    _init(rank, world, port)
    try:
        model, params = tiny_model()
        owned = _owned(params, rank, world)
        engine = PerSampleGradients(model, [params[i] for i in owned])
        with engine.capture():
            _, per_sample, r = reward_losses(model, rank=0)  # every rank sees the same batch
        rows = engine.gradients(per_sample.sum(), project=r)  # [K, P_rank]: r @ per-sample grads
        gram = sharded_gram(rows, process_group_sum())
        weights = harmonize_gram(gram).weights
        piece = shard_direction(weights, rows)
        sizes = [params[i].numel() for i in owned]
        torch.save(
            {
                "gram": gram,
                "weights": weights,
                "owned": owned,
                "pieces": list(piece.split(sizes)),
                "columns": rows.shape[1],
            },
            tmp_path / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_owning_parameter_subsets_match_one_process(tmp_path: Path) -> None:
    results = _launch(_subset_worker, tmp_path)

    model, params = tiny_model()
    losses, _, _ = reward_losses(model, rank=0)
    g = per_reward_gradients(losses, params, engine="backward")
    reference = harmonize(g)
    assert reference.direction is not None
    assert (g.abs().sum(dim=1) > 1e-3).all()

    owned = [set(res["owned"]) for res in results]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(len(params)))
    assert all(res["columns"] > 0 for res in results)
    assert sum(res["columns"] for res in results) == g.shape[1]
    # both ranks hold the same reduced Gram matrix and weights, equal to the one-process values
    assert torch.equal(results[0]["gram"], results[1]["gram"])
    assert torch.equal(results[0]["weights"], results[1]["weights"])
    torch.testing.assert_close(results[0]["gram"], g @ g.T, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(results[0]["weights"], reference.weights, rtol=1e-8, atol=1e-12)
    # each rank's piece of w @ g, put back in parameter order, is the one-process direction
    pieces: dict[int, torch.Tensor] = {}
    for res in results:
        pieces.update(zip(res["owned"], res["pieces"]))
    direction = torch.cat([pieces[i] for i in range(len(params))])
    torch.testing.assert_close(direction, reference.direction, rtol=1e-8, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# (c) torch FSDP2 (fully_shard) on a CPU device mesh; rows are the local gradient shards


def _fsdp_worker(rank: int, world: int, port: int, tmp_path: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    _init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model, _ = tiny_model()
        for block in (model.conv1, model.conv2, model.head):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = [p for p in model.parameters() if p.requires_grad]  # now DTensor shards
        assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses, _, _ = reward_losses(model, rank)  # each rank its own batch (data parallel)
            rows = []
            for k in range(K):  # FSDP reduce-scatters (mean over ranks) into the local grad shards
                model.zero_grad(set_to_none=True)
                losses[k].backward(retain_graph=k < K - 1)
                assert all(isinstance(p.grad, DTensor) for p in params)
                rows.append(torch.cat([p.grad.to_local().reshape(-1) for p in params]))
        rows = torch.stack(rows)  # [K, P_rank]
        gram = sharded_gram(rows, process_group_sum())
        weights = harmonize_gram(gram).weights
        piece = shard_direction(weights, rows)
        # write this rank's direction into the sharded .grad (what the optimizer steps on), then
        # gather the full tensors to compare with the single-process direction
        offset = 0
        for p in params:
            local = p.grad.to_local()
            local.copy_(piece[offset : offset + local.numel()].view_as(local))
            offset += local.numel()
        full = [p.grad.full_tensor() for p in params]
        torch.save(
            {
                "gram": gram,
                "weights": weights,
                "direction": torch.cat([f.reshape(-1) for f in full]),
                "local_numel": [p.to_local().numel() for p in params],
                "full_numel": [p.numel() for p in params],
            },
            tmp_path / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_fsdp2_local_gradient_shards_match_one_process(tmp_path: Path) -> None:
    results = _launch(_fsdp_worker, tmp_path)

    model, params = tiny_model()
    per_rank = [reward_losses(model, rank)[0] for rank in range(2)]
    losses = (per_rank[0] + per_rank[1]) / 2  # FSDP's gradient is the mean over the ranks
    g = per_reward_gradients(losses, params, engine="backward")
    reference = harmonize(g)
    assert reference.direction is not None and (g.abs().sum(dim=1) > 1e-3).all()

    # the parameters really are sharded: every rank holds a strict part, the parts add up
    local = torch.tensor([res["local_numel"] for res in results])
    assert torch.equal(local.sum(dim=0), torch.tensor(results[0]["full_numel"]))
    assert (local < torch.tensor(results[0]["full_numel"])).any(dim=1).all()

    assert torch.equal(results[0]["gram"], results[1]["gram"])
    assert torch.equal(results[0]["weights"], results[1]["weights"])
    torch.testing.assert_close(results[0]["gram"], g @ g.T, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(results[0]["weights"], reference.weights, rtol=1e-8, atol=1e-12)
    for res in results:
        torch.testing.assert_close(res["direction"], reference.direction, rtol=1e-8, atol=1e-12)
