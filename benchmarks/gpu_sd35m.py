"""SD3.5-Medium-sized step time and peak memory on one GPU (random weights; no download).

Builds a randomly initialised transformer with the SD3.5-Medium architecture
(``marble_lightning.testing.build_sd35_medium_transformer``), LoRA r=32 / alpha 64 on the
attention projections (the paper's setting), bf16, behind a text-encoder-free backbone (fixed random
prompt embeddings of the real shapes; latents decoded by a fixed 16->3 channel projection), and
K=5 cheap synthetic rewards, so the numbers isolate the diffusion model's cost. Times, interleaved:
weighted sum, amortised MARBLE (refresh every 5), full MARBLE with the ``backward`` and
``per_sample`` Gram engines; reports s/step, ratios and CUDA peak memory.

    python benchmarks/gpu_sd35m.py                      # 512 px, 2 prompts x 4 images, 10 steps
    python benchmarks/gpu_sd35m.py --tiny --device cpu  # a seconds-long check of the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ProjectionReward, environment, environment_markdown

from marble_lightning.sampling import uniform_time_grid


class LatentOnlyBackbone(nn.Module):
    """FlowBackbone around a bare SD3 transformer: random fixed text embeddings, linear decoder."""

    def __init__(self, transformer: nn.Module, resolution: int, seq_len: int = 333) -> None:
        super().__init__()
        self.denoiser = transformer
        cfg = transformer.config
        self.sample_shape = (cfg.in_channels, resolution // 8, resolution // 8)
        self.lora_target_modules = [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
        ]
        gen = torch.Generator().manual_seed(0)
        self.register_buffer(
            "_text",
            torch.randn(seq_len, cfg.joint_attention_dim, generator=gen) * 0.1,
            persistent=False,
        )
        self.register_buffer(
            "_pooled", torch.randn(cfg.pooled_projection_dim, generator=gen) * 0.1, persistent=False
        )
        self.register_buffer(
            "_rgb",
            torch.randn(3, cfg.in_channels, generator=gen) / cfg.in_channels**0.5,
            persistent=False,
        )

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        b = len(prompts)
        dtype = next(self.denoiser.parameters()).dtype
        shift = torch.tensor([hash(p) % 997 / 997.0 for p in prompts], device=self._text.device)[
            :, None, None
        ]
        text = (self._text[None] + 0.01 * shift).to(dtype)
        return {"text": text, "pooled": self._pooled[None].expand(b, -1).to(dtype)}

    def velocity(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        dtype = next(self.denoiser.parameters()).dtype
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(x.shape[0])
        out = self.denoiser(
            hidden_states=x.to(dtype),
            timestep=t * 1000,
            encoder_hidden_states=cond["text"],
            pooled_projections=cond["pooled"],
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    def time_grid(self, steps: int) -> Tensor:
        """Uniform sampler times ``1 - j / steps`` (``[steps + 1]``, float64)."""
        return uniform_time_grid(steps)

    def decode(self, x: Tensor) -> Tensor:
        rgb = torch.einsum("oc,bchw->bohw", self._rgb.to(x.dtype), x)
        return torch.sigmoid(
            torch.nn.functional.interpolate(rgb.float(), scale_factor=8, mode="nearest")
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny transformer (script check)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--train-timesteps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per method and repetition")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/gpu_sd35m")
    args = parser.parse_args(argv)

    from diffusers import SD3Transformer2DModel

    from marble_lightning.module import MarbleDiffusionModule
    from marble_lightning.testing import build_sd35_medium_transformer

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def backbone() -> LatentOnlyBackbone:
        if args.tiny:
            tr = SD3Transformer2DModel(
                sample_size=8,
                patch_size=2,
                in_channels=16,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=2,
                joint_attention_dim=32,
                caption_projection_dim=16,
                pooled_projection_dim=16,
                out_channels=16,
                pos_embed_max_size=16,
            )
            return LatentOnlyBackbone(tr.to(dtype), 64, seq_len=8)
        return LatentOnlyBackbone(build_sd35_medium_transformer(dtype, device), args.resolution)

    methods = {
        "weighted_sum": dict(mode="weighted_sum"),
        "amortized_N5": dict(mode="amortized", refresh_every=5),
        "full_backward": dict(mode="marble", gram="backward"),
        "full_per_sample": dict(mode="marble", gram="per_sample"),
    }
    prompts = [f"prompt {i}" for i in range(args.prompts)]
    shared = backbone().to(device)
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, float] = {}
    for rep in range(args.repeats):
        for name, options in methods.items():
            module = MarbleDiffusionModule(
                backbone=shared,
                rewards=[ProjectionReward(i) for i in range(args.k)],
                group_size=args.group_size,
                sample_steps=args.sample_steps,
                train_timesteps=args.train_timesteps,
                lora_rank=32,
                lora_alpha=64,
                **options,
            ).to(device)
            opt = torch.optim.AdamW(module.trainable_parameters, lr=1e-4)
            module.optimizers = lambda opt=opt: opt  # drive the step without a Trainer
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            for step in range(args.steps):
                start = time.perf_counter()
                rollout = module.rollout(prompts, step=step)
                refresh = module.rule.harmonizes and module.coefficients.refresh_due(0)
                result = module.compute_update(rollout, refresh=refresh)
                module.apply_update(result)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
                module.step_index = step + 1
                module.coefficients.end_step(refresh)
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30
            # detach this module's adapters so the next method starts from the bare transformer
            shared.denoiser.delete_adapters(["policy", "old"]) if hasattr(
                shared.denoiser, "delete_adapters"
            ) else None
            del module, opt
            print(
                f"rep {rep} {name}: {statistics.fmean(times[name][-args.steps :]):.3f} s/step",
                flush=True,
            )

    base = statistics.median(times["weighted_sum"])
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    lines = [
        environment_markdown(),
        "",
        f"Measured on {where}: SD3.5-Medium-sized transformer "
        f"({'tiny' if args.tiny else 'full size'}), random weights, {dtype}, {args.resolution} px, "
        f"{args.prompts} prompts x {args.group_size} images, {args.sample_steps} sampler steps, "
        f"{args.train_timesteps} training timesteps, LoRA r=32, K={args.k}.",
        "",
        "| method | s/step median (min-max) | ratio to weighted sum | peak GPU memory (GiB) |",
        "|---|---|---|---|",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(
            f"| {name} | {med:.3f} ({min(ts):.3f}-{max(ts):.3f}) | {med / base:.2f} | "
            f"{peaks.get(name, float('nan')):.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out + ("_tiny" if args.tiny else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"env": environment(), "times": times, "peaks": peaks}, indent=1)
    )


if __name__ == "__main__":
    main()
