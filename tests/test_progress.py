"""MarbleProgressBar: the training bar counts optimizer steps up to max_steps (not the prompt
stream's misleading length), shows s/step, an ETA and the reward means, and evaluation passes
get their own bar."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, IterableDataset

from marble_lightning.callbacks import RewardEvalCallback
from marble_lightning.progress import MarbleProgressBar


class _EndlessPrompts(IterableDataset):
    """An endless prompt stream that claims a length of 24 (as the real one does)."""

    def __iter__(self):
        i = 0
        while True:
            yield f"prompt {i}"
            i += 1

    def __len__(self) -> int:
        return 24


class _StepModule(LightningModule):
    """Manual optimisation, one optimizer step per batch, logs reward/<k>_mean like the real
    module."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.sampled = 0

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = (self.w - 1.0).square().sum()
        self.manual_backward(loss)
        opt.step()
        self.log_dict(
            {"reward/red_mean": 0.25 + self.global_step, "reward/dark_std": 9.0}, prog_bar=False
        )

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)

    def sample(self, prompts, seed=None, adapter="policy"):
        self.sampled += 1
        return torch.zeros(len(prompts), 3, 2, 2)


class _StubEval(RewardEvalCallback):
    """A RewardEvalCallback whose pass samples 7 prompts x 2 images in chunks of 4 (4 chunks)."""

    def __init__(self, seen: list) -> None:
        super().__init__(["p"] * 7, every_n_steps=2, images_per_prompt=2, batch_size=4)
        self.seen = seen

    def setup(self, trainer, pl_module, stage):
        self.prompts = list(self.source)

    def on_train_start(self, trainer, pl_module):
        self.evaluate(trainer, pl_module, adapter="base")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module, adapter="policy")

    def on_fit_end(self, trainer, pl_module):
        pass

    def evaluate(self, trainer, pl_module, adapter="policy"):
        bar = trainer.progress_bar_callback
        for start in range(0, 14, self.batch_size):
            pl_module.sample(["p"] * min(self.batch_size, 14 - start), adapter=adapter)
            task = bar.progress.tasks[bar.eval_progress_bar_id]
            self.seen.append((adapter, task.description, int(task.completed), int(task.total)))
        return {"eval/red": 0.5, "eval/mean": 0.5}


def _fit(
    bar: MarbleProgressBar, max_steps: int, callbacks=(), ckpt_path=None, root=None
) -> Trainer:
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar, *callbacks],
        default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(
            _StepModule(),
            train_dataloaders=DataLoader(_EndlessPrompts(), batch_size=2, collate_fn=list),
            ckpt_path=ckpt_path,
        )
    return trainer


def _recorded_bar() -> tuple[MarbleProgressBar, io.StringIO]:
    out = io.StringIO()
    bar = MarbleProgressBar(
        console_kwargs={"file": out, "force_terminal": True, "width": 200, "color_system": None}
    )
    return bar, out


@pytest.fixture(autouse=True)
def _restore_console():
    yield
    from rich import reconfigure

    reconfigure()  # the bar reconfigures rich's global console


def test_training_bar_counts_steps_to_max_steps() -> None:
    bar, out = _recorded_bar()
    trainer = _fit(bar, max_steps=5)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.total, task.completed) == (5, 5)  # max_steps, not the dataloader's 24
    assert trainer.global_step == 5
    assert len(bar._durations) == 5 and bar.seconds_per_step is not None
    assert bar.eta_seconds == 0.0
    metrics = bar.get_metrics(trainer, trainer.lightning_module)
    assert metrics["red"] == pytest.approx(
        5.25
    )  # the latest reward/red_mean, logged with prog_bar=False
    assert "dark" not in metrics and "v_num" not in metrics
    bar._console.file = out  # render the finished bar once more, onto our buffer
    bar._console.print(bar.progress)
    text = out.getvalue()
    assert "Training" in text and "5/5 steps" in text and "s/step" in text and "ETA 0:00:00" in text
    assert "red: 5.250" in text
    assert "/24" not in text


def test_resumed_run_starts_at_its_step(tmp_path) -> None:
    first, _ = _recorded_bar()
    trainer = _fit(first, max_steps=3, root=tmp_path)
    ckpt = tmp_path / "three.ckpt"
    trainer.save_checkpoint(ckpt)
    bar, _ = _recorded_bar()
    seen = []

    from lightning.pytorch import Callback

    class _First(Callback):  # records the bar at each resumed batch
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            task = bar.progress.tasks[bar.train_progress_bar_id]
            seen.append((int(task.completed), int(task.total)))

    _fit(bar, max_steps=6, callbacks=[_First()], ckpt_path=str(ckpt), root=tmp_path)
    assert seen[0] == (3, 6)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.completed, task.total) == (6, 6)


def test_evaluation_passes_get_their_own_bar() -> None:
    bar, _ = _recorded_bar()
    seen: list = []
    evaluator = _StubEval(seen)
    trainer = _fit(bar, max_steps=4, callbacks=[evaluator])
    # base pass at train start + policy passes at steps 2 and 4; 14 images in chunks of 4 -> 4
    # chunks
    passes = [seen[i : i + 4] for i in range(0, len(seen), 4)]
    assert [p[0][0] for p in passes] == ["base", "policy", "policy"]
    for chunk in passes:
        assert [c[2] for c in chunk] == [1, 2, 3, 4] and {c[3] for c in chunk} == {4}
        assert chunk[0][1].endswith(f"Eval ({chunk[0][0]})")
    assert bar.eval_progress_bar_id is None
    assert all(not t.visible for t in bar.progress.tasks if t.id != bar.train_progress_bar_id)
    assert "evaluate" not in vars(evaluator) and "sample" not in vars(trainer.lightning_module)
    assert bar.get_metrics(trainer, trainer.lightning_module)["eval/mean"] == 0.5
    # evaluation time is not counted as step time
    assert len(bar._durations) == 4


def test_bad_window() -> None:
    with pytest.raises(ValueError, match="window"):
        MarbleProgressBar(window=0)
