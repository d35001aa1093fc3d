"""Peak memory of one training step per mode, engine and K (one fresh process per configuration).

CPU: peak resident set size (``ru_maxrss``) of the step minus the RSS before it; CUDA (when
available): ``torch.cuda.max_memory_allocated`` during the step. Also reports the gradient
buffers each method holds (``[K, P]`` per-reward gradients, or ``2 x [B, P]`` per-sample
gradients for the ``per_sample`` engine), in units of the trainable parameter count P, to check
the bound "gradient buffers <= K x trainable parameters" for the per-reward gradients.

    python benchmarks/memory.py            # K in {2, 5, 8}
    python benchmarks/memory.py --quick
    # per-rank memory, FSDP2 on 1 vs 2 ranks (memory_sharded.py)
    python benchmarks/memory.py --sharded
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, environment_markdown

CONFIGS = {
    "weighted_sum": dict(mode="weighted_sum", gram="backward"),
    "amortized (non-refresh step)": dict(mode="amortized", gram="backward"),
    "marble/backward": dict(mode="marble", gram="backward"),
    "marble/per_sample": dict(mode="marble", gram="per_sample"),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(config_name: str, k: int, args: argparse.Namespace) -> dict:
    import torch
    from k_scaling import make_module  # same construction as the K-scaling benchmark

    torch.manual_seed(0)
    module = make_module(k, CONFIGS[config_name]["mode"], CONFIGS[config_name]["gram"], args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device)
    from marble_lightning.toy.prompts import train_prompts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rollout = module.rollout(train_prompts()[: args.prompts], step=0)
        if config_name.startswith("amortized"):
            # fills the cache; NOTE ru_maxrss is a process-lifetime peak, so the amortised step's
            # own peak is only visible when it exceeds this refresh's (reported as 0 otherwise)
            module.compute_update(rollout, refresh=True)
    p = sum(q.numel() for q in module.trainable_parameters)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    refresh = CONFIGS[config_name]["mode"] == "marble"
    result = module.compute_update(rollout, refresh=refresh)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "config": config_name,
        "k": k,
        "trainable_params": p,
        "step_peak_mb": max(0.0, peak - max(before, peak_before)) if peak > peak_before else 0.0,
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "grad_rows": 0 if result.grads is None else int(result.grads.shape[0]),
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else None,
    }
    # gradient rows held across the step ([K, P] on a refresh; the per-sample engine contracts
    # per-sample gradients layer by layer, so it also holds K rows plus one layer's [B, P_layer])
    out["grad_buffer_in_P"] = k if refresh else 1
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--sharded" in argv:  # the sharded column: its own launches (torchrun, 1 and 2 ranks)
        from memory_sharded import main as sharded_main

        return sharded_main([a for a in argv if a != "--sharded"])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 5, 8])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=6)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--train-timesteps", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--random-backbone", action="store_true")
    parser.add_argument(
        "--rollout-precision",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="rollout sampler precision "
        "(configs/marble.yaml uses auto: bf16 only with native bf16)",
    )
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/memory")
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.prompts, args.group_size, args.sample_steps, args.train_timesteps = (
            [2],
            2,
            2,
            2,
            1,
        )
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args)))
        return
    rows = []
    passthrough = [
        f"--prompts={args.prompts}",
        f"--group-size={args.group_size}",
        f"--sample-steps={args.sample_steps}",
        f"--train-timesteps={args.train_timesteps}",
        f"--lora-rank={args.lora_rank}",
        f"--rollout-precision={args.rollout_precision}",
    ]
    if args.random_backbone:
        passthrough.append("--random-backbone")
    for k in args.ks:
        for name in CONFIGS:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name, str(k), *passthrough],
                capture_output=True,
                text=True,
                check=True,
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
            rows.append(json.loads(line[7:]))
            print(rows[-1], flush=True)
    lines = [
        environment_markdown(),
        "",
        f"Setting: toy backbone, {args.prompts} prompts x {args.group_size} images, "
        f"{args.train_timesteps} "
        f"training timesteps, LoRA r={args.lora_rank}; one update step after one rollout.",
        "",
        "| K | method | step peak RSS increase (MB) | gradient buffers (x P) | P (trainable) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['config']} | {r['step_peak_mb']:.0f} | {r['grad_buffer_in_P']} "
            f"| {r['trainable_params']:,} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out + ("_quick" if args.quick else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
