"""RewardEvalCallback through Lightning: monitorable ``eval/mean`` and DDP equal to one process.

* ``ModelCheckpoint(monitor="eval/mean")`` sees each evaluation step's own numbers (checkpoint
  callbacks run after the others) and keeps the best one.
* ``EarlyStopping(monitor="eval/mean")`` reads the latest evaluation at the end of an epoch.
* Two CPU ranks (gloo, ``ddp_fork`` in-process) give the single-process means, SEs, ``eval/mean``
  and per-image scores, through torchmetrics' sync; a rank with no held-out sample still syncs.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from marble_lightning.callbacks import RewardEvalCallback
from marble_lightning.data import PromptDataModule
from marble_lightning.metrics import composite
from marble_lightning.testing import PROMPTS, fit, make_module

torch.set_num_threads(1)

HELDOUT = ["a green dog", "red house", "small box"]


def test_model_checkpoint_monitors_eval_mean(tmp_path: Path) -> None:
    module = make_module("marble")
    evaluator = RewardEvalCallback(HELDOUT, every_n_steps=1, seed=3, log_images=False)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        monitor="eval/mean",
        mode="max",
        save_top_k=-1,
        every_n_train_steps=1,
        filename="step{step}",
        auto_insert_metric_name=False,
    )
    # the checkpoint callback is listed first on purpose: Lightning runs it after the evaluator
    trainer = fit(module, max_steps=3, callbacks=[checkpoint, evaluator], enable_checkpointing=True)
    policy = {
        e["global_step"]: e["eval/mean"] for e in evaluator.history if e["adapter"] == "policy"
    }
    assert sorted(policy) == [1, 2, 3]
    # every step's checkpoint carries that step's evaluation (not the previous one)
    scores = {Path(path).name: float(score) for path, score in checkpoint.best_k_models.items()}
    assert scores == {f"step{s}.ckpt": pytest.approx(v, abs=0) for s, v in policy.items()}
    best_step = max(policy, key=policy.get)
    assert Path(checkpoint.best_model_path).name == f"step{best_step}.ckpt"
    assert float(checkpoint.best_model_score) == policy[best_step]
    assert Path(checkpoint.best_model_path).is_file()
    # what the trainer exposes: the latest policy evaluation and the base one
    metrics = trainer.callback_metrics
    base = evaluator.history[0]
    assert base["adapter"] == "base"
    assert float(metrics["eval/mean"]) == policy[3]
    assert float(metrics["eval/mean_base"]) == base["eval/mean"]
    assert float(metrics["eval/green_base"]) == base["eval/green"]
    assert "eval/green_sem" not in metrics  # the SEs stay in the history


def test_early_stopping_reads_eval_mean() -> None:
    module = make_module("marble")
    evaluator = RewardEvalCallback(HELDOUT, every_n_steps=1, seed=3, log_images=False)
    # 8 prompts, 4 per step: 2 steps per epoch. Epoch 0 sets the best score; epoch 1 cannot
    # beat it by min_delta=1 (eval/mean is in [0, 1]), so training stops after 4 of 10 steps.
    stopper = EarlyStopping(
        monitor="eval/mean", mode="max", patience=0, min_delta=1.0, check_on_train_epoch_end=True
    )
    trainer = fit(module, max_steps=10, prompts_per_step=4, callbacks=[evaluator, stopper])
    assert trainer.global_step == 4 and stopper.stopped_epoch == 1
    by_step = {
        e["global_step"]: e["eval/mean"] for e in evaluator.history if e["adapter"] == "policy"
    }
    assert float(stopper.best_score) == by_step[2]  # the latest evaluation at the end of epoch 0
    # without the evaluator there is nothing to monitor
    with pytest.raises(RuntimeError, match="eval/mean"):
        fit(
            make_module("marble"),
            max_steps=2,
            prompts_per_step=4,
            callbacks=[EarlyStopping(monitor="eval/mean", check_on_train_epoch_end=True)],
        )


def test_non_finite_values_are_not_published() -> None:
    """A NaN evaluation (reward applies to no held-out sample) removes the key, keeps the others."""
    module = make_module("marble")
    evaluator = RewardEvalCallback(["small box"], every_n_steps=1, log_images=False)
    trainer = fit(module, max_steps=1, callbacks=[evaluator])
    entry = evaluator.history[-1]
    assert math.isnan(entry["eval/green"]) and "eval/green" not in trainer.callback_metrics
    assert entry["eval/mean"] == composite(
        {n: entry[f"eval/{n}"] for n in ("red", "green", "dark")}
    )
    assert entry["eval/mean"] == pytest.approx((entry["eval/red"] + entry["eval/dark"]) / 2)
    assert float(trainer.callback_metrics["eval/mean"]) == entry["eval/mean"]


# ---------------------------------------------------------------- DDP (2 ranks, gloo, ddp_fork)
class _Dump(Callback):
    """Each rank writes the evaluators' history, samples and callback metrics at fit end."""

    def __init__(self, directory: Path, evaluators: list[RewardEvalCallback]) -> None:
        self.directory = directory
        self.evaluators = evaluators

    def on_fit_end(self, trainer: Trainer, pl_module) -> None:  # after the evaluators' final one
        torch.save(
            {
                "history": [e.history for e in self.evaluators],
                "samples": [e.samples for e in self.evaluators],
                "metrics": {
                    k: float(v)
                    for k, v in trainer.callback_metrics.items()
                    if k.startswith("eval/")
                },
            },
            self.directory / f"rank{trainer.global_rank}.pt",
        )


def _run(tmp: Path, devices: int) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    module = make_module("marble")
    evaluators = [
        # 9 images: 5 on rank 0, 4 on rank 1, in chunks of 2
        RewardEvalCallback(
            HELDOUT, every_n_steps=1, images_per_prompt=3, batch_size=2, log_images=False
        ),
        # 1 image: rank 1 has none and still takes part in the sync
        RewardEvalCallback(["a green dog"], every_n_steps=1, seed=9, log_images=False),
    ]
    trainer = Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*evaluators, _Dump(tmp, evaluators)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the same global batch of 4 prompts: 2 per rank, or 4 in one process
        trainer.fit(module, datamodule=PromptDataModule(PROMPTS, prompts_per_step=4 // devices))
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(devices)]


def _same(a: object, b: object) -> bool:
    return a == b or (
        isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    )


def _close(a: object, b: object, rel: float) -> bool:
    if not isinstance(a, float):
        return a == b
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=1e-7)


def test_two_ranks_evaluate_like_one_process(tmp_path: Path) -> None:
    rank0, rank1 = _run(tmp_path / "ddp", devices=2)
    (one,) = _run(tmp_path / "single", devices=1)
    # identical numbers on both ranks (the metric states are summed in the same order)
    assert rank0["metrics"] == rank1["metrics"]
    for mine, theirs in zip(rank0["history"], rank1["history"]):
        for a, b in zip(mine, theirs):
            assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a), (a, b)
    for which, (mine, ref) in enumerate(zip(rank0["history"], one["history"])):
        assert [(e["adapter"], e["step"]) for e in mine] == [("base", 0), ("policy", 1)]
        for got, want in zip(mine, ref):
            assert got.keys() == want.keys()
            for key, value in want.items():
                # the base evaluation is the same model on both sides; the policy went through
                # one DDP step (gradients reduced across ranks: float rounding)
                rel = 1e-6 if got["adapter"] == "base" else 1e-4
                assert _close(got[key], value, rel), (which, got["adapter"], key, got[key], value)
    assert rank0["metrics"].keys() == one["metrics"].keys()
    for key, value in one["metrics"].items():
        assert _close(rank0["metrics"][key], value, 1e-4), key
    # per-image scores are rank-local: rank r holds images r, r + 2, ... of the single process
    for which in range(2):
        for evaluation in range(2):
            full = one["samples"][which][evaluation]
            for rank, dump in enumerate((rank0, rank1)):
                local = dump["samples"][which][evaluation]
                assert local.shape == full[rank::2].shape
                torch.testing.assert_close(
                    local, full[rank::2], rtol=1e-4, atol=1e-6, equal_nan=True
                )


def _forwards_per_evaluation(module, evaluator: RewardEvalCallback) -> list[int]:
    """Counts ``module.backbone.velocity`` calls inside each ``evaluator.evaluate``; the returned
    list gets one count per evaluation."""
    calls: list[int] = []
    inner_velocity, inner_evaluate = module.backbone.velocity, evaluator.evaluate

    def velocity(*args, **kwargs):
        calls[-1] += 1
        return inner_velocity(*args, **kwargs)

    def evaluate(*args, **kwargs):
        calls.append(0)
        module.backbone.velocity = velocity
        try:
            return inner_evaluate(*args, **kwargs)
        finally:
            module.backbone.velocity = inner_velocity

    evaluator.evaluate = evaluate
    return calls


def test_evaluation_sampler_steps_are_set_apart_from_the_rollouts() -> None:
    """``RewardEvalCallback(sample_steps=5)`` samples the held-out images with 5 steps while the
    rollouts keep the module's 2: its per-image scores are those of ``sample(..., steps=5)``."""
    module = make_module("marble", sample_steps=2)
    evaluator = RewardEvalCallback(
        HELDOUT, every_n_steps=10, seed=3, images_per_prompt=2, log_images=False, sample_steps=5
    )
    calls = _forwards_per_evaluation(module, evaluator)
    fit(module, max_steps=1, callbacks=[evaluator])
    assert calls == [5, 5]  # one batch of 6 held-out images, before and after training
    prompts = [p for p in HELDOUT for _ in range(2)]
    seeds = [3 + c for _ in HELDOUT for c in range(2)]

    def scores(steps: int) -> torch.Tensor:
        images = module.sample(prompts, seed=seeds, adapter="base", steps=steps)
        scored = module.rewards(images, prompts)
        return torch.where(scored.mask, scored.values.double(), torch.nan)

    base = evaluator.samples[0]
    assert torch.allclose(base, scores(5), atol=1e-6, equal_nan=True)
    assert not torch.allclose(base, scores(2), atol=1e-4, equal_nan=True)


def test_the_module_eval_sample_steps_is_the_callbacks_default() -> None:
    module = make_module("marble", sample_steps=2, eval_sample_steps=3)
    evaluator = RewardEvalCallback(HELDOUT, every_n_steps=10, seed=3, log_images=False)
    calls = _forwards_per_evaluation(module, evaluator)
    fit(module, max_steps=1, callbacks=[evaluator])
    assert calls == [3, 3]
    with pytest.raises(ValueError, match="sample_steps"):
        RewardEvalCallback(HELDOUT, sample_steps=0)
    with pytest.raises(ValueError, match="eval_sample_steps"):
        make_module("marble", eval_sample_steps=0)
