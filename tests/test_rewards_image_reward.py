"""ImageRewardReward: the release's ImageReward.pt rebuilt on transformers' BLIP modules.

A tiny random checkpoint in the release's key layout (``save_tiny_image_reward``) is loaded through
the public constructor and scored against an independent re-computation written here in plain torch
ops straight from the original keys (BLIP ViT, BERT with cross-attention, linear MLP head, release
constants), plus masking, batching and the refusal paths (missing, garbled, crafted pickle).
"""

from __future__ import annotations

import math
import pickle
import re

import pytest
import torch
import torch.nn.functional as F

from marble_lightning.rewards.base import MultiReward
from marble_lightning.rewards.image_reward import ImageRewardReward
from marble_lightning.testing import TINY_IMAGE_REWARD, ChannelMean, save_tiny_image_reward

RELEASE_MEAN = 0.16717362830052426  # ImageReward.mean / ImageReward.std in the release
RELEASE_STD = 1.0333394966054072
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a photo of a cat", "A red dog on the blue cat, with a dog.", "", "zebra"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = save_tiny_image_reward(tmp_path_factory.mktemp("image_reward"), seed=0)
    paths["state"] = torch.load(paths["checkpoint"], weights_only=True)
    return paths


def make_reward(tiny, **kwargs) -> ImageRewardReward:
    kwargs.setdefault("vision_heads", TINY_IMAGE_REWARD["vision_heads"])
    return ImageRewardReward(str(tiny["checkpoint"]), tokenizer=str(tiny["tokenizer"]), **kwargs)


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- independent re-computation


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _lin(x, sd, prefix):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def _heads(x, h):
    b, n, d = x.shape
    return x.view(b, n, h, d // h).permute(0, 2, 1, 3)


def _attend(q, k, v, h, bias=None):
    q, k, v = _heads(q, h), _heads(k, h), _heads(v, h)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    out = scores.softmax(-1) @ v
    return out.permute(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)


def reference_vit(sd, pixels, heads, depth):
    """BLIP's timm-style ViT from the ``blip.visual_encoder.*`` keys (LayerNorm eps 1e-6)."""
    p = "blip.visual_encoder."
    w = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, sd[p + "patch_embed.proj.bias"], stride=w.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[p + "pos_embed"]
    d = x.shape[-1]
    for i in range(depth):
        b = f"{p}blocks.{i}."
        q, k, v = _lin(_ln(x, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").split(d, dim=-1)
        x = x + _lin(_attend(q, k, v, heads), sd, b + "attn.proj")
        hidden = F.gelu(_lin(_ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1"))
        x = x + _lin(hidden, sd, b + "mlp.fc2")
    return _ln(x, sd, p + "norm", 1e-6)


def reference_bert(sd, ids, mask, image_embeds, heads, depth, eps=1e-12):
    """BLIP's BERT (``blip.text_encoder.*``), multimodal mode: self-attn, cross-attn, FFN."""
    p = "blip.text_encoder."
    x = sd[p + "embeddings.word_embeddings.weight"][ids]
    x = x + sd[p + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = _ln(x, sd, p + "embeddings.LayerNorm", eps)
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0  # BLIP's extended attention mask
    for i in range(depth):
        b = f"{p}encoder.layer.{i}."
        a = f"{b}attention."
        ctx = _attend(
            _lin(x, sd, a + "self.query"),
            _lin(x, sd, a + "self.key"),
            _lin(x, sd, a + "self.value"),
            heads,
            bias,
        )
        x = _ln(_lin(ctx, sd, a + "output.dense") + x, sd, a + "output.LayerNorm", eps)
        c = f"{b}crossattention."
        q = _lin(x, sd, c + "self.query")
        ctx = _attend(
            q,
            _lin(image_embeds, sd, c + "self.key"),
            _lin(image_embeds, sd, c + "self.value"),
            heads,
        )
        x = _ln(_lin(ctx, sd, c + "output.dense") + x, sd, c + "output.LayerNorm", eps)
        hidden = F.gelu(_lin(x, sd, b + "intermediate.dense"))
        x = _ln(_lin(hidden, sd, b + "output.dense") + x, sd, b + "output.LayerNorm", eps)
    return x[:, 0]


def reference_scores(tiny, imgs, prompts):
    """The release's ``ImageReward.score`` on already 32-px images, in plain torch ops."""
    from transformers import BertTokenizer

    sd = {k: v.double() if v.is_floating_point() else v for k, v in tiny["state"].items()}
    c = TINY_IMAGE_REWARD
    tok = BertTokenizer.from_pretrained(str(tiny["tokenizer"]))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    text = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    pixels = ((imgs - CLIP_MEAN) / CLIP_STD).double()
    image_embeds = reference_vit(sd, pixels, c["vision_heads"], c["vision_layers"])
    cls = reference_bert(
        sd, text.input_ids, text.attention_mask, image_embeds, c["text_heads"], c["text_layers"]
    )
    x = cls
    for index in (
        0,
        2,
        4,
        6,
        7,
    ):  # Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
        x = _lin(x, sd, f"mlp.layers.{index}")
    return ((x.squeeze(-1) - RELEASE_MEAN) / RELEASE_STD).float()


# ---------------------------------------------------------------- tests


def test_matches_independent_recomputation(tiny) -> None:
    reward = make_reward(tiny, med_config=str(tiny["med_config"]))
    imgs = images(4)
    got = reward(imgs, PROMPTS)
    want = reference_scores(tiny, imgs, PROMPTS)
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # both inputs matter: another image or another prompt changes the score
    assert (reward(images(4, seed=1), PROMPTS) - got).abs().min() > 1e-4
    assert (reward(imgs, PROMPTS[1:] + PROMPTS[:1]) - got).abs().min() > 1e-4


def test_med_config_next_to_checkpoint_and_heads(tiny, tmp_path) -> None:
    # the tiny folder holds med_config.json next to ImageReward.pt: picked up without naming it
    auto = make_reward(tiny)
    assert auto.med_config == str(tiny["med_config"])
    imgs = images(2, seed=3)
    want = reference_scores(tiny, imgs, PROMPTS[:2])
    torch.testing.assert_close(auto(imgs, PROMPTS[:2]), want, atol=1e-5, rtol=1e-5)
    # a lone checkpoint without med_config: heads default to width // 64 (one head here) -> differs
    lone = tmp_path / "ImageReward.pt"
    lone.write_bytes(tiny["checkpoint"].read_bytes())
    single = ImageRewardReward(str(lone), tokenizer=str(tiny["tokenizer"]), vision_heads=2)
    assert single.med_config is None
    assert not torch.allclose(single(imgs, PROMPTS[:2]), want, atol=1e-4)


def test_batches_resizing_and_dtype(tiny) -> None:
    reward = make_reward(tiny)
    imgs = images(5, seed=4)
    prompts = (PROMPTS + ["two dogs"])[:5]
    whole = reward(imgs, prompts)
    one_by_one = torch.cat([reward(imgs[i : i + 1], prompts[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(whole, one_by_one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        make_reward(tiny, batch_size=2)(imgs, prompts), whole, atol=1e-5, rtol=1e-5
    )
    # larger, non-square images: shortest side to 32 (bicubic, antialiased), centre crop
    big = images(2, size=64, seed=5)[..., :48]  # [2, 3, 64, 48]
    from marble_lightning.rewards._loading import resize_center_crop

    torch.testing.assert_close(
        reward(big, prompts[:2]),
        reward(resize_center_crop(big, 32), prompts[:2]),
        atol=1e-5,
        rtol=1e-5,
    )
    # a prompt longer than 35 tokens is truncated like the release (same score as its first 33
    # words)
    long = " ".join(["cat"] * 60)
    torch.testing.assert_close(reward(imgs[:1], [long]), reward(imgs[:1], [" ".join(["cat"] * 33)]))
    assert reward(imgs[:0], []).shape == (0,)
    half = make_reward(tiny, dtype="bfloat16")(imgs, prompts)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - whole).abs().max() < 0.3


def test_applies_to_every_prompt_and_masks_in_multireward(tiny) -> None:
    reward = make_reward(tiny)
    assert reward.applies_to(PROMPTS).tolist() == [True] * 4
    multi = MultiReward([reward, ChannelMean(0, keyword="dog", name="red_dog")])
    imgs = images(4, seed=6)
    batch = multi(imgs, PROMPTS, step=3)
    assert batch.names == ["imagereward", "red_dog"]
    assert batch.mask[:, 0].tolist() == [True] * 4
    assert batch.mask[:, 1].tolist() == [False, True, False, False]
    torch.testing.assert_close(batch.values[:, 0], reward(imgs, PROMPTS))
    # the weights stay out of the module tree (never in a training checkpoint)
    assert list(reward.state_dict()) == [] and list(reward.parameters()) == []


def test_construction_is_lazy_and_validates_arguments(tiny, tmp_path) -> None:
    default = ImageRewardReward()  # hub release: nothing downloaded until the first call
    assert default.model_ref == "ImageReward-v1.0" and not default._model.loaded
    with pytest.raises(FileNotFoundError, match=r"imagereward.*nope\.pt"):
        ImageRewardReward(str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="med_config.json"):
        ImageRewardReward(med_config=str(tmp_path / "med_config.json"))
    with pytest.raises(ValueError, match="batch_size"):
        make_reward(tiny, batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        make_reward(tiny, dtype="float8")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_reward(tiny)(images(1) + 2, ["a"])


def test_garbled_and_wrong_layout_checkpoints_name_the_path(tiny, tmp_path) -> None:
    garbled = tmp_path / "garbled.pt"
    garbled.write_bytes(b"\x00not a torch file" * 8)
    with pytest.raises(ValueError, match=r"garbled\.pt"):
        make_reward_at(garbled, tiny)(images(1), ["a cat"])

    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=r"other\.pt.*not an ImageReward state dict"):
        make_reward_at(other, tiny)(images(1), ["a cat"])

    broken = tmp_path / "broken.pt"
    state = dict(tiny["state"])
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(state, broken)
    with pytest.raises(
        ValueError,
        match=r"broken\.pt.*missing "
        r"blip\.text_encoder\.encoder\.layer\.1\.crossattention\.self\.key\.weight",
    ):
        make_reward_at(broken, tiny)(images(1), ["a cat"])

    state = dict(tiny["state"])
    del state["blip.visual_encoder.blocks.1.attn.proj.bias"]  # named in the release's layout
    torch.save(state, broken)
    with pytest.raises(
        ValueError, match=r"broken\.pt.*missing blip\.visual_encoder\.blocks\.1\.attn\.proj\.bias"
    ):
        make_reward_at(broken, tiny)(images(1), ["a cat"])

    state = dict(tiny["state"])
    state["mlp.layers.7.weight"] = torch.zeros(2, 4)  # head ending in 2 outputs
    torch.save(state, broken)
    with pytest.raises(ValueError, match=r"broken\.pt.*MLP head widths"):
        make_reward_at(broken, tiny)(images(1), ["a cat"])


def make_reward_at(path, tiny) -> ImageRewardReward:
    return ImageRewardReward(
        str(path),
        med_config=str(tiny["med_config"]),
        tokenizer=str(tiny["tokenizer"]),
        vision_heads=2,
    )


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling would call open(marker, "w")
        return (open, (self.marker, "w"))


def test_crafted_pickle_is_refused_without_executing(tiny, tmp_path) -> None:
    marker = tmp_path / "executed"
    plain = tmp_path / "plain" / "ImageReward.pt"  # a bare pickle
    plain.parent.mkdir()
    with open(plain, "wb") as f:
        pickle.dump({"mlp.layers.0.weight": _Payload(str(marker))}, f, protocol=2)
    zipped = tmp_path / "zipped" / "ImageReward.pt"  # torch.save's zip format, same payload
    zipped.parent.mkdir()
    torch.save({"mlp.layers.0.weight": _Payload(str(marker))}, zipped)
    assert not marker.exists()
    for crafted in (plain, zipped):
        reward = make_reward_at(crafted, tiny)
        pattern = re.escape(str(crafted)) + r".*weights_only=True.*nothing was executed"
        with pytest.raises(ValueError, match=pattern):
            reward(images(1), ["a cat"])
        assert not marker.exists()


def _release_shapes() -> dict[str, torch.Tensor]:
    """Meta tensors with the shapes of the released ImageReward.pt (ViT-L/16 224, BERT-base)."""
    shapes = {
        "cls_token": (1, 1, 1024),
        "pos_embed": (1, 197, 1024),
        "patch_embed.proj.weight": (1024, 3, 16, 16),
        "patch_embed.proj.bias": (1024,),
        "norm.weight": (1024,),
        "norm.bias": (1024,),
    }
    state = {"blip.visual_encoder." + k: v for k, v in shapes.items()}
    for i in range(24):
        b = f"blip.visual_encoder.blocks.{i}."
        for name, n_out, n_in in (
            ("attn.qkv", 3072, 1024),
            ("attn.proj", 1024, 1024),
            ("mlp.fc1", 4096, 1024),
            ("mlp.fc2", 1024, 4096),
        ):
            state.update({b + name + ".weight": (n_out, n_in), b + name + ".bias": (n_out,)})
        state.update({b + n + s: (1024,) for n in ("norm1", "norm2") for s in (".weight", ".bias")})
    t = "blip.text_encoder."
    state.update(
        {
            t + "embeddings.word_embeddings.weight": (30524, 768),
            t + "embeddings.position_embeddings.weight": (512, 768),
            t + "embeddings.LayerNorm.weight": (768,),
            t + "embeddings.LayerNorm.bias": (768,),
        }
    )
    for i in range(12):
        b = f"{t}encoder.layer.{i}."
        for block, kv in (("attention", 768), ("crossattention", 1024)):
            for name, n_in in (
                ("self.query", 768),
                ("self.key", kv),
                ("self.value", kv),
                ("output.dense", 768),
            ):
                state.update(
                    {f"{b}{block}.{name}.weight": (768, n_in), f"{b}{block}.{name}.bias": (768,)}
                )
            state.update({f"{b}{block}.output.LayerNorm{s}": (768,) for s in (".weight", ".bias")})
        state.update(
            {
                b + "intermediate.dense.weight": (3072, 768),
                b + "intermediate.dense.bias": (3072,),
                b + "output.dense.weight": (768, 3072),
                b + "output.dense.bias": (768,),
                b + "output.LayerNorm.weight": (768,),
                b + "output.LayerNorm.bias": (768,),
            }
        )
    state.update({"blip.vision_proj.weight": (256, 1024), "blip.text_proj.weight": (256, 768)})
    dims = (768, 1024, 128, 64, 16, 1)
    for index, n_in, n_out in zip((0, 2, 4, 6, 7), dims[:-1], dims[1:]):
        state.update(
            {f"mlp.layers.{index}.weight": (n_out, n_in), f"mlp.layers.{index}.bias": (n_out,)}
        )
    return {k: torch.empty(v, device="meta") for k, v in state.items()}


def test_release_shapes_give_the_release_architecture() -> None:
    from marble_lightning.rewards.image_reward import ImageRewardScorer

    with torch.device("meta"):  # no memory, no init cost
        scorer = ImageRewardScorer.from_state_dict(_release_shapes())  # default heads: width // 64
    v, t = scorer.vision.config, scorer.text.config
    assert (
        v.hidden_size,
        v.num_hidden_layers,
        v.num_attention_heads,
        v.image_size,
        v.patch_size,
    ) == (1024, 24, 16, 224, 16)
    assert (v.intermediate_size, v.layer_norm_eps) == (4096, 1e-6)
    assert (
        t.vocab_size,
        t.hidden_size,
        t.encoder_hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
    ) == (30524, 768, 1024, 12, 12)
    assert (t.max_position_embeddings, t.layer_norm_eps, t.hidden_act) == (512, 1e-12, "gelu")
    assert [layer.out_features for layer in scorer.mlp] == [1024, 128, 64, 16, 1]
