"""SD3Backbone on a tiny random SD3 pipeline written to disk (no downloads)."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch

from marble_lightning.backbone import FlowBackbone
from marble_lightning.sd3 import SD3_LORA_TARGET_MODULES, SD3Backbone
from marble_lightning.testing import (
    TINY_SD3_RESOLUTION,
    build_tiny_sd3_pipeline,
    sd35_medium_transformer_config,
)

SEQ = 8  # T5 slots (zeros: the tiny pipeline has no T5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    torch.set_num_threads(1)
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="module")
def backbone(tiny_dir) -> SD3Backbone:
    return SD3Backbone(tiny_dir, resolution=TINY_SD3_RESOLUTION, max_sequence_length=SEQ)


def test_protocol_shapes_and_ranges(backbone: SD3Backbone) -> None:
    assert isinstance(backbone, FlowBackbone)
    assert backbone.sample_shape == (16, 16, 16)
    assert backbone.lora_target_modules == SD3_LORA_TARGET_MODULES
    cond = backbone.encode_prompts(["a red circle", "", "two blue squares"])
    assert cond["prompt_embeds"].shape == (3, 77 + SEQ, 64)  # 77 CLIP tokens + 8 zero T5 slots
    assert cond["pooled_prompt_embeds"].shape == (3, 64)
    assert torch.all(cond["prompt_embeds"][:, 77:] == 0)
    # different prompts give different conditioning, the same prompt the same one
    again = backbone.encode_prompts(["a red circle"])
    torch.testing.assert_close(again["prompt_embeds"][0], cond["prompt_embeds"][0])
    assert not torch.allclose(cond["pooled_prompt_embeds"][0], cond["pooled_prompt_embeds"][2])

    x = torch.randn(3, *backbone.sample_shape, generator=torch.Generator().manual_seed(0))
    v = backbone.velocity(x, torch.tensor([0.1, 0.5, 1.0]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    v_scalar = backbone.velocity(x, torch.tensor(0.5), cond)
    v_rows = backbone.velocity(x, torch.full((3,), 0.5), cond)
    torch.testing.assert_close(v_scalar, v_rows)
    images = backbone.decode(x)
    assert images.shape == (3, 3, TINY_SD3_RESOLUTION, TINY_SD3_RESOLUTION)
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0


def test_velocity_uses_time_scale_1000(backbone: SD3Backbone) -> None:
    cond = backbone.encode_prompts(["x"])
    x = torch.randn(1, *backbone.sample_shape)
    direct = backbone.denoiser(
        hidden_states=x,
        timestep=torch.tensor([300.0]),
        encoder_hidden_states=cond["prompt_embeds"],
        pooled_projections=cond["pooled_prompt_embeds"],
    ).sample
    torch.testing.assert_close(backbone.velocity(x, torch.tensor([0.3]), cond), direct)


def test_frozen_parts_not_registered_but_moved(backbone: SD3Backbone) -> None:
    assert all(not p.requires_grad for p in backbone.parameters())
    keys = list(backbone.state_dict())
    assert keys and all(k.startswith("denoiser.") for k in keys)
    assert set(backbone.frozen_modules) == {"vae", "text_encoder", "text_encoder_2"}
    registered = {id(m) for m in backbone.modules()}
    for module in backbone.frozen_modules.values():
        assert id(module) not in registered
        assert all(not p.requires_grad for p in module.parameters())
    backbone.train()
    assert backbone.denoiser.training
    assert not any(m.training for m in backbone.frozen_modules.values())
    backbone.eval()
    try:
        backbone.to(torch.float64)
        assert backbone.denoiser.dtype == torch.float64
        for module in backbone.frozen_modules.values():
            assert next(module.parameters()).dtype == torch.float64
        cond = backbone.encode_prompts(["a"])
        x = torch.randn(1, *backbone.sample_shape, dtype=torch.float64)
        assert backbone.velocity(x, torch.tensor([0.5]), cond).dtype == torch.float64
    finally:
        backbone.to(torch.float32)


def test_noising_convention_matches_scheduler(backbone: SD3Backbone) -> None:
    """diffusers noises with x_sigma = sigma eps + (1 - sigma) x0: our t is its sigma."""
    scheduler = backbone.pipeline.scheduler
    scheduler.set_timesteps(5)
    x0 = torch.randn(2, *backbone.sample_shape)
    eps = torch.randn_like(x0)
    for i in range(5):
        sigma = scheduler.sigmas[i]
        noised = scheduler.scale_noise(x0, scheduler.timesteps[i : i + 1], eps)
        torch.testing.assert_close(noised, (1 - sigma) * x0 + sigma * eps)


def test_euler_sampling_matches_diffusers_pipeline(backbone: SD3Backbone) -> None:
    """Our Euler loop x_{t'} = x_t + (t' - t) v on the scheduler's sigmas reproduces the
    diffusers pipeline end to end: prompt encoding, timestep scale, velocity sign, decoding."""
    pipe = backbone.pipeline
    prompts = ["a red circle", "three words here"]
    steps = 4
    x_init = torch.randn(2, *backbone.sample_shape, generator=torch.Generator().manual_seed(1))
    kwargs = {
        "height": TINY_SD3_RESOLUTION,
        "width": TINY_SD3_RESOLUTION,
        "num_inference_steps": steps,
        "guidance_scale": 1.0,
        "max_sequence_length": SEQ,
        "latents": x_init.clone(),
    }
    ref_latents = pipe(prompts, output_type="latent", **kwargs).images
    ref_images = pipe(prompts, output_type="pt", **kwargs).images

    sigmas = pipe.scheduler.sigmas.clone()  # set by the call above; shift 3, ends at 0
    assert len(sigmas) == steps + 1 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    torch.testing.assert_close(backbone.time_grid(steps), sigmas.double())

    # closed form: shift s=3 applied to a uniform grid from 1 to shift(1/1000) (diffusers'
    # sigma_min), then a final step to 0
    def shift(u):
        return 3 * u / (1 + 2 * u)

    uniform = torch.linspace(
        1.0, float(shift(torch.tensor(1e-3, dtype=torch.float64))), steps, dtype=torch.float64
    )
    expected = torch.cat([shift(uniform), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(backbone.time_grid(steps), expected, atol=1e-6, rtol=1e-6)
    cond = backbone.encode_prompts(prompts)
    x = x_init.clone()
    with torch.no_grad():
        for t, t_next in itertools.pairwise(sigmas):
            x = x + (t_next - t) * backbone.velocity(x, t.expand(2), cond)
        images = backbone.decode(x)
    torch.testing.assert_close(x, ref_latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(images, ref_images, atol=1e-5, rtol=1e-5)


def test_bfloat16_weights_float32_io(tiny_dir: str) -> None:
    bb = SD3Backbone(
        tiny_dir, resolution=TINY_SD3_RESOLUTION, torch_dtype="bfloat16", max_sequence_length=SEQ
    )
    assert bb.denoiser.dtype == torch.bfloat16 and bb.vae.dtype == torch.bfloat16
    cond = bb.encode_prompts(["a"])
    x = torch.randn(1, *bb.sample_shape)
    assert bb.velocity(x, torch.tensor([0.5]), cond).dtype == torch.float32
    images = bb.decode(x)
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1


def test_bad_inputs(tmp_path, tiny_dir: str, backbone: SD3Backbone) -> None:
    missing = tmp_path / "no" / "such_pipeline"
    with pytest.raises(FileNotFoundError, match="such_pipeline"):
        SD3Backbone(str(missing))
    with pytest.raises(FileNotFoundError, match="such_dir"):
        SD3Backbone("./such_dir")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        SD3Backbone(str(tmp_path))
    with pytest.raises(ValueError, match="torch_dtype='float8'"):
        SD3Backbone(tiny_dir, torch_dtype="float8")
    with pytest.raises(ValueError, match="resolution=34"):
        SD3Backbone(tiny_dir, resolution=34)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(OSError, match="broken"):
        SD3Backbone(str(broken))
    with pytest.raises(ValueError, match="shape"):
        backbone.velocity(
            torch.randn(16, 16, 16), torch.tensor([0.5]), backbone.encode_prompts(["a"])
        )
    with pytest.raises(ValueError, match="list of str"):
        backbone.encode_prompts("a single string")
    with pytest.raises(ValueError, match="steps=0"):
        backbone.time_grid(0)


def test_lora_targets_exist_in_transformer(backbone: SD3Backbone) -> None:
    names = [n for n, _ in backbone.denoiser.named_modules()]
    for target in SD3_LORA_TARGET_MODULES:
        assert any(n == target or n.endswith("." + target) for n in names), target


def test_sd35_medium_config_matches_diffusers_signature() -> None:
    from diffusers import SD3Transformer2DModel

    config = sd35_medium_transformer_config()
    params = inspect.signature(SD3Transformer2DModel.__init__).parameters
    assert set(config) <= set(params)
    # parameter count from the shapes, without allocating: built on the meta device
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 2.0e9 < n_params < 2.6e9, n_params
    assert model.config.num_attention_heads * model.config.attention_head_dim == 1536
    assert len(model.transformer_blocks) == 24
    assert sum(b.attn2 is not None for b in model.transformer_blocks) == 13


MODE_KWARGS = {
    "marble": {},
    "amortized": {"refresh_every": 2},
    "weighted_sum": {"reward_weights": [1.0, 0.5, 1.0]},
    "fixed": {"fixed_alpha": [0.5, 0.25, 0.25]},
    "single": {"single_reward": "dark"},
    "sequential": {"stages": [("bright", 1), ("dark", 2)]},
}


@pytest.mark.parametrize("mode", sorted(MODE_KWARGS))
def test_module_trains_on_tiny_sd3_in_every_mode(tiny_dir: str, mode: str) -> None:
    module_lib = pytest.importorskip(
        "marble_lightning.module", reason="module.py (engineer 4a) not present"
    )
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from marble_lightning.testing import BrightnessReward

    torch.manual_seed(0)
    backbone = SD3Backbone(tiny_dir, resolution=TINY_SD3_RESOLUTION, max_sequence_length=4)
    rewards = [
        BrightnessReward(target=1.0, name="bright"),
        BrightnessReward(target=0.0, name="dark"),
        BrightnessReward(
            target=0.5, keyword="red", name="grey_red"
        ),  # masked on prompts without "red"
    ]
    module = module_lib.MarbleDiffusionModule(
        backbone,
        rewards,
        mode=mode,
        group_size=2,
        sample_steps=2,
        lora_rank=2,
        lora_alpha=4,
        lr=1e-2,
        **MODE_KWARGS[mode],
    )
    lora = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert lora and all(".lora_" in n and ".policy." in n for n in lora)
    base = {
        n: p.detach().clone() for n, p in backbone.denoiser.named_parameters() if ".lora_" not in n
    }
    frozen = {k: next(m.parameters()).detach().clone() for k, m in backbone.frozen_modules.items()}

    prompts = ["a red circle", "a blue square", "two green dots", "a red word"]
    loader = DataLoader(prompts, batch_size=2, shuffle=False, collate_fn=list)
    trainer = Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader)

    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("loss")}
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert module.step_index == 3
    changed = [
        n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, lora[n])
    ]
    assert changed, "no LoRA parameter changed"
    for n, p in backbone.denoiser.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, base[n]), n
    for k, m in backbone.frozen_modules.items():
        assert torch.equal(next(m.parameters()), frozen[k]), k
    images = module.sample(["a red circle"], seed=0)
    assert images.shape == (1, 3, TINY_SD3_RESOLUTION, TINY_SD3_RESOLUTION)
