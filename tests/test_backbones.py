"""FLUX.1, Qwen-Image and Wan backbones on tiny random pipelines written to disk (no downloads).

For each family: the protocol and the frozen parts; our sampler (``MarbleDiffusionModule.
sample_latents``: keyed noise, the backbone's ``velocity`` and ``time_grid``, Euler steps, CFG
with the empty prompt) reproduces the family's diffusers pipeline from the same noise; three
training steps in every rule change only LoRA parameters; the exported LoRA loads back into
the family's pipeline with ``load_lora_weights`` and gives the trained policy's samples.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from marble_lightning.backbone import FlowBackbone
from marble_lightning.backbones import FluxBackbone, QwenImageBackbone, WanBackbone
from marble_lightning.backbones.flux import pack_latents
from marble_lightning.testing import (
    TINY_FLUX_RESOLUTION,
    TINY_QWEN_IMAGE_RESOLUTION,
    TINY_WAN_FRAMES,
    TINY_WAN_RESOLUTION,
    BrightnessReward,
    build_tiny_flux_pipeline,
    build_tiny_qwen_image_pipeline,
    build_tiny_wan_pipeline,
)


@dataclass
class Family:
    name: str
    build: Any
    backbone_cls: Any
    options: dict[str, Any]
    sample_shape: tuple[int, ...]
    decoded_shape: tuple[int, ...]
    frozen: set[str]
    pipe_kwargs: dict[str, Any] = field(default_factory=dict)
    cfg: float = 1.0  # CFG scale of the equality test (the pipeline's true CFG / guidance)
    packed: bool = False
    video: bool = False


R_F, R_Q, R_W = TINY_FLUX_RESOLUTION, TINY_QWEN_IMAGE_RESOLUTION, TINY_WAN_RESOLUTION
FAMILIES = {
    "flux": Family(
        "flux",
        build_tiny_flux_pipeline,
        FluxBackbone,
        {"resolution": R_F, "max_sequence_length": 16, "guidance_scale": 3.5},
        (4, 16, 16),
        (3, R_F, R_F),
        {"vae", "text_encoder", "text_encoder_2"},
        {"height": R_F, "width": R_F, "max_sequence_length": 16, "guidance_scale": 3.5},
        cfg=2.0,
        packed=True,
    ),
    "qwen_image": Family(
        "qwen_image",
        build_tiny_qwen_image_pipeline,
        QwenImageBackbone,
        {"resolution": R_Q, "max_sequence_length": 200},
        (4, 8, 8),
        (3, R_Q, R_Q),
        {"vae", "text_encoder"},
        {"height": R_Q, "width": R_Q, "max_sequence_length": 200},
        packed=True,
    ),
    "wan": Family(
        "wan",
        build_tiny_wan_pipeline,
        WanBackbone,
        {"height": R_W, "width": R_W, "num_frames": TINY_WAN_FRAMES, "max_sequence_length": 16},
        (4, 2, 4, 4),
        (TINY_WAN_FRAMES, 3, R_W, R_W),
        {"vae", "text_encoder"},
        {"height": R_W, "width": R_W, "num_frames": TINY_WAN_FRAMES, "max_sequence_length": 16},
        cfg=4.0,
        video=True,
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


_DIRS: dict[str, str] = {}


@pytest.fixture(scope="module")
def tiny_dir(family: Family, tmp_path_factory) -> str:
    torch.set_num_threads(1)
    if family.name not in _DIRS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _DIRS[family.name] = family.build(tmp_path_factory.mktemp(f"tiny_{family.name}"))
    return _DIRS[family.name]


def _backbone(family: Family, tiny_dir: str, **kwargs: Any):
    return family.backbone_cls(tiny_dir, **{**family.options, **kwargs})


def _module(backbone, mode: str = "marble", **kwargs: Any):
    from marble_lightning.module import MarbleDiffusionModule

    rewards = [
        BrightnessReward(target=1.0, name="bright"),
        BrightnessReward(target=0.0, name="dark"),
        BrightnessReward(target=0.5, keyword="red", name="grey_red"),  # masked elsewhere
    ]
    if backbone.sample_shape.__len__() == 4:  # video: the image rewards apply per frame
        from marble_lightning.rewards.video import PerFrameReward

        rewards = [PerFrameReward(r, aggregation="mean") for r in rewards]
    options = {"group_size": 2, "sample_steps": 2, "lora_rank": 2, "lora_alpha": 4, "lr": 1e-2}
    options.update(kwargs)
    return MarbleDiffusionModule(backbone, rewards, mode=mode, **options)


def _pipeline_output(family: Family, pipe, prompts, noise, steps, cfg, output_type):
    kwargs = dict(family.pipe_kwargs, num_inference_steps=steps)
    kwargs["latents"] = pack_latents(noise) if family.packed else noise.clone()
    if cfg != 1.0:
        kwargs["negative_prompt"] = [""] * len(prompts)
        kwargs["true_cfg_scale" if family.name != "wan" else "guidance_scale"] = cfg
    elif family.name == "wan":
        kwargs["guidance_scale"] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(prompts, output_type=output_type, **kwargs)
    return out.frames if family.video else out.images


def test_protocol_shapes_and_frozen_parts(family: Family, tiny_dir: str) -> None:
    backbone = _backbone(family, tiny_dir)
    assert isinstance(backbone, FlowBackbone)
    assert backbone.sample_shape == family.sample_shape
    cond = backbone.encode_prompts(["a red circle", "", "two blue squares"])
    assert all(v.shape[0] == 3 for v in cond.values())
    x = torch.randn(3, *backbone.sample_shape, generator=torch.Generator().manual_seed(0))
    v = backbone.velocity(x, torch.tensor([0.1, 0.5, 1.0]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    torch.testing.assert_close(
        backbone.velocity(x, torch.tensor(0.5), cond),
        backbone.velocity(x, torch.full((3,), 0.5), cond),
    )
    decoded = backbone.decode(x)
    assert decoded.shape == (3, *family.decoded_shape)
    assert decoded.dtype == torch.float32 and decoded.min() >= 0 and decoded.max() <= 1
    # frozen parts: not registered, not trainable, still moved by .to()
    assert all(not p.requires_grad for p in backbone.parameters())
    keys = list(backbone.state_dict())
    assert keys and all(k.startswith("denoiser.") for k in keys)
    assert set(backbone.frozen_modules) == family.frozen
    registered = {id(m) for m in backbone.modules()}
    assert all(id(m) not in registered for m in backbone.frozen_modules.values())
    backbone.train()
    assert backbone.denoiser.training and not any(
        m.training for m in backbone.frozen_modules.values()
    )
    backbone.to(torch.float64)
    assert all(
        next(m.parameters()).dtype == torch.float64 for m in backbone.frozen_modules.values()
    )
    names = [n for n, _ in backbone.denoiser.named_modules()]
    for target in backbone.lora_target_modules:
        assert any(n == target or n.endswith("." + target) for n in names), target
    with pytest.raises(ValueError, match="shape"):
        backbone.velocity(x[0], torch.tensor([0.5]), cond)
    with pytest.raises(ValueError, match="list of str"):
        backbone.encode_prompts("one string")
    with pytest.raises(ValueError, match="steps=0"):
        backbone.time_grid(0)


def test_sampler_matches_diffusers_pipeline(family: Family, tiny_dir: str) -> None:
    """Our sampler (module.sample_latents on the backbone's grid, CFG with "") == the pipeline."""
    backbone = _backbone(family, tiny_dir)
    module = _module(backbone)
    pipe = backbone.pipeline
    prompts = ["a red circle", "three words here"]
    steps = 4
    noise = torch.randn(2, *backbone.sample_shape, generator=torch.Generator().manual_seed(1))
    for cfg in sorted({1.0, family.cfg}):
        ref = _pipeline_output(family, pipe, prompts, noise, steps, cfg, "latent")
        torch.testing.assert_close(backbone.time_grid(steps), pipe.scheduler.sigmas.double())
        ours = module.sample_latents(prompts, noise, adapter="base", steps=steps, cfg_scale=cfg)
        torch.testing.assert_close(
            pack_latents(ours) if family.packed else ours, ref, atol=1e-5, rtol=1e-5
        )
    ref_pixels = _pipeline_output(family, pipe, prompts, noise, steps, family.cfg, "pt")
    torch.testing.assert_close(backbone.decode(ours), ref_pixels, atol=1e-5, rtol=1e-5)
    # the LoRA-free policy equals the base model (LoRA B starts at zero)
    torch.testing.assert_close(
        module.sample_latents(prompts, noise, steps=steps, cfg_scale=family.cfg), ours
    )


MODE_KWARGS = {
    "marble": {},
    "amortized": {"refresh_every": 2},
    "weighted_sum": {"reward_weights": [1.0, 0.5, 1.0]},
    "fixed": {"fixed_alpha": [0.5, 0.25, 0.25]},
    "single": {"single_reward": "dark"},
    "sequential": {"stages": [("bright", 1), ("dark", 2)]},
}


def _fit(module, steps: int = 3):
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    prompts = ["a red circle", "a blue square", "two green dots", "a red word"]
    loader = DataLoader(prompts, batch_size=2, shuffle=False, collate_fn=list)
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    return trainer


@pytest.mark.parametrize("mode", sorted(MODE_KWARGS))
def test_trains_three_steps_in_every_rule(family: Family, tiny_dir: str, mode: str) -> None:
    torch.manual_seed(0)
    backbone = (
        _backbone(family, tiny_dir, max_sequence_length=8)
        if family.name != "qwen_image"
        else _backbone(family, tiny_dir)
    )
    module = _module(backbone, mode, **MODE_KWARGS[mode])
    lora = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert lora and all(".lora_" in n and ".policy." in n for n in lora)
    base = {
        n: p.detach().clone() for n, p in backbone.denoiser.named_parameters() if ".lora_" not in n
    }
    frozen = {
        k: [p.detach().clone() for p in m.parameters()] for k, m in backbone.frozen_modules.items()
    }
    trainer = _fit(module)
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
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), frozen[k])), k
    out = module.sample(["a red circle"], seed=0)
    assert out.shape == (1, *family.decoded_shape)


def test_exported_lora_loads_into_the_family_pipeline(
    family: Family, tiny_dir: str, tmp_path
) -> None:
    from marble_lightning.lora_export import DIFFUSERS_LORA_FILE, export_lora

    torch.manual_seed(0)
    backbone = _backbone(family, tiny_dir)
    module = _module(backbone, "weighted_sum", lr=5e-2)
    _fit(module, steps=2)
    path = export_lora(module, tmp_path / "lora")
    assert path.name == DIFFUSERS_LORA_FILE
    prompts = ["a red circle", "two words"]
    noise = torch.randn(2, *backbone.sample_shape, generator=torch.Generator().manual_seed(3))
    trained = module.sample_latents(prompts, noise, steps=3, cfg_scale=1.0)
    base = module.sample_latents(prompts, noise, adapter="base", steps=3, cfg_scale=1.0)
    assert not torch.allclose(trained, base, atol=1e-6)
    fresh = type(backbone.pipeline).from_pretrained(tiny_dir)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    ref = _pipeline_output(family, fresh, prompts, noise, 3, 1.0, "latent")
    torch.testing.assert_close(
        pack_latents(trained) if family.packed else trained, ref, atol=1e-5, rtol=1e-5
    )
