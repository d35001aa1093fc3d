"""Property tests of marble_lightning.checks: what passes comes back converted, what fails names
the argument and the value in the one message format."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from marble_lightning.checks import check_choice, check_float, check_int, check_weights

NAMES = st.from_regex(r"[a-z_][a-z0-9_.]{0,12}", fullmatch=True)
FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
NOT_NUMBERS = st.one_of(
    st.none(), st.booleans(), st.text(max_size=3), st.lists(st.integers(), max_size=2)
)


def _raises_named(name: str, value: object):
    """``pytest.raises`` for the shared format: "`name` should be ..., got repr(value)"."""
    return pytest.raises(
        ValueError, match=rf"^`{re.escape(name)}` should be .*, got {re.escape(repr(value))}$"
    )


# --------------------------------------------------------------------------------- check_int
@settings(max_examples=100, deadline=None)
@given(NAMES, st.integers(-1000, 1000), st.integers(-1000, 1000))
def test_check_int_accepts_exactly_the_integers_at_or_above_the_minimum(name, value, minimum):
    if value >= minimum:
        out = check_int(name, value, minimum)
        assert out == value and type(out) is int
    else:
        with _raises_named(name, value) as info:
            check_int(name, value, minimum)
        assert f">= {minimum}" in str(info.value)


@settings(max_examples=50, deadline=None)
@given(NAMES, st.one_of(NOT_NUMBERS, FINITE, NOT_FINITE))
def test_check_int_refuses_bools_floats_and_non_numbers(name, value):
    with _raises_named(name, value):
        check_int(name, value, minimum=-(10**9))


def test_check_int_default_minimum_is_one() -> None:
    assert check_int("n", 1) == 1
    with pytest.raises(ValueError, match=r"^`n` should be an integer >= 1, got 0$"):
        check_int("n", 0)


# ------------------------------------------------------------------------------- check_float
BOUNDS = st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(
    NAMES,
    st.one_of(FINITE, st.integers(-(10**6), 10**6)),
    BOUNDS,
    st.booleans(),
    BOUNDS,
    st.booleans(),
)
def test_check_float_agrees_with_the_bounds(name, value, minimum, strict, maximum, maximum_strict):
    above = minimum is None or (value > minimum if strict else value >= minimum)
    below = maximum is None or (value < maximum if maximum_strict else value <= maximum)
    kwargs = {
        "minimum": minimum,
        "strict": strict,
        "maximum": maximum,
        "maximum_strict": maximum_strict,
    }
    if above and below:
        out = check_float(name, value, **kwargs)
        assert out == value and type(out) is float
    else:
        with _raises_named(name, value) as info:
            check_float(name, value, **kwargs)
        message = str(info.value)
        if minimum is not None:
            assert f"{'>' if strict else '>='} {minimum}" in message
        if maximum is not None:
            assert f"{'<' if maximum_strict else '<='} {maximum}" in message


@settings(max_examples=50, deadline=None)
@given(NAMES, st.one_of(NOT_FINITE, NOT_NUMBERS))
def test_check_float_refuses_non_finite_and_non_numbers(name, value):
    with _raises_named(name, value) as info:
        check_float(name, value)
    assert "a finite number" in str(info.value)


@settings(max_examples=50, deadline=None)
@given(NAMES, st.floats(0.0, 1e6, allow_nan=False))
def test_check_float_strict_lower_bound_refuses_the_bound_itself(name, bound):
    with _raises_named(name, bound):
        check_float(name, bound, minimum=bound, strict=True)
    assert check_float(name, bound, minimum=bound) == bound


# ------------------------------------------------------------------------------ check_choice
@settings(max_examples=100, deadline=None)
@given(
    NAMES, st.lists(st.text(max_size=4), min_size=1, max_size=5, unique=True), st.text(max_size=4)
)
def test_check_choice_returns_members_and_lists_the_options(name, choices, value):
    if value in choices:
        assert check_choice(name, value, iter(choices)) is value
    else:
        with _raises_named(name, value) as info:
            check_choice(name, value, iter(choices))  # any iterable, consumed once
        assert str(tuple(choices)) in str(info.value)


# ----------------------------------------------------------------------------- check_weights
@settings(max_examples=100, deadline=None)
@given(NAMES, st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=6))
def test_check_weights_accepts_non_negative_with_positive_sum(name, weights):
    k = len(weights)
    names = [f"r{i}" for i in range(k)]
    if sum(weights) > 0:
        out = check_weights(name, weights, k, names)
        assert out == weights and all(type(w) is float for w in out)
    else:
        with pytest.raises(ValueError, match=rf"^`{re.escape(name)}` should be finite"):
            check_weights(name, weights, k, names)


@settings(max_examples=50, deadline=None)
@given(
    NAMES,
    st.lists(st.floats(0.0, 10.0), min_size=1, max_size=5),
    st.one_of(NOT_FINITE, st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)),
    st.data(),
)
def test_check_weights_refuses_a_negative_or_non_finite_entry(name, weights, bad, data):
    weights = list(weights)
    weights.insert(data.draw(st.integers(0, len(weights))), bad)
    with pytest.raises(ValueError, match=rf"^`{re.escape(name)}` should be finite, non-negative"):
        check_weights(name, weights, len(weights), [f"r{i}" for i in range(len(weights))])


@settings(max_examples=50, deadline=None)
@given(NAMES, st.lists(st.floats(0.1, 10.0), min_size=1, max_size=5), st.integers(1, 6))
def test_check_weights_needs_one_entry_per_reward(name, weights, k):
    assume(k != len(weights))
    names = [f"r{i}" for i in range(k)]
    with pytest.raises(
        ValueError, match=rf"^`{re.escape(name)}` should have one entry per reward \(K = {k}"
    ):
        check_weights(name, weights, k, names)
