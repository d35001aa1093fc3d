"""Generation with a trained (or base) policy: the sampler's time grid, latents and images.

A mixin of :class:`~marble_lightning.module.MarbleDiffusionModule`; it needs ``backbone``,
``adapters``, ``sample_steps``, ``cfg_scale`` and ``device`` from the module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from marble_lightning.adapters import POLICY
from marble_lightning.checks import check_int
from marble_lightning.sampling import (
    check_time_grid,
    evaluation_noise,
    flow_sample,
)

__all__ = ["PolicySampling"]


class PolicySampling:
    """Sampling methods shared by training (rollouts) and evaluation."""

    backbone: Any
    adapters: Any
    sample_steps: int
    cfg_scale: float
    device: torch.device

    def time_grid(self, steps: int | None = None) -> Tensor:
        """``[steps + 1]`` sampler times from 1 down to 0 (float64, CPU), the backbone's own."""
        steps = self.sample_steps if steps is None else steps
        return check_time_grid(self.backbone.time_grid(steps), steps, "backbone.time_grid")

    def _param_dtype(self) -> torch.dtype:
        return next(self.backbone.denoiser.parameters()).dtype

    @torch.no_grad()
    def sample_latents(
        self,
        prompts: list[str],
        noise: Tensor,
        *,
        adapter: str = POLICY,
        steps: int | None = None,
        cfg_scale: float | None = None,
    ) -> Tensor:
        """Integrate ``noise`` (``[B, C, H, W]`` at ``t = 1``) to ``t = 0`` with ``adapter``."""
        steps = check_int("steps", self.sample_steps if steps is None else steps)
        cfg = self.cfg_scale if cfg_scale is None else float(cfg_scale)
        cond = self.backbone.encode_prompts(list(prompts))
        uncond = self.backbone.encode_prompts([""] * len(prompts)) if cfg != 1.0 else None
        with self.adapters.inference(adapter):
            return flow_sample(
                self.backbone.velocity,
                noise,
                cond,
                self.time_grid(steps),
                uncond=uncond,
                cfg_scale=cfg,
                solver=getattr(self, "solver", "euler"),
            )

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        seed: int | Sequence[int],
        adapter: str = POLICY,
        steps: int | None = None,
        cfg_scale: float | None = None,
    ) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]``, one per prompt, with fixed noise.

        Args:
            prompts: ``B`` prompts (repeat a prompt to get several images of it).
            seed: an int (image ``i`` gets the noise of ``(seed, prompts[i], occurrence)``), or
                ``B`` ints (image ``i`` gets ``(seed[i], prompts[i])``, independent of the rest of
                the list). The module's ``seed`` is not part of the key, so evaluations of
                different runs are paired.
            adapter: ``"policy"``, ``"old"`` or ``"base"`` (adapters disabled).
            steps: Euler steps (default: ``sample_steps``).
            cfg_scale: guidance scale (default: ``cfg_scale``).
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`prompts` should be a list of strings, got {prompts!r}")
        noise = evaluation_noise(
            prompts, seed, self.backbone.sample_shape, device=self.device, dtype=self._param_dtype()
        )
        x0 = self.sample_latents(
            list(prompts), noise, adapter=adapter, steps=steps, cfg_scale=cfg_scale
        )
        return self.backbone.decode(x0).float().clamp(0.0, 1.0)
