"""Tests of the per-prompt multi-reward stat tracker (marble_lightning.advantages)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_lightning.advantages import PerPromptStatTracker

EPS = 1e-4


class ReferenceTracker:
    """Element-by-element numpy re-implementation of the documented semantics."""

    def __init__(self, k: int, global_std: bool, window: int | None, eps: float = EPS) -> None:
        self.k, self.global_std, self.window, self.eps = k, global_std, window, eps
        self.history: dict[tuple[str, int], list[float]] = {}

    def update(self, prompts: list[str], rewards: np.ndarray, mask: np.ndarray) -> np.ndarray:
        b = len(prompts)
        for i in range(b):
            for k in range(self.k):
                if mask[i, k]:
                    self.history.setdefault((prompts[i], k), []).append(float(rewards[i, k]))
        if self.window is not None:
            for key, values in self.history.items():
                self.history[key] = values[-self.window :]
        out = np.zeros((b, self.k))
        for k in range(self.k):
            batch_values = np.array([rewards[i, k] for i in range(b) if mask[i, k]])
            for i in range(b):
                if not mask[i, k]:
                    continue
                seen = np.array(self.history[(prompts[i], k)])
                if np.all(seen == seen[0]):
                    continue
                if self.global_std:
                    if np.all(batch_values == batch_values[0]):
                        continue
                    std = np.sqrt(np.mean((batch_values - batch_values.mean()) ** 2))
                else:
                    std = np.sqrt(np.mean((seen - seen.mean()) ** 2))
                out[i, k] = (rewards[i, k] - seen.mean()) / (std + self.eps)
        return out


PROMPTS = ["a", "a", "b", "b", "b"]
REWARDS = torch.tensor([[1.0, 0.0], [3.0, 4.0], [2.0, 1.0], [2.0, 2.0], [2.0, 3.0]])


def test_hand_made_groups() -> None:
    tracker = PerPromptStatTracker(2)
    adv = tracker.update(PROMPTS, REWARDS)
    s = math.sqrt(2 / 3)
    expected = torch.tensor(
        [
            [-1 / (1 + EPS), -2 / (2 + EPS)],
            [1 / (1 + EPS), 2 / (2 + EPS)],
            [0.0, -1 / (s + EPS)],  # reward 0 of prompt "b" has zero variance -> exactly 0
            [0.0, 0.0],
            [0.0, 1 / (s + EPS)],
        ]
    )
    torch.testing.assert_close(adv, expected)
    assert adv.dtype == torch.float32
    assert adv[2:, 0].eq(0).all()

    # Second batch of prompt "a": statistics over the whole history [1, 3, 5, 7].
    adv = tracker.update(["a", "a"], torch.tensor([[5.0, 1.0], [7.0, 1.0]]))
    std0 = math.sqrt(5.0)
    std1 = float(np.std([0.0, 4.0, 1.0, 1.0]))
    torch.testing.assert_close(
        adv,
        torch.tensor(
            [
                [1 / (std0 + EPS), (1 - 1.5) / (std1 + EPS)],
                [3 / (std0 + EPS), (1 - 1.5) / (std1 + EPS)],
            ]
        ),
    )
    assert tracker.history("a", 0) == [1.0, 3.0, 5.0, 7.0]


def test_window_keeps_most_recent_values() -> None:
    tracker = PerPromptStatTracker(2, window=2)
    tracker.update(PROMPTS, REWARDS)
    adv = tracker.update(["a", "a"], torch.tensor([[5.0, 1.0], [7.0, 3.0]]))
    torch.testing.assert_close(
        adv, torch.tensor([[-1 / (1 + EPS), -1 / (1 + EPS)], [1 / (1 + EPS), 1 / (1 + EPS)]])
    )
    assert tracker.history("a", 0) == [5.0, 7.0]
    assert tracker.history("b", 1) == [2.0, 3.0]


def test_mask_excludes_from_stats_and_zeroes_advantage() -> None:
    tracker = PerPromptStatTracker(2)
    mask = torch.ones(5, 2, dtype=torch.bool)
    mask[1, 1] = False  # reward 1 does not apply to sample 1
    mask[4, 1] = False
    rewards = REWARDS.clone()
    rewards[1, 1] = float("nan")  # masked entries may hold anything, even NaN
    adv = tracker.update(PROMPTS, rewards, mask)
    assert adv[1, 1] == 0 and adv[4, 1] == 0
    assert adv[0, 1] == 0  # prompt "a" has one valid value of reward 1 -> zero variance
    torch.testing.assert_close(adv[2:4, 1], torch.tensor([-0.5 / (0.5 + EPS), 0.5 / (0.5 + EPS)]))
    assert tracker.history("a", 1) == [0.0]
    assert tracker.history("b", 1) == [1.0, 2.0]


def test_global_std() -> None:
    tracker = PerPromptStatTracker(2, global_std=True)
    adv = tracker.update(PROMPTS, REWARDS)
    std0 = math.sqrt(0.4)  # batch values [1, 3, 2, 2, 2]
    std1 = math.sqrt(2.0)  # batch values [0, 4, 1, 2, 3]
    expected = torch.tensor(
        [
            [-1 / (std0 + EPS), -2 / (std1 + EPS)],
            [1 / (std0 + EPS), 2 / (std1 + EPS)],
            [0.0, -1 / (std1 + EPS)],
            [0.0, 0.0],
            [0.0, 1 / (std1 + EPS)],
        ]
    )
    torch.testing.assert_close(adv, expected)


def test_zero_variance_gives_exact_zero_not_nan() -> None:
    for global_std in (False, True):
        tracker = PerPromptStatTracker(1, global_std=global_std, eps=0.0)
        adv = tracker.update(["p"] * 3 + ["q"], torch.tensor([[0.1], [0.1], [0.1], [0.7]]))
        assert adv.eq(0).all(), global_std  # 0.1 * 3 / 3 != 0.1 in floating point
        assert not torch.isnan(adv).any()


def test_nonfinite_raise_names_reward_and_prompt_and_changes_nothing() -> None:
    tracker = PerPromptStatTracker(2, reward_names=["pick", "ocr"])
    tracker.update(PROMPTS, REWARDS)
    before = tracker.state_dict()
    rewards = REWARDS.clone()
    rewards[3, 1] = float("inf")
    with pytest.raises(ValueError, match=r"reward 1 \('ocr'\) = inf for prompt 'b'"):
        tracker.update(PROMPTS, rewards)
    assert tracker.state_dict() == before
    unnamed = PerPromptStatTracker(2)
    rewards[3, 1] = float("nan")
    with pytest.raises(ValueError, match="reward 1 = nan for prompt 'b'"):
        unnamed.update(PROMPTS, rewards)


def test_nonfinite_drop_equals_mask() -> None:
    rewards = REWARDS.clone()
    rewards[0, 0] = float("nan")
    dropping = PerPromptStatTracker(2, on_nonfinite="drop")
    with pytest.warns(RuntimeWarning, match="reward 0 = nan for prompt 'a'"):
        adv = dropping.update(PROMPTS, rewards)
    mask = torch.ones(5, 2, dtype=torch.bool)
    mask[0, 0] = False
    masked = PerPromptStatTracker(2).update(PROMPTS, REWARDS, mask)
    torch.testing.assert_close(adv, masked)
    assert adv[0, 0] == 0


def test_state_dict_round_trip_resumes_identically() -> None:
    rng = np.random.default_rng(0)
    batches = [
        (
            [f"p{j}" for j in rng.integers(0, 3, size=8)],
            torch.from_numpy(rng.standard_normal((8, 3))),
        )
        for _ in range(4)
    ]
    uninterrupted = PerPromptStatTracker(3, window=6)
    expected = [uninterrupted.update(p, r) for p, r in batches]

    first = PerPromptStatTracker(3, window=6)
    for p, r in batches[:2]:
        first.update(p, r)
    state = json.loads(json.dumps(first.state_dict()))  # plain python data
    resumed = PerPromptStatTracker(3, window=6)
    resumed.load_state_dict(state)
    for (p, r), exp in zip(batches[2:], expected[2:]):
        torch.testing.assert_close(resumed.update(p, r), exp, rtol=0, atol=0)
    assert resumed.state_dict() == uninterrupted.state_dict()

    # Tolerant loading: missing keys give an empty tracker; a wrong K is refused.
    empty = PerPromptStatTracker(3)
    empty.load_state_dict({})
    assert empty.prompts == []
    with pytest.raises(ValueError, match="2 rewards"):
        PerPromptStatTracker(3).load_state_dict({"num_rewards": 2})
    first.reset()
    assert first.prompts == [] and first.state_dict()["history"] == {}


def test_validation() -> None:
    with pytest.raises(ValueError, match="num_rewards"):
        PerPromptStatTracker(0)
    with pytest.raises(ValueError, match="window"):
        PerPromptStatTracker(2, window=0)
    with pytest.raises(ValueError, match="on_nonfinite"):
        PerPromptStatTracker(2, on_nonfinite="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reward_names"):
        PerPromptStatTracker(2, reward_names=["a"])
    with pytest.raises(ValueError, match="eps"):
        PerPromptStatTracker(2, eps=-1.0)
    tracker = PerPromptStatTracker(2)
    with pytest.raises(ValueError, match="K = 2"):
        tracker.update(["a"], torch.zeros(1, 3))
    with pytest.raises(ValueError, match="prompts"):
        tracker.update(["a", "b"], torch.zeros(1, 2))
    with pytest.raises(ValueError, match="mask"):
        tracker.update(["a"], torch.zeros(1, 2), torch.ones(1, 3, dtype=torch.bool))


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 4),
    global_std=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 6)),
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(1, 4),
)
def test_matches_reference(
    k: int, global_std: bool, window: int | None, seed: int, steps: int
) -> None:
    rng = np.random.default_rng(seed)
    tracker = PerPromptStatTracker(k, global_std=global_std, window=window)
    reference = ReferenceTracker(k, global_std, window)
    for _ in range(steps):
        b = int(rng.integers(1, 12))
        prompts = [f"prompt {j}" for j in rng.integers(0, 4, size=b)]
        rewards = np.round(rng.standard_normal((b, k)), int(rng.integers(0, 3)))  # ties are common
        mask = rng.random((b, k)) < 0.8
        got = tracker.update(prompts, torch.from_numpy(rewards), torch.from_numpy(mask))
        expected = reference.update(prompts, rewards, mask)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
        assert not got[~torch.from_numpy(mask)].any()


def test_device_and_no_warnings() -> None:
    tracker = PerPromptStatTracker(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adv = tracker.update(PROMPTS, REWARDS.double())
    assert adv.device == REWARDS.device and adv.dtype == torch.float32
