"""Rollout precision: which autocast dtype the training sampler runs in, chosen from the hardware.

``rollout_precision="auto"`` (the default) picks bfloat16 only where the device computes it
natively: a CUDA device that reports bf16 support, or a CPU with AVX-512-BF16 or AMX-BF16
instructions. Elsewhere (e.g. an AVX2-only CPU, where bf16 autocast falls back to slow generic
kernels and a toy rollout was measured ~15x slower than float32) it picks float32.
"""

from __future__ import annotations

import contextlib
import logging

import torch

__all__ = [
    "ROLLOUT_PRECISIONS",
    "SUPPORTED_TRAINER_PRECISIONS",
    "autocast_context",
    "check_trainer_precision",
    "native_bf16",
    "resolve_rollout_precision",
]

log = logging.getLogger(__name__)

ROLLOUT_PRECISIONS: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""``rollout_precision`` values and their autocast dtypes (``None``: no autocast / decided
later)."""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA bf16 support; CPU AVX-512-BF16 or
    AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    # bf16 kernels are dispatched only at AVX-512 (or AMX) capability; ATEN_CPU_CAPABILITY=avx2
    # lowers it, and then bf16 runs on slow generic kernels whatever the hardware
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")):
        return False
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None:
        try:
            if bool(probe()):
                return True
        except RuntimeError:
            pass
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def resolve_rollout_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` with ``"auto"`` replaced by ``"bfloat16"`` or ``"float32"`` for ``device``.

    The decision is logged (INFO) with the CPU capability torch reports.
    """
    if precision not in ROLLOUT_PRECISIONS:
        raise ValueError(
            f"`rollout_precision` should be one of {tuple(ROLLOUT_PRECISIONS)}, got {precision!r}"
        )
    if precision != "auto":
        return precision
    chosen = "bfloat16" if native_bf16(device) else "float32"
    log.info(
        "rollout_precision='auto' -> %r on %s (CPU capability %s)",
        chosen,
        torch.device(device),
        torch.backends.cpu.get_cpu_capability(),
    )
    return chosen


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for a resolved ``precision`` on ``device`` (a no-op for float32)."""
    dtype = ROLLOUT_PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


SUPPORTED_TRAINER_PRECISIONS = ("32-true", "64-true")
"""Trainer precisions the module supports: it computes and writes its gradients itself, so a
precision plugin's loss scaling (``16-mixed``) or whole-step autocast (``bf16-mixed``) does not
apply. Use the backbone's ``torch_dtype`` for low-precision base weights and
``rollout_precision`` for a fast sampler."""


def check_trainer_precision(precision: str) -> None:
    """Raise a ``ValueError`` naming the supported options for an unsupported trainer precision."""
    if str(precision) not in SUPPORTED_TRAINER_PRECISIONS:
        raise ValueError(
            f"Trainer(precision={precision!r}) is not supported by MarbleDiffusionModule, which "
            f"computes and writes its gradients itself; use one of {SUPPORTED_TRAINER_PRECISIONS}, "
            "with the backbone's `torch_dtype` for bf16/fp16 base weights and "
            "`rollout_precision` for a low-precision sampler"
        )
