"""The policy / old LoRA adapter pair on one denoiser.

The denoiser (a diffusers model with ``PeftAdapterMixin``) carries two LoRA adapters of the same
shape: ``"policy"`` (trained) and ``"old"`` (the sampling policy of the rollouts, a soft copy of
the policy). ``"base"`` means adapters disabled (the frozen reference model).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["ADAPTERS", "BASE", "OLD", "POLICY", "LoraAdapterPair"]

POLICY = "policy"
OLD = "old"
BASE = "base"
ADAPTERS = (POLICY, OLD, BASE)
_REQUIRED = ("add_adapter", "set_adapter", "disable_adapters", "enable_adapters")


class LoraAdapterPair:
    """Attach, switch, soft-update and write gradients of the policy and old LoRA adapters.

    Args:
        denoiser: the model to attach to (must support diffusers' PEFT adapters).
        rank: LoRA rank.
        alpha: LoRA alpha (scale ``alpha / rank``).
        targets: module-name patterns for LoRA.
        seed: seed of the LoRA initialisation (the global RNG is left untouched).
        merge: fold the LoRA into the base weights for gradient-free forwards (:meth:`inference`).

    Attributes:
        policy_names / old_names: the adapter parameter names in ``denoiser``, aligned, sorted.
        policy_params / old_params: the parameters, aligned with the names.
        old_is_policy: True while the old adapter is known to equal the policy (then the old
            policy's forward can be skipped).
        merge: see :meth:`inference`.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        rank: int,
        alpha: float,
        targets: list[str],
        seed: int,
        merge: bool = True,
    ) -> None:
        from peft import LoraConfig

        for method in _REQUIRED:
            if not hasattr(denoiser, method):
                raise ValueError(
                    f"backbone.denoiser ({type(denoiser).__name__}) lacks `{method}`; it must "
                    "support diffusers' PEFT adapters (PeftAdapterMixin)"
                )
        self.denoiser = denoiser
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                denoiser.add_adapter(config, adapter_name=POLICY)
                with warnings.catch_warnings():  # a second adapter is intended here
                    warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                    denoiser.add_adapter(config, adapter_name=OLD)
            except ValueError as err:
                raise ValueError(f"could not attach LoRA to targets {targets}: {err}") from err
        named = dict(denoiser.named_parameters())
        self.policy_names = sorted(n for n in named if ".lora_" in n and f".{POLICY}." in n)
        self.old_names = [n.replace(f".{POLICY}.", f".{OLD}.") for n in self.policy_names]
        if not self.policy_names:
            raise ValueError(f"LoRA targets {targets} matched no module of the denoiser")
        self.policy_params = [named[n] for n in self.policy_names]
        self.old_params = [named[n] for n in self.old_names]
        with torch.no_grad():
            for old, new in zip(self.old_params, self.policy_params):
                old.copy_(new)
        self.old_is_policy = True
        self.merge = merge
        self._layers: list[nn.Module] | None = None
        self.activate(POLICY)

    @classmethod
    def for_backbone(
        cls,
        backbone: nn.Module,
        rank: int,
        alpha: float,
        targets: list[str] | None,
        seed: int,
        merge: bool = True,
    ) -> LoraAdapterPair:
        """Freeze ``backbone`` and attach the pair to its ``denoiser`` (``targets=None``: the
        backbone's ``lora_target_modules``)."""
        targets = list(targets) if targets is not None else list(backbone.lora_target_modules)
        if not targets:
            raise ValueError(
                "`lora_targets` is empty and the backbone names no lora_target_modules"
            )
        backbone.requires_grad_(False)
        return cls(backbone.denoiser, rank, alpha, targets, seed, merge)

    def activate(self, adapter: str) -> None:
        """Make ``adapter`` ("policy", "old" or "base" = adapters disabled) the active one."""
        if adapter == BASE:
            self.denoiser.disable_adapters()
        else:
            self.denoiser.enable_adapters()
            self.denoiser.set_adapter(adapter)
        # PEFT toggles requires_grad when switching; only the policy LoRA is ever trainable.
        for p in self.policy_params:
            p.requires_grad_(True)
        for p in self.old_params:
            p.requires_grad_(False)

    @contextmanager
    def using(self, adapter: str) -> Iterator[None]:
        """Context in which the denoiser runs ``adapter``; restores the policy afterwards."""
        if adapter not in ADAPTERS:
            raise ValueError(f"`adapter` should be one of {ADAPTERS}, got {adapter!r}")
        self.activate(adapter)
        try:
            yield
        finally:
            self.activate(POLICY)

    @contextmanager
    def inference(self, adapter: str) -> Iterator[None]:
        """Context for gradient-free forwards of ``adapter`` (sampling, old / reference velocities).

        With :attr:`merge` set, each LoRA layer's ``scale * B @ A`` is added to a transient copy of
        its frozen base weight and the adapters are disabled, so a forward costs what the base
        model's does (on the toy UNet the LoRA branches made it ~1.6x slower). Outputs equal
        :meth:`using`'s to float rounding; the base weights are restored bit for bit on exit. The
        copy costs the memory of the targeted weights while the context is open. Sharded (FSDP2)
        parameters, or ``merge=False``, fall back to :meth:`using`. Use only under
        ``torch.no_grad()``: no gradient reaches the LoRA inside.
        """
        if adapter not in ADAPTERS:
            raise ValueError(f"`adapter` should be one of {ADAPTERS}, got {adapter!r}")
        if adapter == BASE or not self.merge or self.sharded:
            with self.using(adapter):
                yield
            return
        swapped: list[tuple[nn.Parameter, Tensor]] = []
        try:
            with torch.no_grad():
                for layer in self._lora_layers():
                    weight = layer.get_base_layer().weight
                    delta = layer.get_delta_weight(adapter)
                    swapped.append((weight, weight.data))
                    weight.data = weight.data + delta.to(weight.dtype)
            self.activate(BASE)
            yield
        finally:
            for weight, original in reversed(swapped):
                weight.data = original
            self.activate(POLICY)

    @property
    def sharded(self) -> bool:
        """True when the adapter parameters are FSDP2 DTensors."""
        return any(hasattr(p, "to_local") for p in self.policy_params)

    def _lora_layers(self) -> list[nn.Module]:
        """The PEFT LoRA layers of the denoiser (cached)."""
        if self._layers is None:
            from peft.tuners.lora import LoraLayer

            self._layers = [
                m
                for m in self.denoiser.modules()
                if isinstance(m, LoraLayer) and POLICY in getattr(m, "lora_A", {})
            ]
        return self._layers

    @torch.no_grad()
    def soft_update(self, eta: float) -> None:
        """``theta_old <- eta theta_old + (1 - eta) theta`` (``eta = 0``: copy the policy)."""
        for old, new in zip(self.old_params, self.policy_params):
            old.mul_(eta).add_(new.detach(), alpha=1.0 - eta)
        self.old_is_policy = eta == 0.0

    def rebind(self) -> None:
        """Re-read the parameters by name (FSDP's ``fully_shard`` replaces them with DTensors)."""
        named = dict(self.denoiser.named_parameters())
        self.policy_params = [named[n] for n in self.policy_names]
        self.old_params = [named[n] for n in self.old_names]
        self._layers = None

    def write_gradients(self, flat: Tensor) -> None:
        """Set ``p.grad`` of the policy parameters from one ``[P]`` vector (in parameter order).

        Sharded (FSDP2 DTensor) parameters: ``flat`` holds this rank's local shards, in order.
        """
        total = sum(
            p.to_local().numel() if hasattr(p, "to_local") else p.numel()
            for p in self.policy_params
        )
        if flat.numel() != total:
            raise ValueError(f"gradient vector has {flat.numel()} entries, the policy has {total}")
        offset = 0
        for p in self.policy_params:
            if hasattr(p, "to_local"):  # sharded (marble_lightning.sharding); DDP path unchanged
                offset = _write_shard(p, flat, offset)
                continue
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n

    def state_keys(self, prefix: str) -> list[str]:
        """Checkpoint keys of both adapters, each name prefixed with ``prefix``."""
        return [prefix + n for n in self.policy_names + self.old_names]

    def check_state(self, state: dict, prefix: str) -> None:
        """Raise unless ``state``'s keys are exactly this pair's adapter tensors (``prefix`` +
        name)."""
        expected = set(self.state_keys(prefix))
        missing = sorted(expected - set(state))
        unexpected = sorted(key for key in state if key not in expected)
        if missing or unexpected:
            example = (missing or unexpected)[0]
            raise ValueError(
                f"checkpoint does not match this module's LoRA adapter tensors ({len(missing)} "
                f"missing, {len(unexpected)} unexpected, e.g. {example!r}); was it written with "
                "other lora_targets / lora_rank?"
            )


def _write_shard(p: Tensor, flat: Tensor, offset: int) -> int:
    """``p.grad`` of a DTensor parameter from its local shard in ``flat[offset:]``; the new
    offset."""
    from torch.distributed.tensor import DTensor

    local = p.to_local()
    n = local.numel()
    piece = flat[offset : offset + n].view_as(local).to(p.dtype).clone()
    p.grad = DTensor.from_local(
        piece, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
    )
    return offset + n
