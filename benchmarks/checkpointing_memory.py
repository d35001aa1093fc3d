"""Peak memory of one LoRA training forward + backward with and without gradient checkpointing.

A small FLUX transformer (random weights; 4 double- and 8 single-stream blocks of width 128,
a 64 x 64 latent, i.e. 1024 image tokens, batch 4, LoRA rank 4 on the attention projections),
as ``FluxBackbone(gradient_checkpointing=...)`` sets it up (diffusers'
``enable_gradient_checkpointing()``). One fresh process per setting. Reports:

* ``saved``: bytes of the tensors autograd keeps for the backward (``saved_tensors_hooks``):
  the activation memory checkpointing trades for recomputation (deterministic, any device);
* ``peak``: CPU: peak RSS growth over the step (``ru_maxrss`` minus the RSS before; first step);
  CUDA: ``max_memory_allocated``;
* ``time``: wall time of the step.

    python benchmarks/checkpointing_memory.py [--device cuda] \
        [--out benchmarks/results/checkpointing_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(checkpointing: bool, device: str) -> dict:
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from marble_lightning.backbones.flux import (
        FLUX_LORA_TARGET_MODULES,
        latent_image_ids,
        pack_latents,
    )

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=4,
        num_single_layers=8,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    ).to(device)
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=FLUX_LORA_TARGET_MODULES), "policy"
    )
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    b, c, h, w, seq = 4, 16, 64, 64, 32
    x = torch.randn(b, c, h, w, device=device)
    kwargs = {
        "hidden_states": pack_latents(x),
        "timestep": torch.full((b,), 0.5, device=device),
        "guidance": torch.full((b,), 3.5, device=device),
        "pooled_projections": torch.randn(b, 32, device=device),
        "encoder_hidden_states": torch.randn(b, seq, 64, device=device),
        "txt_ids": torch.zeros(seq, 3, device=device),
        "img_ids": latent_image_ids(h, w, torch.device(device), torch.float32),
        "return_dict": False,
    }
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    def step():
        out = model(**kwargs)[0]
        loss = out.float().square().mean()
        loss.backward()

    if device == "cuda":
        step()  # warm-up (allocator, lazy inits); on the CPU ru_maxrss is a high-water mark,
        model.zero_grad(set_to_none=True)  # so the measured step must be the first one there
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:  # current RSS (KiB), not the high-water mark
        rss_before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**10
    return {
        "checkpointing": checkpointing,
        "saved_mb": saved[0] / 2**20,
        "peak_mb": peak,
        "time_s": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child == "1", args.device)))
        return
    rows = []
    for flag in ("0", "1"):
        out = (
            subprocess.run(
                [sys.executable, __file__, "--child", flag, "--device", args.device],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        rows.append(json.loads(out))
    off, on = rows
    print("| gradient checkpointing | saved activations (MB) | peak (MB) | step time (s) |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {'on' if row['checkpointing'] else 'off'} | {row['saved_mb']:.1f} "
            f"| {row['peak_mb']:.1f} | {row['time_s']:.2f} |"
        )
    print(
        f"\nratio on/off: saved activations {on['saved_mb'] / off['saved_mb']:.3f}, "
        f"peak {on['peak_mb'] / max(off['peak_mb'], 1e-9):.3f}, "
        f"time {on['time_s'] / off['time_s']:.2f}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
