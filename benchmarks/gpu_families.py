"""FLUX.1-dev, Qwen-Image and Wan 2.1 1.3B full-size step time and peak memory on one GPU.

For each family, builds the transformer with the published architecture and random weights
(no download) in bf16, puts it behind the family's backbone (``FluxBackbone``,
``QwenImageBackbone``, ``WanBackbone``: the real packing, ids, guidance input, time scale and
grid) with the text encoders and VAE replaced by fixed random embeddings of the real shapes and
a fixed linear latent-to-RGB decoder, LoRA r=32 / alpha 64 on the default attention targets,
activation checkpointing as in the configs, and K cheap synthetic rewards (per frame plus temporal
consistency for Wan). Times one MARBLE step (``backward`` engine) and one weighted-sum step per
family through a Lightning ``Trainer``; prints s/step and CUDA peak memory.

    # all families, 512 px / 17x256x448 clips
    python benchmarks/gpu_families.py
    python benchmarks/gpu_families.py --families wan --steps 3
    # a seconds-long check of the script itself
    python benchmarks/gpu_families.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ProjectionReward

FULL = {
    "flux": {  # FLUX.1-dev transformer (12B)
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    },
    "qwen_image": {  # Qwen-Image transformer (20B)
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": 60,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 3584,
        "guidance_embeds": False,
        "axes_dims_rope": (16, 56, 56),
    },
    "wan": {  # Wan 2.1 T2V 1.3B transformer
        "patch_size": (1, 2, 2),
        "num_attention_heads": 12,
        "attention_head_dim": 128,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": 8960,
        "num_layers": 30,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    },
}
TINY = {
    "flux": {
        "patch_size": 1,
        "in_channels": 16,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 6, 6),
    },
    "qwen_image": {
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 16,
        "guidance_embeds": False,
        "axes_dims_rope": (8, 4, 4),
    },
    "wan": {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 4,
        "out_channels": 4,
        "text_dim": 32,
        "freq_dim": 256,
        "ffn_dim": 32,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 32,
    },
}
TEXT = {"flux": 512, "qwen_image": 256, "wan": 512}  # text tokens per prompt


def synthetic_backbone(family: str, transformer, tiny: bool, checkpointing: bool):
    """The family's backbone around ``transformer``, with random text embeddings and a linear
    decoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from marble_lightning.backbones import FluxBackbone, QwenImageBackbone, WanBackbone

    base = {"flux": FluxBackbone, "qwen_image": QwenImageBackbone, "wan": WanBackbone}[family]
    seq = 8 if tiny else TEXT[family]
    cfg = transformer.config
    text_dim = cfg.joint_attention_dim if family != "wan" else cfg.text_dim
    channels = cfg.out_channels if family != "flux" else cfg.in_channels // 4
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(seq, text_dim, generator=gen) * 0.1
    pooled = torch.randn(getattr(cfg, "pooled_projection_dim", 1) or 1, generator=gen) * 0.1
    rgb = torch.randn(3, channels, generator=gen) / channels**0.5

    class Synthetic(base):
        @torch.no_grad()
        def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
            b, dev, dt = len(prompts), self.device, self.dtype
            shift = torch.tensor([hash(p) % 997 / 997.0 for p in prompts], device=dev)[
                :, None, None
            ]
            embeds = (text.to(dev)[None] + 0.01 * shift).to(dt)
            if family == "flux":
                return {
                    "prompt_embeds": embeds,
                    "pooled_prompt_embeds": pooled.to(dev, dt)[None].expand(b, -1),
                }
            if family == "qwen_image":
                return {
                    "prompt_embeds": embeds,
                    "prompt_embeds_mask": torch.ones(b, seq, device=dev, dtype=torch.long),
                }
            return {"prompt_embeds": embeds}

        def decode(self, x: Tensor) -> Tensor:
            w = rgb.to(x.device, x.dtype)
            if x.ndim == 5:  # [B, C, F, H, W] -> [B, F, 3, H, W]
                return torch.sigmoid(torch.einsum("rc,bcfhw->bfrhw", w, x)).float()
            return torch.sigmoid(torch.einsum("rc,bchw->brhw", w, x)).float()

    pipeline = types.SimpleNamespace(
        transformer=transformer,
        vae=types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=[1, 2, 3, 4])),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae_scale_factor=8,
        vae_scale_factor_spatial=8,
        vae_scale_factor_temporal=4,
        config={"expand_timesteps": False},
    )
    if family == "wan":
        size = (
            {"height": 32, "width": 32, "num_frames": 5}
            if tiny
            else {"height": 256, "width": 448, "num_frames": 17}
        )
    else:
        size = {"resolution": 32 if tiny else 512}
    return Synthetic.from_pipeline(
        pipeline, gradient_checkpointing=checkpointing, max_sequence_length=seq, **size
    )


def build_transformer(family: str, tiny: bool, dtype: torch.dtype, device: torch.device):
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, WanTransformer3DModel

    cls = {
        "flux": FluxTransformer2DModel,
        "qwen_image": QwenImageTransformer2DModel,
        "wan": WanTransformer3DModel,
    }[family]
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**(TINY if tiny else FULL)[family])
    return model.to(dtype).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--families", nargs="+", default=["flux", "qwen_image", "wan"], choices=sorted(FULL)
    )
    parser.add_argument("--tiny", action="store_true", help="tiny transformers (script check)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=8)
    parser.add_argument("--train-timesteps", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per method (after one warm-up)"
    )
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/gpu_families")
    args = parser.parse_args(argv)

    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    from marble_lightning.module import MarbleDiffusionModule
    from marble_lightning.rewards.video import PerFrameReward, TemporalConsistencyReward

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    class Timer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *_args) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *_args) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    results: dict[str, dict[str, dict[str, float]]] = {}
    prompts = [f"prompt {i}" for i in range(args.prompts * (args.steps + 1))]
    for family in args.families:
        transformer = build_transformer(family, args.tiny, dtype, device)
        results[family] = {}
        for method, options in (
            ("marble", {"mode": "marble", "gram": "backward"}),
            ("weighted_sum", {"mode": "weighted_sum"}),
        ):
            backbone = synthetic_backbone(family, transformer, args.tiny, not args.no_checkpointing)
            rewards = [ProjectionReward(i) for i in range(args.k)]
            if family == "wan":
                rewards = [PerFrameReward(r) for r in rewards[:-1]] + [TemporalConsistencyReward()]
            module = MarbleDiffusionModule(
                backbone,
                rewards,
                group_size=args.group_size,
                sample_steps=args.sample_steps,
                train_timesteps=args.train_timesteps,
                lora_rank=32,
                lora_alpha=64,
                **options,
            )
            timer = Timer()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            trainer = Trainer(
                accelerator="gpu" if device.type == "cuda" else "cpu",
                devices=1,
                max_steps=args.steps + 1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[timer],
            )
            loader = DataLoader(prompts, batch_size=args.prompts, collate_fn=list)
            trainer.fit(module, train_dataloaders=loader)
            timed = timer.times[1:] or timer.times
            peak = (
                torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            )
            results[family][method] = {"s_per_step": statistics.median(timed), "peak_gib": peak}
            print(
                f"{family} {method}: {statistics.median(timed):.2f} s/step, peak {peak:.1f} GiB",
                flush=True,
            )
            transformer.delete_adapters(["policy", "old"])
            del module, trainer, backbone
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    lines = [
        (
            f"Measured on {where}: {'tiny' if args.tiny else 'full-size'} transformers, "
            f"random weights, {dtype}, "
            f"{args.prompts} prompt(s) x {args.group_size} samples, "
            f"{args.sample_steps} sampler steps, "
            f"{args.train_timesteps} training timesteps, LoRA r=32, K={args.k}, "
            "gradient checkpointing "
            f"{'off' if args.no_checkpointing else 'on'}."
        ),
        "",
        "| family | MARBLE s/step | weighted sum s/step | ratio | MARBLE peak (GiB) "
        "| weighted-sum peak (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for family, r in results.items():
        m, w = r["marble"], r["weighted_sum"]
        lines.append(
            f"| {family} | {m['s_per_step']:.2f} | {w['s_per_step']:.2f} | "
            f"{m['s_per_step'] / w['s_per_step']:.2f} | {m['peak_gib']:.1f} | {w['peak_gib']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out + ("_tiny" if args.tiny else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
