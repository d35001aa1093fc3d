"""Two CPU ranks (gloo, ``ddp_fork`` in-process) against one process over the same global batch."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from marble_lightning.callbacks import (
    EMACoefficientCallback,
    HarmonizationCallback,
    RewardEvalCallback,
)
from marble_lightning.data import PromptDataModule
from marble_lightning.testing import PROMPTS, make_module

torch.set_num_threads(1)


class _DumpState(Callback):
    """Each rank writes its final adapters, alpha and history to ``<dir>/rank<r>.pt``."""

    def __init__(self, directory: Path, evaluator: RewardEvalCallback) -> None:
        self.directory = directory
        self.evaluator = evaluator

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {
                "policy": [p.detach().cpu().clone() for p in pl_module.trainable_parameters],
                "old": [p.detach().cpu().clone() for p in pl_module.old_parameters],
                "alpha": pl_module.current_alpha.clone(),
                "alpha_history": [r["alpha"] for r in pl_module.history],
                "rewards": [r["reward/red_mean"] for r in pl_module.history],
                "tracker": pl_module.tracker.state_dict(),
                "eval": self.evaluator.history,
                "norms": pl_module.cached_norms
                if pl_module.cached_norms is None
                else pl_module.cached_norms.clone(),
            },
            self.directory / f"rank{trainer.global_rank}.pt",
        )


def _run(tmp: Path, devices: int, prompts_per_step: int, mode: str) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    module = make_module(
        mode, kl_weight=0.05, old_policy={"start": 1, "rate": 0.3, "max_decay": 0.5}
    )
    evaluator = RewardEvalCallback(
        ["a green dog", "red house", "small box"], every_n_steps=2, images_per_prompt=3
    )
    callbacks = [evaluator, _DumpState(tmp, evaluator)]
    if mode == "amortized":
        callbacks += [HarmonizationCallback(refresh_every=2), EMACoefficientCallback(decay=0.5)]
    trainer = Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=PromptDataModule(PROMPTS, prompts_per_step=prompts_per_step))
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(devices)]


@pytest.mark.parametrize("mode", ["marble", "amortized", "weighted_sum"])
def test_two_ranks_agree_and_match_one_process(tmp_path, mode):
    two = _run(tmp_path / "ddp", devices=2, prompts_per_step=2, mode=mode)
    one = _run(tmp_path / "single", devices=1, prompts_per_step=4, mode=mode)[0]
    rank0, rank1 = two
    # identical on both ranks (bitwise: the same reduced gradients and the same QP)
    assert rank0["alpha_history"] == rank1["alpha_history"]
    assert rank0["tracker"] == rank1["tracker"]
    for a, b in zip(rank0["policy"] + rank0["old"], rank1["policy"] + rank1["old"]):
        assert torch.equal(a, b)
    # equal, to float tolerance, to one process over the same global batch of 4 prompts
    torch.testing.assert_close(rank0["alpha"], one["alpha"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        torch.tensor(rank0["alpha_history"]),
        torch.tensor(one["alpha_history"]),
        rtol=1e-4,
        atol=1e-5,
    )
    if mode != "weighted_sum":
        torch.testing.assert_close(rank0["norms"], one["norms"], rtol=1e-4, atol=1e-7)
    assert rank0["rewards"] == pytest.approx(one["rewards"], rel=1e-6)
    assert rank0["tracker"]["history"].keys() == one["tracker"]["history"].keys()
    for a, b in zip(rank0["policy"] + rank0["old"], one["policy"] + one["old"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6)
    # held-out evaluation split over the ranks (9 images: 5 + 4) equals the single-process one
    assert rank0["eval"] == rank1["eval"]
    assert [(e["adapter"], e["step"]) for e in rank0["eval"]] == [
        ("base", 0),
        ("policy", 2),
    ]  # the final one runs at fit end, after this dump
    for mine, ref in zip(rank0["eval"], one["eval"]):
        for key in ("eval/red", "eval/green", "eval/dark"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-4), key
