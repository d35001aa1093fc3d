"""The evidence: MARBLE vs its baselines on the toy world, same budget, several seeds.

Methods (configs generated from configs/marble.yaml by scripts/make_toy_configs.py, so only the
training rule differs): amortised MARBLE (``marble``), full per-step MARBLE (``toy_marble_full``),
weighted sum, sequential stages, decoupled fixed uniform coefficients, and each single-reward
specialist. Every run evaluates the same held-out prompts at the same evaluation seeds before and
after training. Per method (mean +/- std over seeds):

* each reward's held-out gain over the base model;
* ``composite``: the mean over rewards of the standardised gain (gain / the base model's
  per-image std of that reward on the held-out set) so rewards on different scales count alike
  (:func:`marble_lightning.metrics.composite` with the ranges ``(0, base std)``);
* ``worst``: the minimum over rewards of the standardised gain;
* on diagnostic steps (every 5 steps; MARBLE's refresh steps, the others' ``diagnostics_every``)
  the worst-reward cosine ``min_k cos(d, g_k)`` of the actual update direction.

Outputs under ``--out`` (default ``benchmarks/results/quality``): ``table.md``, ``curves.png``
(held-out reward curves per method), ``worst_cosine.png`` (histogram), ``alpha.png`` (MARBLE's
alpha trajectories), ``runs.json``.

    python benchmarks/quality.py --seeds 0 1 2 --jobs 2     # the full comparison (hours on 2 cores)
    python benchmarks/quality.py --quick                     # 2 steps, 2 methods, 1 seed

Finished runs are kept (``<out>/runs/<config>/seed<s>/done.json``) and reused when the script is
run again with the same settings, so an interrupted comparison resumes run by run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, environment_markdown
from default_run import ALLOCATOR, run_seed

from marble_lightning.metrics import composite, normalize_scores

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "marble (amortised)": "marble",
    "marble (full, per-step)": "toy_marble_full",
    "marble (reference recipe)": "toy_marble_reference",
    "equal alpha (reference ablation)": "toy_equal_alpha",
    "weighted sum": "toy_weighted_sum",
    "sequential": "toy_sequential",
    "decoupled (fixed uniform)": "toy_decoupled",
    **{
        f"single: {n}": f"toy_single_{n}" for n in ("composition", "ocr", "quality", "jpeg", "clip")
    },
}


def load_config(name: str, diagnostics: int | None, quick: bool) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    if diagnostics and cfg["model"].get("mode") not in ("marble",):
        cfg["model"]["diagnostics_every"] = diagnostics
    if quick:
        cfg["trainer"]["max_steps"] = 2
        for cb in cfg["trainer"]["callbacks"]:
            if cb["class_path"].endswith("RewardEvalCallback"):
                cb["init_args"]["prompts"] = [
                    'the word "cat"',
                    "two red circles",
                    "a red circle left of a blue square",
                ]
        cfg["trainer"]["callbacks"] = [
            c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith("ProgressBar")
        ]
        cfg["trainer"]["enable_progress_bar"] = False
    return cfg


def stats(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:+.3f}"
    return f"{statistics.fmean(values):+.3f} ± {statistics.stdev(values):.3f}"


def summarise(record: dict) -> dict:
    """Per-reward paired gains (final minus base, same prompts and seeds) and their composite.

    The composite is :func:`marble_lightning.metrics.composite` of the trained rewards' gains,
    each normalised by the range ``(0, base std)``, i.e. the mean of ``gain / std`` (the base
    model's per-image population std of that reward; 1 when it is 0).
    """
    names = record.get("eval_names", record["names"])
    first, last = record["eval_samples"][0], record["eval_samples"][-1]
    out: dict = {"gain": {}, "std_gain": {}}
    scale: dict[str, tuple[float, float]] = {}
    for k, name in enumerate(names):
        pairs = [
            (a[k], b[k]) for a, b in zip(first, last) if not (math.isnan(a[k]) or math.isnan(b[k]))
        ]
        if not pairs:
            continue
        base = [p[0] for p in pairs]
        out["gain"][name] = statistics.fmean(p[1] - p[0] for p in pairs)
        scale[name] = (0.0, statistics.pstdev(base) or 1.0)
    out["std_gain"] = normalize_scores(out["gain"], scale)  # gain / base std
    trained = [n for n in record["names"] if n in out["gain"]]
    out["composite"] = composite(
        {n: out["gain"][n] for n in trained}, ranges={n: scale[n] for n in trained}
    )
    out["worst"] = min(out["std_gain"][n] for n in trained)
    out["worst_cosines"] = [
        h["cos/worst"] for h in record["train"] if math.isfinite(h.get("cos/worst", float("nan")))
    ]
    return out


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))[0]["record"]
    names = first.get("eval_names", first["names"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for method, runs in results.items():
        for k, name in enumerate(names):
            steps = [h["step"] for h in runs[0]["record"]["eval"]]
            means = [
                statistics.fmean(
                    r["record"]["eval"][i].get(f"eval/{name}", float("nan")) for r in runs
                )
                for i in range(len(steps))
            ]
            axes[0, k].plot(steps, means, marker="o", label=method)
            axes[0, k].set_title(name)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for method, runs in results.items():
        cos = [c for r in runs for c in r["summary"]["worst_cosines"]]
        if cos:
            ax.hist(cos, bins=30, alpha=0.5, label=method)
    ax.axvline(0, color="k", lw=1)
    ax.set_xlabel("min_k cos(d, g_k)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "worst_cosine.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in results.get("marble (amortised)", []):
        hist = r["record"]["train"]
        for k, name in enumerate(r["record"]["names"]):  # trained rewards only
            ax.plot(
                [h["step"] for h in hist],
                [h["alpha"][k] for h in hist],
                color=f"C{k}",
                alpha=0.6,
                label=name if r is results["marble (amortised)"][0] else None,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("alpha")
    if ax.get_legend_handles_labels()[
        0
    ]:  # no MARBLE run among the methods: an empty plot, no legend
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "alpha.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--diagnostics-every", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/quality")
    args = parser.parse_args(argv)
    for key, value in ALLOCATOR.items():  # the runs get these; record what they ran under
        os.environ.setdefault(key, value)
    if args.quick:
        args.seeds, args.methods = [0], ["marble (amortised)", "weighted sum"]
        args.out = args.out + "_quick"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(m, s) for s in args.seeds for m in args.methods]  # seeds outermost: methods interleave
    threads = 1 if args.jobs > 1 else None
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            (m, s): pool.submit(
                run_seed,
                load_config(METHODS[m], args.diagnostics_every, args.quick),
                s,
                out / "runs" / METHODS[m],
                None,
                threads,
            )
            for m, s in jobs
        }
        for (m, s), future in futures.items():
            path, elapsed = future.result()
            record = json.loads(path.read_text())
            results[m].append(
                {"seed": s, "elapsed": elapsed, "record": record, "summary": summarise(record)}
            )
            print(f"{m} seed {s}: {elapsed / 60:.1f} min", flush=True)

    first = results[args.methods[0]][0]["record"]
    names = first.get("eval_names", first["names"])
    lines = [
        environment_markdown(),
        "",
        (
            f"Seeds {args.seeds}; gains are held-out final minus base "
            "(same prompts and evaluation seeds); composite/worst are standardised gains."
        ),
        "",
        "| method | " + " | ".join(names) + " | composite | worst | worst cos < 0 |",
        "|---|" + "---|" * (len(names) + 3),
    ]
    for m, runs in results.items():
        cells = [stats([r["summary"]["gain"].get(n, float("nan")) for r in runs]) for n in names]
        cos = [c for r in runs for c in r["summary"]["worst_cosines"]]
        neg = f"{sum(c < 0 for c in cos)}/{len(cos)}" if cos else "n/a"
        lines.append(
            f"| {m} | "
            + " | ".join(cells)
            + f" | {stats([r['summary']['composite'] for r in runs])} | "
            f"{stats([r['summary']['worst'] for r in runs])} | {neg} |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    plots(results, out)
    slim = {
        m: [{k: v for k, v in r.items() if k != "record"} for r in runs]
        for m, runs in results.items()
    }
    (out / "runs.json").write_text(json.dumps({"env": environment(), "results": slim}, indent=1))


if __name__ == "__main__":
    main()
