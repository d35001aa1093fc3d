"""marble_lightning/collective.py: the identity collective, and the strategy's on two gloo ranks."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer

from marble_lightning.collective import Collective, LocalCollective, StrategyCollective

torch.set_num_threads(1)


def rank_tensor(rank: int) -> torch.Tensor:
    """``[2, 3]`` float64 values that differ per rank."""
    return torch.arange(6, dtype=torch.float64).reshape(2, 3) * (rank + 1) + 10.0 * rank


def rank_rows(rank: int) -> torch.Tensor:
    """``[rank-specific values] [2, 2, 2]`` for ``gather_rows`` with trailing dims."""
    return torch.full((2, 2, 2), float(rank)) + torch.arange(8.0).reshape(2, 2, 2) / 10


def rank_objects(rank: int) -> list:
    return [f"prompt-{rank}", {"rank": rank}, (rank, rank * 2)][: rank + 2]


# --------------------------------------------------------------------------- local
def test_local_collective_is_the_identity():
    c = LocalCollective()
    assert isinstance(c, Collective)
    assert (c.world_size, c.rank) == (1, 0)
    x = rank_tensor(3)
    for op in (c.mean, c.sum, c.gather_rows):
        out = op(x)
        assert torch.equal(out, rank_tensor(3))
    items = ["a", 1]
    gathered = c.gather_objects(items)
    assert gathered == items and gathered is not items  # a new list


class _FakeTrainer:
    world_size = 1
    global_rank = 0
    strategy = None  # never touched on one device


def test_strategy_collective_on_one_device_is_the_identity():
    c = StrategyCollective(_FakeTrainer())
    assert isinstance(c, Collective)
    assert (c.world_size, c.rank) == (1, 0)
    x = rank_tensor(1)
    assert (
        torch.equal(c.mean(x), x) and torch.equal(c.sum(x), x) and torch.equal(c.gather_rows(x), x)
    )
    assert c.gather_objects(("a", "b")) == ["a", "b"]


# --------------------------------------------------------------------------- two ranks
class _CollectiveProbe(LightningModule):
    """training_step runs every collective once and writes this rank's results to a file."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        c = StrategyCollective(self.trainer)
        r = c.rank
        x = rank_tensor(r)
        results = {
            "world_size": c.world_size,
            "rank": r,
            "mean": c.mean(x.clone()),
            "sum": c.sum(x.clone()),
            "gather_rows": c.gather_rows(rank_rows(r)),
            "gather_vector": c.gather_rows(torch.tensor([float(r), -float(r), 7.0])),
            "gather_objects": c.gather_objects(rank_objects(r)),
        }
        torch.save(results, Path(self.directory) / f"rank{r}.pt")
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=1)


def test_strategy_collective_two_ranks(tmp_path):
    trainer = Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_CollectiveProbe(str(tmp_path)))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    expected_sum = rank_tensor(0) + rank_tensor(1)
    expected_rows = torch.cat([rank_rows(0), rank_rows(1)])
    expected_vector = torch.tensor([0.0, 0.0, 7.0, 1.0, -1.0, 7.0])
    expected_objects = rank_objects(0) + rank_objects(1)
    for r, res in enumerate(results):
        assert res["world_size"] == 2 and res["rank"] == r
        torch.testing.assert_close(res["mean"], expected_sum / 2, rtol=0, atol=1e-12)
        torch.testing.assert_close(res["sum"], expected_sum, rtol=0, atol=1e-12)
        assert res["mean"].dtype == torch.float64
        assert res["gather_rows"].shape == (4, 2, 2)
        torch.testing.assert_close(res["gather_rows"], expected_rows, rtol=0, atol=0)
        torch.testing.assert_close(res["gather_vector"], expected_vector, rtol=0, atol=0)
        assert res["gather_objects"] == expected_objects
    # every rank gets the same numbers
    for key in ("mean", "sum", "gather_rows"):
        assert torch.equal(results[0][key], results[1][key])
