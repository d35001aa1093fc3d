"""Lightning's own loops and plugins: validate / test / predict from the CLI, self-describing
checkpoints, optimizer and scheduler from the config (resumed exactly), precision plugins."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.plugins import MixedPrecision

from marble_lightning.cli import main
from marble_lightning.module import MarbleDiffusionModule
from marble_lightning.testing import PROMPTS, fit, make_module

HELDOUT = PROMPTS[:3]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _config(tmp_path: Path, **model: object) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 3,
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "logger": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
                }
            ],
        },
        "model": {
            "backbone": {"class_path": "marble_lightning.testing.TinySD3Backbone"},
            "rewards": [
                {
                    "class_path": "marble_lightning.testing.ChannelMean",
                    "init_args": {"channel": 0, "name": "red"},
                },
                {"class_path": "marble_lightning.testing.Darkness", "init_args": {"name": "dark"}},
            ],
            "mode": "amortized",
            "group_size": 2,
            "sample_steps": 2,
            "lora_rank": 2,
            "lora_alpha": 4,
            "rollout_precision": "float32",
            **model,
        },
        "data": {
            "train_prompts": PROMPTS,
            "prompts_per_step": 2,
            "heldout_prompts": HELDOUT,
            "eval_images_per_prompt": 2,
            "eval_batch_size": 4,
        },
    }
    path = (
        tmp_path / "input" / "config.yaml"
    )  # not the root: the CLI saves its own config.yaml there
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _run(*args: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code in (0, None)


def _cli(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as exit_info:
        assert exit_info.code in (0, None), exit_info.code


def test_validate_test_predict_from_the_cli(tmp_path: Path, capsys) -> None:
    config = _config(tmp_path)
    _cli("fit", "--config", str(config))
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    capsys.readouterr()
    _cli("validate", "--config", str(config), "--ckpt_path", str(ckpt))
    printed = capsys.readouterr().out
    for name in ("eval/red", "eval/dark", "eval/mean", "eval/red_sem"):
        assert name in printed
    _cli("test", "--config", str(config), "--ckpt_path", str(ckpt))
    assert "test/mean" in capsys.readouterr().out
    out = tmp_path / "predictions"
    # a process of its own, as a user runs it (one LightningCLI per process)
    proc = subprocess.run(
        [sys.executable, "-m", "marble_lightning", "predict", "--config", str(config),
         "--ckpt_path", str(ckpt), "--trainer.callbacks+=marble_lightning.evaluation.ImageWriter",
         f"--trainer.callbacks.output_dir={out}"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(HELDOUT) * 2
    rows = list(csv.DictReader((out / "rewards_rank0.csv").open()))
    assert [r["file"] for r in rows] == [p.name for p in pngs]
    assert {r["prompt"] for r in rows} == set(HELDOUT)
    assert all(math.isfinite(float(r["red"])) for r in rows)


def test_validation_equals_an_independent_evaluation(tmp_path: Path) -> None:
    """The logged means are the masked means of the module's own images and rewards."""
    from marble_lightning.data import PromptDataModule

    module = make_module("amortized")
    data = PromptDataModule(
        PROMPTS, 2, heldout_prompts=HELDOUT, eval_images_per_prompt=2, eval_batch_size=4
    )
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    result = trainer.validate(module, datamodule=data)[0]
    prompts = [p for p in HELDOUT for _ in range(2)]
    seeds = [1000 + c for _ in HELDOUT for c in range(2)]
    images = module.sample(prompts, seed=seeds)
    scored = module.rewards(images, prompts)
    for k, name in enumerate(module.reward_names):
        mask = scored.mask[:, k]
        if mask.any():
            assert result[f"eval/{name}"] == pytest.approx(
                float(scored.values[mask, k].double().mean()), rel=1e-6
            )
    finite = [result[f"eval/{n}"] for n in module.reward_names if f"eval/{n}" in result]
    assert result["eval/mean"] == pytest.approx(
        sum(finite) / len(finite), rel=1e-6
    )  # logged as float32


def test_validate_test_and_forward_sample_with_eval_sample_steps() -> None:
    """``eval_sample_steps`` sets the evaluation's sampler apart from the rollouts'."""
    from marble_lightning.data import PromptDataModule

    module = make_module("amortized", sample_steps=2, eval_sample_steps=4)
    data = PromptDataModule(PROMPTS, 2, heldout_prompts=HELDOUT, eval_batch_size=8)
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    result = trainer.test(module, datamodule=data)[0]
    seeds = [1000] * len(HELDOUT)
    for steps, expected in ((4, True), (2, False)):
        scored = module.rewards(module.sample(HELDOUT, seed=seeds, steps=steps), HELDOUT)
        name = module.reward_names[0]
        mean = float(scored.values[scored.mask[:, 0], 0].double().mean())
        assert (result[f"test/{name}"] == pytest.approx(mean, rel=1e-6)) is expected
    assert torch.equal(module(HELDOUT, seed=seeds), module.sample(HELDOUT, seed=seeds, steps=4))


def test_load_from_checkpoint_without_arguments(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _cli("fit", "--config", str(config))
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    with _no_key_noise():
        loaded = MarbleDiffusionModule.load_from_checkpoint(ckpt)
    stored = torch.load(ckpt, weights_only=True)
    assert loaded.step_index == 3 and loaded.reward_names == ["red", "dark"]
    assert loaded.hparams["lora_rank"] == 2
    for key, value in stored["state_dict"].items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # the same images as a module rebuilt by hand and loaded with Lightning's trainer
    again = MarbleDiffusionModule.load_from_checkpoint(ckpt)
    assert torch.equal(loaded.sample(["a red dog"], seed=1), again.sample(["a red dog"], seed=1))


class _no_key_noise:
    """No "keys not in the checkpoint" warnings while loading."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        noisy = [str(w.message) for w in self.records if "key" in str(w.message).lower()]
        assert not noisy, noisy[:3]


def test_optimizer_and_cosine_schedule_from_the_config_resume_exactly(tmp_path: Path) -> None:
    sched = {
        "class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
        "init_args": {"T_max": 4, "eta_min": 1e-4},
    }
    opt = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}}
    full = tmp_path / "full"
    full.mkdir()
    config = _config(full, optimizer=opt, lr_scheduler=sched)
    _cli("fit", "--config", str(config), "--trainer.max_steps=4")
    end = torch.load(full / "ckpt" / "last.ckpt", weights_only=True)
    lr = end["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-4 + (0.01 - 1e-4) * (1 + math.cos(math.pi * 4 / 4)) / 2)
    assert end["optimizer_states"][0]["param_groups"][0]["momentum"] == 0.9
    # interrupted after 2 steps, resumed to 4: identical adapters and optimizer state
    part = tmp_path / "part"
    part.mkdir()
    config = _config(part, optimizer=opt, lr_scheduler=sched)
    _cli("fit", "--config", str(config), "--trainer.max_steps=2")
    _cli(
        "fit",
        "--config",
        str(config),
        "--trainer.max_steps=4",
        "--ckpt_path",
        str(part / "ckpt" / "last.ckpt"),
    )
    resumed = torch.load(part / "ckpt" / "last.ckpt", weights_only=True)
    for key, value in end["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert resumed["lr_schedulers"][0]["last_epoch"] == end["lr_schedulers"][0]["last_epoch"] == 4
    assert resumed["optimizer_states"][0]["param_groups"][0]["lr"] == lr


@pytest.mark.parametrize(
    "precision",
    [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu")), "bf16-mixed", "16-true"],
)
def test_precision_plugins_are_rejected_at_setup(precision) -> None:
    module = make_module("marble")
    before = [p.detach().clone() for p in module.trainable_parameters]
    kwargs = (
        {"plugins": [precision]}
        if isinstance(precision, MixedPrecision)
        else {"precision": precision}
    )
    with pytest.raises(ValueError, match=r"not supported.*32-true.*rollout_precision"):
        fit(module, max_steps=1, **kwargs)
    assert module.step_index == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.trainable_parameters))
