"""End-of-run report: plots of alpha and rewards over training, image grids, a summary table.

The plotting helpers are plain functions over the records the module and the evaluation
callback keep (``MarbleDiffusionModule.history``, ``RewardEvalCallback.history``), so they work
on a finished run's checkpoint as well as inside :class:`RunReportCallback`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from typing_extensions import override

from marble_lightning.checks import check_int

__all__ = ["RunReportCallback", "plot_alpha", "plot_rewards", "save_grid", "summary_table"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        finite = [a for a in acc if math.isfinite(a)]
        out.append(sum(finite) / len(finite) if finite else float("nan"))
    return out


def plot_alpha(history: Sequence[dict[str, Any]], names: Sequence[str], path: str | Path) -> Path:
    """Plot the coefficients in use (``record["alpha"]``) against the step; refresh steps marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in history]
    for k, name in enumerate(names):
        ax.plot(steps, [r["alpha"][k] for r in history], label=name)
    refresh = [r["step"] for r in history if r.get("refresh")]
    if refresh and len(refresh) < len(steps):
        ax.scatter(refresh, [0.0] * len(refresh), marker="|", color="k", s=30, label="refresh")
    ax.set_xlabel("step")
    ax.set_ylabel("alpha")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rewards(
    train_history: Sequence[dict[str, Any]],
    eval_history: Sequence[dict[str, Any]],
    names: Sequence[str],
    path: str | Path,
    smooth: int = 10,
) -> Path:
    """One panel per reward: training batch mean (smoothed) and held-out mean (with std error)."""
    plt = _pyplot()
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        key = f"reward/{name}_mean"
        train = [(r["step"], r[key]) for r in train_history if key in r]
        if train:
            xs, ys = zip(*train)
            ax.plot(xs, _smooth(ys, smooth), color="tab:blue", label=f"train (mean of {smooth})")
        ev = [
            (r["step"], r[f"eval/{name}"], r.get(f"eval/{name}_sem", 0.0))
            for r in eval_history
            if f"eval/{name}" in r
        ]
        if ev:
            xs, ys, es = zip(*ev)
            ax.errorbar(xs, ys, yerr=es, color="tab:red", marker="o", capsize=3, label="held-out")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_grid(images: Tensor, path: str | Path, nrow: int = 8, scale: int = 2) -> Path:
    """Save images ``[N, 3, H, W]`` (or videos ``[N, F, 3, H, W]``, one row per clip) in ``[0, 1]``
    as one PNG grid (nearest upscaling by ``scale``)."""
    from PIL import Image
    from torchvision.utils import make_grid

    images = images.detach().float().cpu().clamp(0, 1)
    if images.ndim == 5:  # videos [N, F, 3, H, W] (issue 20): one row of frames per clip
        nrow = images.shape[1]
        images = images.flatten(0, 1)
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=0.5)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    path = Path(path)
    Image.fromarray(array).save(path)
    return path


def summary_table(
    base: dict[str, float],
    final: dict[str, float],
    names: Sequence[str],
    base_sem: dict[str, float] | None = None,
    final_sem: dict[str, float] | None = None,
) -> str:
    """A markdown table of held-out rewards, base vs final, with the change."""
    base_sem, final_sem = base_sem or {}, final_sem or {}
    lines = ["| reward | base | final | change |", "|---|---|---|---|"]
    for name in list(names) + [n for n in final if n not in names]:
        if name not in base or name not in final:
            continue
        b, f = base[name], final[name]
        bs = f" ± {base_sem[name]:.4f}" if name in base_sem else ""
        fs = f" ± {final_sem[name]:.4f}" if name in final_sem else ""
        lines.append(f"| {name} | {b:.4f}{bs} | {f:.4f}{fs} | {f - b:+.4f} |")
    return "\n".join(lines)


class RunReportCallback(Callback):
    """Write the run's report under ``<log_dir>/report`` when ``fit`` ends.

    Place it after the :class:`~marble_lightning.callbacks.RewardEvalCallback` in the callback
    list: that callback's final evaluation also runs at fit end, and callbacks run in list order.

    Files: ``alpha.png``, ``rewards.png``, ``grid_base.png`` / ``grid_final.png`` (held-out
    prompts, fixed seeds, from the :class:`~marble_lightning.callbacks.RewardEvalCallback`),
    ``summary.md`` (base vs final held-out rewards) and ``history.json`` (training and evaluation
    records, and the per-image held-out scores of every evaluation, NaN where a reward does not
    apply, for paired comparisons). The summary is also printed.

    Args:
        out_dir: where to write; default ``<trainer.log_dir>/report``.
        smooth: moving-average window of the training-reward curves.
    """

    def __init__(self, out_dir: str | None = None, smooth: int = 10) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.smooth = check_int("smooth", smooth)
        self.written: Path | None = None

    def _eval_callback(self, trainer: Trainer) -> Any:
        from marble_lightning.callbacks import RewardEvalCallback

        for cb in trainer.callbacks:
            if isinstance(cb, RewardEvalCallback):
                return cb
        return None

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = Path(self.out_dir or Path(trainer.log_dir or trainer.default_root_dir) / "report")
        out.mkdir(parents=True, exist_ok=True)
        names = list(pl_module.reward_names)
        history = list(getattr(pl_module, "history", []))
        if history:
            plot_alpha(history, names, out / "alpha.png")
        eval_cb = self._eval_callback(trainer)
        eval_history = list(getattr(eval_cb, "history", [])) if eval_cb is not None else []
        if history or eval_history:
            plot_rewards(history, eval_history, names, out / "rewards.png", smooth=self.smooth)
        text = ""
        if eval_cb is not None and len(eval_history) >= 1:
            first, last = eval_history[0], eval_history[-1]
            all_names = names + [
                k[5:]
                for k in last
                if k.startswith("eval/") and not k.endswith("_sem") and k[5:] not in names
            ]

            def pick(rec, suffix):
                return {
                    n: rec[f"eval/{n}{suffix}"] for n in all_names if f"eval/{n}{suffix}" in rec
                }

            text = (
                f"Held-out rewards, step {first['step']} (base) vs step {last['step']} (final)\n\n"
                + summary_table(
                    pick(first, ""), pick(last, ""), names, pick(first, "_sem"), pick(last, "_sem")
                )
            )
            for tag, images in (
                ("base", getattr(eval_cb, "first_images", None)),
                ("final", getattr(eval_cb, "last_images", None)),
            ):
                if images is not None:
                    save_grid(images, out / f"grid_{tag}.png")
        (out / "summary.md").write_text(text + "\n")
        samples = (
            [s.tolist() for s in getattr(eval_cb, "samples", [])] if eval_cb is not None else []
        )
        eval_names = (
            list(getattr(eval_cb, "names", None) or names) if eval_cb is not None else names
        )
        record = {
            "names": names,
            "train": history,
            "eval": eval_history,
            "eval_samples": samples,
            "eval_names": eval_names,
        }
        (out / "history.json").write_text(json.dumps(record, indent=1, default=float))
        if text:
            print(text)
        print(f"marble: report written to {out}")
        self.written = out

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "smooth": self.smooth}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.out_dir = state_dict.get("out_dir", self.out_dir)
        self.smooth = state_dict.get("smooth", self.smooth)
