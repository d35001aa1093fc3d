"""Sharded training (FSDP2) under Lightning's ``ModelParallelStrategy``, with exact MARBLE on
shards.

``MarbleDiffusionModule.configure_model`` calls :func:`configure_sharding`, which does nothing
unless the trainer's strategy is a ``ModelParallelStrategy``. Then:

* **Sharding**: :func:`shard_denoiser` applies ``fully_shard`` to every block of the denoiser (the
  children of its ``nn.ModuleList`` attributes: ``transformer_blocks`` for SD3, also
  ``single_transformer_blocks`` for FLUX, ``blocks`` for Wan) and then to the denoiser itself, over
  the strategy's ``data_parallel`` mesh dimension. The frozen base is always sharded; the LoRA
  adapters (policy and old) are sharded too (``lora_sharding="sharded"``, the default) or kept
  replicated on every rank (``"replicated"``: FSDP's ``ignored_params``). Rewards and text
  encoders stay replicated.
* **Exact MARBLE on shards** (sharded LoRA): :class:`ShardedNFTUpdate` builds this rank's
  ``[R, P_local]`` gradient rows with one ``backward`` per loss row, each reduce-scattered by FSDP
  (mean over ranks, as DDP's all-reduce would) into the local gradient shards; the ``K x K``
  Gram matrix is the all-reduced sum of the local Gram blocks (:func:`~marble_lightning.gram.
  sharded_gram`, ``K^2`` numbers on the wire), every rank solves the same QP and writes its shard
  ``w @ g_local`` of the direction (:func:`~marble_lightning.gram.shard_direction`). An
  aggregated (amortised / weighted-sum) step is a single backward through FSDP's reduce-scatter.
  With replicated LoRA the update is the unsharded code path unchanged (``[R, P]`` rows of the
  local batch, one mean all-reduce), and the per-sample engine still applies.
* **Checkpoints**: :class:`MarbleModelParallelStrategy` (registered as ``"marble_fsdp"``) saves and
  loads only the two adapters plus the optimizer state as a distributed checkpoint (a folder: one
  shard file per rank and Lightning's ``meta.pt``), never the frozen base.
* **LoRA export**: :func:`export_lora_sharded` gathers the full adapter and writes it on rank 0.

The data-parallel size must be the world size (``tensor_parallel_size=1``): ranks see different
prompts (``PromptDataModule`` splits the global batch by ``global_rank``) and FSDP shards over all
of them. ``MarbleModelParallelStrategy`` chooses that by default.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import Tensor, nn

from marble_lightning.gram import (
    GradientAccumulator,
    process_group_sum,
    shard_direction,
    sharded_gram,
)
from marble_lightning.harmonize import gram_cosines, harmonize_gram
from marble_lightning.update import NFTUpdate, UpdateResult, finish_result

__all__ = [
    "LORA_SHARDING",
    "MarbleModelParallelStrategy",
    "ShardedBackwardRows",
    "ShardedGradientEngine",
    "ShardedNFTUpdate",
    "configure_sharding",
    "export_lora_sharded",
    "full_lora_tensors",
    "shard_denoiser",
    "shard_module",
]

LORA_SHARDING = ("sharded", "replicated")


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameter or gradient), else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _is_dtensor(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


# ------------------------------------------------------------------------------------ sharding
def block_lists(denoiser: nn.Module) -> list[nn.ModuleList]:
    """The denoiser's direct ``nn.ModuleList`` children (its stacks of transformer blocks)."""
    return [child for child in denoiser.children() if isinstance(child, nn.ModuleList)]


def shard_denoiser(
    denoiser: nn.Module, mesh: Any, *, replicate: Sequence[nn.Parameter] = ()
) -> int:
    """``fully_shard`` every block of ``denoiser`` and then ``denoiser`` (the root group).

    Args:
        denoiser: the network to shard (in place; its class becomes FSDP's subclass).
        mesh: a 1-D device mesh (the data-parallel dimension).
        replicate: parameters to leave unsharded on every rank (FSDP's ``ignored_params``).

    Returns:
        The number of blocks sharded on their own.
    """
    from torch.distributed.fsdp import fully_shard

    ignored = set(replicate) or None
    blocks = [block for stack in block_lists(denoiser) for block in stack]
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(denoiser, mesh=mesh, ignored_params=ignored)
    return len(blocks)


def data_parallel_mesh(strategy: ModelParallelStrategy) -> Any:
    """The strategy's 1-D ``data_parallel`` mesh; the tensor-parallel size must be 1."""
    mesh = strategy.device_mesh
    tp = mesh["tensor_parallel"].size()
    if tp != 1:
        raise ValueError(
            "MarbleDiffusionModule shards the denoiser with FSDP over the data-parallel ranks "
            f"only; got tensor_parallel_size={tp}. Use ModelParallelStrategy(data_parallel_size="
            "<world size>, tensor_parallel_size=1) or MarbleModelParallelStrategy (that default)."
        )
    return mesh["data_parallel"]


def configure_sharding(module: Any) -> bool:
    """Shard ``module``'s denoiser when its trainer runs a ``ModelParallelStrategy`` (else no-op).

    Idempotent (Lightning calls ``configure_model`` once per ``fit``/``validate``/... call).

    Returns:
        Whether the denoiser is sharded.
    """
    trainer = getattr(module, "_trainer", None)
    if getattr(module, "_sharded_lora", None) is not None:
        return True
    if trainer is None:
        return False
    strategy = trainer.strategy
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        raise NotImplementedError(
            "MarbleDiffusionModule does not support FSDPStrategy (FSDP1: it flattens the LoRA and "
            "frozen weights into FlatParameters, so per-parameter gradient shards cannot be read "
            "per reward); use ModelParallelStrategy / MarbleModelParallelStrategy (FSDP2)."
        )
    if not isinstance(strategy, ModelParallelStrategy):
        return False
    lora = getattr(strategy, "lora_sharding", "sharded")
    shard_module(module, data_parallel_mesh(strategy), lora)
    return True


def shard_module(module: Any, mesh: Any, lora: str = "sharded") -> None:
    """Shard a ``MarbleDiffusionModule``'s denoiser over the 1-D ``mesh`` (what
    :func:`configure_sharding` does under a strategy; usable without a trainer, e.g. benchmarks).

    Args:
        module: the module (before its optimizer is built: the parameters are replaced).
        mesh: 1-D data-parallel device mesh.
        lora: ``"sharded"`` or ``"replicated"`` adapters.
    """
    if lora not in LORA_SHARDING:
        raise ValueError(f"`lora_sharding` should be one of {LORA_SHARDING}, got {lora!r}")
    adapters = module.adapters
    replicate = (
        list(adapters.policy_params) + list(adapters.old_params) if lora == "replicated" else []
    )
    shard_denoiser(module.backbone.denoiser, mesh, replicate=replicate)
    adapters.rebind()  # fully_shard replaced the Parameter objects (DTensors now)
    if lora == "sharded":
        engine = ShardedGradientEngine(adapters.policy_params)
        module.engine = engine
        module.gram = engine.name
        module.updater = ShardedNFTUpdate.from_update(module.updater, engine, mesh.get_group())
    module._sharded_lora = lora


# ------------------------------------------------------------------------ gradient rows on shards
class ShardedBackwardRows(GradientAccumulator):
    """One ``backward`` per loss row; the rows are the local gradient shards FSDP reduce-scattered
    (the mean over ranks of the rows' gradients), concatenated in parameter order."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.total: Tensor | None = None

    def _clear(self) -> None:
        for p in self.params:
            p.grad = None

    def add(
        self, terms: Any, losses: list[Tensor], rows: Tensor, use_kl: bool, reuse_old: bool
    ) -> None:
        out = []
        for i, loss in enumerate(losses):
            self._clear()
            loss.backward(retain_graph=i < len(losses) - 1)
            out.append(
                torch.cat(
                    [
                        (_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p)))
                        .reshape(-1)
                        .float()
                        for p in self.params
                    ]
                )
            )
        self._clear()
        grads = torch.stack(out)
        self.total = grads if self.total is None else self.total + grads

    def result(self, n_timesteps: int, scales: Tensor, nft_scale: float) -> Tensor:
        assert self.total is not None
        return self.total / n_timesteps


class ShardedGradientEngine:
    """The gradient engine of sharded LoRA parameters (see :class:`ShardedBackwardRows`)."""

    name = "backward"

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.per_sample = None

    def accumulator(self, n_rows: int) -> GradientAccumulator:
        return ShardedBackwardRows(self.params)


class ShardedNFTUpdate(NFTUpdate):
    """:class:`~marble_lightning.update.NFTUpdate` on gradient rows that are column shards.

    The rows are already averaged over the ranks (FSDP's reduce-scatter), so they are not reduced
    again; every quantity that needs whole rows (the Gram matrix, the direction's norm, the
    diagnostics' cosines) comes from a ``K x K`` (or ``(K+1) x (K+1)``) sum all-reduce of the
    local Gram blocks. Mirrors ``NFTUpdate.compute``; ``result.direction``, ``result.kl_grad`` and
    ``result.grads`` are this rank's columns.
    """

    group: Any = None

    @classmethod
    def from_update(
        cls, update: NFTUpdate, engine: ShardedGradientEngine, group: Any
    ) -> ShardedNFTUpdate:
        sharded = cls.__new__(cls)
        sharded.__dict__.update(update.__dict__)
        sharded.engine = engine
        sharded.group = group
        return sharded

    def _gram(self, rows: Tensor) -> Tensor:
        return sharded_gram(rows, process_group_sum(self.group))

    def compute(  # type: ignore[override]
        self,
        rollout: Any,
        plan: Any,
        *,
        grid: Tensor,
        timesteps: list[int],
        update: int,
        refresh: bool,
        coefficients: Any,
        collective: Any,
        names: list[str],
    ) -> UpdateResult:
        k = len(names)
        use_kl = self.kl_weight > 0
        start = time.perf_counter()
        total, mean_losses, metrics = self._gradient_rows(rollout, plan, grid, timesteps, update)
        metrics["time/backward"] = time.perf_counter() - start
        metrics["loss/kl"] = float(mean_losses[-1]) if use_kl else 0.0
        kl_grad = total[-1] if use_kl else torch.zeros_like(total[0])
        reward_rows = total[:-1] if use_kl else total

        start = time.perf_counter()
        if refresh:
            assert coefficients is not None
            gram = self._gram(reward_rows)  # one K x K all-reduce
            h = harmonize_gram(gram)
            alpha, weights = coefficients.record_refresh(h, gram)
            direction = shard_direction(weights, reward_rows)
            cosines = gram_cosines(gram, weights, h.dropped)
            w = weights.double().cpu()
            metrics["norm/direction"] = float(w @ gram.cpu() @ w) ** 0.5
            for i, name in enumerate(names):
                metrics[f"loss/{name}"] = float(mean_losses[i])
            metrics["loss/nft"] = float((weights.double() * mean_losses[:k]).sum())
            result = UpdateResult(
                direction=direction, kl_grad=kl_grad, alpha=alpha.double(),
                weights=weights.double(), refreshed=True, harmonized=h, grads=reward_rows,
                cosines=cosines, skipped=bool(h.dropped.all()),
            )  # fmt: skip
        else:
            direction = reward_rows[0]
            grads = reward_rows[1 : 1 + k] if plan.rows.shape[0] > 1 else None
            cosines = None
            if grads is not None:
                joint = self._gram(torch.cat([direction[None], grads]))  # (K+1) x (K+1)
                norms = joint.diagonal()[1:].clamp_min(0).sqrt().cpu()
                dropped = norms <= 1e-6 * norms.max().clamp_min(1e-300)
                denom = joint[0, 0].clamp_min(0).sqrt().cpu() * norms
                cosines = torch.where(
                    denom > 0, joint[0, 1:].cpu() / denom.clamp_min(1e-300), torch.zeros_like(denom)
                )
                cosines[dropped] = float("nan")
                for i, name in enumerate(names):
                    metrics[f"loss/{name}"] = float(mean_losses[1 + i])
                    metrics[f"norm/{name}"] = float(norms[i])
            metrics["loss/nft"] = float(mean_losses[0])
            weights = plan.weights
            result = UpdateResult(
                direction=direction, kl_grad=kl_grad, alpha=plan.alpha.double(),
                weights=None if weights is None else weights.double(), refreshed=False,
                grads=grads, cosines=cosines,
                skipped=weights is not None and float(weights.sum()) <= 0,
            )  # fmt: skip
        # a non-finite entry on any rank makes every rank's direction non-finite, so that every
        # rank refuses the step (the optimizer must not step on some ranks only)
        bad = (~torch.isfinite(result.direction + result.kl_grad)).any().double().reshape(1)
        if float(process_group_sum(self.group)(bad)) > 0:
            result.direction = torch.full_like(result.direction, float("nan"))
        metrics["time/qp"] = time.perf_counter() - start
        return finish_result(result, metrics, names, timesteps)


# ------------------------------------------------------------------------------- the strategy
class MarbleModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for :class:`~marble_lightning.module.MarbleDiffusionModule`.

    Differences from Lightning's: the data-parallel size defaults to the world size (FSDP over
    every rank, ``tensor_parallel_size=1``); checkpoints hold only the LoRA adapters' shards and
    the optimizer state (a distributed checkpoint folder), never the frozen base, and load back
    into the sharded module.

    Args:
        lora_sharding: ``"sharded"`` (default) or ``"replicated"`` LoRA adapters.
        data_parallel_size: ``"auto"``: ``num_nodes * devices``.
        kwargs: the rest of ``ModelParallelStrategy``'s arguments.
    """

    def __init__(
        self,
        lora_sharding: str = "sharded",
        data_parallel_size: Any = "auto",
        tensor_parallel_size: Any = 1,
        **kwargs: Any,
    ) -> None:
        if lora_sharding not in LORA_SHARDING:
            raise ValueError(
                f"`lora_sharding` should be one of {LORA_SHARDING}, got {lora_sharding!r}"
            )
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            **kwargs,
        )
        self.lora_sharding = lora_sharding

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def _adapter_state(self) -> dict[str, Tensor]:
        module = self.lightning_module
        keys = set(module.adapters.state_keys("backbone.denoiser."))
        return {key: value for key, value in module.state_dict().items() if key in keys}

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._save_distributed_checkpoint:
            return super().lightning_module_state_dict()
        return {key: value.detach() for key, value in self._adapter_state().items()}

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        from lightning.fabric.strategies.fsdp import _METADATA_FILENAME, _is_sharded_checkpoint
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = self._adapter_state()  # the live (sharded) tensors: loaded in place
        load({"state_dict": state}, checkpoint_id=path)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=optim_state[key],
                options=StateDictOptions(cpu_offload=True),
            )  # fmt: skip
        # plain values only: never unpickle code, whatever the caller asked
        metadata = torch.load(path / _METADATA_FILENAME, weights_only=True)
        # the module's on_load_checkpoint checks the adapter keys (the values are already loaded)
        metadata["state_dict"] = state
        return metadata


def register_fsdp_strategy() -> None:
    """Register :class:`MarbleModelParallelStrategy` as ``"marble_fsdp"`` (and
    ``"marble_fsdp_replicated_lora"``)."""
    StrategyRegistry.register(
        "marble_fsdp", MarbleModelParallelStrategy,
        description="FSDP2 (ModelParallelStrategy) for MarbleDiffusionModule, sharded LoRA",
        override=True,
    )  # fmt: skip
    StrategyRegistry.register(
        "marble_fsdp_replicated_lora", MarbleModelParallelStrategy,
        description="FSDP2 (ModelParallelStrategy) for MarbleDiffusionModule, replicated LoRA",
        lora_sharding="replicated", override=True,
    )  # fmt: skip


register_fsdp_strategy()


# ---------------------------------------------------------------------------------- LoRA export
def full_lora_tensors(module: Any) -> dict[str, Tensor]:
    """Every adapter tensor of ``module``'s denoiser, gathered whole (collective: every rank
    calls)."""
    out = {}
    for name, p in module.backbone.denoiser.named_parameters():
        if ".lora_" in name:
            out[name] = (p.full_tensor() if _is_dtensor(p) else p).detach().cpu().clone()
    return out


@contextmanager
def _full_parameters(denoiser: nn.Module, tensors: dict[str, Tensor]) -> Iterator[None]:
    """Swap the named (sharded) parameters for whole ones, restore them afterwards."""
    saved = []
    try:
        for name, value in tensors.items():
            owner_name, _, attr = name.rpartition(".")
            owner = denoiser.get_submodule(owner_name)
            saved.append((owner, attr, owner._parameters[attr]))
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
        yield
    finally:
        for owner, attr, param in reversed(saved):
            owner._parameters[attr] = param


def export_lora_sharded(module: Any, out_dir: str | Path, **kwargs: Any) -> Path | None:
    """:func:`~marble_lightning.lora_export.export_lora` of a sharded module: every rank gathers the
    adapter (collective), rank 0 writes it. Returns rank 0's output folder, ``None`` elsewhere."""
    from marble_lightning.lora_export import export_lora

    tensors = full_lora_tensors(module)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    written = None
    if rank == 0:
        with _full_parameters(module.backbone.denoiser, tensors):
            written = export_lora(module, out_dir, **kwargs)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return None if written is None else Path(written)
