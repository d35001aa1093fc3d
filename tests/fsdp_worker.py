"""Worker of tests/test_module_fsdp.py, launched by ``torchrun`` (one process per rank).

    torchrun --nproc_per_node=2 tests/fsdp_worker.py --out DIR --modes marble amortized
    (two nodes: torchrun --nnodes=2 --nproc_per_node=1 --node_rank=R ... --num-nodes 2)

For each mode: fits the tiny module under MarbleModelParallelStrategy on CPU (gloo) and writes
``DIR/<mode>/rank<r>.pt`` (whole adapters gathered from the shards, alpha history, norms, ...).
Options: ``--lora replicated``; ``--save-every N`` (ModelCheckpoint);
``--resume CKPT``; ``--export`` (LoRA export on rank 0).
"""

from __future__ import annotations

import argparse
import functools
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from marble_lightning.callbacks import EMACoefficientCallback, HarmonizationCallback
from marble_lightning.data import PromptDataModule
from marble_lightning.sharding import (
    MarbleModelParallelStrategy,
    export_lora_sharded,
    full_lora_tensors,
)
from marble_lightning.testing import PROMPTS, make_module

# plain SGD: Adam's normalisation would amplify float round-off in near-zero gradient entries
OPTIONS = {
    "kl_weight": 0.05,
    "old_policy": {"start": 1, "rate": 0.3, "max_decay": 0.5},
    "gram": "backward",
    "optimizer": functools.partial(torch.optim.SGD, lr=10.0),
    "grad_clip": 1.0,
}
UNCLIPPED = ("weighted_sum",)
"""Modes run without gradient clipping (``grad/norm`` is then computed apart from the clip)."""


def options_for(mode: str) -> dict:
    return {**OPTIONS, **({"grad_clip": None} if mode in UNCLIPPED else {})}


class Dump(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        tensors = full_lora_tensors(pl_module)  # collective: every rank gathers
        names = pl_module.adapters.policy_names + pl_module.adapters.old_names
        local = sum(
            p.to_local().numel() if hasattr(p, "to_local") else p.numel()
            for p in pl_module.trainable_parameters
        )
        base = [p for n, p in pl_module.backbone.denoiser.named_parameters() if ".lora_" not in n]
        torch.save(
            {
                "adapters": [tensors[n] for n in names],
                "alpha_history": [r["alpha"] for r in pl_module.history],
                "alpha": pl_module.current_alpha.clone(),
                "norms": None if pl_module.cached_norms is None else pl_module.cached_norms.clone(),
                "rewards": [r["reward/red_mean"] for r in pl_module.history],
                "grad_norms": [r["grad/norm"] for r in pl_module.history],
                "global_step": trainer.global_step,
                "lora_local": local,
                "lora_full": sum(p.numel() for p in pl_module.trainable_parameters),
                "base_local": sum(
                    p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in base
                ),
                "base_full": sum(p.numel() for p in base),
                "updater": type(pl_module.updater).__name__,
            },
            self.path,
        )


def _fit(args: argparse.Namespace, mode: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    options = options_for(mode)
    if args.adam:  # exercises the optimizer state in the checkpoint
        options.pop("optimizer")
    module = make_module(mode, **options)
    callbacks: list[Callback] = []
    if mode == "amortized":
        callbacks += [HarmonizationCallback(refresh_every=2), EMACoefficientCallback(decay=0.5)]
    if args.save_every is not None:  # distributed checkpoint folders <out>/ckpts/step=<n>.ckpt
        callbacks.append(
            ModelCheckpoint(
                out / "ckpts", "{step}", every_n_train_steps=args.save_every, save_top_k=-1
            )
        )
    strategy = MarbleModelParallelStrategy(lora_sharding=args.lora)
    trainer = Trainer(
        max_steps=args.steps, accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes,
        strategy=strategy, logger=False, enable_checkpointing=args.save_every is not None,
        enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(out), callbacks=callbacks,
    )  # fmt: skip
    trainer.callbacks.append(Dump(out / f"rank{trainer.global_rank}.pt"))
    data = PromptDataModule(PROMPTS, prompts_per_step=args.prompts_per_step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data, ckpt_path=args.resume)
        if args.export:
            export_lora_sharded(module, out / "lora")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", nargs="+", default=["marble"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--lora", default="sharded")
    parser.add_argument("--adam", action="store_true")
    parser.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    parser.add_argument("--resume", default=None, help="resume from this checkpoint (out: <mode>)")
    parser.add_argument("--export", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for mode in args.modes:
        _fit(args, mode, args.out / mode)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # a clean teardown: a rank leaving with live gloo threads can abort ("terminate called
        # without an active exception") while another still finishes its export
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
