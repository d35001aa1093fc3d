"""The one seed hash of the package: stable 63-bit seeds from any tuple of keys.

Every random draw of training (rollout noise, training-timestep noise, the choice of training
timesteps, the order of the prompts) uses a ``torch.Generator`` seeded by :func:`stable_seed` of
what identifies the draw, never the global RNG: a draw does not depend on the rank, on the order
of the batch or on what ran before, so resumed and multi-device runs see the same numbers.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["generator", "stable_seed"]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from a stable hash of ``parts`` (independent of ``PYTHONHASHSEED``)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`stable_seed` of ``parts``."""
    return torch.Generator().manual_seed(stable_seed(*parts))
