"""Training-step time of MARBLE vs a weighted sum, side by side in one run, interleaved.

For each K, every configuration runs ``--steps`` training steps per repetition (the repetitions
interleave the configurations so that machine noise hits all of them alike). Reported per
configuration: mean step time over the steps of a repetition (an amortised configuration's
refresh cost is spread over its refresh period), median and min-max over repetitions, the ratio
to the weighted sum, and the phase split (sampling / rewards / backward / QP).

The ratio column is the median (min-max) over repetitions of the paired ratio: a configuration's
time in one repetition over the weighted sum's time in the same repetition (run right before or
after it), which cancels slow drifts of the machine's load. The first ``--warmup`` step of each
run is not timed; with the defaults (11 steps, warm-up 1) the timed steps 1-10 hold two refreshes
of N=5 (steps 5, 10) and one of N=10, as in a long run.

    python benchmarks/step_time.py            # full: K in {2, 5, 8}, 3 repetitions of 10 steps
    python benchmarks/step_time.py --quick    # about a minute, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import StepTimer, environment, environment_markdown, toy_rewards

CONFIGS = {
    "weighted_sum": dict(mode="weighted_sum"),
    "amortized_N5": dict(mode="amortized", refresh_every=5),
    "amortized_N10": dict(mode="amortized", refresh_every=10),
    "full_backward": dict(mode="marble", gram="backward"),
    "full_per_sample": dict(mode="marble", gram="per_sample"),
}


def build_module(backbone_factory, k: int, config: dict, args: argparse.Namespace):
    from marble_lightning.module import MarbleDiffusionModule

    return MarbleDiffusionModule(
        backbone=backbone_factory(),
        rewards=toy_rewards(k),
        group_size=args.group_size,
        sample_steps=args.sample_steps,
        train_timesteps=args.train_timesteps,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_rank * 2,
        rollout_precision=args.rollout_precision,
        **config,
    )


def run_once(
    backbone_factory, k: int, config: dict, args: argparse.Namespace
) -> tuple[float, dict[str, float]]:
    from lightning.pytorch import Trainer

    from marble_lightning.data import PromptDataModule

    module = build_module(backbone_factory, k, config, args)
    module.rewards(
        torch.rand(2, 3, 32, 32), ["a red circle", 'the word "cat"']
    )  # load reward models now
    timer = StepTimer()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    data = PromptDataModule(
        train_prompts="toy:train", prompts_per_step=args.prompts_per_step, seed=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    times = timer.times[args.warmup :] if len(timer.times) > args.warmup else timer.times
    phases: dict[str, float] = {}
    for record in timer.phases[args.warmup :] or timer.phases:
        for key, value in record.items():
            phases[key] = phases.get(key, 0.0) + value / max(
                1, len(timer.phases[args.warmup :] or timer.phases)
            )
    return statistics.fmean(times), phases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny run (about a minute) for smoke tests"
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 5, 8])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=11, help="steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps of each run")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=6)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--train-timesteps", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--rollout-precision",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="rollout sampler precision "
        "(configs/marble.yaml uses auto: bf16 only with native bf16)",
    )
    parser.add_argument("--backbone", choices=["toy"], default="toy")
    parser.add_argument("--out", default="benchmarks/results/step_time")
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.repeats, args.steps, args.warmup = [2], 1, 2, 0
        args.prompts_per_step, args.group_size, args.sample_steps, args.train_timesteps = 2, 2, 2, 1
        args.configs = ["weighted_sum", "amortized_N5", "full_backward", "full_per_sample"]

    from marble_lightning.toy.backbone import ToyBackbone

    backbone_factory = lambda: ToyBackbone()  # noqa: E731  (the shipped checkpoint)
    results: dict[int, dict[str, list[float]]] = {k: {c: [] for c in args.configs} for k in args.ks}
    phase_acc: dict[int, dict[str, list[dict[str, float]]]] = {
        k: {c: [] for c in args.configs} for k in args.ks
    }
    for rep in range(args.repeats):
        for k in args.ks:
            for name in args.configs:
                mean_time, phases = run_once(backbone_factory, k, CONFIGS[name], args)
                results[k][name].append(mean_time)
                phase_acc[k][name].append(phases)
                print(f"rep {rep} K={k} {name}: {mean_time:.3f} s/step", flush=True)

    lines = [
        environment_markdown(),
        "",
        f"Setting: toy backbone, {args.prompts_per_step} prompts x {args.group_size} images, "
        f"{args.sample_steps} sampler steps ({args.rollout_precision}), "
        f"{args.train_timesteps} training timesteps, "
        f"LoRA r={args.lora_rank}, "
        f"{args.steps} steps ({args.warmup} untimed) x {args.repeats} repetitions "
        "per configuration, interleaved; "
        "ratio: median (min-max) over repetitions of the time over the same repetition's "
        "weighted-sum time; "
        "phases: mean s/step.",
        "",
        "| K | configuration | s/step median (min-max) | ratio to weighted sum "
        "| sampling | rewards | backward | QP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in args.ks:
        base = results[k].get("weighted_sum")
        for name in args.configs:
            ts = results[k][name]
            med = statistics.median(ts)
            ratio = "-"
            if base:
                paired = [t / b for t, b in zip(ts, base)]
                ratio = f"{statistics.median(paired):.3f} ({min(paired):.2f}-{max(paired):.2f})"
            ph = {
                key: statistics.fmean(p.get(key, float("nan")) for p in phase_acc[k][name])
                for key in phase_acc[k][name][0]
            }
            lines.append(
                f"| {k} | {name} | {med:.3f} ({min(ts):.3f}-{max(ts):.3f}) | {ratio} | "
                + " | ".join(
                    f"{ph.get(f'time/{p}', float('nan')):.3f}"
                    for p in ("sampling", "rewards", "backward", "qp")
                )
                + " |"
            )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out + ("_quick" if args.quick else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(
            {"env": environment(), "args": vars(args), "results": results, "phases": phase_acc},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
