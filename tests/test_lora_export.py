"""Round trips of the exported policy LoRA: diffusers' load_lora_weights and peft's PeftModel."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from torch import nn

from marble_lightning.lora_export import DIFFUSERS_LORA_FILE, PEFT_LORA_FILE, export_lora
from marble_lightning.sd3 import SD3_LORA_TARGET_MODULES, SD3Backbone
from marble_lightning.testing import TINY_SD3_RESOLUTION, build_tiny_sd3_pipeline

RANK, ALPHA = 4, 12  # scale alpha / r = 3: a loader that ignored alpha would be caught


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    torch.set_num_threads(1)
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3_lora"))


def _adapted_backbone(tiny_dir: str) -> SD3Backbone:
    backbone = SD3Backbone(tiny_dir, resolution=TINY_SD3_RESOLUTION, max_sequence_length=4)
    torch.manual_seed(0)
    for name in ("policy", "old"):  # random non-zero A and B for both adapters
        config = LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            target_modules=SD3_LORA_TARGET_MODULES,
            init_lora_weights=False,
        )
        backbone.denoiser.add_adapter(config, adapter_name=name)
    backbone.denoiser.set_adapter("policy")
    return backbone


def _transformer_out(transformer: nn.Module, x: torch.Tensor, cond: dict) -> torch.Tensor:
    with torch.no_grad():
        return transformer(
            hidden_states=x,
            timestep=torch.full((x.shape[0],), 400.0),
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
        ).sample


def _check_diffusers_round_trip(tiny_dir: str, out_dir, expected: torch.Tensor, x, cond) -> None:
    from diffusers import StableDiffusion3Pipeline

    fresh = StableDiffusion3Pipeline.from_pretrained(
        tiny_dir, text_encoder_3=None, tokenizer_3=None
    )
    base = _transformer_out(fresh.transformer, x, cond)
    fresh.load_lora_weights(str(out_dir))
    loaded = _transformer_out(fresh.transformer, x, cond)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)


def test_diffusers_round_trip_from_module(tiny_dir: str, tmp_path) -> None:
    backbone = _adapted_backbone(tiny_dir)
    cond = backbone.encode_prompts(["a red circle", "blue"])
    x = torch.randn(2, *backbone.sample_shape, generator=torch.Generator().manual_seed(3))
    expected = _transformer_out(backbone.denoiser, x, cond)
    backbone.denoiser.set_adapter("old")
    other = _transformer_out(backbone.denoiser, x, cond)
    backbone.denoiser.set_adapter("policy")
    assert not torch.allclose(other, expected, atol=1e-3)

    holder = nn.Module()  # stands for MarbleDiffusionModule: export finds .backbone.denoiser
    holder.backbone = backbone
    path = export_lora(holder, tmp_path / "lora")
    assert path == tmp_path / "lora" / DIFFUSERS_LORA_FILE
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(k.startswith("transformer.") and ".lora_" in k and "policy" not in k for k in keys)
    # 2 blocks: block 0 has attn (8 targets) + attn2 (4), block 1 (context_pre_only) attn without
    # to_add_out (7)
    assert len(keys) == 2 * (8 + 4 + 7)
    assert metadata["transformer.r"] == RANK and metadata["transformer.lora_alpha"] == ALPHA
    _check_diffusers_round_trip(tiny_dir, tmp_path / "lora", expected, x, cond)


def test_diffusers_round_trip_from_checkpoint(tiny_dir: str, tmp_path) -> None:
    backbone = _adapted_backbone(tiny_dir)
    cond = backbone.encode_prompts(["a green square"])
    x = torch.randn(1, *backbone.sample_shape, generator=torch.Generator().manual_seed(4))
    expected = _transformer_out(backbone.denoiser, x, cond)
    # a Lightning-style checkpoint of a module holding the backbone as `.backbone`
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "global_step": 3}, ckpt)
    # alpha from the run's config.yaml, as the CLI saves it
    (tmp_path / "run" / "config.yaml").write_text(
        "model:\n  backbone:\n    class_path: marble_lightning.sd3.SD3Backbone\n"
        f"    init_args:\n      pretrained: {tiny_dir}\n  lora_alpha: {ALPHA}\n"
    )
    path = export_lora(str(ckpt), tmp_path / "from_ckpt")
    assert path.name == DIFFUSERS_LORA_FILE
    _check_diffusers_round_trip(tiny_dir, tmp_path / "from_ckpt", expected, x, cond)

    # no config and no hyper-parameters: alpha is unknown -> clear error; explicit alpha works
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": state}, bare)
    with pytest.raises(ValueError, match="lora_alpha"):
        export_lora(str(bare), tmp_path / "x")
    export_lora(str(bare), tmp_path / "bare_out", lora_alpha=ALPHA)
    _check_diffusers_round_trip(tiny_dir, tmp_path / "bare_out", expected, x, cond)
    torch.save({"state_dict": state, "hyper_parameters": {"lora_alpha": ALPHA}}, bare)
    export_lora(str(bare), tmp_path / "hp_out")
    _check_diffusers_round_trip(tiny_dir, tmp_path / "hp_out", expected, x, cond)


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(6, 8)
        self.mid = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.proj_out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.mid(self.proj_in(x)))


@pytest.mark.parametrize("from_checkpoint", [False, True])
def test_peft_round_trip_for_other_backbones(tmp_path, from_checkpoint: bool) -> None:
    from peft import PeftModel, inject_adapter_in_model

    torch.manual_seed(0)
    net = _TinyNet()
    base_state = {k: v.clone() for k, v in net.state_dict().items()}
    config = LoraConfig(
        r=2, lora_alpha=6, target_modules=["proj_in", "mid.0", "mid.2"], init_lora_weights=False
    )
    inject_adapter_in_model(config, net, adapter_name="policy")
    holder = nn.Module()
    holder.backbone = nn.Module()
    holder.backbone.denoiser = net
    x = torch.randn(5, 6)
    expected = net(x).detach()
    if from_checkpoint:
        ckpt = tmp_path / "toy.ckpt"
        torch.save({"state_dict": holder.state_dict(), "hyper_parameters": {"lora_alpha": 6}}, ckpt)
        path = export_lora(str(ckpt), tmp_path / "peft")
    else:
        path = export_lora(holder, tmp_path / "peft")
    assert path == tmp_path / "peft" / PEFT_LORA_FILE
    fresh = _TinyNet()
    fresh.load_state_dict(base_state)
    assert not torch.allclose(fresh(x), expected, atol=1e-4)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "peft"))
    torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=1e-6)


def test_bad_sources(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        export_lora(str(tmp_path / "nope.ckpt"), tmp_path / "o")
    with pytest.raises(ValueError, match="format='onnx'"):
        export_lora(nn.Linear(2, 2), tmp_path / "o", format="onnx")
    with pytest.raises(ValueError, match="no LoRA adapter named 'policy'"):
        export_lora(nn.Linear(2, 2), tmp_path / "o")
    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"backbone.denoiser.w": torch.zeros(2)}}, ckpt)
    with pytest.raises(ValueError, match="no weights of LoRA adapter 'policy'"):
        export_lora(str(ckpt), tmp_path / "o", lora_alpha=1)


def test_export_from_marble_module_and_its_checkpoint(tiny_dir: str, tmp_path) -> None:
    """A trained MarbleDiffusionModule's policy, exported from the live module and from the
    checkpoint Lightning writes, reproduces the policy's velocity in a fresh diffusers pipeline."""
    module_lib = pytest.importorskip(
        "marble_lightning.module", reason="module.py (engineer 4a) not present"
    )
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from marble_lightning.testing import BrightnessReward

    backbone = SD3Backbone(tiny_dir, resolution=TINY_SD3_RESOLUTION, max_sequence_length=4)
    module = module_lib.MarbleDiffusionModule(
        backbone,
        [
            BrightnessReward(1.0, name="bright"),
            BrightnessReward(0.5, keyword="red", name="grey_red"),
        ],
        mode="marble",
        group_size=2,
        sample_steps=2,
        lora_rank=2,
        lora_alpha=6,
        lr=5e-2,
    )
    trainer = Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=DataLoader(["a", "b red"], batch_size=2, collate_fn=list))
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)

    cond = backbone.encode_prompts(["a red circle"])
    x = torch.randn(1, *backbone.sample_shape, generator=torch.Generator().manual_seed(5))
    with module.using_adapter("policy"):
        expected = _transformer_out(backbone.denoiser, x, cond)
    export_lora(module, tmp_path / "live")
    _check_diffusers_round_trip(tiny_dir, tmp_path / "live", expected, x, cond)
    export_lora(str(ckpt), tmp_path / "ckpt")  # alpha from the checkpoint's hyper-parameters
    _check_diffusers_round_trip(tiny_dir, tmp_path / "ckpt", expected, x, cond)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    )


@pytest.mark.parametrize("from_checkpoint", [False, True])
def test_unet_peft_export_loads_exactly_with_diffusers_loader(
    tmp_path, from_checkpoint: bool
) -> None:
    """The toy backbone's case (a UNet2DConditionModel, peft format): diffusers' own
    ``load_lora_adapter`` rebuilds the adapter with scale alpha / r and reproduces the policy's
    output bit for bit, from either file of the export; peft's loader too."""
    from peft import PeftModel

    unet = _tiny_unet()
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    for name in ("policy", "old"):  # as the module does: the policy plus the old-policy adapter
        unet.add_adapter(
            LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False),
            adapter_name=name,
        )
    unet.set_adapter("policy")
    x, t, c = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 4, 8)
    with torch.no_grad():
        expected = unet(x, t, c).sample
    holder = nn.Module()
    holder.backbone = nn.Module()
    holder.backbone.denoiser = unet
    out = tmp_path / "peft"
    if from_checkpoint:
        ckpt = tmp_path / "toy.ckpt"
        torch.save(
            {"state_dict": holder.state_dict(), "hyper_parameters": {"lora_alpha": ALPHA}}, ckpt
        )
        path = export_lora(str(ckpt), out)
    else:
        path = export_lora(holder, out)
    assert path == out / PEFT_LORA_FILE and (out / DIFFUSERS_LORA_FILE).is_file()
    with safe_open(str(out / DIFFUSERS_LORA_FILE), framework="pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        assert all(k.startswith("transformer.") for k in f.keys())  # noqa: SIM118 (safe_open)
    assert metadata["transformer.r"] == RANK and metadata["transformer.lora_alpha"] == ALPHA

    def fresh():
        model = _tiny_unet()
        model.load_state_dict(base_state)
        return model

    with torch.no_grad():
        assert not torch.allclose(
            fresh()(x, t, c).sample, expected, atol=1e-3
        )  # the adapter matters
    for kwargs in (
        {"use_safetensors": True},  # picks pytorch_lora_weights.safetensors, prefix "transformer"
        {"weight_name": PEFT_LORA_FILE, "prefix": "base_model.model"},
    ):
        model = fresh()
        model.load_lora_adapter(str(out), **kwargs)
        config = next(iter(model.peft_config.values()))
        assert (config.r, config.lora_alpha) == (RANK, ALPHA), kwargs
        with torch.no_grad():
            assert torch.equal(model(x, t, c).sample, expected), kwargs
    loaded = PeftModel.from_pretrained(fresh(), str(out))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, c).sample, expected)


def test_sd3_export_loads_with_model_level_loader(tiny_dir: str, tmp_path) -> None:
    """The SD3 export also loads exactly through the transformer's own ``load_lora_adapter``."""
    from diffusers import SD3Transformer2DModel

    backbone = _adapted_backbone(tiny_dir)
    cond = backbone.encode_prompts(["a red circle"])
    x = torch.randn(1, *backbone.sample_shape, generator=torch.Generator().manual_seed(6))
    expected = _transformer_out(backbone.denoiser, x, cond)
    export_lora(backbone, tmp_path / "lora")
    transformer = SD3Transformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    transformer.load_lora_adapter(str(tmp_path / "lora"), use_safetensors=True)
    config = next(iter(transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)
    torch.testing.assert_close(
        _transformer_out(transformer, x, cond), expected, atol=1e-6, rtol=1e-6
    )


def test_export_from_a_sharded_checkpoint_folder_equals_the_file(tiny_dir: str, tmp_path) -> None:
    """A distributed-checkpoint folder (the layout MarbleModelParallelStrategy writes: adapter
    tensors under ``state_dict.``, Lightning's ``meta.pt`` beside) exports the same files as the
    equivalent single-file checkpoint."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import save

    from marble_lightning.lora_export import read_checkpoint

    backbone = _adapted_backbone(tiny_dir)
    state = {
        f"backbone.{k}": v.detach().clone()
        for k, v in backbone.state_dict().items()
        if ".lora_" in k
    }
    meta = {"hyper_parameters": {"lora_alpha": ALPHA}, "global_step": 3}
    single = tmp_path / "single" / "checkpoints" / "last.ckpt"
    single.parent.mkdir(parents=True)
    torch.save({"state_dict": state, **meta}, single)
    folder = tmp_path / "sharded" / "checkpoints" / "last.ckpt"
    save(
        {"state_dict": {k: v.clone() for k, v in state.items()}}, checkpoint_id=folder, no_dist=True
    )
    torch.save(meta, folder / "meta.pt")

    read = read_checkpoint(folder)
    assert read["hyper_parameters"] == {"lora_alpha": ALPHA} and read["global_step"] == 3
    assert sorted(read["state_dict"]) == sorted(state)
    for key, value in state.items():
        assert torch.equal(read["state_dict"][key], value)
    a = load_file(export_lora(str(single), tmp_path / "from_file"))
    b = load_file(export_lora(str(folder), tmp_path / "from_folder"))  # alpha from meta.pt
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="sharded checkpoint folder"):
        read_checkpoint(tmp_path / "sharded")  # a folder without .metadata
