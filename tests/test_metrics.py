"""RewardMetric, CompositeScore, the torchmetrics CLIPScore helper, and 2-process gloo reduction."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from marble_lightning.metrics import NATURAL_RANGES, CompositeScore, RewardMetric, clip_score_metric
from marble_lightning.rewards.base import MultiReward, RewardBatch, RewardModel


class MeanRed(RewardModel):
    """Mean of the red channel; applies only to prompts containing 'red'."""

    name = "red"

    def applies_to(self, prompts):
        return torch.tensor(["red" in p for p in prompts])

    def score(self, images, prompts):
        return images[:, 0].mean(dim=(1, 2))


def test_reward_metric_update_compute_reset() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 4, 4, generator=g)
    prompts = ["red", "blue", "red dog", "red", "cat", "a red"]
    metric = RewardMetric(MeanRed())
    metric.update(images[:4], prompts[:4])
    metric.update(images[4:], prompts[4:])
    out = metric.compute()
    applied = torch.tensor(["red" in p for p in prompts])
    ref = images[applied, 0].mean(dim=(1, 2)).double()
    torch.testing.assert_close(out["mean"], ref.mean().float())
    torch.testing.assert_close(out["std"], ref.std().float())  # unbiased
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute()["mean"].item())
    metric.update(values=torch.tensor([2.0]))
    assert metric.compute()["mean"] == 2.0 and metric.compute()["std"] == 0.0


def test_reward_metric_precomputed_and_errors() -> None:
    metric = RewardMetric()
    metric.update(values=torch.tensor([1.0, 100.0, 3.0]), mask=torch.tensor([True, False, True]))
    assert metric.compute()["mean"] == 2.0
    with pytest.raises(ValueError, match="needs images"):
        metric.update(images=torch.rand(1, 3, 2, 2), prompts=["a"])
    with pytest.raises(ValueError, match="mask shape"):
        metric.update(values=torch.ones(3), mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-finite"):
        metric.update(values=torch.tensor([float("nan")]))
    metric.update(
        values=torch.tensor([float("nan")]), mask=torch.tensor([False])
    )  # masked NaN is fine
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RewardMetric(MeanRed()).update(torch.rand(1, 3, 2, 2) * 255, ["red"])


def test_composite_formula() -> None:
    metric = CompositeScore(
        {"ocr": (0, 1), "pick": (18.0, 24.0), "jpeg": (-50.0, 0.0)}, weights={"pick": 2.0}
    )
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
    torch.testing.assert_close(
        metric.normalized_means(), torch.tensor([s_ocr, s_pick, s_jpeg], dtype=torch.float64)
    )
    unclipped = CompositeScore({"a": (0, 1)}, clip=False)
    unclipped.update(torch.tensor([[3.0]]))
    assert unclipped.compute().item() == pytest.approx(3.0)


def test_composite_unseen_members_and_name_mapping() -> None:
    metric = CompositeScore({"ocr": (0, 1), "composition": (0, 1)})
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute().item())
    metric.update(torch.tensor([[0.2, 9.0], [0.4, 9.0]]), names=["ocr", "other"])  # 'other' ignored
    assert metric.compute().item() == pytest.approx(0.3)  # composition unseen -> left out
    metric.update(torch.tensor([[1.0, 0.0]]), mask=torch.tensor([[False, True]]))
    assert metric.compute().item() == pytest.approx((0.3 + 0.0) / 2)


def test_composite_validation() -> None:
    with pytest.raises(ValueError, match="high > low"):
        CompositeScore({"a": (1.0, 1.0)})
    with pytest.raises(ValueError, match="without a range"):
        CompositeScore({"a": (0, 1)}, weights={"b": 1.0})
    with pytest.raises(ValueError, match="weights"):
        CompositeScore({"a": (0, 1)}, weights={"a": -1.0})
    with pytest.raises(ValueError, match="columns without names"):
        CompositeScore({"a": (0, 1)}).update(torch.zeros(2, 2))
    assert NATURAL_RANGES["ocr"] == (0.0, 1.0)


def test_composite_with_multireward() -> None:
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
    from marble_lightning.rewards._tiny import save_tiny_clip
    from marble_lightning.rewards.clip_score import CLIPScoreReward

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
def _values(n: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    values = torch.randn(n, 2, generator=g) * 3 + 1
    mask = torch.rand(n, 2, generator=g) > 0.3
    mask[0] = True
    return values, mask, torch.arange(n)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        values, mask, idx = _values()
        shard = idx[rank::world]  # uneven shards: 6 and 5 samples
        rm = RewardMetric()
        cs = CompositeScore({"a": (-2.0, 4.0), "b": (0.0, 2.0)}, weights={"b": 3.0})
        for chunk in shard.split(2):
            rm.update(values=values[chunk, 0], mask=mask[chunk, 0])
            cs.update(values[chunk], mask[chunk], names=["a", "b"])
        torch.save(
            {"reward": rm.compute(), "composite": cs.compute()}, os.path.join(out, f"rank{rank}.pt")
        )
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path) -> None:
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    values, mask, _ = _values()
    rm = RewardMetric()
    rm.update(values=values[:, 0], mask=mask[:, 0])
    cs = CompositeScore({"a": (-2.0, 4.0), "b": (0.0, 2.0)}, weights={"b": 3.0})
    cs.update(values, mask, names=["a", "b"])
    single = {"reward": rm.compute(), "composite": cs.compute()}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["reward"]["mean"], single["reward"]["mean"])
        torch.testing.assert_close(got["reward"]["std"], single["reward"]["std"])
        torch.testing.assert_close(got["composite"], single["composite"])
    # and the single-process numbers are the plain formulas
    v = values[mask[:, 0], 0].double()
    assert single["reward"]["mean"].item() == pytest.approx(v.mean().item(), rel=1e-6)
