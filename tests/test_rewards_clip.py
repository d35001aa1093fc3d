"""CLIP-score rewards on tiny random models saved in the real formats, against hand computations."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from marble_lightning.rewards.clip_score import CLIPScoreReward, OpenCLIPScoreReward
from marble_lightning.testing import save_tiny_clip, save_tiny_open_clip

PROMPTS = ["a cat", "a photo of a dog", 'a sign that says "red"']


def quantized_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random images on the uint8 grid, so PIL round trips are exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255.0


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (bilinear upsampling of a coarse grid) on the uint8 grid."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 5, 7, generator=g)
    up = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    return (up * 255).round() / 255.0


def pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_open_clip(tmp_path_factory.mktemp("openclip"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


# ---------------------------------------------------------------- open_clip
def open_clip_reference(
    config_path, ckpt, images: torch.Tensor, prompts: list[str]
) -> torch.Tensor:
    """Independent: open_clip's own model + preprocess transform on PIL images, weights via
    safetensors."""
    import open_clip
    from safetensors.torch import load_file

    name = config_path.stem
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.load_state_dict(load_file(str(ckpt)))
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        x = torch.stack([preprocess(im) for im in pil(images)])
        fi = model.encode_image(x)
        ft = model.encode_text(tokenizer(prompts))
    fi = fi / fi.norm(dim=-1, keepdim=True)
    ft = ft / ft.norm(dim=-1, keepdim=True)
    return (fi * ft).sum(-1)


def test_open_clip_matches_hand_computation(open_clip_files) -> None:
    config_path, ckpt = open_clip_files
    reward = OpenCLIPScoreReward(str(config_path), str(ckpt), scale=2.5)
    assert not reward._clip.loaded  # lazy
    images = quantized_images(3, 32, 32)
    values = reward(images, PROMPTS)
    expected = 2.5 * open_clip_reference(config_path, ckpt, images, PROMPTS)
    assert values.dtype == torch.float32 and values.shape == (3,)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)
    assert values.abs().max() > 1e-3  # not a degenerate model
    assert len(reward.state_dict()) == 0  # frozen weights stay out of the module tree


def test_open_clip_resizes_like_reference(open_clip_files) -> None:
    config_path, ckpt = open_clip_files
    reward = OpenCLIPScoreReward(str(config_path), str(ckpt))
    images = smooth_images(2, 48, 64, seed=1)
    ours = reward.image_embeddings(images)
    # reference: PIL bicubic resize of the shortest side + centre crop (open_clip's transform)
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms(config_path.stem)
    model, _ = reward.clip("cpu")
    with torch.no_grad():
        ref = model.encode_image(torch.stack([preprocess(im) for im in pil(images)]))
    ref = ref / ref.norm(dim=-1, keepdim=True)
    cos = (ours * ref).sum(-1)
    assert cos.min() > 0.995, cos


def test_open_clip_batching_and_torch_checkpoint(open_clip_files, tmp_path) -> None:
    config_path, ckpt = open_clip_files
    from safetensors.torch import load_file

    pt = tmp_path / "wrapped.pt"
    torch.save({"state_dict": load_file(str(ckpt))}, pt)  # HPS-style wrapper, read weights_only
    a = OpenCLIPScoreReward(str(config_path), str(pt), batch_size=1)
    b = OpenCLIPScoreReward(str(config_path), str(ckpt))
    images = quantized_images(3, 32, 32, seed=2)
    torch.testing.assert_close(a(images, PROMPTS), b(images, PROMPTS), atol=1e-5, rtol=1e-5)


def test_open_clip_bad_paths_and_inputs(open_clip_files, tmp_path) -> None:
    config_path, ckpt = open_clip_files
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="openclip_score.*nope.safetensors"):
        OpenCLIPScoreReward(str(config_path), str(missing))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        OpenCLIPScoreReward(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 4}))
    with pytest.raises(ValueError, match="lacks keys"):
        OpenCLIPScoreReward(str(bad))
    reward = OpenCLIPScoreReward(str(config_path), str(ckpt))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(quantized_images(1, 32, 32) * 255, PROMPTS[:1])
    with pytest.raises(ValueError, match="shape"):
        reward(torch.rand(1, 4, 32, 32), PROMPTS[:1])
    with pytest.raises(ValueError, match="dtype"):
        OpenCLIPScoreReward(str(config_path), dtype="float8")
    with pytest.raises(ValueError, match="batch_size"):
        OpenCLIPScoreReward(str(config_path), batch_size=0)


# ---------------------------------------------------------------- transformers CLIP
def transformers_reference(folder, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Independent: the saved CLIPProcessor on PIL images + CLIPModel forward (logits / scale)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=prompts, images=pil(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    # logits_per_image[i, j] = exp(logit_scale) * cos(image i, text j)
    return out.logits_per_image.diagonal() / model.logit_scale.exp()


def test_clipscore_matches_hand_computation(clip_dir) -> None:
    reward = CLIPScoreReward(str(clip_dir))
    images = quantized_images(3, 32, 32, seed=3)
    values = reward(images, PROMPTS)
    expected = transformers_reference(clip_dir, images, PROMPTS)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-4)
    assert values.abs().max() > 1e-3
    scaled = CLIPScoreReward(str(clip_dir), scale=100.0, batch_size=2)(images, PROMPTS)
    torch.testing.assert_close(scaled, 100 * expected, atol=1e-3, rtol=1e-4)


def test_clipscore_resize_close_to_processor(clip_dir) -> None:
    reward = CLIPScoreReward(str(clip_dir))
    images = smooth_images(2, 40, 56, seed=4)
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(clip_dir)
    model, _ = reward.clip("cpu")
    from marble_lightning.rewards._loading import model_output_features

    with torch.no_grad():
        pv = processor(images=pil(images), return_tensors="pt")["pixel_values"]
        ref = model_output_features(model.get_image_features(pixel_values=pv))
    ref = ref / ref.norm(dim=-1, keepdim=True)
    cos = (reward.image_embeddings(images) * ref).sum(-1)
    assert cos.min() > 0.995, cos


def test_clipscore_missing_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="clipscore.*no_model"):
        CLIPScoreReward(str(tmp_path / "no_model"))
    with pytest.raises(FileNotFoundError, match="my_clip"):
        CLIPScoreReward("./my_clip", name="my_clip")
    # a hub id is accepted at construction (loading is lazy; this machine is offline)
    assert CLIPScoreReward("openai/clip-vit-large-patch14").model_local is False


def test_clipscore_bad_images(clip_dir) -> None:
    reward = CLIPScoreReward(str(clip_dir))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(torch.full((1, 3, 32, 32), 200.0), ["a"])
    with pytest.raises(ValueError, match="shape"):
        reward(torch.rand(3, 32, 32), ["a"])


def test_bfloat16_close_to_float32(clip_dir, open_clip_files) -> None:
    images = smooth_images(2, 40, 40, seed=6)
    config_path, ckpt = open_clip_files
    pairs = [
        (CLIPScoreReward(str(clip_dir)), CLIPScoreReward(str(clip_dir), dtype="bfloat16")),
        (
            OpenCLIPScoreReward(str(config_path), str(ckpt)),
            OpenCLIPScoreReward(str(config_path), str(ckpt), dtype="bf16"),
        ),
    ]
    for full, half in pairs:
        a, b = full(images, PROMPTS[:2]), half(images, PROMPTS[:2])
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, atol=0.02, rtol=0.0)
