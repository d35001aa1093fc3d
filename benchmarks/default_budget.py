"""A rollout / training budget for the default, against the claims study's default runs.

Runs the claims study's ``default`` rule as ``claims.py`` runs it (its pinned 150-step budget,
float32 rollouts, one thread per run, diagnostics every 5 steps, the same held-out evaluation)
with overrides (``--set KEY=VALUE``: a model key, ``trainer.KEY`` or ``<CallbackClass>.KEY``), so
the two differ only in what is overridden. Stores one summary per seed and prints, per reward, the
mean gain with its 95% interval for both and the paired difference by seed. Stored budgets
(``marble_lightning/toy/README.md``, "How the default was chosen"):

* ``results/default_budget_120/``: the shipped ``configs/marble.yaml`` (120 steps, 8-step
  rollouts, 1 training timestep, evaluation at 10 steps; 13.6-14.8 min per run*):

      python benchmarks/default_budget.py --seeds 0 1 2 3 4 \
          --out benchmarks/results/default_budget_120 \
          --set sample_steps=8 eval_sample_steps=10 train_timesteps=1 'old_policy={"start": 60}' \
          trainer.max_steps=120 HarmonizationCallback.uniform_after=80 \
          RewardEvalCallback.every_n_steps=120

* ``results/default_budget/``: the same per-step budget over 150 steps, measured and not
  adopted (18-22 min per run*):

      python benchmarks/default_budget.py --seeds 0 1 2 4 \
          --set sample_steps=8 eval_sample_steps=10 train_timesteps=1

``--collect`` (with the same ``--out``) reports what is stored without running. Another budget
needs another ``--out``. (*2-core Intel Xeon, capability ``AVX512``, two runs at a time.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import mean_interval, paired_test
from claims import config_hash, cpu_line, study_config
from default_run import ALLOCATOR, run_seed
from quality import summarise

STUDY = Path(__file__).resolve().parent / "results" / "claims" / "summaries.json"


def budget_config(overrides: dict) -> dict:
    """The default as the study runs it, with ``overrides``: a plain key sets a ``model`` key,
    ``trainer.KEY`` a trainer key and ``<CallbackClass>.KEY`` that callback's init argument."""
    config = study_config("marble (amortised)", 5)
    config["model"]["rollout_precision"] = "float32"
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c for c in config["trainer"]["callbacks"]}
    for key, value in overrides.items():
        owner, dot, name = key.rpartition(".")
        if not dot:
            config["model"][name] = value
        elif owner == "trainer":
            config["trainer"][name] = value
        elif owner in callbacks:
            callbacks[owner].setdefault("init_args", {})[name] = value
        else:
            raise SystemExit(
                f"--set {key}: expected a model key, trainer.KEY or one of the callbacks "
                f"{sorted(callbacks)} followed by .KEY"
            )
    return config


def comparison(results: dict, study: dict, seeds: list[int]) -> list[str]:
    """Lines: per reward / composite / worst, this budget vs the study's default, paired."""
    done = [str(s) for s in seeds if str(s) in results and str(s) in study]
    if not done:
        return ["no seed stored in both"]
    lines = [f"seeds {', '.join(done)}"]
    first = results[done[0]]["summary"]
    keys = [(n, lambda r, n=n: r["summary"]["gain"][n]) for n in first["gain"]]
    keys += [(k, lambda r, k=k: r["summary"][k]) for k in ("composite", "worst")]
    for name, get in keys:
        a = [get(results[s]) for s in done]
        b = [get(study[s]) for s in done]
        lines.append(
            f"{name:12s} this budget {mean_interval(a)}   study {mean_interval(b)}   "
            f"paired {paired_test(a, b)}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="benchmarks/results/default_budget")
    parser.add_argument("--collect", action="store_true", help="no runs: report what is stored")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    for key, value in ALLOCATOR.items():
        os.environ.setdefault(key, value)
    config = budget_config(overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "summaries.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    if args.collect and results:  # report the stored budget
        config = budget_config(next(iter(results.values()))["overrides"])
    digest = config_hash(config)
    other = sorted(s for s, entry in results.items() if entry.get("config") != digest)
    if other:
        raise SystemExit(
            f"{store} holds seeds {other} of another config; choose another --out for this budget"
        )

    def one(seed: int) -> None:
        if str(seed) in results:
            return
        path, elapsed = run_seed(config, seed, out / "runs", None, 1)
        record = json.loads(path.read_text())
        results[str(seed)] = {
            "config": digest,
            "elapsed_s": elapsed,
            "cpu": cpu_line(),
            "overrides": overrides,
            "summary": summarise(record),
        }
        store.write_text(json.dumps(results, indent=1))
        print(f"seed {seed}: {elapsed / 60:.1f} min", flush=True)

    if not args.collect:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, args.seeds))
    study = json.loads(STUDY.read_text())["default"]
    print("\n".join(comparison(results, study, args.seeds)))


if __name__ == "__main__":
    main()
