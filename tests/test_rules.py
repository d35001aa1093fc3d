"""marble_lightning/rules.py: make_rule and the training rules, against independent computations."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_lightning.rules import (
    DEFAULT_REFRESH_EVERY,
    MODES,
    FixedAlphaRule,
    MarbleRule,
    SequentialRule,
    SingleRewardRule,
    TrainingRule,
    WeightedSumRule,
    make_rule,
)

NAMES = ("red", "green", "dark")
SETTINGS = settings(max_examples=60, deadline=None)

# one valid option per mode (the option that belongs to it)
OWN_OPTION = {
    "marble": {},
    "amortized": {"refresh_every": 3},
    "weighted_sum": {"reward_weights": [1.0, 2.0, 0.5]},
    "fixed": {"fixed_alpha": [0.2, 0.0, 0.8]},
    "single": {"single_reward": "green"},
    "sequential": {"stages": [("red", 2), ("dark", 3)]},
}
OPTION_MODE = {
    "refresh_every": "amortized",
    "reward_weights": "weighted_sum",
    "fixed_alpha": "fixed",
    "single_reward": "single",
    "stages": "sequential",
}
CLASSES = {
    "marble": MarbleRule,
    "amortized": MarbleRule,
    "weighted_sum": WeightedSumRule,
    "fixed": FixedAlphaRule,
    "single": SingleRewardRule,
    "sequential": SequentialRule,
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_builds_its_class(mode):
    rule = make_rule(mode, list(NAMES), **OWN_OPTION[mode])
    assert type(rule) is CLASSES[mode]
    assert rule.names == NAMES and rule.k == 3
    assert rule.harmonizes is (mode in ("marble", "amortized"))
    assert rule.scalarised is (mode == "weighted_sum")


def test_modes_cover_the_classes():
    assert set(MODES) == set(CLASSES)


def test_marble_and_amortized_options():
    full = make_rule("marble", NAMES)
    assert full.every_step and full.refresh_every is None
    amortized = make_rule("amortized", NAMES)
    assert not amortized.every_step and amortized.refresh_every is None
    assert make_rule("amortized", NAMES, refresh_every=7).refresh_every == 7
    assert DEFAULT_REFRESH_EVERY >= 1
    with pytest.raises(ValueError, match="`refresh_every` should be an integer >= 1, got 0"):
        make_rule("amortized", NAMES, refresh_every=0)
    with pytest.raises(RuntimeError, match="Coefficients"):
        full.loss_weights(0)
    # the base rule's alpha is uniform
    torch.testing.assert_close(full.alpha(3), torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "mode, option",
    [(m, o) for m, o in itertools.product(MODES, OPTION_MODE) if OPTION_MODE[o] != m],
)
def test_options_of_other_modes_raise_naming_option_and_mode(mode, option):
    kwargs = dict(OWN_OPTION[mode])
    kwargs.update(OWN_OPTION[OPTION_MODE[option]])
    with pytest.raises(ValueError) as info:
        make_rule(mode, NAMES, **kwargs)
    message = str(info.value)
    assert f"`{option}`" in message
    assert f"not to mode {mode!r}" in message
    assert repr(OPTION_MODE[option]) in message


def test_unknown_mode():
    with pytest.raises(ValueError, match="'pcgrad'"):
        make_rule("pcgrad", NAMES)


weights_strategy = st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=1, max_size=6).filter(
    lambda w: sum(w) > 1e-6
)


@given(weights=weights_strategy, step=st.integers(0, 1000))
@SETTINGS
def test_weighted_sum_alpha_is_normalised_weights(weights, step):
    names = [f"r{i}" for i in range(len(weights))]
    rule = make_rule("weighted_sum", names, reward_weights=weights)
    alpha = rule.alpha(step)
    expected = [w / sum(weights) for w in weights]
    assert alpha.dtype == torch.float64
    assert alpha.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-12) and bool((alpha >= 0).all())
    assert rule.loss_weights(step) is None


@given(weights=weights_strategy, step=st.integers(0, 1000))
@SETTINGS
def test_fixed_alpha_sums_to_one_and_loss_weights_are_unnormalised(weights, step):
    names = [f"r{i}" for i in range(len(weights))]
    rule = make_rule("fixed", names, fixed_alpha=weights)
    alpha = rule.alpha(step)
    assert alpha.tolist() == pytest.approx(
        [w / sum(weights) for w in weights], rel=1e-12, abs=1e-15
    )
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-12) and bool((alpha >= 0).all())
    lw = rule.loss_weights(step)
    assert lw.dtype == torch.float64 and lw.tolist() == [float(w) for w in weights]


def test_defaults_of_weighted_sum_and_fixed_are_uniform():
    torch.testing.assert_close(
        make_rule("weighted_sum", NAMES).alpha(0), torch.full((3,), 1 / 3, dtype=torch.float64)
    )
    fixed = make_rule("fixed", NAMES)
    torch.testing.assert_close(fixed.alpha(0), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(fixed.loss_weights(0), torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "mode, option", [("weighted_sum", "reward_weights"), ("fixed", "fixed_alpha")]
)
@pytest.mark.parametrize(
    "bad", [[1.0, 2.0], [1.0, -1.0, 2.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]]
)
def test_bad_weights_name_the_option(mode, option, bad):
    with pytest.raises(ValueError, match=f"`{option}`"):
        make_rule(mode, NAMES, **{option: bad})


@pytest.mark.parametrize("name, index", [("red", 0), ("green", 1), ("dark", 2)])
def test_single_reward_is_one_hot(name, index):
    rule = make_rule("single", NAMES, single_reward=name)
    assert rule.index == index
    expected = [1.0 if i == index else 0.0 for i in range(3)]
    for step in (0, 5, 10_000):
        assert rule.alpha(step).tolist() == expected
        assert rule.loss_weights(step).tolist() == expected
    # loss_weights is a copy: mutating it does not change alpha
    rule.loss_weights(0).zero_()
    assert rule.alpha(0).tolist() == expected


def test_single_needs_a_known_reward():
    with pytest.raises(ValueError, match="needs `single_reward`"):
        make_rule("single", NAMES)
    with pytest.raises(
        ValueError, match=r"`single_reward` names unknown reward 'blue'.*\['red', 'green', 'dark'\]"
    ):
        make_rule("single", NAMES, single_reward="blue")


def _active_reference(stages: list[tuple[int, int]], step: int) -> int:
    """Independent: the stage whose cumulative window [start, end) contains ``step``."""
    ends = list(itertools.accumulate(n for _, n in stages))
    for (index, _), end in zip(stages, ends):
        if step < end:
            return index
    return stages[-1][0]


@given(
    stages=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 20)), min_size=1, max_size=5),
    steps=st.lists(st.integers(0, 150), min_size=1, max_size=20),
)
@SETTINGS
def test_sequential_active_matches_cumulative_sum(stages, steps):
    rule = make_rule("sequential", NAMES, stages=[(NAMES[i], n) for i, n in stages])
    assert rule.stages == tuple(stages)
    for step in steps:
        active = _active_reference(stages, step)
        assert rule.active(step) == active
        expected = [1.0 if i == active else 0.0 for i in range(3)]
        assert rule.alpha(step).tolist() == expected
        assert rule.loss_weights(step).tolist() == expected


def test_sequential_boundaries_by_hand():
    rule = make_rule(
        "sequential", NAMES, stages=[("red", 2), ("dark", 3), {"reward": "green", "steps": 1}]
    )
    assert [rule.active(s) for s in range(9)] == [0, 0, 2, 2, 2, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "stages, match",
    [
        (None, "needs `stages`"),
        ([], "needs `stages`"),
        ([("blue", 2)], r"`stages` names unknown reward 'blue'"),
        ([{"reward": "blue", "steps": 2}], r"`stages` names unknown reward 'blue'"),
        ([("red", 0)], r"`steps of stage 'red'` should be an integer >= 1, got 0"),
        ([("red", 1.5)], r"`steps of stage 'red'` should be an integer >= 1"),
        ([("red", 2, 3)], r"a stage should be \(reward name, steps\)"),
        (["red"], r"a stage should be \(reward name, steps\)"),
    ],
)
def test_sequential_bad_stages(stages, match):
    with pytest.raises(ValueError, match=match):
        make_rule("sequential", NAMES, stages=stages)


@given(
    mode=st.sampled_from(MODES),
    k=st.integers(1, 5),
    data=st.data(),
)
@SETTINGS
def test_alpha_of_every_rule_is_on_the_simplex(mode, k, data):
    names = [f"r{i}" for i in range(k)]
    weights = data.draw(
        st.lists(st.floats(0.0, 10.0), min_size=k, max_size=k).filter(lambda w: sum(w) > 1e-3)
    )
    options = {
        "marble": {},
        "amortized": {},
        "weighted_sum": {"reward_weights": weights},
        "fixed": {"fixed_alpha": weights},
        "single": {"single_reward": names[data.draw(st.integers(0, k - 1))]},
        "sequential": {
            "stages": [(names[data.draw(st.integers(0, k - 1))], data.draw(st.integers(1, 4)))]
        },
    }[mode]
    rule = make_rule(mode, names, **options)
    for step in data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=5)):
        alpha = rule.alpha(step)
        assert alpha.shape == (k,) and alpha.dtype == torch.float64
        assert bool((alpha >= 0).all())
        assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-12)


def test_rules_are_frozen_and_base_flags():
    rule = make_rule("fixed", NAMES)
    with pytest.raises(AttributeError):
        rule.fixed = (1.0, 1.0, 1.0)  # type: ignore[misc]
    assert not TrainingRule.scalarised and not TrainingRule.harmonizes
    assert MarbleRule.harmonizes and WeightedSumRule.scalarised
    for cls in (FixedAlphaRule, SingleRewardRule, SequentialRule):
        assert not cls.harmonizes and not cls.scalarised
