"""PickScore, Aesthetic and HPS v2.1 on tiny random models in the real formats."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from marble_lightning.rewards.aesthetic import AestheticMLP, AestheticReward
from marble_lightning.rewards.hps import HPSv21Reward
from marble_lightning.rewards.pickscore import PickScoreReward
from marble_lightning.testing import save_aesthetic_mlp, save_tiny_clip, save_tiny_open_clip

PROMPTS = ["a cat", "two red circles", "a photo of a dog"]


def images_u8(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255.0


def pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=1)


def hf_forward(folder, images, prompts):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=prompts, images=pil(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model, model(**inputs)


# ---------------------------------------------------------------- PickScore
def test_pickscore_is_the_model_logit(clip_dir) -> None:
    images = images_u8(3)
    _, out = hf_forward(clip_dir, images, PROMPTS)
    expected = out.logits_per_image.diagonal()  # exp(logit_scale) * cosine, PickScore's score
    values = PickScoreReward(str(clip_dir), processor=str(clip_dir))(images, PROMPTS)
    torch.testing.assert_close(values, expected, atol=1e-4, rtol=1e-4)
    normalized = PickScoreReward(str(clip_dir), processor=str(clip_dir), normalize=26.0)(
        images, PROMPTS
    )
    torch.testing.assert_close(normalized, expected / 26.0, atol=1e-5, rtol=1e-4)


def test_pickscore_errors(clip_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="normalize"):
        PickScoreReward(str(clip_dir), processor=str(clip_dir), normalize=0.0)
    with pytest.raises(FileNotFoundError, match="pickscore.*absent"):
        PickScoreReward(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PickScoreReward(str(clip_dir), processor=str(clip_dir))(images_u8(1) * 255, ["a"])


# ---------------------------------------------------------------- Aesthetic
def test_aesthetic_mlp_structure() -> None:
    keys = set(AestheticMLP(768).state_dict())
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    shapes = [
        tuple(AestheticMLP(768).state_dict()[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)
    ]
    assert shapes == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_aesthetic_matches_hand_computation(clip_dir, tmp_path, suffix: str) -> None:
    mlp_path = save_aesthetic_mlp(tmp_path / f"mlp{suffix}", input_dim=16)
    images = images_u8(3, seed=2)
    model, _ = hf_forward(clip_dir, images, PROMPTS)
    from transformers import CLIPProcessor

    from marble_lightning.rewards._loading import model_output_features

    pv = CLIPProcessor.from_pretrained(clip_dir)(images=pil(images), return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        f = model_output_features(model.get_image_features(pixel_values=pv))
    f = f / f.norm(dim=-1, keepdim=True)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(mlp_path))
    else:
        sd = torch.load(mlp_path, weights_only=True)
    h = f
    for i in (0, 2, 4, 6, 7):  # linear layers only: dropout is identity in eval, no activations
        h = h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    reward = AestheticReward(str(mlp_path), clip_model=str(clip_dir))
    values = reward(images, PROMPTS)
    torch.testing.assert_close(values, h.squeeze(-1), atol=1e-5, rtol=1e-4)
    assert len(reward.state_dict()) == 0


def test_aesthetic_errors(clip_dir, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="aesthetic.*missing.pth"):
        AestheticReward(str(tmp_path / "missing.pth"), clip_model=str(clip_dir))
    wrong_dim = save_aesthetic_mlp(tmp_path / "wide.safetensors", input_dim=24)
    with pytest.raises(ValueError, match="does not match"):
        AestheticReward(str(wrong_dim), clip_model=str(clip_dir))(images_u8(1), ["a"])
    junk = tmp_path / "junk.pt"
    torch.save({"w": torch.zeros(2)}, junk)
    with pytest.raises(ValueError, match="not an aesthetic MLP"):
        AestheticReward(str(junk), clip_model=str(clip_dir))(images_u8(1), ["a"])
    pickled = tmp_path / "pickled.pt"
    torch.save({"layers.0.weight": AestheticMLP}, pickled)  # arbitrary objects are refused
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        AestheticReward(str(pickled), clip_model=str(clip_dir))(images_u8(1), ["a"])


# ---------------------------------------------------------------- HPS v2.1
@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("hps")
    config, ckpt = save_tiny_open_clip(folder, name="tiny-hps")
    from safetensors.torch import load_file

    pt = folder / "HPS_v2.1_tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in load_file(str(ckpt)).items()}}, pt)
    return config, pt


def test_hps_matches_reference_formula(hps_files) -> None:
    import open_clip

    config, pt = hps_files
    reward = HPSv21Reward(str(pt), model_config=str(config))
    images = images_u8(3, seed=3)
    values = reward(images, PROMPTS)
    # reference: outputs of model(image, text) (normalised features), diag(img @ txt.T)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-hps", output_dict=True)
    sd = torch.load(pt, weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    model.eval()
    with torch.no_grad():
        out = model(
            torch.stack([preprocess(im) for im in pil(images)]),
            open_clip.get_tokenizer("tiny-hps")(PROMPTS),
        )
    expected = torch.diagonal(out["image_features"] @ out["text_features"].T)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


def test_hps_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="hpsv21.*HPS_v2.1_compressed.pt"):
        HPSv21Reward(str(tmp_path / "HPS_v2.1_compressed.pt"))
