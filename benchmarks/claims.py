"""The paper's claims on the toy world: six training rules, several seeds, intervals and tests.

Methods (configs generated from configs/marble.yaml by scripts/make_toy_configs.py: same world,
budget and evaluation): MARBLE with the reference recipe (refresh every 10, EMA 0.7, no uniform
stage), its equal-alpha ablation (alpha = 1/K on normalised gradients, no QP), decoupled fixed
uniform coefficients, the weighted sum, full per-step MARBLE and this project's default. Each run
is ``benchmarks/quality.py``'s (held-out gains of the same images before and after training,
standardised composite and worst reward, worst-reward cosines on diagnostic steps). Reported:

* per method: mean gain of every reward, composite and worst with 95% Student-t intervals over
  seeds;
* paired t-tests (runs paired by seed: same prompt order and rollout noise keys) of composite and
  worst between MARBLE variants and the baselines;
* the paper's claims, each marked as holding (p < 0.05 in the claimed direction), not shown, or
  contradicted (p < 0.05 against it).

Nothing is tuned here: the configs are fixed before the held-out numbers are read.

    python benchmarks/claims.py --seeds 0 1 2 3 4 --jobs 2  # the study (hours on 2 cores)
    python benchmarks/claims.py --collect                 # tables and plots from summaries.json

Rollouts run in float32 whatever the CPU (``--rollout-precision``), so the numbers do not depend
on which machine ran a seed. Every finished run's summary is added to ``<out>/summaries.json`` at
once (with its config's hash, CPU and torch capability), so an interrupted study continues where
it stopped, on this machine or another; a run whose config changed is run again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, environment, environment_markdown
from _stats import mean_interval, paired_test
from default_run import ALLOCATOR, run_seed
from quality import METHODS, load_config, summarise

STUDY = {
    "marble (reference recipe)": "reference",
    "equal alpha (reference ablation)": "equal alpha",
    "decoupled (fixed uniform)": "decoupled",
    "weighted sum": "weighted sum",
    "marble (full, per-step)": "full per-step",
    "marble (amortised)": "default",
}
"""Method (a key of ``quality.METHODS``) -> short label."""

MARBLES = ["reference", "full per-step", "default"]
BASELINES = ["weighted sum", "equal alpha", "decoupled"]


STUDY_BUDGET = {"sample_steps": 10, "train_timesteps": 2}
"""Sampling and training budget every run of the study used: applied to each config, with the
held-out evaluation at the same 10 steps and DiffusionNFT's old-policy schedule (lagging from step
75), so the stored runs stay reproducible when the default's budget changes."""

STUDY_STEPS = 150
"""Training steps of every run of the study (evaluated at the end)."""

STUDY_UNIFORM_AFTER = 100
"""The study's default rule: dynamic alpha for steps 0-99, uniform alpha for the last third."""


def study_config(method: str, diagnostics_every: int | None) -> dict:
    """The config of ``method`` (a key of ``quality.METHODS``) as the study runs it: the method
    from ``configs/``, the budget pinned above."""
    config = load_config(METHODS[method], diagnostics_every, quick=False)
    config["model"].update(STUDY_BUDGET)
    config["model"].pop("eval_sample_steps", None)  # evaluation at sample_steps, as stored
    config["model"].pop("old_policy", None)  # the module's default: DiffusionNFT's schedule
    config["trainer"]["max_steps"] = STUDY_STEPS
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("RewardEvalCallback"):
            cb.setdefault("init_args", {})["every_n_steps"] = STUDY_STEPS
        args = cb.get("init_args") or {}
        # a final uniform stage (not the reference's None, not equal alpha's 0) at the study's step
        if cb["class_path"].endswith("HarmonizationCallback") and args.get("uniform_after"):
            args["uniform_after"] = STUDY_UNIFORM_AFTER
    return config


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def qp_schedule(config: dict) -> tuple[bool, int | None]:
    """``(solves MARBLE's QP on refresh steps, step from which alpha is uniform)`` of a config:
    the QP runs in ``marble`` / ``amortized`` mode unless a ``HarmonizationCallback`` makes alpha
    uniform from step 0 (the equal-alpha ablation)."""
    uniform_after = None
    for cb in config.get("trainer", {}).get("callbacks") or []:
        if cb.get("class_path", "").endswith("HarmonizationCallback"):
            uniform_after = (cb.get("init_args") or {}).get("uniform_after")
    qp = config["model"].get("mode") in ("marble", "amortized") and uniform_after != 0
    return qp, uniform_after


def cpu_line() -> str:
    import torch

    return f"{cpu_model()}, capability {torch.backends.cpu.get_cpu_capability()}"


def verdict(test, direction: int = 1) -> str:
    """``holds`` / ``contradicted`` at p < 0.05 in / against ``direction``; else ``not shown``."""
    if not math.isfinite(test.p):
        return "not shown (too few seeds)"
    if test.p < 0.05:
        return "holds" if test.difference.mean * direction > 0 else "contradicted"
    return "not shown"


def build_report(
    summaries: dict, seeds: list[int], schedules: dict[str, tuple[bool, int | None]] | None = None
) -> str:
    """The markdown report from ``{label: {seed: {"summary": ...}}}`` (only the given seeds).

    ``schedules``: :func:`qp_schedule` per label, to tell QP steps (refresh steps whose alpha
    comes from the QP) from the others; a label without one counts every refresh step as a QP
    step."""
    schedules = schedules or {}
    labels = [label for label in STUDY.values() if label in summaries]
    runs = {
        label: {s: summaries[label][str(s)]["summary"] for s in seeds if str(s) in summaries[label]}
        for label in labels
    }
    entries = {
        label: {s: summaries[label][str(s)] for s in seeds if str(s) in summaries[label]}
        for label in labels
    }
    some = next((r for per in runs.values() for r in per.values()), None)
    if some is None:
        return "no finished runs"
    first = next(e for per in entries.values() for e in per.values())
    trained = list(first.get("trained") or [n for n in some["gain"] if n != "ocr_edit"])
    names = trained + sorted(n for n in some["gain"] if n not in trained)

    def cosines(label: str, qp: bool) -> list[float]:
        """Worst-reward cosines of ``label``'s runs on QP steps (``qp``) or on the others."""
        solves, uniform_after = schedules.get(label, (True, None))
        values = []
        for e in entries[label].values():
            for step, is_refresh, c in e.get("cosines", []):
                on_qp = solves and is_refresh and (uniform_after is None or step < uniform_after)
                if on_qp == qp:
                    values.append(c)
        return values

    def negatives(values: list[float]) -> str:
        return f"{sum(c < 0 for c in values)}/{len(values)}" if values else "-"

    lines = [
        "Held-out gain (final minus base on the same images), mean over seeds with its 95% "
        "t-interval; composite and worst are gains standardised by the base model's per-image std "
        "(composite: their mean over the trained rewards, worst: their minimum). `cos < 0`: "
        "diagnostic steps whose update direction had a negative cosine with some reward's "
        "gradient, on QP steps (refresh steps whose alpha comes from MARBLE's QP, smoothed by the "
        "alpha EMA where the recipe has one) / other diagnostic steps (cached alpha between "
        "refreshes, the uniform stage, rules without a QP); columns after the trained rewards are "
        "evaluated only.",
        "",
        "| method | seeds | "
        + " | ".join(names)
        + " | composite | worst | cos < 0 QP steps / other |",
        "|---|---|" + "---|" * (len(names) + 3),
    ]
    for label in labels:
        per = runs[label]
        cells = [
            str(mean_interval([r["gain"].get(n, math.nan) for r in per.values()])) for n in names
        ]
        neg = f"{negatives(cosines(label, True))} / {negatives(cosines(label, False))}"
        comp = mean_interval([r["composite"] for r in per.values()])
        worst = mean_interval([r["worst"] for r in per.values()])
        lines.append(
            f"| {label} | {len(per)} | " + " | ".join(cells) + f" | {comp} | {worst} | {neg} |"
        )

    def paired(a: str, b: str, key: str):
        common = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
        return paired_test(
            [runs[a][s][key] for s in common], [runs[b][s][key] for s in common]
        ), len(common)

    lines += [
        "",
        "Paired t-tests over seeds (difference A - B, its 95% interval, t and two-sided p):",
        "",
        "| A | B | pairs | composite A - B | worst A - B |",
        "|---|---|---|---|---|",
    ]
    pairs = [(m, b) for m in MARBLES for b in BASELINES]
    pairs += [("reference", "default"), ("reference", "full per-step")]
    tests = {}
    for a, b in pairs:
        if a not in runs or b not in runs:
            continue
        comp, n = paired(a, b, "composite")
        worst, _ = paired(a, b, "worst")
        tests[(a, b)] = comp
        lines.append(f"| {a} | {b} | {n} | {comp} | {worst} |")

    lines += ["", "The paper's claims on the toy world (p < 0.05 for 'holds'):", ""]
    for m in MARBLES:
        for b in ("weighted sum", "equal alpha"):
            if (m, b) in tests:
                t = tests[(m, b)]
                lines.append(
                    f"* MARBLE ({m}) beats {b} on composite: **{verdict(t)}** "
                    f"(difference {t.difference}, p = {t.p:.3f})."
                )
    for m in MARBLES:
        if m not in runs:
            continue
        lows = {n: mean_interval([r["gain"][n] for r in runs[m].values()]) for n in names}
        up = [n for n in trained if lows[n].low > 0]
        down = [n for n in trained if lows[n].high < 0]
        state = (
            "holds"
            if len(up) == len(trained)
            else f"contradicted ({', '.join(down)} down)"
            if down
            else f"not shown (interval includes 0: {', '.join(n for n in trained if n not in up)})"
        )
        lines.append(f"* MARBLE ({m}) improves every reward: **{state}**.")
    for m in MARBLES + ["weighted sum", "equal alpha", "decoupled"]:
        if m not in runs:
            continue
        fresh, cached = cosines(m, True), cosines(m, False)
        every = fresh + cached
        if every:
            lines.append(
                f"* Worst-reward cosine of {m}: negative on {negatives(fresh)} QP steps and "
                f"{negatives(cached)} other diagnostic steps (min {min(every):+.2f})."
            )
    baseline = cosines("weighted sum", False) if "weighted sum" in runs else []
    for m in MARBLES:
        if m not in runs or not baseline:
            continue
        fresh, every = cosines(m, True), cosines(m, True) + cosines(m, False)
        if not fresh:
            continue
        never = all(c >= 0 for c in every)
        state = (
            "holds"
            if never
            else "holds on QP steps only"
            if all(c >= 0 for c in fresh)
            else "contradicted"
        )
        lines.append(
            f"* MARBLE ({m})'s worst-reward cosine is never negative while the weighted sum's "
            f"often is: **{state}** ({m}: {negatives(every)} diagnostic steps negative, "
            f"{negatives(fresh)} of its QP steps; weighted sum: {negatives(baseline)})."
        )
    return "\n".join(lines)


def plot_study(
    summaries: dict,
    seeds: list[int],
    schedules: dict[str, tuple[bool, int | None]],
    out: Path,
) -> list[Path]:
    """Figures of the study, written to ``out``; returns their paths.

    ``gains.png``: every reward's held-out gain, composite and worst per rule (each seed a dot,
    the mean with its 95% t-interval a bar); ``paired.png``: the paired differences of composite
    and worst (MARBLE variant minus baseline) with their intervals; ``worst_cosine.png``: the
    worst-reward cosine at each diagnostic step, every seed a line, QP steps filled dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label in STUDY.values() if label in summaries]
    entries = {
        label: [summaries[label][str(s)] for s in seeds if str(s) in summaries[label]]
        for label in labels
    }
    if not any(entries.values()):
        return []
    first = next(e for per in entries.values() for e in per)
    gains = first["summary"]["gain"]
    trained = list(first.get("trained") or gains)
    panels = trained + sorted(n for n in gains if n not in trained) + ["composite", "worst"]

    def value(entry: dict, panel: str) -> float:
        summary = entry["summary"]
        return summary[panel] if panel in ("composite", "worst") else summary["gain"][panel]

    written = []
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for i, label in enumerate(labels):
            values = [value(e, panel) for e in entries[label]]
            ax.scatter([i] * len(values), values, s=10, color="0.6", zorder=2)
            ci = mean_interval(values)
            if ci.n >= 2:
                ax.errorbar(
                    i,
                    ci.mean,
                    yerr=[[ci.mean - ci.low], [ci.high - ci.mean]],
                    fmt="o",
                    color=f"C{i}",
                    capsize=3,
                    zorder=3,
                )
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
        unit = " (std of base)" if panel in ("composite", "worst") else ""
        ax.set_title(f"{panel}{unit}", fontsize=9)
    written.append(
        _save(
            fig,
            axes,
            len(panels),
            out / "gains.png",
            "held-out gain over the base model: seeds (dots), mean and 95% interval",
        )
    )

    pairs = [(a, b) for a in MARBLES for b in BASELINES if a in entries and b in entries]
    if pairs:
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(pairs) + 1.5), squeeze=False)
        for ax, key in zip(axes[0], ("composite", "worst")):
            for j, (a, b) in enumerate(pairs):
                by_seed = {s: summaries[b][str(s)] for s in seeds if str(s) in summaries[b]}
                matched = [
                    (value(summaries[a][str(s)], key), value(by_seed[s], key))
                    for s in seeds
                    if str(s) in summaries[a] and s in by_seed
                ]
                test = paired_test([x for x, _ in matched], [y for _, y in matched])
                d = test.difference
                if d.n >= 2:
                    color = "C2" if d.low > 0 else "C3" if d.high < 0 else "0.3"
                    ax.errorbar(
                        d.mean,
                        j,
                        xerr=[[d.mean - d.low], [d.high - d.mean]],
                        fmt="o",
                        color=color,
                        capsize=3,
                    )
            ax.axvline(0, color="k", lw=0.8)
            ax.set_yticks(range(len(pairs)), [f"{a} - {b}" for a, b in pairs], fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{key}: paired difference, 95% interval", fontsize=9)
        fig.tight_layout()
        written.append(out / "paired.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(2, 3, figsize=(13, 6), sharex=True, sharey=True, squeeze=False)
    for ax, label in zip(axes.flat, labels):
        solves, uniform_after = schedules.get(label, (True, None))
        for entry in entries[label]:
            rows_ = entry.get("cosines", [])
            ax.plot([r[0] for r in rows_], [r[2] for r in rows_], color="0.6", lw=0.6)
            qp = [
                r
                for r in rows_
                if solves and r[1] and (uniform_after is None or r[0] < uniform_after)
            ]
            ax.scatter([r[0] for r in qp], [r[2] for r in qp], s=6, color="C0", zorder=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(label, fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    for ax in axes[:, 0]:
        ax.set_ylabel("min_k cos(d, g_k)")
    written.append(
        _save(
            fig,
            axes,
            len(labels),
            out / "worst_cosine.png",
            "worst-reward cosine at diagnostic steps (lines: seeds; dots: QP steps)",
        )
    )
    return written


def _save(fig: Any, axes: Any, used: int, path: Path, title: str) -> Path:
    """Hide the panels after the first ``used``, title, save ``fig`` to ``path`` and close it."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(STUDY), choices=list(STUDY))
    parser.add_argument("--diagnostics-every", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="smoke runs only")
    parser.add_argument(
        "--rollout-precision",
        default="float32",
        help="pinned for every run (default float32: the same arithmetic on every CPU, so seeds "
        "run on different machines stay comparable; 'auto' would pick bf16 on some)",
    )
    parser.add_argument("--collect", action="store_true", help="no runs: report what is stored")
    parser.add_argument("--out", default="benchmarks/results/claims")
    args = parser.parse_args(argv)
    for key, value in ALLOCATOR.items():
        os.environ.setdefault(key, value)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "summaries.json"
    summaries: dict = json.loads(store.read_text()) if store.is_file() else {}
    lock = threading.Lock()
    threads = 1 if args.jobs > 1 else None

    def one(method: str, seed: int) -> None:
        label = STUDY[method]
        config = study_config(method, args.diagnostics_every)
        config["model"]["rollout_precision"] = args.rollout_precision
        if args.max_steps is not None:
            config["trainer"]["max_steps"] = args.max_steps
        digest = config_hash(config)
        stored = summaries.get(label, {}).get(str(seed), {})
        if stored.get("config") == digest and "cosines" in stored:
            return
        path, elapsed = run_seed(config, seed, out / "runs" / METHODS[method], None, threads)
        record = json.loads(path.read_text())
        entry = {
            "config": digest,
            "elapsed_s": round(elapsed, 1),
            "threads": threads or os.cpu_count(),
            "cpu": cpu_line(),
            "summary": summarise(record),
            "trained": list(record["names"]),
            "cosines": [
                [h["step"], bool(h.get("refresh")), h["cos/worst"]]
                for h in record["train"]
                if math.isfinite(h.get("cos/worst", math.nan))
            ],
        }
        with lock:
            summaries.setdefault(label, {})[str(seed)] = entry
            store.write_text(json.dumps(summaries, indent=1, sort_keys=True) + "\n")
        print(f"{label} seed {seed}: {elapsed / 60:.1f} min", flush=True)

    if not args.collect:
        jobs = [(m, s) for s in args.seeds for m in args.methods]  # seed-major: balanced partials
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for future in [pool.submit(one, m, s) for m, s in jobs]:
                future.result()
    schedules = {label: qp_schedule(study_config(method, None)) for method, label in STUDY.items()}
    machines = sorted({e["cpu"] for per in summaries.values() for e in per.values()})
    report = "\n".join(
        [
            environment_markdown(),
            f"Runs made on: {'; '.join(machines) or 'none yet'}",
            "",
            build_report(summaries, args.seeds, schedules),
        ]
    )
    print(report)
    (out / "table.md").write_text(report + "\n")
    for path in plot_study(summaries, args.seeds, schedules, out):
        print(f"wrote {path}")
    (out / "environment.json").write_text(json.dumps(environment(), indent=1) + "\n")


if __name__ == "__main__":
    main()
