"""Gradient-free forwards with the LoRA folded into the weights vs through the LoRA branches.

The toy UNet with the default LoRA (rank 16 on every ResNet convolution, attention and
feed-forward projection), one rollout of the default config (24 images, 10 sampler forwards of
the old adapter in one context, so one merge per rollout as in training): the two ways alternate
within one run and the script prints the median times and their ratio. Also the base model
(adapters off) for the floor, and the largest output difference.

    python benchmarks/merged_lora.py                 # 15 rounds
    python benchmarks/merged_lora.py --quick         # 2 rounds (the test suite)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_markdown, print_table

from marble_lightning.adapters import BASE, OLD, LoraAdapterPair
from marble_lightning.toy.backbone import ToyBackbone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--forwards", type=int, default=10, help="forwards per context")
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    torch.manual_seed(0)
    backbone = ToyBackbone()
    pair = LoraAdapterPair.for_backbone(backbone, 16, 32, None, 0)
    with torch.no_grad():
        for p in pair.old_params:
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(args.batch, *backbone.sample_shape)
    t = torch.full((args.batch,), 0.5)
    cond = backbone.encode_prompts(["two red circles"] * args.batch)
    ways = {
        "LoRA branches (using)": lambda: pair.using(OLD),
        "merged (inference)": lambda: pair.inference(OLD),
        "base model (adapters off)": lambda: pair.using(BASE),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    outputs = {}
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, context in ways.items():
                start = time.perf_counter()
                with context():
                    for _ in range(args.forwards):
                        out = backbone.velocity(x, t, cond)
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
                outputs[name] = out
    diff = (outputs["merged (inference)"] - outputs["LoRA branches (using)"]).abs().max().item()
    lora = statistics.median(times["LoRA branches (using)"])
    lines = [
        environment_markdown(),
        "",
        f"Toy UNet, {args.forwards} forwards of {args.batch} images in one context, median of "
        f"{rounds} interleaved rounds; max |merged - LoRA| = {diff:.1e}",
        "",
        "| forwards | median ms | vs LoRA branches |",
        "|---|---|---|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {1000 * median:.1f} | x{median / lora:.2f} |")
    print_table("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
