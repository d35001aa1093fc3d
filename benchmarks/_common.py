"""Shared pieces of the benchmark scripts: environment record, toy rewards, timing callback."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from marble_lightning.rewards.base import RewardModel

ALLOCATOR_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """CPU, versions, threads and the allocator setting the numbers were measured under."""
    import lightning

    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "allocator": {k: os.environ.get(k) for k in ALLOCATOR_VARS},
    }


def environment_markdown() -> str:
    env = environment()
    alloc = env.pop("allocator")
    alloc_text = "set" if all(alloc.values()) else f"NOT set ({alloc}); timings are not comparable"
    return (
        "Environment: "
        + ", ".join(f"{k}={v}" for k, v in env.items())
        + f", allocator {alloc_text}"
    )


def print_table(table: str, out: str | None) -> None:
    """Print a markdown ``table``; with ``out``, also write it to ``<out>.md``."""
    print(table)
    if out:
        path = Path(out).with_suffix(".md")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table + "\n")


class ProjectionReward(RewardModel):
    """A cheap synthetic reward: a fixed random projection of the 8x8 downsampled image.

    Used to reach K beyond the toy world's five rewards without adding reward-model cost.
    """

    def __init__(self, seed: int, name: str | None = None) -> None:
        super().__init__(name or f"proj{seed}")
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "direction", torch.randn(3 * 8 * 8, generator=gen) / 13.9, persistent=False
        )

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        small = torch.nn.functional.adaptive_avg_pool2d(images.float(), 8).flatten(1)
        return small @ self.direction.to(small.device)


def toy_rewards(k: int) -> list[RewardModel]:
    """The toy world's real rewards first (composition, ocr, quality, jpeg, clip), then
    synthetic."""
    from marble_lightning.toy.rewards import default_rewards

    rewards: list[RewardModel] = list(default_rewards())[:k]
    seed = 0
    while len(rewards) < k:
        rewards.append(ProjectionReward(seed))
        seed += 1
    return rewards


class StepTimer(Callback):
    """Wall time of every training step, plus the module's per-phase timings."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.phases: list[dict[str, float]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)
        metrics = trainer.callback_metrics
        self.phases.append({k: float(v) for k, v in metrics.items() if k.startswith("time/")})
