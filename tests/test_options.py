"""HarmonizationOptions: groups, preferences, floor, reward dropout and reward EMA normalisation,
against independent computations; defaults change nothing; resume is bit-exact; 2 DDP ranks
agree."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from marble_lightning.advantages import PerPromptStatTracker
from marble_lightning.data import PromptDataModule
from marble_lightning.harmonize import harmonize_gram, harmonize_groups_gram
from marble_lightning.options import HarmonizationOptions
from marble_lightning.seeding import stable_seed
from marble_lightning.testing import PROMPTS, fit, make_module

torch.set_num_threads(1)

NAMES = ["red", "green", "dark"]
FULL = dict(
    groups={"colour": ["red", "green"]},
    member_weights={"red": 2.0},
    preference={"colour": 1.5},
    alpha_floor=0.1,
    reward_dropout={"dark": 0.4, "green": 0.3},
    dropout_warmup=2,
    reward_ema=0.7,
)


# ---------------------------------------------------------------- resolution


def test_resolve_indexes_groups_and_defaults() -> None:
    r = HarmonizationOptions(**FULL).resolve(NAMES)
    assert r.groups == [[0, 1], [2]] and r.labels == ["colour", "dark"]
    assert r.member_weights == [2.0, 1.0, 1.0] and r.preference == [1.5, 1.0]
    assert r.changes_qp
    assert not HarmonizationOptions().resolve(NAMES).changes_qp
    assert not HarmonizationOptions(reward_ema=0.9).resolve(NAMES).changes_qp


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(groups={"g": ["red", "blue"]}), "unknown reward 'blue'"),
        (dict(groups={"a": ["red", "green"], "b": ["green"]}), "more than one group"),
        (dict(groups={"g": []}), "empty"),
        (dict(preference={"nope": 2.0}), "neither a group"),
        (dict(preference={"red": 0.0}), "preference"),
        (dict(alpha_floor=0.4), r"infeasible.*3 \* alpha_floor <= 1"),
        (dict(groups={"g": ["red", "green"]}, alpha_floor=0.6), r"2 \* alpha_floor"),
        (dict(reward_dropout={"red": 1.0}), "reward_dropout"),
        (dict(reward_dropout=-0.1), "reward_dropout"),
        (dict(dropout_warmup=-1), "dropout_warmup"),
        (dict(reward_ema=1.0), "reward_ema"),
    ],
)
def test_resolve_rejects(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        HarmonizationOptions(**options).resolve(NAMES)


def test_qp_options_need_a_marble_mode() -> None:
    with pytest.raises(ValueError, match="MARBLE modes"):
        make_module("weighted_sum", harmonization=HarmonizationOptions(alpha_floor=0.1))
    module = make_module("weighted_sum", harmonization={"reward_ema": 0.5})  # EMA applies to all
    assert module.tracker.reward_ema == 0.5 and module.updater.harmonization is None
    assert module.hparams["harmonization"]["reward_ema"] == 0.5  # stored as a plain dict


# ---------------------------------------------------------------- dropout


def test_dropout_mask_is_keyed_ramped_and_never_empty() -> None:
    r = HarmonizationOptions(reward_dropout={"red": 0.5, "dark": 0.9}, dropout_warmup=4).resolve(
        NAMES
    )
    assert r.dropout_probabilities(0) == [0.0, 0.0, 0.0]
    assert r.dropout_probabilities(2) == [0.25, 0.0, 0.45]
    assert r.dropout_probabilities(10) == [0.5, 0.0, 0.9]
    for step in range(40):
        mask = r.dropout_mask(step=step, update=0, seed=7)
        # independent recomputation of the keyed draw
        gen = torch.Generator().manual_seed(stable_seed(7, "reward_dropout", step, 0))
        draws = torch.rand(3, generator=gen, dtype=torch.float64)
        probs = torch.tensor(r.dropout_probabilities(step), dtype=torch.float64)
        expected = draws < probs
        if expected.all():
            expected[int(torch.argmax(draws - probs))] = False
        assert torch.equal(mask, expected)
        assert not mask[1]  # probability 0 is never dropped
        assert torch.equal(mask, r.dropout_mask(step=step, update=0, seed=7))  # same on every call
    everything = HarmonizationOptions(reward_dropout=0.99).resolve(NAMES)
    for step in range(20):
        assert not everything.dropout_mask(step=step, update=0, seed=0).all()
    rate = np.mean([r.dropout_mask(step=s, update=0, seed=1)[2].item() for s in range(4, 404)])
    assert rate == pytest.approx(0.9, abs=0.05)


def test_dropout_before_the_qp_equals_the_qp_without_the_reward() -> None:
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 5))
    gram = torch.from_numpy(g @ g.T)
    r = HarmonizationOptions(reward_dropout={"green": 0.5}).resolve(NAMES)
    step = next(s for s in range(100) if r.dropout_mask(step=s, update=0, seed=3)[1])
    h = r.harmonize(gram, step=step, update=0, seed=3)
    kept = [0, 2]
    sub = harmonize_gram(gram[kept][:, kept])
    assert h.dropped.tolist() == [False, True, False]
    torch.testing.assert_close(h.alpha[kept], sub.alpha)
    torch.testing.assert_close(h.weights[kept], sub.weights)
    # groups / floor go through harmonize_groups_gram
    r2 = HarmonizationOptions(groups={"colour": ["red", "green"]}, alpha_floor=0.2).resolve(NAMES)
    torch.testing.assert_close(
        r2.harmonize(gram, step=0, update=0, seed=0).alpha,
        harmonize_groups_gram(gram, groups=[[0, 1], [2]], floor=0.2).alpha,
    )


# ---------------------------------------------------------------- reward EMA normalisation


def test_reward_ema_matches_an_independent_computation_and_resumes() -> None:
    rng = np.random.default_rng(0)
    tracker = PerPromptStatTracker(2)
    tracker.reward_ema = 0.8
    mean = var = None
    batches = []
    for i in range(5):
        values = rng.normal([3.0, -1.0], [2.0, 0.5], size=(6, 2))
        mask = np.ones((6, 2), dtype=bool)
        if i == 0:
            mask[:, 1] = False  # reward 1 first seen at batch 1
        mask[i, 0] = False
        batches.append((values, mask))
    seen = np.zeros(2, dtype=bool)
    mean, var = np.zeros(2), np.zeros(2)
    for i, (values, mask) in enumerate(batches):
        if i == 3:  # checkpoint round trip half-way
            restored = PerPromptStatTracker(2)
            restored.reward_ema = 0.8
            restored.load_state_dict(tracker.state_dict())
            tracker = restored
        out = tracker.normalize_rewards(torch.from_numpy(values), torch.from_numpy(mask))
        for k in range(2):
            col = values[mask[:, k], k]
            if col.size == 0:
                continue
            m, v = col.mean(), col.var()
            if not seen[k]:
                mean[k], var[k], seen[k] = m, v, True
            else:
                mean[k], var[k] = 0.8 * mean[k] + 0.2 * m, 0.8 * var[k] + 0.2 * v
        expected = np.where(mask, (values - mean) / (np.sqrt(var) + tracker.eps), 0.0)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    off = PerPromptStatTracker(2)
    x = torch.randn(3, 2)
    assert off.normalize_rewards(x, torch.ones(3, 2, dtype=torch.bool)) is x
    assert "reward_ema" not in off.state_dict()  # default state unchanged


# ---------------------------------------------------------------- in the module


def _params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.trainable_parameters + module.old_parameters]


def test_defaults_are_bit_identical_to_no_options() -> None:
    plain = make_module("marble")
    fit(plain, max_steps=2)
    default = make_module("marble", harmonization=HarmonizationOptions())
    fit(default, max_steps=2)
    assert default.updater.harmonization is None and default.tracker.reward_ema is None
    for a, b in zip(_params(plain), _params(default)):
        assert torch.equal(a, b)
    assert plain.history == default.history


def test_options_change_the_run_and_resume_bit_exactly(tmp_path) -> None:
    opts = dict(FULL, dropout_warmup=1)
    straight = make_module("marble", harmonization=HarmonizationOptions(**opts))
    fit(straight, max_steps=4)
    alphas = [r["alpha"] for r in straight.history]
    assert any(a[2] == 0.0 for a in alphas[1:]) or any(a[1] == 0.0 for a in alphas[1:])  # a dropout

    first = make_module("marble", harmonization=HarmonizationOptions(**opts))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
    fit(first, max_steps=2, callbacks=[ckpt], enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "reward_ema" in saved["marble"]["tracker"]
    second = make_module("marble", harmonization=HarmonizationOptions(**opts))
    fit(second, max_steps=4, ckpt_path=str(tmp_path / "last.ckpt"))
    for a, b in zip(_params(straight), _params(second)):
        assert torch.equal(a, b)
    assert [r["alpha"] for r in second.history] == alphas
    assert second.tracker.state_dict() == straight.tracker.state_dict()


class _Dump(Callback):
    def __init__(self, directory) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {"alpha": [r["alpha"] for r in pl_module.history],
             "policy": [p.detach().clone() for p in pl_module.trainable_parameters]},
            self.directory / f"rank{trainer.global_rank}.pt",
        )  # fmt: skip


@pytest.mark.slow
def test_two_ddp_ranks_agree(tmp_path) -> None:
    module = make_module(
        "marble", harmonization=HarmonizationOptions(**dict(FULL, dropout_warmup=0))
    )
    trainer = Trainer(
        max_steps=3, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[_Dump(tmp_path)],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=PromptDataModule(PROMPTS, prompts_per_step=2))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["alpha"] == r1["alpha"]
    assert all(math.isfinite(a) for row in r0["alpha"] for a in row)
    for a, b in zip(r0["policy"], r1["policy"]):
        assert torch.equal(a, b)
