"""Under DDP (2 gloo ranks), every Gram engine gives the Gram matrix and alpha of the ``backward``
engine."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from marble_lightning.data import PromptDataModule
from marble_lightning.testing import PROMPTS, make_module

torch.set_num_threads(1)


class _DumpGram(Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.grams: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.grams.append(pl_module.coefficients.gram.clone())

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {
                "grams": self.grams,
                "alpha": [r["alpha"] for r in pl_module.history],
                "policy": [p.detach().cpu().clone() for p in pl_module.trainable_parameters],
            },
            self.directory / f"rank{trainer.global_rank}.pt",
        )


def _run(tmp: Path, gram: str) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    # train_timesteps=None: both sampler timesteps are accumulated; a_max=0.5 clamps some samples
    module = make_module("marble", gram=gram, a_max=0.5, kl_weight=0.05)
    trainer = Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_DumpGram(tmp)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=PromptDataModule(PROMPTS, prompts_per_step=2))
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("gram", ["batched", "per_sample"])
def test_engines_match_backward_under_ddp(tmp_path: Path, gram: str) -> None:
    reference = _run(tmp_path / "backward", "backward")
    fast = _run(tmp_path / gram, gram)
    for rank in range(2):
        assert len(fast[rank]["grams"]) == 2
        for g_fast, g_ref in zip(fast[rank]["grams"], reference[rank]["grams"]):
            assert g_ref.abs().max() > 0
            torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(
            torch.tensor(fast[rank]["alpha"]),
            torch.tensor(reference[rank]["alpha"]),
            rtol=1e-4,
            atol=1e-6,
        )
    # both ranks hold the same reduced Gram matrix
    for a, b in zip(fast[0]["grams"], fast[1]["grams"]):
        assert torch.equal(a, b)
