"""MarbleDiffusionModule on a tiny SD3 transformer: the update direction against independent
per-reward gradients, every mode end to end, the old policy, sampling and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from marble_lightning.harmonize import harmonize
from marble_lightning.module import MODES, MarbleDiffusionModule
from marble_lightning.nft import interpolation_coefficient
from marble_lightning.sampling import keyed_noise, training_timesteps
from marble_lightning.testing import (
    PROMPTS,
    TINY,
    ChannelMean,
    Darkness,
    NaNReward,
    TinySD3Backbone,
    WrongShapeReward,
    base_state,
    fit,
    lora_state,
    make_module,
    tiny_rewards,
)

torch.set_num_threads(1)


def _perturb(module: MarbleDiffusionModule, seed: int = 1) -> None:
    """Random policy and (different) old adapters, so policy != old != base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, q in zip(module.trainable_parameters, module.old_parameters):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
            q.copy_(p + 0.05 * torch.randn(p.shape, generator=gen))
    module.adapters.old_is_policy = False


def _independent_gradients(
    module: MarbleDiffusionModule, rollout, timesteps, beta: float, a_max: float, kl_weight: float
):
    """Per-reward and KL gradients written from the formulas (marble_lightning/nft.py), one
    autograd.grad per reward and timestep on a deep copy of the module."""
    twin = copy.deepcopy(module)
    params = twin.trainable_parameters
    k = twin.num_rewards
    x0 = rollout.x0
    b = x0.shape[0]
    r = rollout.r  # [K, B]
    cond = twin.backbone.encode_prompts(rollout.prompts)
    grads = torch.zeros(k, sum(p.numel() for p in params), dtype=torch.float64)
    kl_grad = torch.zeros(grads.shape[1], dtype=torch.float64)
    for j in timesteps:
        t = float(twin.time_grid()[j])
        eps = keyed_noise(
            rollout.prompts[:: twin.group_size],
            twin.group_size,
            twin.backbone.sample_shape,
            (twin.seed, "train", rollout.step, 0, j),
        )
        x_t = (1 - t) * x0 + t * eps
        tt = torch.full((b,), t)
        with torch.no_grad():
            with twin.using_adapter("old"):
                v_old = twin.backbone.velocity(x_t, tt, cond)
            with twin.using_adapter("base"):
                v_ref = twin.backbone.velocity(x_t, tt, cond)
        for kk in range(k + 1):
            v = twin.backbone.velocity(x_t, tt, cond)
            if kk == k:
                loss = kl_weight * ((v - v_ref) ** 2).mean()
            else:
                x0_pos = x_t - t * (beta * v + (1 - beta) * v_old)
                x0_neg = x_t - t * ((1 + beta) * v_old - beta * v)
                dims = (1, 2, 3)
                l_pos = ((x0_pos - x0) ** 2).mean(dims) / (x0_pos - x0).abs().mean(dims).clamp_min(
                    1e-5
                ).detach()
                l_neg = ((x0_neg - x0) ** 2).mean(dims) / (x0_neg - x0).abs().mean(dims).clamp_min(
                    1e-5
                ).detach()
                loss = a_max * (r[kk] * l_pos + (1 - r[kk]) * l_neg).mean() / beta
            g = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
            flat = torch.cat([x.reshape(-1) for x in g]).double() / len(timesteps)
            if kk == k:
                kl_grad += flat
            else:
                grads[kk] += flat
    return grads, kl_grad


@pytest.mark.parametrize("gram", ["backward", "batched", "per_sample"])
def test_refresh_direction_equals_harmonize_of_independent_gradients(gram):
    module = make_module("marble", sample_steps=3, beta=0.5, kl_weight=0.2, gram=gram)
    assert module.gram == gram
    _perturb(module)
    rollout = module.rollout(PROMPTS[:3], step=0)
    # the masked reward ("green") has r = 1/2 exactly where it does not apply
    green = module.reward_names.index("green")
    assert torch.all(rollout.r[green][~rollout.mask[:, green]] == 0.5)
    grads, kl_grad = _independent_gradients(
        module, rollout, [0, 1, 2], beta=0.5, a_max=5.0, kl_weight=0.2
    )
    result = module.compute_update(rollout, refresh=True)
    assert result.timesteps == [0, 1, 2]  # accumulation over 3 timesteps
    expected = harmonize(grads)
    torch.testing.assert_close(result.grads.double(), grads, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.alpha, expected.alpha, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.direction.double(), expected.direction, rtol=1e-4, atol=1e-7)
    # the KL gradient is separate (not harmonised) and non-zero here
    assert kl_grad.norm() > 1e-4
    torch.testing.assert_close(result.kl_grad.double(), kl_grad, rtol=1e-4, atol=1e-8)
    # the module caches what amortised steps need
    torch.testing.assert_close(module.cached_norms, grads.norm(dim=1), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(module.current_alpha, expected.alpha, rtol=1e-4, atol=1e-5)
    assert module.coefficients.gram.shape == (3, 3)
    # cosines: never negative for MARBLE (worst-reward cosine >= 0)
    assert float(result.cosines.min()) >= -1e-6


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_per_sample_refresh_with_old_equal_to_policy_and_kl(beta):
    """Old adapter == policy (first update, v_old = v): the per-sample engine uses grad L-_i =
    -grad L+_i; its K rows and the KL row match the independent gradients (policy != base)."""
    module = make_module("marble", sample_steps=3, beta=beta, kl_weight=0.2, gram="per_sample")
    assert module.gram == "per_sample"
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p, q in zip(module.trainable_parameters, module.old_parameters):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
            q.copy_(p)
    rollout = module.rollout(PROMPTS[:3], step=0)
    assert module.adapters.old_is_policy
    grads, kl_grad = _independent_gradients(
        module, rollout, [0, 1, 2], beta=beta, a_max=5.0, kl_weight=0.2
    )
    result = module.compute_update(rollout, refresh=True)
    assert grads.norm(dim=1).min() > 1e-4 and kl_grad.norm() > 1e-4
    torch.testing.assert_close(result.grads.double(), grads, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.kl_grad.double(), kl_grad, rtol=1e-4, atol=1e-8)


def test_train_timestep_subset_and_reuse_of_old_policy():
    """A random subset of the grid (same for the same step), and v_old = v when old == policy."""
    module = make_module("marble", sample_steps=4, train_timesteps=2)
    rollout = module.rollout(PROMPTS[:2], step=0)
    assert module.adapters.old_is_policy
    grads, _ = _independent_gradients(
        module, rollout, training_timesteps(module.seed, 0, 0, 4, 2), 1.0, 5.0, 0.0
    )
    result = module.compute_update(rollout, refresh=True)
    assert len(result.timesteps) == 2 and result.timesteps == training_timesteps(
        module.seed, 0, 0, 4, 2
    )
    torch.testing.assert_close(result.grads.double(), grads, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("aggregate", "gram"), [("r", "backward"), ("advantage", "backward"), ("r", "per_sample")]
)
def test_amortized_step_with_cached_weights_equals_refresh_direction(aggregate, gram):
    module = make_module("amortized", sample_steps=2, beta=0.7, aggregate=aggregate, gram=gram)
    _perturb(module, seed=3)
    rollout = module.rollout(PROMPTS[:4], step=0)
    clamp_active = bool(((rollout.advantages.abs() >= module.a_max) & rollout.mask).any())
    refresh = module.compute_update(rollout, refresh=True)
    amortized = module.compute_update(rollout, refresh=False)
    assert not amortized.refreshed and amortized.grads is None
    torch.testing.assert_close(amortized.weights, refresh.weights, rtol=1e-6, atol=1e-9)
    if aggregate == "r" or not clamp_active:
        torch.testing.assert_close(amortized.direction, refresh.direction, rtol=2e-4, atol=1e-7)


def test_fixed_mode_direction_is_the_fixed_combination_with_diagnostics():
    """fixed: one backward on W l(r_bar) equals sum_k alpha_k g_k; diagnostics give the g_k."""
    module = make_module("fixed", fixed_alpha=[0.2, 0.5, 0.3], beta=0.8)
    _perturb(module, seed=7)
    rollout = module.rollout(PROMPTS[:4], step=0)
    grads, _ = _independent_gradients(module, rollout, [0, 1], beta=0.8, a_max=5.0, kl_weight=0.0)
    result = module.compute_update(rollout, diagnostics=True)
    torch.testing.assert_close(result.grads.double(), grads, rtol=1e-4, atol=1e-7)
    combo = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64) @ grads
    torch.testing.assert_close(result.direction.double(), combo, rtol=1e-4, atol=1e-7)
    cos = (grads @ combo) / (grads.norm(dim=1) * combo.norm())
    # float32 gradients (per-sample engine by default): a near-zero cosine carries ~1e-6 abs error
    torch.testing.assert_close(result.cosines, cos, rtol=1e-4, atol=1e-5)
    assert result.metrics["cos/worst"] == pytest.approx(float(cos.min()), rel=1e-4, abs=1e-5)


def test_cfg_sampling_matches_the_guidance_formula():
    module = make_module("marble", cfg_scale=3.0)
    _perturb(module)
    prompts = ["a red cat", "small box"]
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = module.sample_latents(prompts, noise, steps=1)
    with torch.no_grad():
        t = torch.ones(2)
        v_c = module.backbone.velocity(noise, t, module.backbone.encode_prompts(prompts))
        v_u = module.backbone.velocity(noise, t, module.backbone.encode_prompts(["", ""]))
    torch.testing.assert_close(x, noise - (v_u + 3.0 * (v_c - v_u)), rtol=1e-5, atol=1e-6)
    plain = module.sample_latents(prompts, noise, steps=1, cfg_scale=1.0)
    torch.testing.assert_close(plain, noise - v_c, rtol=1e-5, atol=1e-6)


def test_several_updates_per_rollout():
    module = make_module("amortized", updates_per_rollout=2)
    trainer = fit(module, max_steps=4)
    assert trainer.global_step == 4 and module.step_index == 2  # 2 optimizer steps per rollout
    assert [r["refresh"] for r in module.history] == [True, False]
    assert [r["global_step"] for r in module.history] == [2, 4]


def test_weights_from_matches_harmonized_weights():
    g = torch.randn(4, 50, dtype=torch.float64)
    g[2] *= 10
    h = harmonize(g)
    w = MarbleDiffusionModule.weights_from(h.alpha, h.norms, h.dropped)
    torch.testing.assert_close(w, h.weights)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains(mode):
    module = make_module(mode, kl_weight=0.01, diagnostics_every=2 if mode != "marble" else None)
    lora_before = lora_state(module)
    base_before = base_state(module)
    fit(module, max_steps=3)
    assert module.step_index == 3 and len(module.history) == 3
    for record in module.history:
        assert math.isfinite(record["loss/nft"])
        assert len(record["alpha"]) == 3 and abs(sum(record["alpha"]) - 1) < 1e-6
    policy_after = [p.detach() for p in module.trainable_parameters]
    changed = max(float((a - b).abs().max()) for a, b in zip(lora_before, policy_after))
    assert changed > 1e-5
    for name, p in module.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(p, base_before[name]), name
    assert all(p.requires_grad for p in module.trainable_parameters)
    trainable = {id(p) for p in module.trainable_parameters}
    assert all(not p.requires_grad for p in module.parameters() if id(p) not in trainable)
    # default schedule: eta = 0 before step 75, so the old adapter is a copy of the policy
    for p, q in zip(module.trainable_parameters, module.old_parameters):
        assert torch.equal(p, q)
    if mode == "marble":
        assert all(r["refresh"] for r in module.history)
        for r in module.history:
            # a min-norm direction that is zero up to round-off (Pareto-stationary batch, e.g.
            # "red" and "dark" anti-parallel) has no meaningful cosine
            largest = max(r[f"norm/{n}"] for n in module.reward_names)
            if r["norm/direction"] > 1e-5 * largest:
                assert r["cos/worst"] >= -1e-6, r
    if mode in ("weighted_sum", "fixed", "single", "sequential"):
        assert not any(r["refresh"] for r in module.history)
        assert "cos/worst" in module.history[0] and "cos/worst" not in module.history[1]
    if mode == "sequential":
        assert [r["alpha"] for r in module.history] == [
            [1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0],
            [0.0, 0.0, 1.0],
        ]
    if mode == "amortized":  # refresh_every=5 default: refresh at step 0 only
        assert [r["refresh"] for r in module.history] == [True, False, False]


def test_weighted_sum_scalarises_rewards_with_masked_entries_as_zero():
    module = make_module("weighted_sum", reward_weights=[1.0, 2.0, 0.5])
    rollout = module.rollout(PROMPTS[:4], step=0)
    scalar = (rollout.values * rollout.mask) @ torch.tensor([1.0, 2.0, 0.5])
    # per-prompt advantage of the scalar, population std over the group (G=2 -> +-1 scaled)
    for i in range(0, len(rollout.prompts), 2):
        a, b = float(scalar[i]), float(scalar[i + 1])
        mean, std = (a + b) / 2, abs(a - b) / 2
        expected = 0.0 if std == 0 else (a - mean) / (std + module.tracker.eps)
        assert rollout.scalar_advantages[i].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(
        rollout.scalar_r, interpolation_coefficient(rollout.scalar_advantages, 5.0)
    )


def test_old_policy_ema_update():
    module = make_module("marble", old_policy={"start": 1, "rate": 0.5, "max_decay": 0.9})
    _perturb(module, seed=5)
    policy = [p.detach().clone() for p in module.trainable_parameters]
    old = [p.detach().clone() for p in module.old_parameters]
    assert module.update_old_policy(0) == 0.0
    for p, q in zip(policy, module.old_parameters):
        assert torch.equal(p, q)
    with torch.no_grad():
        for q, o in zip(module.old_parameters, old):
            q.copy_(o)
    eta = module.update_old_policy(2)  # min(0.5 * (2 - 1), 0.9)
    assert eta == 0.5
    for p, o, q in zip(policy, old, module.old_parameters):
        torch.testing.assert_close(q, 0.5 * o + 0.5 * p)
    assert module.update_old_policy(10) == 0.9


def test_sample_is_deterministic_and_adapters_differ():
    module = make_module("marble")
    _perturb(module)
    a = module.sample(["a red cat", "a red cat", "small box"], seed=7)
    b = module.sample(["a red cat", "a red cat", "small box"], seed=7)
    assert a.shape == (3, 3, 8, 8) and float(a.min()) >= 0 and float(a.max()) <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], a[1])  # two occurrences of a prompt get different noise
    # per-image seeds are independent of the rest of the list
    c = module.sample(["small box"], seed=[11])
    d = module.sample(["a red cat", "small box"], seed=[3, 11])
    torch.testing.assert_close(c[0], d[1])
    base = module.sample(["a red cat"], seed=7, adapter="base")
    old = module.sample(["a red cat"], seed=7, adapter="old")
    assert not torch.allclose(base[0], a[0]) and not torch.allclose(old[0], a[0])
    # the policy is active again and still the only trainable adapter
    assert all(p.requires_grad for p in module.trainable_parameters)
    assert not any(p.requires_grad for p in module.old_parameters)
    torch.testing.assert_close(module.sample(["a red cat"], seed=7)[0], a[0])
    with pytest.raises(ValueError, match="adapter"):
        module.sample(["x"], seed=0, adapter="ema")


def test_bfloat16_rollout_is_close_to_the_float32_rollout_and_trains():
    full = make_module("marble")
    half = make_module("marble", rollout_precision="bfloat16")
    _perturb(full)
    half.load_state_dict(full.state_dict())
    prompts = ["a red cat", "small box"]
    a, b = full.rollout(prompts, step=0), half.rollout(prompts, step=0)
    assert b.x0.dtype == a.x0.dtype == torch.float32
    diff = (a.x0 - b.x0).abs()
    # bfloat16 keeps 8 mantissa bits: the sampler's output moves, but only by rounding noise
    assert 0 < float(diff.max()) < 0.1 and float(diff.mean()) < 0.02
    # evaluation sampling is unaffected by the rollout precision
    torch.testing.assert_close(full.sample(prompts, seed=3), half.sample(prompts, seed=3))
    result = half.compute_update(b, refresh=True)
    assert torch.isfinite(result.direction).all() and float(result.direction.norm()) > 0


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rewards=[]), "K=0"),
        (dict(mode="mgda"), "mgda"),
        (dict(refresh_every=0), "refresh_every"),
        (dict(mode="fixed", fixed_alpha=[0.5, 0.5]), "fixed_alpha"),
        (dict(mode="weighted_sum", reward_weights=[1.0]), "reward_weights"),
        (dict(mode="weighted_sum", reward_weights=[1.0, -1.0, 1.0]), "reward_weights"),
        (dict(mode="sequential", stages=[("red", 2), ("ocr", 3)]), "'ocr'"),
        (dict(mode="sequential", stages=[("red", 0)]), "steps of stage 'red'"),
        (dict(mode="single", single_reward="blue"), "'blue'"),
        (dict(mode="single", single_reward=None), "single_reward"),
        (dict(train_timesteps=5), "train_timesteps"),
        (dict(beta=0.0), "beta"),
        (dict(aggregate="mean"), "aggregate"),
        (dict(gram="magic"), "magic"),
        (dict(old_policy={"start": 0, "max_decay": 1.0}), "max_decay"),
        (dict(old_policy={"begin": 3}), "begin"),
        (dict(group_size=0), "group_size"),
        (dict(kl_weight=-1.0), "kl_weight"),
        (dict(diagnostics_every=0), "diagnostics_every"),
        (dict(rollout_precision="int8"), "int8"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, match):
    mode = kwargs.pop("mode", "marble")
    with pytest.raises(ValueError, match=match):
        make_module(mode, **kwargs)


def test_duplicate_reward_names_and_bad_backbone():
    with pytest.raises(ValueError, match="duplicates"):
        make_module("marble", rewards=[Darkness("x"), Darkness("x")])
    with pytest.raises(TypeError, match="FlowBackbone"):
        MarbleDiffusionModule(torch.nn.Linear(2, 2), tiny_rewards())


@pytest.mark.parametrize(
    ("reward", "match"),
    [
        (NaNReward(), r"'nan'.*non-finite(.|\n)*step 0"),
        (WrongShapeReward(), r"'wrong_shape'.*shape"),
    ],
)
def test_bad_reward_fails_at_first_step_with_state_untouched(reward, match):
    module = make_module("marble", rewards=[ChannelMean(0, "red"), reward])
    before = lora_state(module)
    with pytest.raises(ValueError, match=match):
        fit(module, max_steps=2)
    assert module.step_index == 0 and module.history == []
    assert module.tracker.prompts == []
    for a, b in zip(before, lora_state(module)):
        assert torch.equal(a, b)


def test_bad_batch_is_rejected():
    module = make_module("marble")
    with pytest.raises(ValueError, match="list of prompt strings"):
        module.rollout([1, 2])


def test_unet_denoiser_with_conv_lora_and_per_sample_engine():
    """The toy world's UNet2DConditionModel (LoRA on convolutions too) trains, and the
    per-sample Gram engine gives the backward engine's direction."""
    from marble_lightning.toy.backbone import ToyBackbone, ToyModelConfig

    config = ToyModelConfig(
        block_out_channels=(8, 16, 16),
        text_width=16,
        text_layers=1,
        text_heads=2,
        norm_num_groups=4,
    )
    directions = []
    for gram in ("backward", "per_sample"):
        module = MarbleDiffusionModule(
            ToyBackbone.from_config(config, seed=0),
            tiny_rewards(),
            mode="marble",
            gram=gram,
            group_size=2,
            sample_steps=2,
            lora_rank=2,
            lora_alpha=4,
        )
        assert module.gram == gram
        assert any("conv1" in name for name in module.adapters.policy_names)
        _perturb(module, seed=2)
        rollout = module.rollout(PROMPTS[:2], step=0)
        directions.append(module.compute_update(rollout, refresh=True).direction)
    assert directions[0].norm() > 0
    # Both engines sum the same float32 terms in different orders: agree to ~1e-6 of the
    # largest entry (a wrong Gram or direction differs at the 1e-1 level).
    atol = 1e-5 * directions[0].abs().max().item()
    torch.testing.assert_close(directions[1], directions[0], rtol=1e-4, atol=atol)
    base = base_state(module)
    fit(module, max_steps=1)
    assert all(torch.equal(p, base[n]) for n, p in module.named_parameters() if ".lora_" not in n)


class _ShiftedBackbone(TinySD3Backbone):
    """Tiny backbone with SD3's shifted time grid t' = 3 t / (1 + 2 t)."""

    def time_grid(self, steps: int) -> torch.Tensor:
        t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        return 3 * t / (1 + 2 * t)


def test_backbone_time_grid_is_used_by_sampler_and_training():
    module = MarbleDiffusionModule(_ShiftedBackbone(), tiny_rewards(), mode="marble", **TINY)
    grid = module.time_grid()
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.75, 0.0], dtype=torch.float64))
    _perturb(module)
    prompts = ["a red cat", "small box"]
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = noise
    cond = module.backbone.encode_prompts(prompts)
    with torch.no_grad():
        for t, t_next in ((1.0, 0.75), (0.75, 0.0)):
            x = x + (t_next - t) * module.backbone.velocity(x, torch.full((2,), t), cond)
    torch.testing.assert_close(module.sample_latents(prompts, noise), x, rtol=1e-5, atol=1e-6)
    rollout = module.rollout(PROMPTS[:2], step=0)
    grads, _ = _independent_gradients(module, rollout, [0, 1], 1.0, 5.0, 0.0)  # t = 1 and 0.75
    torch.testing.assert_close(
        module.compute_update(rollout, refresh=True).grads.double(), grads, rtol=1e-4, atol=1e-7
    )


def test_bad_backbone_time_grid_is_rejected():
    class Bad(TinySD3Backbone):
        def time_grid(self, steps: int) -> torch.Tensor:
            return torch.linspace(0.0, 1.0, steps + 1)

    module = MarbleDiffusionModule(Bad(), tiny_rewards(), mode="marble", **TINY)
    with pytest.raises(ValueError, match="decrease from 1 to 0"):
        module.sample(["a"], seed=0)


def test_sample_noise_is_independent_of_the_training_seed():
    a = make_module("marble", seed=0)
    b = make_module("marble", seed=7)
    prompts = ["a green dog", "red house"]
    torch.testing.assert_close(
        a.sample(prompts, seed=3, adapter="base"), b.sample(prompts, seed=3, adapter="base")
    )
    assert not torch.equal(
        a.sample(prompts, seed=3, adapter="base"), a.sample(prompts, seed=4, adapter="base")
    )


def test_merged_lora_forwards_train_like_the_lora_branches():
    """merge_lora only changes float rounding: same rollouts, alpha and adapters after 3 steps."""
    from marble_lightning.testing import base_state, fit, lora_state, make_module

    runs = {}
    for merge in (True, False):
        module = make_module("marble", merge_lora=merge, seed=3)
        base = base_state(module)
        fit(module, max_steps=3)
        after = base_state(module)
        assert all(torch.equal(base[k], after[k]) for k in base)  # frozen weights untouched
        runs[merge] = (lora_state(module), module.current_alpha.clone(), module.adapters.merge)
    (merged, alpha_m, flag_m), (plain, alpha_p, flag_p) = runs[True], runs[False]
    assert flag_m and not flag_p
    for a, b in zip(merged, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(alpha_m, alpha_p, rtol=1e-4, atol=1e-6)


def test_frozen_parts_are_in_eval_mode_from_construction():
    """Backbone (denoiser and LoRA layers) and rewards run deterministic eval-mode forwards even
    before a Trainer calls ``train()``, e.g. for ``module(prompts)`` right after construction."""
    module = make_module("amortized")

    def training_names() -> list[str]:
        parts = [("backbone", module.backbone), ("rewards", module.rewards)]
        return [f"{p}.{n}" for p, part in parts for n, m in part.named_modules() if m.training]

    assert module.training and training_names() == []
    module.train()
    assert module.training and training_names() == []
    module.eval()
    assert not module.training and training_names() == []
