"""Update cost vs the number of rewards K, for each Gram engine, side by side in one run.

For K in {2, 5, 16, 32, 64} and each engine (``backward``: K backward passes; ``batched``: one
vectorised backward; ``per_sample``: two backward passes + per-sample gradients, exact), times
``compute_update(refresh=True)`` + ``harmonize`` on ONE fixed rollout of the toy backbone, against
the weighted-sum update (one backward pass) on the same rollout. Rewards beyond the toy world's
five are cheap synthetic projections, so the table isolates the harmonisation cost; the sampling
cost of a full step (the same for every method) is reported once for context.

    python benchmarks/k_scaling.py            # full
    python benchmarks/k_scaling.py --quick    # about a minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ProjectionReward, environment, environment_markdown


def make_module(k: int, mode: str, gram: str, args: argparse.Namespace):
    from marble_lightning.module import MarbleDiffusionModule
    from marble_lightning.toy.backbone import ToyBackbone

    backbone = ToyBackbone() if not args.random_backbone else ToyBackbone.from_config(seed=0)
    return MarbleDiffusionModule(
        backbone=backbone,
        rewards=[ProjectionReward(i) for i in range(k)],
        mode=mode,
        gram=gram,
        group_size=args.group_size,
        sample_steps=args.sample_steps,
        train_timesteps=args.train_timesteps,
        lora_rank=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        seed=0,
        rollout_precision=args.rollout_precision,
    )


def time_update(module, rollout, refresh: bool, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = module.compute_update(rollout, refresh=refresh)
        out.append(time.perf_counter() - start)
        del result
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 5, 16, 32, 64])
    parser.add_argument("--engines", nargs="+", default=["backward", "batched", "per_sample"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=6)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--train-timesteps", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--random-backbone",
        action="store_true",
        help="random weights instead of the shipped checkpoint",
    )
    parser.add_argument(
        "--old-differs",
        action="store_true",
        help="time the general case where the old adapter differs from the policy (its own forward "
        "pass, and the per_sample engine's second backward); by default the old adapter equals "
        "the policy, as for the first 75 steps of DiffusionNFT's old-policy schedule",
    )
    parser.add_argument(
        "--rollout-precision",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="rollout sampler precision "
        "(configs/marble.yaml uses auto: bf16 only with native bf16)",
    )
    parser.add_argument("--out", default="benchmarks/results/k_scaling")
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.repeats, args.prompts, args.group_size = [2, 8], 1, 2, 2
        args.sample_steps, args.train_timesteps = 2, 1

    from marble_lightning.toy.prompts import train_prompts

    prompts = [p for p in train_prompts()][: args.prompts]
    torch.manual_seed(0)
    rows = []
    sampling_time = None
    for k in args.ks:
        modules = {"weighted_sum": make_module(k, "weighted_sum", "backward", args)}
        for engine in args.engines:
            modules[engine] = make_module(k, "marble", engine, args)
        if args.old_differs:
            for module in modules.values():
                module.adapters.old_is_policy = (
                    False  # v_old from the old adapter's own forward pass
                )
        # one rollout, shared by every method (same prompts, images, advantages)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rollout = modules["weighted_sum"].rollout([p for p in prompts], step=0)
        sampling_time = sampling_time or time.perf_counter() - start
        times: dict[str, list[float]] = {name: [] for name in modules}
        for _ in range(args.repeats):  # interleave the methods
            for name, module in modules.items():
                times[name] += time_update(
                    module, rollout, refresh=name != "weighted_sum", repeats=1
                )
        base = statistics.median(times["weighted_sum"])
        for name, ts in times.items():
            med = statistics.median(ts)
            step_ratio = (sampling_time + med) / (sampling_time + base)
            rows.append((k, name, med, min(ts), max(ts), med / base, step_ratio))
            print(
                f"K={k} {name}: {med:.3f} s "
                f"({med / base:.2f}x weighted sum; step {step_ratio:.2f}x)",
                flush=True,
            )

    lines = [
        environment_markdown(),
        "",
        f"Setting: toy backbone, {args.prompts} prompts x {args.group_size} images, "
        f"{args.train_timesteps} training "
        f"timesteps, LoRA r={args.lora_rank}, old adapter "
        f"{'distinct from' if args.old_differs else 'equal to'} the policy; "
        "update = gradients + Gram + QP (no sampling). "
        f"Sampling one rollout ({args.sample_steps} steps, {args.rollout_precision}) "
        f"took {sampling_time:.2f} s "
        "(identical for every method); the step ratio is "
        "(sampling + update) / (sampling + weighted-sum "
        "update), without reward-model time (the synthetic rewards cost nothing; "
        "the toy world's five real "
        "rewards add about 0.5 s to every method's step).",
        "",
        "| K | method | update s median (min-max) | ratio to weighted-sum update | step ratio |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {name} | {med:.3f} ({lo:.3f}-{hi:.3f}) | {ratio:.2f} | {sr:.2f} |"
        for k, name, med, lo, hi, ratio, sr in rows
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out + ("_quick" if args.quick else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"env": environment(), "args": vars(args), "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
