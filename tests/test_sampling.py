"""marble_lightning/sampling.py: Euler sampler, keyed noise, time grids, training timesteps.

Every expectation is computed independently of the library (hand-written Euler loops, closed
forms, direct generator draws). The DPM solver (``dpm_solver_2m_sample`` / ``flow_sample``) is
tested elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_lightning.sampling import (
    check_time_grid,
    euler_sample,
    evaluation_noise,
    keyed_noise,
    training_timesteps,
    uniform_time_grid,
)
from marble_lightning.seeding import stable_seed

torch.set_num_threads(1)

SETTINGS = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------- euler_sample
def _linear_field(a: torch.Tensor, b: torch.Tensor):
    """``v(x, t, c) = x A^T + b + t c`` on ``[B, D]`` (the cond enters through ``c``)."""
    calls = []

    def velocity(x, t, cond):
        calls.append(x.shape[0])
        return x @ a.T + b + t[:, None] * cond["c"]

    return velocity, calls


def _hand_euler(x, grid, field):
    """Plain Python Euler loop, one sample at a time, in float64."""
    out = []
    times = [float(v) for v in grid]
    for row in x.double():
        y = row.clone()
        for i in range(len(times) - 1):
            y = y + (times[i + 1] - times[i]) * field(y, times[i])
        out.append(y)
    return torch.stack(out)


def _problem(seed: int = 0, b: int = 3, d: int = 4):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.5
    bias = torch.randn(d, generator=gen, dtype=torch.float64)
    noise = torch.randn(b, d, generator=gen, dtype=torch.float64)
    c = torch.randn(b, d, generator=gen, dtype=torch.float64)
    u = torch.randn(b, d, generator=gen, dtype=torch.float64)
    return a, bias, noise, c, u


@pytest.mark.parametrize(
    "grid",
    [uniform_time_grid(5), torch.tensor([1.0, 0.9, 0.5, 0.45, 0.1, 0.0], dtype=torch.float64)],
)
def test_euler_matches_hand_written_loop(grid):
    a, bias, noise, c, _ = _problem()
    velocity, calls = _linear_field(a, bias)
    out = euler_sample(velocity, noise, {"c": c}, grid)

    rows = [
        _hand_euler(noise[i : i + 1], grid, lambda y, t, i=i: a @ y + bias + t * c[i])[0]
        for i in range(noise.shape[0])
    ]
    torch.testing.assert_close(out, torch.stack(rows), rtol=1e-12, atol=1e-12)
    assert calls == [noise.shape[0]] * (
        len(grid) - 1
    )  # one velocity call per step, no CFG doubling
    assert out.shape == noise.shape and out.dtype == noise.dtype


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.5])
def test_euler_cfg_matches_hand_written_guidance(scale):
    a, bias, noise, c, u = _problem(seed=1)
    velocity, calls = _linear_field(a, bias)
    grid = uniform_time_grid(4)
    out = euler_sample(velocity, noise, {"c": c}, grid, uncond={"c": u}, cfg_scale=scale)

    def guided(i):
        def field(y, t):
            v_u = a @ y + bias + t * u[i]
            v_c = a @ y + bias + t * c[i]
            return v_u + scale * (v_c - v_u)

        return field

    expected = torch.stack(
        [_hand_euler(noise[i : i + 1], grid, guided(i))[0] for i in range(noise.shape[0])]
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # both halves in one batched call per step
    assert calls == [2 * noise.shape[0]] * 4


def test_euler_cfg_scale_one_equals_conditional_and_zero_equals_unconditional():
    a, bias, noise, c, u = _problem(seed=2)
    velocity, _ = _linear_field(a, bias)
    grid = uniform_time_grid(3)
    cond_only = euler_sample(velocity, noise, {"c": c}, grid)
    uncond_only = euler_sample(velocity, noise, {"c": u}, grid)
    torch.testing.assert_close(
        euler_sample(velocity, noise, {"c": c}, grid, uncond={"c": u}, cfg_scale=1.0), cond_only
    )
    torch.testing.assert_close(
        euler_sample(velocity, noise, {"c": c}, grid, uncond={"c": u}, cfg_scale=0.0), uncond_only
    )
    assert not torch.allclose(cond_only, uncond_only)


@given(
    interior=st.lists(st.floats(0.01, 0.99), min_size=0, max_size=6, unique=True),
    seed=st.integers(0, 10_000),
)
@SETTINGS
def test_euler_is_exact_for_constant_velocity(interior, seed):
    """dx/dt = v constant: x(0) = x(1) - v on any decreasing grid (Euler is exact)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    grid = torch.tensor([1.0, *sorted(interior, reverse=True), 0.0], dtype=torch.float64)
    out = euler_sample(lambda x, t, cond: v.expand_as(x), noise, {}, grid)
    torch.testing.assert_close(out, noise - v, rtol=0, atol=1e-12)


def test_euler_scalar_linear_ode_equals_product_formula():
    """v = lam x: Euler gives x0 = prod_i (1 + (t_{i+1} - t_i) lam) x1 exactly."""
    lam = 0.7
    grid = torch.tensor([1.0, 0.8, 0.3, 0.0], dtype=torch.float64)
    noise = torch.tensor([[2.0], [-1.0]], dtype=torch.float64)
    out = euler_sample(lambda x, t, cond: lam * x, noise, {}, grid)
    factor = (1 - 0.2 * lam) * (1 - 0.5 * lam) * (1 - 0.3 * lam)
    torch.testing.assert_close(out, noise * factor, rtol=1e-14, atol=0)


def test_euler_keeps_dtype_and_passes_per_sample_times():
    seen = []

    def velocity(x, t, cond):
        seen.append((t.dtype, t.shape, t.tolist()))
        return torch.zeros_like(x)

    noise = torch.randn(3, 2, dtype=torch.float32)
    out = euler_sample(velocity, noise, {}, torch.tensor([1.0, 0.25, 0.0], dtype=torch.float64))
    assert out.dtype == torch.float32
    assert seen == [(torch.float32, (3,), [1.0] * 3), (torch.float32, (3,), [0.25] * 3)]


# --------------------------------------------------------------------------- keyed_noise
def _draw(key, occurrence, prompt, count, shape):
    """Independent reference: the generator seeded by the stable hash of the full key."""
    gen = torch.Generator().manual_seed(stable_seed(*key, occurrence, prompt))
    return torch.randn((count, *shape), generator=gen)


def test_keyed_noise_equals_direct_generator_draws():
    key = (7, "train", 3, 0, 1)
    out = keyed_noise(["a", "b", "a"], 2, (3, 2, 2), key)
    assert out.shape == (6, 3, 2, 2)
    torch.testing.assert_close(out[0:2], _draw(key, 0, "a", 2, (3, 2, 2)), rtol=0, atol=0)
    torch.testing.assert_close(out[2:4], _draw(key, 0, "b", 2, (3, 2, 2)), rtol=0, atol=0)
    torch.testing.assert_close(out[4:6], _draw(key, 1, "a", 2, (3, 2, 2)), rtol=0, atol=0)


@given(
    prompts=st.lists(
        st.sampled_from(["cat", "dog", "a red cat", "sky", ""]), min_size=1, max_size=6
    ),
    perm_seed=st.integers(0, 1000),
    count=st.integers(1, 3),
)
@SETTINGS
def test_keyed_noise_is_independent_of_batch_order_and_other_prompts(prompts, perm_seed, count):
    key = ("seed", 11)
    shape = (2, 3)
    base = keyed_noise(prompts, count, shape, key)

    def by_prompt(ps, noise):
        """{(prompt, occurrence): rows}."""
        seen: dict[str, int] = {}
        out = {}
        for i, p in enumerate(ps):
            occ = seen.get(p, 0)
            seen[p] = occ + 1
            out[(p, occ)] = noise[i * count : (i + 1) * count]
        return out

    # shuffling distinct prompts, or adding other prompts, keeps each (prompt, occurrence)'s noise
    gen = torch.Generator().manual_seed(perm_seed)
    order = torch.randperm(len(prompts), generator=gen).tolist()
    shuffled = [prompts[i] for i in order]
    other = ["zzz extra", *shuffled, "yyy other"]
    expected = by_prompt(prompts, base)
    for ps in (shuffled, other):
        got = by_prompt(ps, keyed_noise(ps, count, shape, key))
        for k, rows in expected.items():
            assert torch.equal(got[k], rows)


def test_keyed_noise_repeated_prompt_gets_new_occurrences():
    out = keyed_noise(["x", "x", "x"], 2, (4,), ("k",))
    chunks = out.chunk(3)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(chunks[i], chunks[j])
    # the first occurrence is the noise of the prompt alone
    assert torch.equal(chunks[0], keyed_noise(["x"], 2, (4,), ("k",)))
    # the count rows of one prompt are different draws too
    assert not torch.allclose(chunks[0][0], chunks[0][1])


def test_keyed_noise_depends_on_every_part_of_the_key():
    ref = keyed_noise(["p"], 1, (8,), (0, "train", 1))
    for key in [(1, "train", 1), (0, "sample", 1), (0, "train", 2), (0, "train", 1, 0)]:
        assert not torch.allclose(ref, keyed_noise(["p"], 1, (8,), key)), key


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (3, 2, 2), (2, 3, 2, 2), (1, 2, 3, 2, 2)])
def test_keyed_noise_any_sample_shape(shape):
    out = keyed_noise(["a", "b"], 3, shape, ("s",), dtype=torch.float64)
    assert out.shape == (6, *shape) and out.dtype == torch.float64
    torch.testing.assert_close(out[3:], _draw(("s",), 0, "b", 3, shape).double(), rtol=0, atol=0)


def test_keyed_noise_leaves_global_rng_untouched_and_is_standard_normal():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    out = keyed_noise([f"prompt {i}" for i in range(50)], 4, (10,), ("stats",))
    assert torch.equal(torch.rand(3), expected_next)
    assert abs(float(out.mean())) < 0.06 and abs(float(out.std()) - 1.0) < 0.06


# --------------------------------------------------------------------------- evaluation_noise
def test_evaluation_noise_int_seed_is_keyed_sample_noise():
    prompts = ["a", "b", "a"]
    out = evaluation_noise(prompts, 5, (2, 2))
    assert out.shape == (3, 2, 2)
    torch.testing.assert_close(out[0], _draw(("sample", 5), 0, "a", 1, (2, 2))[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], _draw(("sample", 5), 0, "b", 1, (2, 2))[0], rtol=0, atol=0)
    torch.testing.assert_close(out[2], _draw(("sample", 5), 1, "a", 1, (2, 2))[0], rtol=0, atol=0)
    assert not torch.allclose(out[0], evaluation_noise(prompts, 6, (2, 2))[0])


def test_evaluation_noise_per_image_seeds():
    prompts = ["a", "b", "a", "c"]
    seeds = [3, 3, 9, 4]
    out = evaluation_noise(prompts, seeds, (3,), dtype=torch.float64)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        torch.testing.assert_close(
            out[i], _draw(("sample", s), 0, p, 1, (3,))[0].double(), rtol=0, atol=0
        )
    # a tensor of seeds works like a list
    assert torch.equal(
        evaluation_noise(prompts, torch.tensor(seeds), (3,), dtype=torch.float64), out
    )
    # the same seed for every distinct prompt equals the int seed
    distinct = ["a", "b", "c"]
    assert torch.equal(
        evaluation_noise(distinct, [8, 8, 8], (3,)), evaluation_noise(distinct, 8, (3,))
    )


@given(
    n=st.integers(1, 7),
    cut=st.integers(0, 7),
    seed=st.integers(0, 10_000),
)
@SETTINGS
def test_evaluation_noise_chunking_invariance(n, cut, seed):
    """Per-image seeds: splitting the list anywhere (ranks, chunks) gives the same noise."""
    cut = min(cut, n)
    prompts = [f"p{i % 3}" for i in range(n)]  # repeated prompts included
    seeds = [seed + i for i in range(n)]
    whole = evaluation_noise(prompts, seeds, (2, 2))
    if cut in (0, n):
        parts = evaluation_noise(prompts, seeds, (2, 2))
    else:
        parts = torch.cat(
            [
                evaluation_noise(prompts[:cut], seeds[:cut], (2, 2)),
                evaluation_noise(prompts[cut:], seeds[cut:], (2, 2)),
            ]
        )
    assert torch.equal(whole, parts)


def test_evaluation_noise_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match=r"one int per prompt \(3\), got 2"):
        evaluation_noise(["a", "b", "c"], [1, 2], (2,))


# --------------------------------------------------------------------------- grids
@pytest.mark.parametrize("steps", [1, 2, 5, 28])
def test_uniform_time_grid(steps):
    grid = uniform_time_grid(steps)
    assert grid.dtype == torch.float64 and grid.shape == (steps + 1,)
    expected = torch.tensor([1.0 - j / steps for j in range(steps + 1)], dtype=torch.float64)
    torch.testing.assert_close(grid, expected, rtol=0, atol=1e-15)
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert torch.equal(check_time_grid(grid, steps), grid)


def test_check_time_grid_accepts_lists_and_returns_float64_cpu():
    out = check_time_grid([1.0, 0.5, 0.0], 2)
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    assert out.tolist() == [1.0, 0.5, 0.0]
    # float32 input within tolerance of the ends
    out = check_time_grid(torch.tensor([1.0 - 1e-7, 0.3, 1e-7], dtype=torch.float32), 2)
    assert out.dtype == torch.float64


@pytest.mark.parametrize(
    "grid, steps",
    [
        ([1.0, 0.5, 0.0], 3),  # wrong number of points
        ([0.9, 0.5, 0.0], 2),  # does not start at 1
        ([1.0, 0.5, 0.1], 2),  # does not end at 0
        ([1.0, 0.5, 0.5, 0.0], 3),  # not strictly decreasing
        ([1.0, 0.2, 0.6, 0.0], 3),  # increasing somewhere
        ([0.0, 0.5, 1.0], 2),  # increasing
        ([[1.0, 0.0]], 1),  # wrong shape
    ],
)
def test_check_time_grid_errors_name_source_steps_and_values(grid, steps):
    with pytest.raises(ValueError) as info:
        check_time_grid(torch.tensor(grid, dtype=torch.float64), steps, source="my_grid")
    message = str(info.value)
    assert f"my_grid({steps})" in message
    assert f"{steps + 1} points" in message
    assert "got [" in message


# --------------------------------------------------------------------------- training_timesteps
@pytest.mark.parametrize("count", [None, 4, 9])
def test_training_timesteps_all(count):
    assert training_timesteps(0, 3, 1, 4, count) == [0, 1, 2, 3]


@given(
    seed=st.integers(0, 2**31),
    step=st.integers(0, 10_000),
    update=st.integers(0, 8),
    steps=st.integers(2, 40),
    data=st.data(),
)
@SETTINGS
def test_training_timesteps_subset_properties(seed, step, update, steps, data):
    count = data.draw(st.integers(1, steps - 1))
    torch.manual_seed(seed % 97)  # the global RNG plays no role
    chosen = training_timesteps(seed, step, update, steps, count)
    state = torch.get_rng_state()
    assert len(chosen) == count
    assert chosen == sorted(chosen)
    assert len(set(chosen)) == count
    assert all(0 <= j < steps for j in chosen)
    torch.manual_seed(seed % 89 + 1)
    assert training_timesteps(seed, step, update, steps, count) == chosen
    torch.set_rng_state(state)


def test_training_timesteps_vary_with_seed_step_and_update():
    # C(10, 3) = 120 subsets; 30 keyed draws along any one axis should not all coincide
    by_seed = {tuple(training_timesteps(i, 0, 0, 10, 3)) for i in range(30)}
    by_step = {tuple(training_timesteps(1, i, 0, 10, 3)) for i in range(30)}
    by_update = {tuple(training_timesteps(1, 0, i, 10, 3)) for i in range(30)}
    for name, draws in (("seed", by_seed), ("step", by_step), ("update", by_update)):
        assert len(draws) > 10, name


def test_training_timesteps_cover_every_index_over_steps():
    seen = set()
    for step in range(60):
        seen.update(training_timesteps(4, step, 0, 8, 2))
    assert seen == set(range(8))
