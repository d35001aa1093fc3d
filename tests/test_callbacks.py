"""HarmonizationCallback, EMACoefficientCallback and RewardEvalCallback on the tiny module."""

from __future__ import annotations

import math

import pytest
import torch

from marble_lightning.callbacks import (
    EMACoefficientCallback,
    HarmonizationCallback,
    RewardEvalCallback,
)
from marble_lightning.testing import ChannelMean, Darkness, fit, make_module

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: HarmonizationCallback(refresh_every=0), "refresh_every"),
        (lambda: HarmonizationCallback(refresh_every=2.5), "refresh_every"),
        (lambda: HarmonizationCallback(uniform_after=-1), "uniform_after"),
        (lambda: EMACoefficientCallback(decay=1.0), "decay"),
        (lambda: EMACoefficientCallback(decay=-0.1), "decay"),
        (lambda: EMACoefficientCallback(decay=True), "decay"),
        (lambda: RewardEvalCallback(["a"], every_n_steps=0), "every_n_steps"),
        (lambda: RewardEvalCallback(["a"], images_per_prompt=0), "images_per_prompt"),
        (lambda: RewardEvalCallback([]), "empty"),
    ],
)
def test_arguments_are_validated(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="prompts"):
        RewardEvalCallback(5)
    with pytest.raises(TypeError, match="MarbleDiffusionModule"):
        from lightning.pytorch.demos.boring_classes import BoringModel

        fit(BoringModel(), max_steps=1, callbacks=[EMACoefficientCallback()])


def test_trainer_checks_in_setup(tmp_path):
    with pytest.raises(ValueError, match="weighted_sum"):
        fit(make_module("weighted_sum"), max_steps=1, callbacks=[HarmonizationCallback()])
    with pytest.raises(ValueError, match="'fixed'"):
        fit(make_module("fixed"), max_steps=1, callbacks=[EMACoefficientCallback()])
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        fit(
            make_module("marble"),
            max_steps=1,
            callbacks=[RewardEvalCallback(str(tmp_path / "nothere.txt"))],
        )


def test_refresh_schedule_and_uniform_stage():
    module = make_module("amortized")
    fit(module, max_steps=5, callbacks=[HarmonizationCallback(refresh_every=2, uniform_after=3)])
    assert module.hparams["refresh_every"] == 2 and module.hparams["uniform_after"] == 3
    assert [r["refresh"] for r in module.history] == [True, False, True, False, True]
    assert module.coefficients.uniform
    names = module.reward_names
    # uniform over the rewards kept at the latest refresh (a reward absent from the batch has a
    # zero gradient and is dropped, e.g. "green" when no prompt contains the word)
    for step, refresh_step in ((3, 2), (4, 4)):
        norms = torch.tensor([module.history[refresh_step][f"norm/{n}"] for n in names])
        kept = (norms > 0).double()
        torch.testing.assert_close(
            torch.tensor(module.history[step]["alpha"], dtype=torch.float64), kept / kept.sum()
        )
        assert kept.sum() >= 2  # not a degenerate one-hot: at least two rewards share alpha
    # before the uniform stage, refresh steps use the QP's alpha* (not uniform here)
    assert module.history[0]["alpha"] != pytest.approx([1 / 3] * 3)


def test_ema_of_coefficients():
    module = make_module("amortized")
    ema = EMACoefficientCallback(decay=0.5)
    fit(module, max_steps=5, callbacks=[HarmonizationCallback(refresh_every=2), ema])
    alpha = [torch.tensor(r["alpha"], dtype=torch.float64) for r in module.history]
    a0, a2, a4 = alpha[0], alpha[2], alpha[4]  # refresh steps use alpha* itself
    torch.testing.assert_close(alpha[1], a0)  # initialised with the first alpha*
    torch.testing.assert_close(alpha[3], 0.5 * a0 + 0.5 * a2)
    torch.testing.assert_close(ema.alpha_ema, 0.25 * a0 + 0.25 * a2 + 0.5 * a4)
    torch.testing.assert_close(module.current_alpha, ema.alpha_ema)
    assert module.coefficients.smoother is None  # removed at teardown
    clone = EMACoefficientCallback(decay=0.5)
    clone.load_state_dict(ema.state_dict())
    torch.testing.assert_close(clone.alpha_ema, ema.alpha_ema)
    assert clone.updates == ema.updates == 3


def test_reward_eval_callback(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    prompts = ["a green dog", "red house", "small box"]
    module = make_module("marble")
    callback = RewardEvalCallback(
        prompts, every_n_steps=1, seed=5, images_per_prompt=2, batch_size=4
    )
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(module, max_steps=2, callbacks=[callback], logger=logger, log_every_n_steps=1)
    assert [(e["adapter"], e["step"]) for e in callback.history] == [
        ("base", 0),
        ("policy", 1),
        ("policy", 2),
    ]

    def expected(adapter: str) -> dict[str, float]:
        repeated = [p for p in prompts for _ in range(2)]
        images = module.sample(repeated, seed=[5, 6] * 3, adapter=adapter)
        red = images[:, 0].mean(dim=(1, 2))
        green = images[:2, 1].mean(dim=(1, 2))  # only "a green dog" has the word green
        dark = 1 - images.mean(dim=(1, 2, 3))
        return {
            "eval/red": float(red.mean()),
            "eval/green": float(green.mean()),
            "eval/dark": float(dark.mean()),
        }

    for adapter, entry in (("base", callback.history[0]), ("policy", callback.history[-1])):
        for key, value in expected(adapter).items():
            assert entry[key] == pytest.approx(value, rel=1e-5), (adapter, key)
        assert entry["eval/mean"] == pytest.approx(
            (entry["eval/red"] + entry["eval/green"] + entry["eval/dark"]) / 3
        )
    assert callback.last_images is not None and callback.last_images.shape == (6, 3, 8, 8)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert (
        "eval/images" in events.Tags()["images"] and "eval/images_base" in events.Tags()["images"]
    )
    assert "eval/red" in events.Tags()["scalars"] and "eval/red_base" in events.Tags()["scalars"]
    logged = set(events.Tags()["scalars"])
    expected_keys = {
        "reward/red_mean",
        "reward/green_std",
        "alpha/red",
        "alpha/dark",
        "loss/nft",
        "loss/kl",
    }
    expected_keys |= {"time/sampling", "time/rewards", "time/backward", "time/qp", "grad/norm"}
    expected_keys |= {"norm/red", "cos/red", "cos/worst", "gram/red_dark", "gram/dark_dark"}
    assert expected_keys <= logged, expected_keys - logged

    restored = RewardEvalCallback(prompts)
    restored.load_state_dict(callback.state_dict())
    assert restored.history == callback.history


def test_reward_eval_with_its_own_rewards_and_no_applicable_samples():
    module = make_module("marble")
    rewards = [Darkness("dark2"), ChannelMean(2, "blue", keyword="blue")]
    callback = RewardEvalCallback(["small box"], every_n_steps=5, rewards=rewards, log_images=False)
    fit(module, max_steps=1, callbacks=[callback])
    entry = callback.history[-1]
    assert set(entry) >= {"eval/dark2", "eval/blue", "eval/mean"}
    assert math.isnan(entry["eval/blue"])  # applies to no held-out sample
    assert entry["eval/mean"] == pytest.approx(entry["eval/dark2"])
    # images are kept for the run report even when not logged; per-image scores are recorded
    assert callback.last_images is not None and callback.last_images.shape[0] == 1
    scores = callback.samples[-1]
    assert scores.shape == (1, 2) and math.isnan(float(scores[0, 1]))
    assert float(scores[0, 0]) == pytest.approx(entry["eval/dark2"])
    assert math.isnan(entry["eval/dark2_sem"])  # one image: no standard error


def test_reward_eval_extra_rewards_are_scored_not_trained():
    module = make_module("marble")
    extra = [ChannelMean(1, "green2")]
    callback = RewardEvalCallback(
        ["a green dog", "red house"], every_n_steps=5, extra_rewards=extra, log_images=False
    )
    fit(module, max_steps=1, callbacks=[callback])
    assert module.reward_names == ["red", "green", "dark"] and callback.names == [
        "red",
        "green",
        "dark",
        "green2",
    ]
    entry = callback.history[-1]
    images = module.sample(["a green dog", "red house"], seed=[0, 0], adapter="policy")
    assert entry["eval/green2"] == pytest.approx(float(images[:, 1].mean()), rel=1e-5)
    main = [entry[f"eval/{n}"] for n in ("red", "green", "dark")]
    assert entry["eval/mean"] == pytest.approx(sum(main) / 3)  # extra rewards stay out of the mean
    assert callback.samples[-1].shape == (2, 4)
    with pytest.raises(ValueError, match="green"):
        fit(
            make_module("marble"),
            max_steps=1,
            callbacks=[RewardEvalCallback(["a"], extra_rewards=[ChannelMean(1, "green")])],
        )


def test_refresh_period_has_one_source_of_truth():
    """A module refresh_every that differs from the callback's fails before training."""
    module = make_module("amortized", refresh_every=3)
    with pytest.raises(ValueError, match=r"refresh_every=2.*refresh_every=3"):
        fit(module, max_steps=1, callbacks=[HarmonizationCallback(refresh_every=2)])
    assert module.step_index == 0
