"""Run the default config (configs/marble.yaml) for several seeds and test every reward's gain.

Each seed is a separate ``marble fit`` process (the README's command, with the seed changed and
the output under ``--out``). The held-out evaluation uses fixed evaluation seeds, so the base and
final scores of every held-out image are paired. Reported per reward: base and final means, the
mean gain over runs with its standard error across runs, and the pooled paired per-image gain
with its standard error; a reward passes when its gain exceeds 2 standard errors (both ways).

    python benchmarks/default_run.py --seeds 0 1 2              # the acceptance run (~30 min)
    python benchmarks/default_run.py --seeds 0 --max-steps 2    # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_markdown

ALLOCATOR = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
    "MALLOC_TOP_PAD_": "1073741824",
}


def run_seed(
    config: dict, seed: int, out: Path, max_steps: int | None, threads: int | None = None
) -> tuple[Path, float]:
    """Run one seed of ``config`` under ``out/seed<seed>``; returns (report history.json, wall
    seconds).

    A finished run leaves ``done.json`` (its config, report path and wall time); calling again with
    the same config returns that run instead of training again, so an interrupted sweep resumes
    where it stopped (a run that was killed midway is restarted from scratch).
    """
    cfg = json.loads(json.dumps(config))
    root = out / f"seed{seed}"
    cfg["seed_everything"] = seed
    cfg["model"]["seed"] = seed
    cfg["data"]["seed"] = seed
    cfg["trainer"]["default_root_dir"] = str(root)
    for logger in cfg["trainer"].get("logger", []):
        logger.setdefault("init_args", {})["save_dir"] = str(root)
    if max_steps is not None:
        cfg["trainer"]["max_steps"] = max_steps
    done = root / "done.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("config") == cfg and Path(record["report"]).is_file():
            return Path(record["report"]), float(record["elapsed"])
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, **{k: os.environ.get(k, v) for k, v in ALLOCATOR.items()})
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(root / "fit.log", "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "marble_lightning", "fit", "--config", str(cfg_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"seed {seed} failed with exit code {proc.returncode}; see {root / 'fit.log'}"
        )
    reports = sorted(
        root.glob("lightning_logs/version_*/report/history.json"), key=lambda p: p.stat().st_mtime
    )
    if not reports:
        raise RuntimeError(f"seed {seed}: no report/history.json under {root}")
    done.write_text(json.dumps({"config": cfg, "report": str(reports[-1]), "elapsed": elapsed}))
    return reports[-1], elapsed


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/marble.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--out", default="runs/default_run")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="seeds run concurrently (each with OMP_NUM_THREADS = cores // jobs); wall times "
        "are then not those of a lone run",
    )
    parser.add_argument(
        "--collect", action="store_true", help="only summarise the runs already under --out"
    )
    args = parser.parse_args(argv)
    for key, value in ALLOCATOR.items():  # the runs get these; record what they ran under
        os.environ.setdefault(key, value)
    config = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    runs = []
    if args.collect:
        for seed in args.seeds:
            reports = sorted(
                (out / f"seed{seed}").glob("lightning_logs/version_*/report/history.json"),
                key=lambda p: p.stat().st_mtime,
            )
            runs.append((seed, json.loads(reports[-1].read_text()), float("nan")))
    else:
        from concurrent.futures import ThreadPoolExecutor

        threads = max(1, (os.cpu_count() or 2) // args.jobs) if args.jobs > 1 else None
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {
                seed: pool.submit(run_seed, config, seed, out, args.max_steps, threads)
                for seed in args.seeds
            }
            for seed, future in futures.items():
                path, elapsed = future.result()
                runs.append((seed, json.loads(path.read_text()), elapsed))
                print(f"seed {seed}: {elapsed / 60:.1f} min, report {path.parent}", flush=True)

    trained = runs[0][1]["names"]
    names = runs[0][1].get("eval_names", trained)
    lines = [
        environment_markdown(),
        "",
        f"`{args.config}`, seeds {args.seeds}, "
        + (
            f"{args.jobs} runs at a time on "
            f"{max(1, (os.cpu_count() or 2) // args.jobs)} thread(s) each, "
            if args.jobs > 1
            else "one run at a time, "
        )
        + "fit wall time per run: "
        + ", ".join(f"{e / 60:.1f} min" for _, _, e in runs),
        "",
        "| reward | base | final | gain over runs (SE) | paired per-image gain (SE, n) | > 2 SE |",
        "|---|---|---|---|---|---|",
    ]
    verdict = {}
    for k, name in enumerate(names):
        bases, finals, gains, paired = [], [], [], []
        for _, rec, _ in runs:
            first, last = rec["eval_samples"][0], rec["eval_samples"][-1]
            pairs = [
                (a[k], b[k])
                for a, b in zip(first, last)
                if not (math.isnan(a[k]) or math.isnan(b[k]))
            ]
            if not pairs:
                continue
            b = sum(p[0] for p in pairs) / len(pairs)
            f = sum(p[1] for p in pairs) / len(pairs)
            bases.append(b), finals.append(f), gains.append(f - b)
            paired += [p[1] - p[0] for p in pairs]
        if not gains:
            continue
        g, g_se = mean_se(gains)
        pg, pg_se = mean_se(paired)
        ok = g > 2 * g_se if len(gains) > 1 else pg > 2 * pg_se
        ok = ok and pg > 2 * pg_se
        if name in trained:
            verdict[name] = ok
        lines.append(
            f"| {name if name in trained else name + ' (evaluation only)'} "
            f"| {sum(bases) / len(bases):.4f} | {sum(finals) / len(finals):.4f} | "
            f"{g:+.4f} ({g_se:.4f}) | {pg:+.4f} ({pg_se:.4f}, {len(paired)}) "
            f"| {'yes' if ok else 'NO'} |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "summary.md").write_text(table + "\n")
    print("every trained reward improved by > 2 SE:", all(verdict.values()))


if __name__ == "__main__":
    main()
