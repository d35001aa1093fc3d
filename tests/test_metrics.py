"""metrics.py against an independent numpy computation, in one process and over 2 gloo processes.

Covers the functional definitions (masked moments, mean / std / SE, the composite), the
torchmetrics ``RewardMetric`` and ``CompositeScore``, and the torchmetrics CLIPScore helper.
"""

from __future__ import annotations

import math
import os
import statistics

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from marble_lightning.metrics import (
    NATURAL_RANGES,
    CompositeScore,
    RewardMetric,
    clip_score_metric,
    composite,
    masked_moments,
    moments_to_stats,
    normalize_scores,
)
from marble_lightning.rewards.base import MultiReward, RewardBatch, RewardModel


# ---------------------------------------------------------------- numpy references
def np_stats(values: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per column: mean, unbiased std and SE of the mean over the masked entries (NaN if too
    few)."""
    out = {"mean": [], "std": [], "sem": [], "count": []}
    for k in range(values.shape[1]):
        v = values[mask[:, k], k].astype(np.float64)
        n = v.size
        out["count"].append(n)
        out["mean"].append(v.mean() if n else np.nan)
        std = v.std(ddof=1) if n > 1 else np.nan
        out["std"].append(std)
        out["sem"].append(std / np.sqrt(n) if n > 1 else np.nan)
    return {key: np.array(val, dtype=np.float64) for key, val in out.items()}


def np_composite(
    scores: dict, ranges: dict | None = None, weights: dict | None = None, clip: bool = False
) -> float:
    names = list(scores)
    s = np.array([scores[n] for n in names], dtype=np.float64)
    if ranges is not None:
        low = np.array([ranges[n][0] for n in names], dtype=np.float64)
        high = np.array([ranges[n][1] for n in names], dtype=np.float64)
        s = (s - low) / (high - low)
        if clip:
            s = np.clip(s, 0.0, 1.0)
    w = np.array([(weights or {}).get(n, 1.0) for n in names], dtype=np.float64)
    keep = np.isfinite(s)
    if not keep.any() or w[keep].sum() == 0:
        return float("nan")
    return float((w[keep] * s[keep]).sum() / w[keep].sum())


def _data(n: int = 13, k: int = 4, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [n, k] with NaN in masked entries; column 2 applies once, column 3 never."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, k, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.rand(n, k, generator=g) > 0.3
    mask[0, :2] = True
    mask[:, 2] = False
    mask[5, 2] = True
    mask[:, 3] = False
    values[~mask] = float("nan")  # must be ignored
    return values.float(), mask


def _assert_matches(
    got: dict[str, torch.Tensor], ref: dict[str, np.ndarray], rtol: float = 1e-6
) -> None:
    for key in ("mean", "std", "sem", "count"):
        np.testing.assert_allclose(
            got[key].cpu().numpy(), ref[key], rtol=rtol, atol=0, equal_nan=True, err_msg=key
        )


class MeanRed(RewardModel):
    """Mean of the red channel; applies only to prompts containing 'red'."""

    name = "red"

    def applies_to(self, prompts):
        return torch.tensor(["red" in p for p in prompts])

    def score(self, images, prompts):
        return images[:, 0].mean(dim=(1, 2))


# ---------------------------------------------------------------- functional definitions
def test_masked_moments_and_stats_match_numpy() -> None:
    values, mask = _data()
    sums, squares, counts = masked_moments(values, mask)
    assert sums.dtype == squares.dtype == counts.dtype == torch.float64 and sums.shape == (4,)
    assert counts.tolist() == mask.sum(dim=0).tolist()
    stats = moments_to_stats(sums, squares, counts)
    _assert_matches(stats, np_stats(values.numpy(), mask.numpy()))
    # the column seen once has a mean but no std / SE; the unseen column has neither
    assert (
        math.isfinite(stats["mean"][2])
        and math.isnan(stats["sem"][2])
        and math.isnan(stats["std"][2])
    )
    assert math.isnan(stats["mean"][3])
    # default mask: everything counts
    full = moments_to_stats(*masked_moments(torch.arange(6.0).reshape(3, 2)))
    np.testing.assert_allclose(full["sem"].numpy(), [2.0 / np.sqrt(3)] * 2)


def test_composite_function_matches_numpy() -> None:
    scores = {"ocr": 0.5, "pick": 23.0, "jpeg": -20.0, "unseen": float("nan")}
    ranges = {"ocr": (0, 1), "pick": (18.0, 22.0), "jpeg": (-50.0, 0.0), "unseen": (0.0, 1.0)}
    weights = {"pick": 2.0, "unseen": 5.0}
    for clip in (False, True):
        assert composite(scores, ranges, weights, clip) == pytest.approx(
            np_composite(scores, ranges, weights, clip), rel=1e-12
        )
    # clipping applies to the normalised scores only
    assert normalize_scores(scores, ranges, clip=True)["pick"] == 1.0
    assert normalize_scores(scores, ranges)["pick"] == pytest.approx(1.25)
    assert normalize_scores({"a": 3.0}) == {"a": 3.0}
    # no ranges, unit weights: fmean of the finite scores (exact sums: order does not matter)
    plain = {"a": 0.1, "b": 1e16, "c": -1e16, "d": float("nan")}
    assert composite(plain) == statistics.fmean([0.1, 1e16, -1e16]) == pytest.approx(0.1 / 3)
    assert composite(dict(reversed(list(plain.items())))) == composite(plain)
    assert math.isnan(composite({"a": float("nan")}))
    assert math.isnan(composite({"a": 1.0, "b": float("nan")}, weights={"a": 0.0, "b": 1.0}))


def test_composite_function_validation() -> None:
    with pytest.raises(ValueError, match="missing"):
        composite({"a": 1.0, "b": 2.0}, ranges={"a": (0, 1)})
    with pytest.raises(ValueError, match="high > low"):
        composite({"a": 1.0}, ranges={"a": (1.0, 1.0)})
    with pytest.raises(ValueError, match="high > low"):
        normalize_scores({"a": 1.0}, ranges={"a": (0.0, float("inf"))})
    with pytest.raises(ValueError, match="without a score"):
        composite({"a": 1.0}, weights={"b": 1.0})
    with pytest.raises(ValueError, match="'a': -1.0"):
        composite({"a": 1.0}, weights={"a": -1.0})


# ---------------------------------------------------------------- RewardMetric
def test_reward_metric_matches_numpy_over_chunks() -> None:
    values, mask = _data()
    metric = RewardMetric(["a", "b", "c", "d"])
    for chunk in torch.arange(values.shape[0]).split(4):  # uneven chunks
        metric.update(values[chunk], mask[chunk])
    out = metric.compute()
    _assert_matches(out, np_stats(values.numpy(), mask.numpy()))
    assert out["mean"].dtype == torch.float64
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute()["mean"][0].item())


def test_reward_metric_inputs() -> None:
    # a RewardBatch maps its columns by name; unknown columns are ignored, missing ones stay unseen
    multi = MultiReward([MeanRed()])
    images = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    metric = RewardMetric(["blue", "red"])
    metric.update(multi(images, ["red", "blue", "red", "x"]))
    ref = images[[0, 2], 0].mean(dim=(1, 2)).double()
    out = metric.compute()
    assert math.isnan(out["mean"][0]) and out["count"].tolist() == [0.0, 2.0]
    assert out["mean"][1].item() == pytest.approx(ref.mean().item(), rel=1e-6)
    assert out["std"][1].item() == pytest.approx(ref.std().item(), rel=1e-5)
    # one reward: a name string and 1-D values; names= with a non-member column
    one = RewardMetric("x")
    one.update(torch.tensor([1.0, 100.0, 3.0]), mask=torch.tensor([True, False, True]))
    one.update(torch.tensor([[5.0, 9.0]]), names=["x", "other"])
    assert one.compute()["mean"].item() == pytest.approx(3.0)
    assert one.compute()["sem"].item() == pytest.approx(
        np.std([1.0, 3.0, 5.0], ddof=1) / np.sqrt(3)
    )


def test_reward_metric_errors() -> None:
    metric = RewardMetric(["a", "b"])
    with pytest.raises(ValueError, match="columns without names"):
        metric.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mask shape"):
        metric.update(torch.ones(3, 2), mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"non-finite values for reward\(s\) \['b'\]"):
        metric.update(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="3 names for 2 columns"):
        metric.update(torch.zeros(1, 2), names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"must be \[B, K\]"):
        metric.update(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="`names`"):
        RewardMetric([])
    with pytest.raises(ValueError, match="`names`"):
        RewardMetric(["a", "a"])


# ---------------------------------------------------------------- CompositeScore
def test_composite_score_formula() -> None:
    ranges = {"ocr": (0, 1), "pick": (18.0, 24.0), "jpeg": (-50.0, 0.0)}
    metric = CompositeScore(ranges, weights={"pick": 2.0})
    batch = RewardBatch(
        values=torch.tensor([[0.5, 21.0, -10.0], [0.0, 30.0, -30.0], [0.0, 18.0, -20.0]]),
        mask=torch.tensor([[True, True, True], [False, True, True], [False, True, True]]),
        names=["ocr", "pick", "jpeg"],
    )
    metric.update(batch)
    s_ocr = (0.5 - 0) / 1
    s_pick = min(max((23.0 - 18.0) / 6.0, 0.0), 1.0)
    s_jpeg = (-20.0 + 50.0) / 50.0
    expected = (1 * s_ocr + 2 * s_pick + 1 * s_jpeg) / 4
    assert metric.compute().item() == pytest.approx(expected)
    assert metric.compute().item() == pytest.approx(
        np_composite({"ocr": 0.5, "pick": 23.0, "jpeg": -20.0}, ranges, {"pick": 2.0}, clip=True)
    )
    torch.testing.assert_close(
        metric.normalized_means(), torch.tensor([s_ocr, s_pick, s_jpeg], dtype=torch.float64)
    )
    unclipped = CompositeScore({"a": (0, 1)}, clip=False)
    unclipped.update(torch.tensor([[3.0]]))
    assert unclipped.compute().item() == pytest.approx(3.0)


def test_composite_score_unseen_members_and_name_mapping() -> None:
    metric = CompositeScore({"ocr": (0, 1), "composition": (0, 1)})
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute().item())
    metric.update(torch.tensor([[0.2, 9.0], [0.4, 9.0]]), names=["ocr", "other"])  # 'other' ignored
    assert metric.compute().item() == pytest.approx(0.3)  # composition unseen -> left out
    metric.update(torch.tensor([[1.0, 0.0]]), mask=torch.tensor([[False, True]]))
    assert metric.compute().item() == pytest.approx((0.3 + 0.0) / 2)


def test_composite_score_validation() -> None:
    with pytest.raises(ValueError, match="at least one"):
        CompositeScore({})
    with pytest.raises(ValueError, match="high > low"):
        CompositeScore({"a": (1.0, 1.0)})
    with pytest.raises(ValueError, match="high > low"):
        CompositeScore({"a": (0.0, "1")})
    with pytest.raises(ValueError, match="without a score or range"):
        CompositeScore({"a": (0, 1)}, weights={"b": 1.0})
    with pytest.raises(ValueError, match="weights"):
        CompositeScore({"a": (0, 1)}, weights={"a": -1.0})
    with pytest.raises(ValueError, match="not all be 0"):
        CompositeScore({"a": (0, 1)}, weights={"a": 0.0})
    with pytest.raises(ValueError, match="columns without names"):
        CompositeScore({"a": (0, 1)}).update(torch.zeros(2, 2))
    assert NATURAL_RANGES["ocr"] == (0.0, 1.0)


def test_composite_score_with_multireward() -> None:
    multi = MultiReward([MeanRed()])
    images = torch.rand(4, 3, 4, 4)
    batch = multi(images, ["red", "blue", "red", "x"])
    metric = CompositeScore({"red": (0.0, 0.5)}, clip=False)
    metric.update(batch)
    ref = images[[0, 2], 0].mean().item() / 0.5
    assert metric.compute().item() == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------- torchmetrics CLIPScore
def test_clip_score_reward_agrees_with_torchmetrics(tmp_path) -> None:
    torch.set_num_threads(1)
    from marble_lightning.rewards.clip_score import CLIPScoreReward
    from marble_lightning.testing import save_tiny_clip

    folder = save_tiny_clip(tmp_path / "clip", seed=3)
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=g).float() / 255
    prompts = ["a cat", "a photo of a dog", "red", "two red circles"]
    tm = clip_score_metric(str(folder))
    tm.update(images * 255, prompts)
    cos = CLIPScoreReward(str(folder))(images, prompts)
    # torchmetrics: max(100 * mean cosine, 0)
    assert tm.compute().item() == pytest.approx(max(100 * cos.mean().item(), 0.0), abs=1e-3)
    ours = CLIPScoreReward(str(folder), scale=100.0)(images, prompts)
    for i in range(4):  # per sample, with the clamp
        one = clip_score_metric(str(folder))
        one.update(images[i : i + 1] * 255, prompts[i : i + 1])
        assert one.compute().item() == pytest.approx(max(ours[i].item(), 0.0), abs=1e-3)
    with pytest.raises(FileNotFoundError, match="missing_clip"):
        clip_score_metric(str(tmp_path / "missing_clip"))


# ---------------------------------------------------------------- DDP (gloo, 2 processes)
RANGES = {"a": (-2.0, 4.0), "b": (0.0, 2.0), "c": (0.0, 1.0)}


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        values, mask = _data()
        shard = torch.arange(values.shape[0])[rank::world]  # uneven shards: 7 and 6 samples
        rm = RewardMetric(["a", "b", "c", "d"])
        cs = CompositeScore(RANGES, weights={"b": 3.0})
        for chunk in shard.split(3):
            rm.update(values[chunk], mask[chunk])
            cs.update(values[chunk, :3], mask[chunk, :3], names=["a", "b", "c"])
        # a metric that only rank 0 feeds (the other takes part in the sync with no data)
        lone = RewardMetric(["a"])
        if rank == 0:
            lone.update(values[mask[:, 0], 0])
        else:
            lone.update(torch.zeros(0))
        torch.save(
            {"reward": rm.compute(), "composite": cs.compute(), "lone": lone.compute()},
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_numpy_and_single_process(tmp_path) -> None:
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    values, mask = _data()
    ref = np_stats(values.numpy(), mask.numpy())
    means = dict(zip("abc", ref["mean"][:3].tolist()))
    ref_composite = np_composite(means, RANGES, {"b": 3.0}, clip=True)
    single = RewardMetric(["a", "b", "c", "d"])
    single.update(values, mask)
    single_out = single.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        _assert_matches(got["reward"], ref)
        for key in ("mean", "std", "sem", "count"):
            torch.testing.assert_close(
                got["reward"][key], single_out[key], equal_nan=True, rtol=1e-12, atol=0
            )
        assert got["composite"].item() == pytest.approx(ref_composite, rel=1e-6)
        assert got["lone"]["mean"].item() == pytest.approx(ref["mean"][0], rel=1e-12)
        assert got["lone"]["sem"].item() == pytest.approx(ref["sem"][0], rel=1e-9)
