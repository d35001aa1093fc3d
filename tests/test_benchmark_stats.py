"""benchmarks/_stats.py (t intervals, paired t-tests) and benchmarks/claims.py's report."""

from __future__ import annotations

import math
import random
import statistics
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _stats import mean_interval, paired_test, t_cdf, t_quantile

REPO = Path(__file__).resolve().parents[1]

# two-sided 95% critical values of Student's t (standard tables)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 29: 2.045}


@pytest.mark.parametrize(("df", "value"), sorted(T975.items()))
def test_quantile_matches_the_tables(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)
    assert t_quantile(0.025, df) == pytest.approx(-value, abs=1e-3)


def test_cdf_matches_closed_forms():
    # df = 1 is Cauchy: F(x) = 1/2 + atan(x) / pi; df = 2: F(x) = 1/2 + x / (2 sqrt(2 + x^2))
    for x in (-7.0, -1.3, 0.0, 0.4, 2.5, 30.0):
        assert t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-9)
        assert t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-9)


def test_cdf_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 3, 4, 10, 50):
        for x in (-4.0, -0.7, 0.2, 1.9, 6.0):
            assert t_cdf(x, df) == pytest.approx(scipy_stats.t.cdf(x, df), abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=3, max_size=8), st.floats(-2, 2))
def test_paired_test_is_the_one_sample_test_of_differences(a, shift):
    rng = random.Random(len(a))
    b = [x - shift + rng.gauss(0, 0.3) for x in a]
    test = paired_test(a, b)
    d = [x - y for x, y in zip(a, b)]
    sd = statistics.stdev(d)
    if sd < 1e-9:
        return
    t = statistics.fmean(d) / (sd / math.sqrt(len(d)))
    assert test.t == pytest.approx(t, rel=1e-9, abs=1e-12)
    assert test.p == pytest.approx(2 * (1 - t_cdf(abs(t), len(d) - 1)), abs=1e-12)
    # the interval excludes 0 exactly when p < 0.05
    excludes = test.difference.low > 0 or test.difference.high < 0
    if abs(test.p - 0.05) > 1e-6:
        assert excludes == (test.p < 0.05)


def test_interval_coverage_by_simulation():
    """About 95% of intervals from normal samples of 5 cover the true mean."""
    rng = random.Random(0)
    covered = 0
    for _ in range(2000):
        iv = mean_interval([rng.gauss(1.0, 2.0) for _ in range(5)])
        covered += iv.low <= 1.0 <= iv.high
    assert 0.93 < covered / 2000 < 0.97


def test_paired_test_needs_equal_lengths():
    with pytest.raises(ValueError, match="3 and 2"):
        paired_test([1, 2, 3], [1, 2])


def fake_summary(gains: dict, composite: float, worst: float, cosines: list[float]) -> dict:
    return {
        "gain": gains,
        "std_gain": dict(gains),
        "composite": composite,
        "worst": worst,
        "worst_cosines": cosines,
    }


def test_claims_report_marks_claims_from_the_tests():
    from claims import build_report

    names = ["a", "b"]
    seeds = [0, 1, 2, 3, 4]
    summaries: dict = {}
    for s in seeds:
        summaries.setdefault("reference", {})[str(s)] = {
            "summary": fake_summary({"a": 0.1 + 0.01 * s, "b": 0.2}, 1.0 + 0.1 * s, 0.5, [0.2]),
            "trained": names,
            "cosines": [[0, True, 0.2], [5, False, -0.1]],
        }
        summaries.setdefault("weighted sum", {})[str(s)] = {
            "summary": fake_summary({"a": -0.1, "b": 0.3 + 0.01 * s}, 0.2 + 0.05 * s, -1.0, [-0.3]),
            "trained": names,
            "cosines": [[5, False, -0.3]],
        }
        summaries.setdefault("equal alpha", {})[str(s)] = {
            # composite higher than the reference's on every seed: the claim is contradicted
            "summary": fake_summary(
                {"a": 0.05, "b": 0.01 * s}, 2.0 + 0.1 * s + 0.01 * s * s, 0.1, []
            )
        }
    report = build_report(summaries, seeds)
    assert "| reference | 5 |" in report
    assert "MARBLE (reference) beats weighted sum on composite: **holds**" in report
    assert "MARBLE (reference) beats equal alpha on composite: **contradicted**" in report
    assert "MARBLE (reference) improves every reward: **holds**" in report
    assert "cosine of weighted sum: negative on - QP steps and 5/5 other" in report
    assert "cosine of reference: negative on 0/5 QP steps and 5/5 other" in report
    assert "| reference | 5 |" in report and "| 0/5 / 5/5 |" in report
    assert (
        "(reference)'s worst-reward cosine is never negative while the weighted sum's often "
        "is: **holds on QP steps only**" in report
    )
    # a uniform stage from step 5 on: the step-5 refresh is not a QP step
    for s in seeds:
        summaries["reference"][str(s)]["cosines"] = [[0, True, 0.2], [5, True, -0.1]]
    staged = build_report(summaries, seeds, {"reference": (True, 5)})
    assert "cosine of reference: negative on 0/5 QP steps and 5/5 other" in staged
    everything = build_report(summaries, seeds)  # without schedules: every refresh is a QP step
    assert "cosine of reference: negative on 5/10 QP steps and - other" in everything
    assert "never negative while the weighted sum's often is: **contradicted**" in everything
    header = next(line for line in report.splitlines() if line.startswith("| method"))
    assert all(f"| {n} |" in header for n in names)


def test_claims_plots_are_written_from_the_summaries(tmp_path):
    from claims import plot_study

    seeds = [0, 1, 2]
    summaries: dict = {}
    for s in seeds:
        for label, shift in (("default", 0.1), ("weighted sum", 0.0)):
            summaries.setdefault(label, {})[str(s)] = {
                "summary": fake_summary({"a": shift + 0.01 * s, "b": 0.2}, shift, -shift, []),
                "trained": ["a", "b"],
                "cosines": [[0, True, 0.2], [5, False, -0.1]],
            }
    assert plot_study({}, seeds, {}, tmp_path) == []
    written = plot_study(summaries, seeds, {"default": (True, 100)}, tmp_path)
    assert [p.name for p in written] == ["gains.png", "paired.png", "worst_cosine.png"]
    import matplotlib.image

    for path in written:
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0  # a drawn figure


def test_qp_schedule_reads_the_study_configs():
    from claims import STUDY, qp_schedule, study_config
    from quality import METHODS, load_config

    schedules = {label: qp_schedule(study_config(m, None)) for m, label in STUDY.items()}
    assert schedules["default"] == (True, 100)  # the study's budget: 150 steps, last third uniform
    shipped = qp_schedule(load_config(METHODS["marble (amortised)"], None, quick=False))
    assert shipped == (True, 80)  # configs/marble.yaml: 120 steps, last third uniform
    assert schedules["reference"] == (True, None)
    assert schedules["full per-step"][0] is True
    assert schedules["equal alpha"] == (False, 0)
    assert schedules["weighted sum"][0] is False and schedules["decoupled"][0] is False


def test_stored_study_runs_match_the_configs_the_study_would_run():
    """Every stored run of the claims study was made with the config ``claims.py`` builds today
    (same hash), so rerunning the study reuses them instead of silently mixing budgets."""
    import json

    from claims import STUDY, config_hash, study_config

    stored = json.loads((REPO / "benchmarks" / "results" / "claims" / "summaries.json").read_text())
    assert set(stored) == set(STUDY.values())
    for method, label in STUDY.items():
        config = study_config(method, 5)
        config["model"]["rollout_precision"] = "float32"
        digest = config_hash(config)
        assert {e["config"] for e in stored[label].values()} == {digest}, label


def test_default_budget_runs_differ_from_the_study_only_in_the_overrides():
    """``default_budget.py`` runs the default as the claims study does, with model overrides; its
    stored runs were made with the config it builds today for their overrides."""
    import json

    from claims import config_hash, study_config
    from default_budget import budget_config, comparison

    stored = json.loads(
        (REPO / "benchmarks" / "results" / "default_budget" / "summaries.json").read_text()
    )
    overrides = next(iter(stored.values()))["overrides"]
    assert overrides == {"sample_steps": 8, "eval_sample_steps": 10, "train_timesteps": 1}
    ours, study = budget_config(overrides), study_config("marble (amortised)", 5)
    study["model"]["rollout_precision"] = "float32"
    changed = set(overrides)
    assert {k: v for k, v in ours["model"].items() if k not in changed} == {
        k: v for k, v in study["model"].items() if k not in changed
    }
    assert {k: v for k, v in ours.items() if k != "model"} == {
        k: v for k, v in study.items() if k != "model"
    }
    assert budget_config({})["model"]["sample_steps"] == study["model"]["sample_steps"] == 10
    assert {e["config"] for e in stored.values()} == {config_hash(ours)}
    # the printed comparison is the paired t-test over the seeds stored in both
    fake = {s: {"summary": {"gain": {"a": g}, "composite": g, "worst": g}} for s, g in
            (("0", 0.3), ("1", 0.1), ("2", 0.2))}  # fmt: skip
    base = {s: {"summary": {"gain": {"a": 0.0}, "composite": 0.0, "worst": 0.0}} for s in "012"}
    lines = comparison(fake, base, [0, 1, 2, 7])
    assert lines[0] == "seeds 0, 1, 2"
    assert "+0.200 [-0.048, +0.448]" in lines[1]  # mean 0.2, sd 0.1, t(2) = 4.303: 0.2 +- 0.248


def test_stored_default_runs_are_of_the_shipped_config():
    """The runs behind the README's results table are of ``configs/marble.yaml`` as it ships
    (float32 rollouts, diagnostics every 5 steps): the study's budget plus their overrides."""
    import json

    from claims import config_hash
    from default_budget import budget_config
    from quality import METHODS, load_config

    stored = json.loads(
        (REPO / "benchmarks" / "results" / "default_budget_120" / "summaries.json").read_text()
    )
    shipped = load_config(METHODS["marble (amortised)"], 5, quick=False)
    shipped["model"]["rollout_precision"] = "float32"
    for entry in stored.values():
        assert budget_config(entry["overrides"]) == shipped
        assert entry["config"] == config_hash(shipped)


def test_default_budget_overrides_reach_trainer_and_callbacks():
    from default_budget import budget_config

    config = budget_config(
        {"trainer.max_steps": 7, "HarmonizationCallback.uniform_after": 3, "lr": 1e-4}
    )
    assert config["trainer"]["max_steps"] == 7 and config["model"]["lr"] == 1e-4
    (harmonization,) = [
        c
        for c in config["trainer"]["callbacks"]
        if c["class_path"].endswith("HarmonizationCallback")
    ]
    assert harmonization["init_args"]["uniform_after"] == 3
    with pytest.raises(SystemExit, match="NoSuchCallback.every"):
        budget_config({"NoSuchCallback.every": 1})


def test_readme_results_table_is_the_stored_default_runs():
    """The README's results table: mean gain and 95% t-interval of the stored runs of the shipped
    config, recomputed here from the per-seed gains."""
    import json
    import re

    from _stats import mean_interval

    stored = json.loads(
        (REPO / "benchmarks" / "results" / "default_budget_120" / "summaries.json").read_text()
    )
    readme = (REPO / "README.md").read_text().split("## Results", 1)[1].split("\n## ", 1)[0]
    assert f"The default, {['no', 'one', 'two', 'three', 'four', 'five'][len(stored)]} seeds" in (
        readme
    )
    rows = dict(re.findall(r"^\| (\w+) \| [-\d.]+ \| ([^|]+) \|$", readme, flags=re.M))
    names = ["composition", "ocr", "quality", "jpeg", "clip"]
    assert sorted(rows) == sorted(names)
    for name in names:
        interval = mean_interval([entry["summary"]["gain"][name] for entry in stored.values()])
        expected = f"{interval.mean:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"
        assert rows[name].strip() == expected, name
