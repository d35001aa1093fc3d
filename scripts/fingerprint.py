"""Fingerprint of a short training run: hashes of the LoRA weights, the alpha history and the
rewards.

Runs ``configs/marble.yaml`` (or ``--config``) for ``--steps`` steps with its own seeds, without
the held-out evaluation, report and checkpoint callbacks, and prints one JSON object:

* ``lora``: SHA-256 of the policy and old LoRA tensors (names and bytes, sorted by name);
* ``alpha``: SHA-256 of the per-step coefficients (float64 bytes) and the refresh flags;
* ``rewards``: SHA-256 of the per-step ``reward/<name>_mean`` values (float64 bytes);
* a few readable numbers (final alpha, last reward means) to eyeball.

Two code versions behave identically on a machine when they print the same hashes. Usage::

    python scripts/fingerprint.py --steps 20 [--config configs/marble.yaml] [--out f.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
_DROPPED_CALLBACKS = ("RewardEvalCallback", "RunReportCallback", "ModelCheckpoint", "ProgressBar")


def _hash_floats(values: list[float]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(values)}d", *values)).hexdigest()


def fingerprint(config: Path, steps: int, root: Path) -> dict:
    from marble_lightning.cli import MarbleCLI
    from marble_lightning.data import PromptDataModule
    from marble_lightning.module import MarbleDiffusionModule

    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"] = [
        cb
        for cb in cfg["trainer"].get("callbacks", [])
        if not cb["class_path"].endswith(_DROPPED_CALLBACKS)
    ]
    root.mkdir(parents=True, exist_ok=True)
    filtered = root / "fingerprint_config.yaml"
    filtered.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cli = MarbleCLI(
        MarbleDiffusionModule,
        PromptDataModule,
        args=[
            "--config",
            str(filtered),
            f"--trainer.max_steps={steps}",
            f"--trainer.default_root_dir={root}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
        ],
        run=False,
        save_config_callback=None,
    )
    trainer = cli.trainer
    trainer.fit(cli.model, datamodule=cli.datamodule)
    module = cli.model
    lora = hashlib.sha256()
    named = dict(module.backbone.denoiser.named_parameters())
    for name in sorted(n for n in named if ".lora_" in n):
        lora.update(name.encode())
        lora.update(named[name].detach().float().cpu().numpy().tobytes())
    history = module.history
    names = list(module.reward_names)
    alphas = [a for record in history for a in record["alpha"]]
    refresh = "".join("1" if record["refresh"] else "0" for record in history)
    rewards = [float(record[f"reward/{n}_mean"]) for record in history for n in names]
    return {
        "steps": len(history),
        "lora": lora.hexdigest(),
        "alpha": _hash_floats(alphas),
        "refresh": refresh,
        "rewards": _hash_floats(rewards),
        "final_alpha": [round(a, 6) for a in history[-1]["alpha"]],
        "last_rewards": {n: round(float(history[-1][f"reward/{n}_mean"]), 6) for n in names},
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "marble.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "fingerprint")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = fingerprint(args.config, args.steps, args.root)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
