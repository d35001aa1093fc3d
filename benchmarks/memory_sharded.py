"""Per-rank memory of sharded (FSDP2) training, 1 vs 2 ranks: the sharded column of memory.py.

Each configuration is one ``torchrun --nproc_per_node=N`` launch on CPU (gloo). Every rank builds
the module, shards its denoiser (:func:`marble_lightning.sharding.shard_module`, the same code as
``configure_model`` under ``ModelParallelStrategy``), then runs one rollout and one MARBLE refresh
update (``K`` backward passes through FSDP, one ``K x K`` all-reduce) and one AdamW step. Per
rank it reports the bytes this rank holds of the frozen base, of the two LoRA adapters and of the
optimizer state (exact, from the local shards), and the step's peak RSS increase (``ru_maxrss``
after the step minus RSS before it: all-gathered blocks, activations, gradient rows).

    python benchmarks/memory.py --sharded          # toy UNet and a small SD3 transformer
    python benchmarks/memory_sharded.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, environment_markdown

MODELS = ("toy", "sd3")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _local_bytes(tensors) -> int:
    return sum(
        (t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors
    )


def _build(model: str, args: argparse.Namespace):
    import torch
    from torch import nn

    from marble_lightning.module import MarbleDiffusionModule

    if model == "toy":
        from _common import ProjectionReward

        from marble_lightning.toy.backbone import ToyBackbone

        backbone = ToyBackbone.from_config(seed=0)
        rewards = [ProjectionReward(i) for i in range(args.k)]
    else:
        from diffusers import SD3Transformer2DModel

        from marble_lightning.testing import TinySD3Backbone, tiny_rewards

        backbone = TinySD3Backbone(size=16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            backbone.denoiser = SD3Transformer2DModel(
                sample_size=16,
                patch_size=2,
                in_channels=3,
                out_channels=3,
                num_layers=args.sd3_layers,
                attention_head_dim=64,
                num_attention_heads=4,
                joint_attention_dim=16,
                caption_projection_dim=256,
                pooled_projection_dim=16,
                pos_embed_max_size=16,
            )
            nn.init.normal_(backbone.denoiser.proj_out.weight, std=0.02)
        backbone.sample_shape = (3, 16, 16)
        rewards = tiny_rewards()
    return MarbleDiffusionModule(
        backbone=backbone,
        rewards=rewards,
        mode="marble",
        gram="backward",
        group_size=args.group_size,
        sample_steps=args.sample_steps,
        train_timesteps=args.train_timesteps,
        lora_rank=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        seed=0,
        rollout_precision="float32",
    )


def child(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from marble_lightning.sharding import shard_module

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    module = _build(args.model, args)
    shard_module(module, init_device_mesh("cpu", (world,)), args.lora)
    denoiser = module.backbone.denoiser
    base = [p for n, p in denoiser.named_parameters() if ".lora_" not in n]
    optimizer = torch.optim.AdamW(module.adapters.policy_params, lr=1e-4)
    from marble_lightning.toy.prompts import train_prompts

    prompts = train_prompts()[rank * args.prompts : (rank + 1) * args.prompts]
    before = _rss_mb()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rollout = module.rollout(prompts, step=0)
        result = module.compute_update(rollout, refresh=True)
        module.adapters.write_gradients(result.direction + result.kl_grad)
        optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state = [
        t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0
    ]
    row = {
        "model": args.model,
        "ranks": world,
        "rank": rank,
        "lora": args.lora,
        "base_params": sum(p.numel() for p in base),
        "lora_params": sum(p.numel() for p in module.trainable_parameters),
        "base_mb": _local_bytes(base) / 2**20,
        "lora_mb": _local_bytes(module.trainable_parameters + module.old_parameters) / 2**20,
        "optimizer_mb": _local_bytes(state) / 2**20,
        "step_peak_mb": max(0.0, peak - before),
        "peak_rss_mb": peak,
    }
    print("RESULT " + json.dumps(row), flush=True)
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, passthrough: list[str]) -> list[dict]:
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for model in args.models:
        for ranks in (1, 2):
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={ranks}",
                f"--master_port={_port()}",
                __file__,
                "--child",
                "--model",
                model,
                *passthrough,
            ]
            proc = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            found = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            rows.append(max(found, key=lambda r: r["base_mb"] + r["lora_mb"]))  # the larger rank
            print(rows[-1], flush=True)
    return rows


def cpu_line() -> str:
    import platform

    import torch

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return (
        f"CPU: {model}; "
        f"torch.backends.cpu.get_cpu_capability()={torch.backends.cpu.get_cpu_capability()}"
    )


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        environment_markdown(),
        cpu_line(),
        "",
        (
            f"Setting: one rollout ({args.prompts} prompts x {args.group_size} images per rank), "
            "one MARBLE "
            f"refresh (K=3 rewards, gram=backward, {args.train_timesteps} training timesteps) "
            "and one AdamW "
            f"step; LoRA r={args.lora_rank} ({args.lora}); CPU, gloo. "
            "Per-rank values of the rank holding most."
        ),
        "",
        "| model | ranks | frozen base (MB/rank) | LoRA x2 (MB/rank) | AdamW state (MB/rank) "
        "| step peak RSS increase (MB) | base ratio 2:1 |",
        "|---|---|---|---|---|---|---|",
    ]
    one = {r["model"]: r for r in rows if r["ranks"] == 1}
    for r in rows:
        ratio = r["base_mb"] / one[r["model"]]["base_mb"]
        lines.append(
            f"| {r['model']} ({r['base_params']:,} base, {r['lora_params']:,} LoRA params) "
            f"| {r['ranks']} | "
            f"{r['base_mb']:.2f} | {r['lora_mb']:.3f} | {r['optimizer_mb']:.3f} "
            f"| {r['step_peak_mb']:.0f} | {ratio:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--model", default="toy", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=4)
    parser.add_argument("--train-timesteps", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora", default="sharded", choices=["sharded", "replicated"])
    parser.add_argument("--sd3-layers", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/results/memory_sharded")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.group_size, args.sample_steps, args.train_timesteps, args.sd3_layers = (
            1,
            2,
            2,
            1,
            2,
        )
    if args.child:
        child(args)
        return
    passthrough = [
        f"--k={args.k}",
        f"--prompts={args.prompts}",
        f"--group-size={args.group_size}",
        f"--sample-steps={args.sample_steps}",
        f"--train-timesteps={args.train_timesteps}",
        f"--lora-rank={args.lora_rank}",
        f"--lora={args.lora}",
        f"--sd3-layers={args.sd3_layers}",
    ]
    rows = run(args, passthrough)
    text = table(rows, args)
    print(text)
    out = Path(
        args.out
        + ("_quick" if args.quick else "")
        + ("" if args.lora == "sharded" else "_replicated")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
