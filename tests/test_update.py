"""marble_lightning/update.py: plan_losses, step_metrics and apply_direction, checked by hand."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_lightning.adapters import LoraAdapterPair
from marble_lightning.coefficients import Coefficients
from marble_lightning.harmonize import harmonize_gram
from marble_lightning.nft import NFTTerms, nft_objective
from marble_lightning.rollout import Rollout
from marble_lightning.rules import make_rule
from marble_lightning.testing import TinySD3Backbone
from marble_lightning.update import UpdateResult, apply_direction, plan_losses, step_metrics

torch.set_num_threads(1)

NAMES = ["red", "green", "dark"]
K, B, A_MAX = 3, 6, 2.0


def make_rollout(seed: int = 0, scalar: bool = False) -> Rollout:
    gen = torch.Generator().manual_seed(seed)
    adv = torch.randn(B, K, generator=gen) * 2.0
    adv[0, 1] = 5.0  # beyond the clip
    r = (0.5 + adv.clamp(-A_MAX, A_MAX) / (2 * A_MAX)).T.contiguous()
    scalar_adv = torch.randn(B, generator=gen) if scalar else None
    scalar_r = (0.5 + scalar_adv.clamp(-A_MAX, A_MAX) / (2 * A_MAX)) if scalar else None
    return Rollout(
        step=4,
        prompts=[f"p{i // 2}" for i in range(B)],
        x0=torch.zeros(B, 3, 2, 2),
        values=torch.zeros(B, K),
        mask=torch.ones(B, K, dtype=torch.bool),
        advantages=adv,
        r=r,
        scalar_advantages=scalar_adv,
        scalar_r=scalar_r,
    )


def refreshed_coefficients(seed: int = 0, zero: tuple[int, ...] = ()) -> Coefficients:
    gen = torch.Generator().manual_seed(seed)
    g = (
        torch.randn(K, 5, generator=gen, dtype=torch.float64)
        * torch.tensor([1.0, 4.0, 0.3])[:, None]
    )
    for i in zero:
        g[i] = 0
    gram = g @ g.T
    c = Coefficients(
        torch.full((K,), 1 / K, dtype=torch.float64), refresh_every=3, every_step=False
    )
    c.record_refresh(harmonize_gram(gram), gram)
    return c


def hand_amortized_weights(c: Coefficients) -> torch.Tensor:
    norms = torch.sqrt(torch.diagonal(c.gram))
    kept = [i for i in range(K) if norms[i] > 1e-6 * norms.max()]
    m = sum(float(norms[i]) for i in kept) / len(kept)
    return torch.tensor(
        [m * float(c.alpha[i]) / float(norms[i]) if i in kept else 0.0 for i in range(K)],
        dtype=torch.float64,
    )


def hand_row(r: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, float]:
    total = float(w.sum())
    row = torch.zeros(B, dtype=torch.float64)
    for k in range(K):
        row += float(w[k]) / total * r[k].double()
    return row, total


def plan(rule, c, rollout, *, refresh=False, diagnostics=False, aggregate="coefficients", step=0):
    return plan_losses(
        rollout,
        rule,
        c,
        step=step,
        refresh=refresh,
        diagnostics=diagnostics,
        aggregate=aggregate,
        a_max=A_MAX,
    )


# --------------------------------------------------------------------------- plan_losses
@pytest.mark.parametrize("mode", ["marble", "amortized"])
def test_refresh_plan_is_the_per_reward_rows(mode):
    rollout = make_rollout()
    c = Coefficients(
        torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64),
        refresh_every=2,
        every_step=mode == "marble",
    )
    p = plan(make_rule(mode, NAMES), c, rollout, refresh=True, diagnostics=True)
    assert torch.equal(p.rows, rollout.r)
    assert p.scales.tolist() == [1.0] * K and p.scales.dtype == rollout.r.dtype
    assert p.alpha.tolist() == [0.2, 0.3, 0.5]
    assert p.weights is None


def test_amortized_plan_is_the_aggregated_row_of_the_cached_weights():
    rollout = make_rollout(1)
    c = refreshed_coefficients(1)
    p = plan(make_rule("amortized", NAMES), c, rollout)
    w = hand_amortized_weights(c)
    row, total = hand_row(rollout.r, w)
    assert p.rows.shape == (1, B) and p.scales.shape == (1,)
    torch.testing.assert_close(p.rows[0].double(), row, rtol=1e-6, atol=1e-7)
    assert float(p.scales[0]) == pytest.approx(total, rel=1e-6)
    torch.testing.assert_close(p.weights, w, rtol=1e-10, atol=0)
    torch.testing.assert_close(p.alpha, c.alpha, rtol=0, atol=0)


def test_fixed_plan_uses_unnormalised_weights():
    rollout = make_rollout(2)
    fixed = [0.5, 1.5, 2.0]
    p = plan(make_rule("fixed", NAMES, fixed_alpha=fixed), None, rollout)
    row, total = hand_row(rollout.r, torch.tensor(fixed, dtype=torch.float64))
    torch.testing.assert_close(p.rows[0].double(), row, rtol=1e-6, atol=1e-7)
    assert float(p.scales[0]) == pytest.approx(total) == pytest.approx(4.0)
    assert p.weights.tolist() == fixed
    assert p.alpha.tolist() == pytest.approx([0.125, 0.375, 0.5])


@pytest.mark.parametrize("mode, options, step, index", [
    ("single", {"single_reward": "dark"}, 0, 2),
    ("sequential", {"stages": [("green", 2), ("red", 1)]}, 1, 1),
    ("sequential", {"stages": [("green", 2), ("red", 1)]}, 2, 0),
])  # fmt: skip
def test_one_hot_plans_train_one_reward_row(mode, options, step, index):
    rollout = make_rollout(3)
    p = plan(make_rule(mode, NAMES, **options), None, rollout, step=step)
    torch.testing.assert_close(p.rows[0], rollout.r[index], rtol=0, atol=1e-7)
    assert float(p.scales[0]) == 1.0
    assert p.alpha.tolist() == [1.0 if i == index else 0.0 for i in range(K)]


def test_weighted_sum_plan_is_the_scalar_row():
    rollout = make_rollout(4, scalar=True)
    rule = make_rule("weighted_sum", NAMES, reward_weights=[1.0, 2.0, 1.0])
    p = plan(rule, None, rollout)
    assert torch.equal(p.rows[0], rollout.scalar_r)
    assert p.scales.tolist() == [1.0] and p.weights is None
    assert p.alpha.tolist() == [0.25, 0.5, 0.25]
    d = plan(rule, None, rollout, diagnostics=True)
    assert torch.equal(d.rows, torch.cat([rollout.scalar_r[None], rollout.r]))
    assert d.scales.tolist() == [1.0] * (K + 1)


def test_advantage_aggregate_is_the_papers_form():
    rollout = make_rollout(5)
    fixed = [1.0, 3.0, 0.0]
    p = plan(make_rule("fixed", NAMES, fixed_alpha=fixed), None, rollout, aggregate="advantage")
    a_bar = [
        sum(float(rollout.advantages[i, k]) * fixed[k] / 4.0 for k in range(K)) for i in range(B)
    ]
    expected = [min(1.0, max(0.0, 0.5 + max(-A_MAX, min(A_MAX, a)) / (2 * A_MAX))) for a in a_bar]
    assert p.rows[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert float(p.scales[0]) == pytest.approx(4.0)
    # it differs from the exact coefficient aggregate where an advantage is clipped
    exact = plan(make_rule("fixed", NAMES, fixed_alpha=fixed), None, rollout)
    assert not torch.allclose(p.rows, exact.rows, atol=1e-4)


def test_all_dropped_marble_gives_a_zero_weight_row():
    rollout = make_rollout(6)
    c = refreshed_coefficients(6, zero=(0, 1, 2))
    assert bool(c.dropped.all())
    p = plan(make_rule("amortized", NAMES), c, rollout, diagnostics=True)
    assert p.rows[0].tolist() == [0.5] * B
    assert p.scales.tolist() == [0.0] + [1.0] * K
    assert float(p.weights.sum()) == 0.0
    torch.testing.assert_close(p.rows[1:], rollout.r, rtol=0, atol=0)


def test_diagnostics_rows_follow_the_aggregated_row():
    rollout = make_rollout(7)
    rule = make_rule("fixed", NAMES, fixed_alpha=[1.0, 1.0, 2.0])
    plain = plan(rule, None, rollout)
    diag = plan(rule, None, rollout, diagnostics=True)
    assert diag.rows.shape == (1 + K, B)
    assert torch.equal(diag.rows[0], plain.rows[0])
    assert torch.equal(diag.rows[1:], rollout.r)
    assert diag.scales.tolist() == [4.0] + [1.0] * K


def test_amortized_plan_before_a_refresh_raises():
    with pytest.raises(RuntimeError, match="refresh first"):
        plan(
            make_rule("amortized", NAMES),
            Coefficients(torch.full((K,), 1 / K), 2, False),
            make_rollout(),
        )


@given(
    fixed=st.lists(st.floats(0.0, 5.0), min_size=K, max_size=K).filter(lambda w: sum(w) > 1e-3),
    seed=st.integers(0, 1000),
)
@settings(max_examples=30, deadline=None)
def test_scaled_aggregated_loss_equals_the_weighted_per_reward_losses(fixed, seed):
    """sum_j scales_j l(rows_j) == sum_k w_k l(r_k) on any NFT terms (the loss is affine in r)."""
    rollout = make_rollout(seed)
    p = plan(make_rule("fixed", NAMES, fixed_alpha=fixed), None, rollout)
    gen = torch.Generator().manual_seed(seed)
    terms = NFTTerms(
        torch.rand(B, generator=gen, dtype=torch.float64),
        torch.rand(B, generator=gen, dtype=torch.float64),
    )
    got = float((nft_objective(terms, p.rows.double(), 0.8, A_MAX) * p.scales.double()).sum())
    expected = 0.0
    for k in range(K):
        per_sample = [
            float(rollout.r[k, i]) * float(terms.positive[i])
            + (1 - float(rollout.r[k, i])) * float(terms.negative[i])
            for i in range(B)
        ]
        expected += fixed[k] * A_MAX / 0.8 * sum(per_sample) / B
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- step_metrics
def test_step_metrics_on_a_refresh():
    c = refreshed_coefficients(8)
    alpha = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    m = step_metrics(NAMES, alpha, c, refreshed=True, eta=0.25)
    gram_keys = {f"gram/{NAMES[i]}_{NAMES[j]}" for i in range(K) for j in range(i, K)}
    expected_keys = (
        {f"alpha/{n}" for n in NAMES}
        | {f"norm/{n}" for n in NAMES}
        | {f"alpha_star/{n}" for n in NAMES}
        | gram_keys
        | {"refresh", "old_policy/eta"}
    )
    assert set(m) == expected_keys and len(gram_keys) == 6
    assert [m[f"alpha/{n}"] for n in NAMES] == pytest.approx([0.1, 0.6, 0.3])
    norms = torch.sqrt(torch.diagonal(c.gram))
    assert [m[f"norm/{n}"] for n in NAMES] == pytest.approx(norms.tolist())
    assert [m[f"alpha_star/{n}"] for n in NAMES] == pytest.approx(c.last.alpha.tolist())
    assert m["gram/red_dark"] == pytest.approx(float(c.gram[0, 2]))
    assert m["gram/green_green"] == pytest.approx(float(norms[1]) ** 2)
    assert m["refresh"] == 1.0 and m["old_policy/eta"] == 0.25
    assert all(isinstance(v, float) for v in m.values())


def test_step_metrics_without_a_refresh():
    c = refreshed_coefficients(9)
    m = step_metrics(NAMES, c.alpha, c, refreshed=False, eta=0.0)
    assert set(m) == {f"alpha/{n}" for n in NAMES} | {"refresh", "old_policy/eta"}
    assert m["refresh"] == 0.0
    # "refreshed" before any refresh was recorded: no norms to report
    fresh = Coefficients(torch.full((K,), 1 / K, dtype=torch.float64), 2, False)
    assert set(step_metrics(NAMES, fresh.alpha, fresh, refreshed=True, eta=0.5)) == {
        f"alpha/{n}" for n in NAMES
    } | {"refresh", "old_policy/eta"}


# --------------------------------------------------------------------------- apply_direction
class CountingScheduler:
    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1


@pytest.fixture()
def adapters():
    backbone = TinySD3Backbone()
    pair = LoraAdapterPair(backbone.denoiser, 2, 4.0, TinySD3Backbone.lora_target_modules, 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pair.policy_params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return pair


def result_for(pair, *, seed=0, skipped=False, scale=1.0):
    n = sum(p.numel() for p in pair.policy_params)
    gen = torch.Generator().manual_seed(seed)
    return UpdateResult(
        direction=torch.randn(n, generator=gen) * scale,
        kl_grad=torch.randn(n, generator=gen) * 0.1 * scale,
        alpha=torch.full((K,), 1 / K, dtype=torch.float64),
        weights=None,
        refreshed=False,
        skipped=skipped,
    )


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


@pytest.mark.parametrize("clip", [None, 1e6])
def test_apply_direction_is_one_sgd_step_on_direction_plus_kl(adapters, clip):
    result = result_for(adapters)
    before = flat(adapters.policy_params)
    old_before = flat(adapters.old_params)
    opt = torch.optim.SGD(adapters.policy_params, lr=0.5)
    sched = CountingScheduler()
    out = apply_direction(result, adapters, opt, sched, clip, step=3)
    full = result.direction + result.kl_grad
    torch.testing.assert_close(
        flat(adapters.policy_params), before - 0.5 * full, rtol=1e-6, atol=1e-7
    )
    assert torch.equal(flat(adapters.old_params), old_before)
    assert out["skipped"] == 0.0
    assert out["grad/norm"] == pytest.approx(float(full.norm()), rel=1e-5)
    assert sched.steps == 1
    assert not adapters.old_is_policy
    assert all(p.grad is None for p in adapters.policy_params)  # zero_grad(set_to_none=True)


def test_apply_direction_clips_the_gradient(adapters):
    result = result_for(adapters, scale=10.0)
    full = result.direction + result.kl_grad
    norm = float(full.norm())
    clip = 0.1 * norm
    before = flat(adapters.policy_params)
    opt = torch.optim.SGD(adapters.policy_params, lr=1.0)
    out = apply_direction(result, adapters, opt, None, clip, step=0)
    step = before - flat(adapters.policy_params)
    assert out["grad/norm"] == pytest.approx(norm, rel=1e-5)  # reported before clipping
    assert float(step.norm()) == pytest.approx(clip, rel=1e-4)
    torch.testing.assert_close(step, full * (clip / norm), rtol=1e-4, atol=1e-6)


def test_apply_direction_skipped_step_warns_and_leaves_everything(adapters):
    result = result_for(adapters, skipped=True)
    before = flat(adapters.policy_params)
    opt = torch.optim.SGD(adapters.policy_params, lr=0.5)
    sched = CountingScheduler()
    with pytest.warns(RuntimeWarning, match="step 7: every reward gradient is ~0"):
        out = apply_direction(result, adapters, opt, sched, 1.0, step=7)
    assert out == {"skipped": 1.0}
    assert torch.equal(flat(adapters.policy_params), before)
    assert sched.steps == 0 and adapters.old_is_policy
    assert all(p.grad is None for p in adapters.policy_params)


@pytest.mark.parametrize("where, value", [("direction", float("nan")), ("kl_grad", float("inf"))])
def test_apply_direction_non_finite_raises_and_leaves_params(adapters, where, value):
    result = result_for(adapters)
    getattr(result, where)[5] = value
    before = flat(adapters.policy_params)
    opt = torch.optim.SGD(adapters.policy_params, lr=0.5)
    sched = CountingScheduler()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FloatingPointError, match="non-finite update direction at step 2"):
            apply_direction(result, adapters, opt, sched, None, step=2)
    assert torch.equal(flat(adapters.policy_params), before)
    assert sched.steps == 0 and adapters.old_is_policy
    assert all(p.grad is None for p in adapters.policy_params)


def test_apply_direction_steps_a_real_scheduler_once(adapters):
    opt = torch.optim.SGD(adapters.policy_params, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for i in range(2):
        apply_direction(result_for(adapters, seed=i), adapters, opt, sched, None, step=i)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
