"""Train the toy world's tiny CLIP model (open_clip) on rendered (image, caption) pairs.

Usage::

    python -m marble_lightning.toy.train_clip --out marble_lightning/toy/assets --minutes 5

writes ``toy_clip.json`` (an open_clip model config: a 2-layer ViT on ``32 x 32`` images with
``4 x 4`` patches and a 2-layer text transformer using open_clip's own BPE tokenizer),
``toy_clip.safetensors`` (the weights, fp16) and ``toy_clip_eval.json`` (retrieval accuracy on
fresh renders). Load it with::

    open_clip.add_model_config("…/toy_clip.json")
    model = open_clip.create_model("toy_clip", pretrained="…/toy_clip.safetensors")
    tokenizer = open_clip.get_tokenizer("toy_clip")

or through
``OpenCLIPScoreReward(model_config=".../toy_clip.json", checkpoint=".../toy_clip.safetensors")``.
Images are fed at 32 x 32 in ``[0, 1]``, normalised with open_clip's default (OpenAI) mean and std,
which is what the reward does for a model registered from a config file.

Training: symmetric InfoNCE (CLIP's loss) with a learned temperature on batches of distinct
prompts from the whole toy grammar (train and held-out splits: this is a reward model, not the
policy), each drawn with a fresh random layout; a third of the images are degraded (blur, noise,
tint) so that imperfect generations still get graded similarities.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from marble_lightning.toy.prompts import (
    TEMPLATES,
    heldout_prompts,
    parse_prompt,
    prompt_family,
    train_prompts,
)
from marble_lightning.toy.world import IMAGE_SIZE, render_scene, to_tensor_images

MODEL_NAME = "toy_clip"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

TOY_CLIP_CONFIG: dict = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": IMAGE_SIZE,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 4,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {
        "context_length": 24,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
        "mlp_ratio": 2.0,
    },
}
"""The open_clip model config written to ``toy_clip.json``."""


def all_prompts() -> list[str]:
    """Every toy prompt (train and held-out splits)."""
    return train_prompts() + heldout_prompts()


def degrade(
    images: torch.Tensor, rng: np.random.Generator, fraction: float = 1 / 3
) -> torch.Tensor:
    """Blur, add noise to, or tint a random ``fraction`` of images ``[B, 3, H, W]`` (in place
    copy)."""
    out = images.clone()
    for i in range(images.shape[0]):
        if rng.random() >= fraction:
            continue
        kind = int(rng.integers(3))
        if kind == 0:
            out[i] = F.avg_pool2d(out[i : i + 1], 3, 1, 1, count_include_pad=False)[0]
        elif kind == 1:
            out[i] = (out[i] + float(rng.uniform(0.05, 0.2)) * torch.randn_like(out[i])).clamp(0, 1)
        else:
            tint = torch.tensor(rng.uniform(0.8, 1.0, size=3), dtype=out.dtype).view(3, 1, 1)
            out[i] = out[i] * tint
    return out


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` images -> open_clip input (OpenAI mean/std)."""
    mean = torch.tensor(OPENAI_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def build(config_path: Path):
    """Register ``config_path`` with open_clip and return ``(model, tokenizer)`` (random init)."""
    import open_clip

    open_clip.add_model_config(config_path)
    name = config_path.stem
    return open_clip.create_model(name, device="cpu"), open_clip.get_tokenizer(name)


@torch.no_grad()
def retrieval_accuracy(
    model, tokenizer, samples_per_prompt: int = 2, seed: int = 99
) -> dict[str, float]:
    """Top-1 text retrieval among all toy prompts for fresh renders, per family and overall.

    A hit is a retrieved prompt with the same :class:`SceneSpec` (the three phrasings of a text
    prompt describe the same image, so any of them counts).
    """
    model.eval()
    prompts = all_prompts()
    rng = np.random.default_rng(seed)
    specs = [parse_prompt(p) for p in prompts]
    txt = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    hits: dict[str, list[float]] = {t: [] for t in TEMPLATES}
    for _ in range(samples_per_prompt):
        imgs = to_tensor_images([render_scene(parse_prompt(p), rng).image for p in prompts])
        img = F.normalize(model.encode_image(normalize(imgs)), dim=-1)
        pred = (img @ txt.T).argmax(-1)
        for i, p in enumerate(prompts):
            hits[prompt_family(p)].append(float(specs[int(pred[i])] == specs[i]))
    res = {t: round(float(np.mean(v)), 4) for t, v in hits.items()}
    res["all"] = round(float(np.mean([x for v in hits.values() for x in v])), 4)
    return res


def train(
    out: Path, minutes: float, max_steps: int | None, batch: int, lr: float, seed: int, threads: int
) -> dict:
    """Train and write ``toy_clip.{json,safetensors}`` and ``toy_clip_eval.json`` to ``out``."""
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{MODEL_NAME}.json"
    config_path.write_text(json.dumps(TOY_CLIP_CONFIG, indent=1) + "\n")
    model, tokenizer = build(config_path)
    prompts = all_prompts()
    if batch > len(prompts):
        raise ValueError(
            f"batch {batch} exceeds the number of distinct toy prompts ({len(prompts)})"
        )
    tokens = tokenizer(prompts)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    t0, step, losses = time.time(), 0, []
    model.train()
    while time.time() - t0 < minutes * 60 and (max_steps is None or step < max_steps):
        idx = rng.choice(len(prompts), size=batch, replace=False)
        imgs = to_tensor_images([render_scene(parse_prompt(prompts[i]), rng).image for i in idx])
        imgs = degrade(imgs, rng)
        f_img = F.normalize(model.encode_image(normalize(imgs)), dim=-1)
        f_txt = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * f_img @ f_txt.T
        target = torch.arange(batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        warm = min(1.0, (step + 1) / 50)
        for g in opt.param_groups:
            g["lr"] = lr * warm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 50 == 0:
            print(
                f"[{time.strftime('%H:%M:%S')}] step {step} loss {np.mean(losses[-50:]):.4f} "
                f"{(time.time() - t0) / step:.3f} s/step",
                flush=True,
            )
    model.eval()
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"{MODEL_NAME}.safetensors"))
    result = {
        "steps": step,
        "minutes": round((time.time() - t0) / 60, 2),
        "batch": batch,
        "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
        "retrieval_top1": retrieval_accuracy(model, tokenizer),
    }
    (out / f"{MODEL_NAME}_eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m marble_lightning.toy.train_clip", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", required=True, help="folder for toy_clip.json / toy_clip.safetensors")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    train(Path(a.out), a.minutes, a.max_steps, a.batch, a.lr, a.seed, a.threads)


if __name__ == "__main__":
    main(sys.argv[1:])
