"""marble_lightning/coefficients.py: the refresh schedule and the cached MARBLE coefficients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_lightning.coefficients import Coefficients
from marble_lightning.harmonize import harmonize_gram, weights_from_alpha

torch.set_num_threads(1)


def uniform(k: int) -> torch.Tensor:
    return torch.full((k,), 1.0 / k, dtype=torch.float64)


def refreshed(seed: int = 0, k: int = 3, zero: tuple[int, ...] = ()):
    """A real harmonisation of random gradients (rows in ``zero`` are zero, hence dropped)."""
    gen = torch.Generator().manual_seed(seed)
    g = (
        torch.randn(k, 6, generator=gen, dtype=torch.float64)
        * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.5][:k])[:, None]
    )
    for i in zero:
        g[i] = 0.0
    gram = g @ g.T
    return harmonize_gram(gram), gram


def hand_weights(alpha: torch.Tensor, norms: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """``w_k = m alpha_k / n_k`` with ``m`` the mean norm of the kept rewards, by hand."""
    kept = [i for i in range(len(alpha)) if not bool(dropped[i])]
    m = sum(float(norms[i]) for i in kept) / len(kept)
    return torch.tensor(
        [
            0.0 if bool(dropped[i]) else m * float(alpha[i]) / float(norms[i])
            for i in range(len(alpha))
        ],
        dtype=torch.float64,
    )


# --------------------------------------------------------------------------- refresh_due
def test_every_step_always_refreshes():
    c = Coefficients(uniform(3), refresh_every=4, every_step=True)
    c.schedule(refresh=False, uniform=False)
    for update in range(3):
        assert c.refresh_due(update)
    c.record_refresh(*refreshed())
    c.end_step(True)
    c.schedule(refresh=False, uniform=False)
    assert c.refresh_due(0) and c.refresh_due(2)


def test_first_step_refreshes_even_against_a_callback():
    c = Coefficients(uniform(3), refresh_every=4, every_step=False)
    assert c.refresh_due(0)
    c.schedule(refresh=False, uniform=False)
    assert c.refresh_due(0)  # no cached norms: an amortised step is impossible
    assert not c.refresh_due(1)  # later updates of a step never refresh


@pytest.mark.parametrize("period", [1, 2, 3, 5])
def test_built_in_period(period):
    c = Coefficients(uniform(3), refresh_every=period, every_step=False)
    schedule = []
    for step in range(16):
        due = c.refresh_due(0)
        schedule.append(due)
        assert not c.refresh_due(1)
        if due:
            c.record_refresh(*refreshed(step))
        c.end_step(due)
    assert schedule == [step % period == 0 for step in range(16)]


def test_callback_request_applies_to_one_step_only():
    c = Coefficients(uniform(3), refresh_every=3, every_step=False)
    c.record_refresh(*refreshed())
    c.end_step(True)  # steps_since_refresh = 1
    assert not c.refresh_due(0)
    c.schedule(refresh=True, uniform=False)
    assert c.refresh_due(0)
    assert not c.refresh_due(1)
    c.end_step(False)  # the request is forgotten: back to the period
    assert c.steps_since_refresh == 2
    assert not c.refresh_due(0)
    c.end_step(False)
    assert c.refresh_due(0)  # 3 steps since the refresh
    c.schedule(refresh=False, uniform=False)
    assert not c.refresh_due(0)  # a callback can also hold a due refresh back, for one step
    c.end_step(False)
    assert c.refresh_due(0)
    c.schedule(refresh=None, uniform=False)  # None: the built-in period
    assert c.refresh_due(0)


def test_set_refresh_every_records_the_owner_and_checks():
    c = Coefficients(uniform(2), refresh_every=5, every_step=False)
    assert c.scheduled_by is None
    c.set_refresh_every(2, "HarmonizationCallback")
    assert c.refresh_every == 2 and c.scheduled_by == "HarmonizationCallback"
    with pytest.raises(ValueError, match="`refresh_every` should be an integer >= 1, got 0"):
        c.set_refresh_every(0, "x")
    with pytest.raises(ValueError, match="`refresh_every`"):
        Coefficients(uniform(2), refresh_every=0, every_step=False)


# --------------------------------------------------------------------------- record_refresh
def test_amortized_weights_before_any_refresh_raises():
    c = Coefficients(uniform(3), refresh_every=2, every_step=False)
    with pytest.raises(RuntimeError, match="needs a refresh first"):
        c.amortized_weights()


def test_record_refresh_without_smoother():
    h, gram = refreshed(1)
    c = Coefficients(uniform(3), refresh_every=2, every_step=False)
    c.steps_since_refresh = 7
    alpha, weights = c.record_refresh(h, gram)
    torch.testing.assert_close(alpha, h.alpha, rtol=0, atol=0)
    torch.testing.assert_close(weights, h.weights, rtol=0, atol=0)
    torch.testing.assert_close(c.alpha, h.alpha.double(), rtol=0, atol=0)
    torch.testing.assert_close(c.norms, torch.sqrt(torch.diagonal(gram)), rtol=1e-12, atol=0)
    assert torch.equal(c.gram, gram) and c.last is h
    assert c.steps_since_refresh == 0 and not bool(c.dropped.any())
    # the amortised steps that follow reuse alpha and the cached norms
    a2, w2 = c.amortized_weights()
    torch.testing.assert_close(a2, h.alpha.double(), rtol=0, atol=0)
    torch.testing.assert_close(w2, hand_weights(h.alpha, c.norms, c.dropped), rtol=1e-12, atol=0)
    # and reproduce the refresh's own weights (same alpha, same norms)
    torch.testing.assert_close(w2, h.weights.double(), rtol=1e-10, atol=0)


def test_record_refresh_with_smoother():
    h, gram = refreshed(2)
    previous = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    c = Coefficients(previous.clone(), refresh_every=2, every_step=False)
    c.set_smoother(lambda a: 0.75 * previous + 0.25 * a)
    assert c.smoother is not None
    alpha, weights = c.record_refresh(h, gram)
    # the refresh step itself uses alpha* ...
    torch.testing.assert_close(alpha, h.alpha, rtol=0, atol=0)
    torch.testing.assert_close(weights, h.weights, rtol=0, atol=0)
    # ... the following steps the smoothed coefficients
    smoothed = 0.75 * previous + 0.25 * h.alpha.double()
    torch.testing.assert_close(c.alpha, smoothed, rtol=1e-12, atol=0)
    a2, w2 = c.amortized_weights()
    torch.testing.assert_close(a2, smoothed, rtol=1e-12, atol=0)
    torch.testing.assert_close(w2, hand_weights(smoothed, c.norms, c.dropped), rtol=1e-12, atol=0)
    c.set_smoother(None)
    assert c.smoother is None


@pytest.mark.parametrize("zero", [(), (1,)])
def test_record_refresh_in_the_uniform_stage(zero):
    h, gram = refreshed(3, zero=zero)
    assert h.dropped.tolist() == [i in zero for i in range(3)]
    c = Coefficients(uniform(3), refresh_every=2, every_step=False)
    c.set_smoother(lambda a: a * 0.0 + 1.0)  # ignored in the uniform stage
    c.schedule(refresh=True, uniform=True)
    alpha, weights = c.record_refresh(h, gram)
    kept = 3 - len(zero)
    expected_alpha = torch.tensor(
        [0.0 if i in zero else 1.0 / kept for i in range(3)], dtype=torch.float64
    )
    torch.testing.assert_close(alpha, expected_alpha, rtol=0, atol=1e-15)
    torch.testing.assert_close(c.alpha, expected_alpha, rtol=0, atol=1e-15)
    norms = torch.sqrt(torch.diagonal(gram))
    expected_weights = hand_weights(expected_alpha, norms, h.dropped)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        weights, weights_from_alpha(expected_alpha, h.norms, h.dropped), rtol=0, atol=0
    )
    a2, w2 = c.amortized_weights()
    torch.testing.assert_close(a2, expected_alpha, rtol=0, atol=1e-15)
    torch.testing.assert_close(w2, expected_weights, rtol=1e-12, atol=0)
    # leaving the uniform stage: the amortised steps use the cached (uniform) alpha
    c.schedule(refresh=None, uniform=False)
    torch.testing.assert_close(c.in_use(), expected_alpha, rtol=0, atol=1e-15)


def test_uniform_stage_switched_on_after_a_refresh():
    h, gram = refreshed(4, zero=(0,))
    c = Coefficients(uniform(3), refresh_every=2, every_step=False)
    c.record_refresh(h, gram)
    torch.testing.assert_close(c.in_use(), h.alpha.double(), rtol=0, atol=0)
    c.schedule(refresh=None, uniform=True)
    expected = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    alpha, weights = c.amortized_weights()
    torch.testing.assert_close(alpha, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        weights, hand_weights(expected, c.norms, c.dropped), rtol=1e-12, atol=0
    )
    assert float(weights[0]) == 0.0


def test_end_step_counts():
    c = Coefficients(uniform(2), refresh_every=9, every_step=False)
    c.end_step(False)
    c.end_step(False)
    assert c.steps_since_refresh == 2
    c.end_step(True)
    assert c.steps_since_refresh == 1


# --------------------------------------------------------------------------- checkpoints
@given(
    seed=st.integers(0, 1000),
    refreshes=st.integers(0, 3),
    extra_steps=st.integers(0, 4),
    uniform_stage=st.booleans(),
)
@settings(max_examples=25, deadline=None)
def test_state_dict_round_trip_is_exact(seed, refreshes, extra_steps, uniform_stage):
    c = Coefficients(
        torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), refresh_every=2, every_step=False
    )
    c.set_smoother(lambda a: 0.5 * a + 0.5 / 3)
    for i in range(refreshes):
        c.record_refresh(*refreshed(seed + i, zero=(2,) if i == 1 else ()))
        c.end_step(True)
    for _ in range(extra_steps):
        c.end_step(False)
    c.schedule(refresh=None, uniform=uniform_stage)
    state = c.state_dict()

    d = Coefficients(uniform(3), refresh_every=2, every_step=False)
    d.load_state_dict(state)
    for name in ("alpha", "norms", "dropped", "gram"):
        a, b = getattr(c, name), getattr(d, name)
        assert (a is None) == (b is None) == (refreshes == 0 and name != "alpha")
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert d.steps_since_refresh == c.steps_since_refresh
    assert d.uniform == c.uniform == uniform_stage
    again = d.state_dict()
    assert again.keys() == state.keys()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, again[key]), key
        else:
            assert value == again[key], key
    # the restored object schedules and weights exactly like the original
    assert d.refresh_due(0) == c.refresh_due(0)
    if refreshes:
        for x, y in zip(c.amortized_weights(), d.amortized_weights()):
            assert torch.equal(x, y)


def test_state_dict_holds_copies():
    c = Coefficients(uniform(3), refresh_every=2, every_step=False)
    c.record_refresh(*refreshed(5))
    state = c.state_dict()
    state["current_alpha"].zero_()
    state["cached_norms"].zero_()
    assert float(c.alpha.sum()) == pytest.approx(1.0) and float(c.norms.sum()) > 0


def test_load_state_dict_of_an_old_checkpoint_uses_defaults():
    c = Coefficients(uniform(2), refresh_every=2, every_step=False)
    c.load_state_dict({})
    torch.testing.assert_close(c.alpha, uniform(2))
    assert c.norms is None and c.steps_since_refresh == 0 and not c.uniform
    assert c.refresh_due(0)
