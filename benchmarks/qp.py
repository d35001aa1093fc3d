"""Time the min-norm QP and gradient harmonisation; print markdown tables.

Usage::

    python benchmarks/qp.py            # full grid, median of many repeats
    python benchmarks/qp.py --quick    # fewer repeats (a smoke run, ~10 s)

Measures, for K in {2, 5, 16, 64} reward gradients:

* ``min_norm_coefficients`` on a normalised K x K Gram matrix (the QP alone, including the
  tensor -> float64 numpy round trip and validation);
* ``harmonize_gram`` on the raw Gram matrix (norms, drop rule, QP, weights, cosines);
* ``harmonize`` on a ``[K, P]`` float32 gradient matrix for P in {1e5, 1e6}, with the Gram
  matrix product (``g @ g.T``) timed separately, since it dominates for large P.

Timings are medians over repeats. Large-buffer timings on CPU depend on the allocator: start the
process with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000
MALLOC_TOP_PAD_=1073741824`` (glibc) for comparable numbers; the header prints what was set.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from importlib.metadata import version

import numpy as np
import torch

from marble_lightning.harmonize import harmonize, harmonize_gram, min_norm_coefficients

KS = (2, 5, 16, 64)
PS = (100_000, 1_000_000)
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


def median_seconds(
    fn: Callable[[], object], repeats: int, budget_s: float, sync: Callable[[], None]
) -> float:
    """Median wall time of ``fn`` over up to ``repeats`` calls (stopping after ``budget_s``)."""
    fn()  # warm-up
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gradients(k: int, p: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``[K, P]`` float32 gradients with correlated directions and norms over two decades."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, p, generator=gen)
    grads = torch.randn(k, p, generator=gen) + 0.5 * shared
    grads *= 10.0 ** torch.linspace(-1, 1, k).unsqueeze(1)
    return grads.to(device)


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    parser.add_argument("--device", default="cpu", help="device of the gradients (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    small_repeats, small_budget = (50, 0.2) if args.quick else (2000, 2.0)
    big_repeats, big_budget = (3, 0.5) if args.quick else (30, 10.0)

    print(
        f"torch {torch.__version__}, numpy {np.__version__}, quadprog {version('quadprog')}, "
        f"python {platform.python_version()}, device {device}, "
        f"torch threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}"
    )
    malloc = ", ".join(f"{name}={os.environ[name]}" for name in MALLOC_VARS if name in os.environ)
    print(f"allocator env: {malloc or 'none set'}")
    print()

    print("| K | `min_norm_coefficients` (ms) | `harmonize_gram` (ms) |")
    print("|---:|---:|---:|")
    for k in KS:
        grads = gradients(k, 1000, torch.device("cpu")).double()
        gram = grads @ grads.T
        norms = gram.diagonal().sqrt()
        normalized = gram / torch.outer(norms, norms)
        qp = median_seconds(
            partial(min_norm_coefficients, normalized), small_repeats, small_budget, sync
        )
        weights = median_seconds(partial(harmonize_gram, gram), small_repeats, small_budget, sync)
        print(f"| {k} | {fmt_ms(qp)} | {fmt_ms(weights)} |")
    print()

    print("| K | P | Gram `g @ g.T` (ms) | `harmonize` total (ms) |")
    print("|---:|---:|---:|---:|")
    for p in PS:
        for k in KS:
            grads = gradients(k, p, device)
            product = median_seconds(
                partial(torch.matmul, grads, grads.T), big_repeats, big_budget, sync
            )
            total = median_seconds(partial(harmonize, grads), big_repeats, big_budget, sync)
            print(f"| {k} | {p:.0e} | {fmt_ms(product)} | {fmt_ms(total)} |")


if __name__ == "__main__":
    main()
