"""Pretrain the toy world's base model (rectified flow) on procedurally rendered scenes.

Usage::

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000 \\
    MALLOC_TOP_PAD_=1073741824 \\
    python -m marble_lightning.toy.pretrain --out pretrain_runs/base --minutes 40 [--resume]
    python -m marble_lightning.toy.pretrain --out pretrain_runs/base \\
        --export marble_lightning/toy/assets [--snapshot min010]
    python -m marble_lightning.toy.pretrain --eval CHECKPOINT [--eval-samples 4]

(The environment variables keep glibc from returning tensor buffers to the OS every step, which
made CPU steps about 7x slower on the development machine.)

Training: each step renders a batch of scenes for random *training* prompts (a family drawn
uniformly, then a prompt of that family; 10% of prompts replaced by ``""`` so classifier-free
guidance works), draws ``t ~ U(0, 1)`` and noise ``eps``, forms ``x_t = (1 - t) x0 + t eps`` and
regresses the velocity ``eps - x0`` (mean squared error). AdamW with linear warm-up, gradient
clipping at 1, and an exponential moving average (EMA) of the weights, which is what snapshots and
exports contain. The text encoder is trained jointly.

Run folder ``--out``:

* ``state.pt``: the resumable state (weights, EMA, optimizer, step, training seconds, RNG), written
  every ``--checkpoint-minutes`` and at the end; ``--resume`` continues from it. It holds tensors
  and plain values only and is read with ``torch.load(weights_only=True)`` (no pickled objects).
* ``snapshots/minNNN/toy_backbone.{safetensors,json}``: EMA weights every ``--snapshot-minutes`` of
  training time (or ``snapshots/stepNNNNN`` every ``--snapshot-steps``) and at the end, with
  ``eval.json`` (held-out detector and OCR scores). On a busy machine the wall-clock budget buys
  few steps: ``--max-steps`` bounds the run by steps instead.
* ``final -> snapshots/minNNN``: the name of the last snapshot in ``final.txt``.
* the log (stdout): one line per ``--log-every`` steps with the loss and seconds per step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from marble_lightning.rewards.ocr import edit_distance
from marble_lightning.toy.backbone import ASSET_NAME, ToyBackbone, ToyModelConfig, sample
from marble_lightning.toy.detector import ToyDetector
from marble_lightning.toy.prompts import TEMPLATES, heldout_prompts, parse_prompt, train_prompts
from marble_lightning.toy.world import SceneSpec, render_scene, to_tensor_images


def render_batch(prompts: Sequence[str], rng: np.random.Generator) -> torch.Tensor:
    """Ground-truth images ``[B, 3, 32, 32]`` in ``[0, 1]``; an empty prompt draws a random train
    prompt's scene."""
    all_train = train_prompts()
    images = []
    for p in prompts:
        spec = parse_prompt(p if p else all_train[int(rng.integers(len(all_train)))])
        if spec is None:
            raise ValueError(f"not a toy-world prompt: {p!r}")
        images.append(render_scene(spec, rng).image)
    return to_tensor_images(images)


def sample_prompts(batch: int, rng: np.random.Generator, p_uncond: float) -> list[str]:
    """``batch`` training prompts: family uniform, prompt uniform within it, ``""`` with prob
    ``p_uncond``."""
    by_family = {t: train_prompts(t) for t in TEMPLATES}
    out = []
    for _ in range(batch):
        fam = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        prompt = by_family[fam][int(rng.integers(len(by_family[fam])))]
        out.append("" if rng.random() < p_uncond else prompt)
    return out


# ----------------------------------------------------------------------------------------------
# evaluation

_OCR = None


def ocr_read(images: torch.Tensor) -> list[str]:
    """RapidOCR (recognition only) on images ``[B, 3, H, W]`` in ``[0, 1]``; lower-cased, no
    spaces."""
    global _OCR
    if _OCR is None:
        from rapidocr_onnxruntime import RapidOCR

        _OCR = RapidOCR()
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in arr:
        res, _ = _OCR(np.ascontiguousarray(img), use_det=False, use_cls=False, use_rec=True)
        text = res[0][0] if res else ""
        out.append("".join(str(text).lower().split()))
    return out


def score_scene(spec: SceneSpec, detections: list, ocr_text: str | None) -> dict[str, float]:
    """Exact and graded scores of one image against its spec (see :func:`evaluate`)."""
    s: dict[str, float] = {}
    if spec.family == "count":
        (o,) = spec.objects
        right = [d for d in detections if d.label == o.shape and d.color == o.color]
        s["count_exact"] = float(len(right) == o.count and len(detections) == o.count)
        s["count_graded"] = max(0.0, 1.0 - abs(len(right) - o.count) / o.count)
        s["color"] = float(bool(detections) and all(d.color == o.color for d in detections))
        s["shape"] = float(bool(detections) and all(d.label == o.shape for d in detections))
    elif spec.family == "relation":
        a, b = spec.objects
        da = [d for d in detections if d.label == a.shape and d.color == a.color]
        db = [d for d in detections if d.label == b.shape and d.color == b.color]
        both = len(da) >= 1 and len(db) >= 1
        ok = False
        if both:
            xa, xb = da[0].center[0], db[0].center[0]
            ok = xa < xb if spec.relation == "left of" else xa > xb
        s["relation_objects"] = float(both)
        s["relation_exact"] = float(ok and len(detections) == 2)
        s["relation"] = float(ok)
    else:
        assert spec.text is not None and ocr_text is not None
        s["ocr_exact"] = float(ocr_text == spec.text)
        s["ocr_graded"] = 1.0 - min(edit_distance(ocr_text, spec.text), len(spec.text)) / len(
            spec.text
        )
    return s


@torch.no_grad()
def evaluate(
    backbone: ToyBackbone,
    samples_per_prompt: int = 2,
    cfgs: Sequence[float] = (1.0, 3.0),
    steps: int = 15,
    seed: int = 1234,
    prompts: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Held-out accuracy of ``backbone`` with a ``steps``-step Euler sampler, per CFG scale.

    Metrics (means over images): ``count_exact`` (exactly n objects, all of the asked shape and
    colour), ``count_graded`` (``1 - |found - n| / n`` over objects of the asked shape+colour),
    ``color`` / ``shape`` (all detected objects have the asked colour / shape), ``relation``
    (both objects found, first on the asked side), ``relation_exact`` (and nothing else drawn),
    ``ocr_exact`` and ``ocr_graded`` (``1 - edit distance / length``).

    Returns:
        ``{"cfg1.0": {metric: value, ...}, "cfg3.0": {...}}``.
    """
    prompts = list(heldout_prompts() if prompts is None else prompts)
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    specs = [parse_prompt(p) for p in expanded]
    detector = ToyDetector()
    out: dict[str, dict[str, float]] = {}
    for cfg in cfgs:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(expanded), *backbone.sample_shape, generator=gen)
        images = torch.cat(
            [
                sample(
                    backbone, expanded[i : i + 64], steps=steps, cfg=cfg, noise=noise[i : i + 64]
                )
                for i in range(0, len(expanded), 64)
            ]
        )
        text_idx = [i for i, s in enumerate(specs) if s is not None and s.family == "text"]
        texts = dict(zip(text_idx, ocr_read(images[text_idx]))) if text_idx else {}
        dets = detector.detect(images, [["circle", "square"]] * len(expanded))
        sums: dict[str, list[float]] = {}
        for i, spec in enumerate(specs):
            if spec is None:
                continue
            for k, v in score_scene(spec, dets[i], texts.get(i)).items():
                sums.setdefault(k, []).append(v)
        out[f"cfg{cfg}"] = {k: round(float(np.mean(v)), 4) for k, v in sorted(sums.items())}
    return out


# ----------------------------------------------------------------------------------------------
# training


def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                ema[k].copy_(v)


def _ema_model(ema: dict[str, torch.Tensor], config: ToyModelConfig) -> ToyBackbone:
    m = ToyBackbone.from_config(config)
    m.load_state_dict(ema)
    return m.eval()


def load_state(path: Path) -> dict:
    """Read ``state.pt`` with ``torch.load(weights_only=True)``: tensors and plain values only.

    The state holds only tensors, numbers, strings, lists and dicts (no pickled objects), so a
    crafted file cannot run code while it is read; anything else is refused.

    Raises:
        ValueError: the file cannot be read safely (or is not a pretraining state).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"cannot load pretraining state {str(path)!r} safely (torch.load weights_only=True "
            f"refused it; nothing was executed): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(state, dict) or not {"config", "model", "optimizer", "ema", "step"} <= set(
        state
    ):
        raise ValueError(f"{str(path)!r} is not a toy pretraining state (state.pt)")
    return state


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save_snapshot(
    ema: dict[str, torch.Tensor],
    config: ToyModelConfig,
    out: Path,
    minutes: float,
    args: argparse.Namespace,
    step: int,
) -> Path:
    """Write an EMA snapshot (``snapshots/minNNN``) with its held-out eval; returns its folder."""
    folder = (
        out
        / "snapshots"
        / (f"step{step:05d}" if args.snapshot_steps else f"min{round(minutes):03d}")
    )
    model = _ema_model(ema, config)
    model.save(folder / ASSET_NAME)
    t0 = time.time()
    result = {"step": step, "train_minutes": round(minutes, 2)}
    if args.eval_samples > 0:
        result["heldout"] = evaluate(model, samples_per_prompt=args.eval_samples)
    result["eval_seconds"] = round(time.time() - t0, 1)
    (folder / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "final.txt").write_text(folder.name + "\n")
    _log(f"snapshot {folder} {json.dumps(result)}")
    return folder


def train(args: argparse.Namespace) -> None:
    """The training loop (see the module docstring)."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    config = (
        ToyModelConfig.from_dict(json.loads(args.model_config))
        if args.model_config
        else ToyModelConfig()
    )
    st = load_state(state_path) if args.resume and state_path.is_file() else None
    if st is not None:
        config = ToyModelConfig.from_dict(st["config"])
    model = ToyBackbone.from_config(config, freeze_text_encoder=False, seed=args.seed)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99)
    )
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step, trained_s, next_snapshot = 0, 0.0, args.snapshot_minutes
    if args.resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume given but no state at {state_path}")
        assert st is not None
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        ema = st["ema"]
        step, trained_s, next_snapshot = st["step"], st["trained_s"], st["next_snapshot"]
        torch.set_rng_state(st["torch_rng"])
        _log(f"resumed from {state_path} at step {step}, {trained_s / 60:.1f} min trained")
    elif state_path.exists():
        raise FileExistsError(
            f"{state_path} exists: pass --resume to continue or choose another --out"
        )
    n_params = sum(p.numel() for p in model.parameters())
    _log(
        f"training {n_params / 1e6:.2f}M params, batch {args.batch}, lr {args.lr}, target "
        f"{args.minutes} min, out {out}"
    )

    def checkpoint() -> None:
        _atomic_save(
            {
                "config": config.to_dict(),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "ema": ema,
                "step": step,
                "trained_s": trained_s,
                "next_snapshot": next_snapshot,
                "torch_rng": torch.get_rng_state(),
                "args": {
                    k: v
                    for k, v in vars(args).items()
                    if isinstance(v, (str, int, float, bool, type(None)))
                },
            },
            state_path,
        )

    last_ckpt = time.time()
    window_loss, window_n, window_t = 0.0, 0, time.time()
    budget_s = args.minutes * 60
    max_steps = args.max_steps if args.max_steps is not None else float("inf")
    while trained_s < budget_s and step < max_steps:
        t_step = time.time()
        rng = np.random.default_rng(
            [args.seed, step]
        )  # data depends only on (seed, step): resumable
        prompts = sample_prompts(args.batch, rng, args.p_uncond)
        x0 = model.encode_images(render_batch(prompts, rng))
        t = torch.rand(args.batch)
        eps = torch.randn_like(x0)
        tt = t[:, None, None, None]
        xt = (1 - tt) * x0 + tt * eps
        v = model.velocity(xt, t, model.encode_prompts(prompts))
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        _ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        trained_s += time.time() - t_step
        window_loss += loss.item()
        window_n += 1
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        if step % args.log_every == 0:
            dt = (time.time() - window_t) / window_n
            _log(
                f"step {step} loss {window_loss / window_n:.4f} s/step {dt:.3f} trained "
                f"{trained_s / 60:.1f} min lr {lr:.2e}"
            )
            window_loss, window_n, window_t = 0.0, 0, time.time()
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
        if args.snapshot_steps:
            due = step % args.snapshot_steps == 0
        else:
            due = trained_s >= next_snapshot * 60
            if due:
                next_snapshot += args.snapshot_minutes
        if due and trained_s < budget_s and step < max_steps:
            checkpoint()
            save_snapshot(ema, config, out, trained_s / 60, args, step)
            checkpoint()
            window_t = time.time()
    checkpoint()
    folder = save_snapshot(ema, config, out, trained_s / 60, args, step)
    _log(f"done: {step} steps, {trained_s / 60:.1f} min; final snapshot {folder}")


def export(run: Path, dest: Path, snapshot: str | None) -> Path:
    """Copy a snapshot of ``run`` (default: the last) to ``dest`` as fp16 ``toy_backbone.*``."""
    if snapshot is None:
        final = run / "final.txt"
        if not final.is_file():
            raise FileNotFoundError(f"no snapshot recorded in {final}")
        snapshot = final.read_text().strip()
    src = run / "snapshots" / snapshot
    if not src.is_dir():
        raise FileNotFoundError(f"snapshot folder not found: {src}")
    model = ToyBackbone(src / f"{ASSET_NAME}.safetensors")
    path = model.save(dest / ASSET_NAME, dtype=torch.float16)
    if (src / "eval.json").is_file():
        shutil.copy(src / "eval.json", dest / f"{ASSET_NAME}_eval.json")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m marble_lightning.toy.pretrain", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=str, help="run folder (pretrain_runs/base)")
    p.add_argument(
        "--minutes", type=float, default=40.0, help="training time budget (excludes evaluation)"
    )
    p.add_argument("--resume", action="store_true")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--checkpoint-minutes", type=float, default=2.0)
    p.add_argument("--snapshot-minutes", type=float, default=10.0)
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many steps (as well as --minutes)",
    )
    p.add_argument(
        "--snapshot-steps",
        type=int,
        default=None,
        help="snapshot every N steps instead of every --snapshot-minutes",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=2,
        help="images per held-out prompt in snapshot evals (0: none)",
    )
    p.add_argument(
        "--model-config",
        type=str,
        help="JSON overrides of ToyModelConfig, e.g. '{\"block_out_channels\": [8, 16, 32]}'",
    )
    p.add_argument(
        "--export", type=str, help="write the run's snapshot to this folder as toy_backbone.*"
    )
    p.add_argument(
        "--snapshot", type=str, help="snapshot to export (e.g. min010; default: the last)"
    )
    p.add_argument(
        "--eval", type=str, help="evaluate this checkpoint (.safetensors or folder) and exit"
    )
    args = p.parse_args(argv)
    if args.eval:
        torch.set_num_threads(args.threads)
        model = ToyBackbone(args.eval).eval()
        print(json.dumps(evaluate(model, samples_per_prompt=max(1, args.eval_samples)), indent=1))
        return
    if not args.out:
        p.error("--out is required")
    if args.export:
        path = export(Path(args.out), Path(args.export), args.snapshot)
        print(f"exported {path}")
        return
    train(args)


if __name__ == "__main__":
    main(sys.argv[1:])
