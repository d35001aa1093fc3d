"""Cost of the toy UNet's widths: a training step's two kinds of forward, side by side.

For each ``block_out_channels`` (the shipped ``32 64 128`` first, then narrower candidates for a
cheaper toy world) a randomly initialised :class:`~marble_lightning.toy.backbone.ToyBackbone` with
the default LoRA (rank 16) runs, alternately within one process, what a step of the default config
does with 24 images: a LoRA forward + backward (training, float32) and 10 merged gradient-free
forwards (a rollout, float32). Prints the median time of each and its ratio to the shipped width,
with the FLOPs per image of one forward (``torch.utils.flop_counter``).

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000 \
        MALLOC_TOP_PAD_=1073741824 python benchmarks/toy_unet_cost.py          # 8 rounds
    python benchmarks/toy_unet_cost.py --widths 32,64,128 16,32,64 --quick   # 2 rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_markdown, print_table

from marble_lightning.adapters import POLICY, LoraAdapterPair
from marble_lightning.toy.backbone import ToyBackbone, ToyModelConfig

SHIPPED = (32, 64, 128)


def _width(text: str) -> tuple[int, ...]:
    try:
        width = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a width is comma-separated ints, got {text!r}") from None
    if len(width) != 3:
        raise argparse.ArgumentTypeError(f"a width has 3 levels, got {text!r}")
    return width


def workloads(width: tuple[int, ...], batch: int, forwards: int) -> dict[str, Callable]:
    """``{"training": f, "rollout": g}`` for a fresh model of ``width``; also ``"flops"``."""
    torch.manual_seed(0)
    backbone = ToyBackbone.from_config(ToyModelConfig(block_out_channels=width)).eval()
    pair = LoraAdapterPair.for_backbone(backbone, 16, 32, None, 0)
    with torch.no_grad():
        for p in pair.policy_params:
            p.add_(0.01 * torch.randn_like(p))
    cond = backbone.encode_prompts(["two red circles"] * batch)
    x = torch.randn(batch, *backbone.sample_shape)
    t = torch.rand(batch)
    target = torch.randn_like(x)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone.velocity(x, t, cond)

    def training() -> None:
        for p in pair.policy_params:
            p.grad = None
        ((backbone.velocity(x, t, cond) - target) ** 2).mean().backward()

    def rollout() -> None:
        with torch.no_grad(), pair.inference(POLICY):
            for _ in range(forwards):
                backbone.velocity(x, t, cond)

    return {"training": training, "rollout": rollout, "flops": counter.get_total_flops() / batch}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--widths",
        type=_width,
        nargs="+",
        default=[SHIPPED, (24, 48, 96), (16, 32, 64)],
        help="block_out_channels to compare, the first is the reference",
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="2 rounds (the test suite)")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--forwards", type=int, default=10, help="forwards per rollout")
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    runs = {w: workloads(w, args.batch, args.forwards) for w in args.widths}
    times: dict[tuple, list[float]] = {}
    for r in range(rounds + 1):
        for kind in ("training", "rollout"):
            for width, run in runs.items():
                start = time.perf_counter()
                run[kind]()
                if r:  # round 0 warms up
                    times.setdefault((width, kind), []).append(time.perf_counter() - start)
    ref = args.widths[0]
    lines = [
        environment_markdown(),
        "",
        f"Toy UNet widths, {args.batch} images, float32, median of {rounds} interleaved rounds "
        f"(training: one LoRA forward + backward; rollout: {args.forwards} merged forwards)",
        "",
        "| block_out_channels | MFLOP per image-forward (LoRA branches on) "
        "| training s | x | rollout s | x |",
        "|---|---|---|---|---|---|",
    ]
    for width, run in runs.items():
        row = [f"| {' '.join(map(str, width))} | {run['flops'] / 1e6:.0f}"]
        for kind in ("training", "rollout"):
            median = statistics.median(times[(width, kind)])
            reference = statistics.median(times[(ref, kind)])
            row.append(f"{median:.3f} | x{median / reference:.2f}")
        lines.append(" | ".join(row) + " |")
    print_table("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
