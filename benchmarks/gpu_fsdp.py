"""GPU check of sharded MARBLE (prepared; not run in CI, which has no GPU).

Builds a FLUX.1-dev-size transformer from its config with random bf16 weights (``--size small``
for a quick check), attaches the policy/old LoRA pair, shards it with ``fully_shard`` over the
GPUs of the launch (one GPU: ``--offload`` adds FSDP's CPU offload), then times one MARBLE step
(K backward passes through FSDP's reduce-scatter, one K x K all-reduce, the QP, this rank's shard
of the direction, AdamW) and one weighted-sum step (one backward), printing per-rank peak memory.

    torchrun --nproc_per_node=8 benchmarks/gpu_fsdp.py --k 3
    torchrun --nproc_per_node=1 benchmarks/gpu_fsdp.py --offload
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from marble_lightning.adapters import LoraAdapterPair
from marble_lightning.gram import process_group_sum, shard_direction, sharded_gram
from marble_lightning.harmonize import harmonize_gram
from marble_lightning.sharding import block_lists

SIZES = {
    "flux": {
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
    },
    "small": {
        "num_layers": 2,
        "num_single_layers": 4,
        "attention_head_dim": 64,
        "num_attention_heads": 4,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="flux", choices=SIZES)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--offload", action="store_true")
    args = parser.parse_args()
    from diffusers import FluxTransformer2DModel

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = FluxTransformer2DModel(
            in_channels=64,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            **SIZES[args.size],
        ).to(torch.bfloat16)
    model.requires_grad_(False)
    adapters = LoraAdapterPair(
        model, args.lora_rank, 2 * args.lora_rank, ["to_q", "to_k", "to_v", "to_out.0"], 0
    )
    for p in adapters.policy_params + adapters.old_params:
        p.data = p.data.float()
    mesh = init_device_mesh("cuda", (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if args.offload else OffloadPolicy()
    for block in [b for stack in block_lists(model) for b in stack]:
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    if not args.offload:
        model.to(device)
    adapters.rebind()
    params = adapters.policy_params
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tokens = (args.resolution // 16) ** 2
    gen = torch.Generator(device="cpu").manual_seed(rank)

    def losses() -> list[torch.Tensor]:
        x = torch.randn(args.batch, tokens, 64, generator=gen).to(device, torch.bfloat16)
        out = model(
            hidden_states=x,
            encoder_hidden_states=torch.randn(args.batch, 512, 4096, generator=gen).to(
                device, torch.bfloat16
            ),
            pooled_projections=torch.randn(args.batch, 768, generator=gen).to(
                device, torch.bfloat16
            ),
            timestep=torch.full((args.batch,), 0.5, device=device),
            guidance=torch.full((args.batch,), 3.5, device=device),
            img_ids=torch.zeros(tokens, 3, device=device),
            txt_ids=torch.zeros(512, 3, device=device),
            return_dict=False,
        )[0].float()
        per_sample = out.square().mean(dim=(1, 2))
        r = torch.rand(args.k, args.batch, generator=gen).to(device)
        return list(r @ per_sample)

    def local_rows(rows: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for i, loss in enumerate(rows):
            for p in params:
                p.grad = None
            loss.backward(retain_graph=i < len(rows) - 1)
            out.append(torch.cat([p.grad.to_local().reshape(-1) for p in params]))
        return torch.stack(out)

    def marble_step() -> None:
        g = local_rows(losses())
        gram = sharded_gram(g, process_group_sum())
        d = shard_direction(harmonize_gram(gram).weights, g)
        adapters.write_gradients(d)
        optimizer.step()

    def weighted_step() -> None:
        g = local_rows([torch.stack(losses()).sum()])
        adapters.write_gradients(g[0])
        optimizer.step()

    for name, step in (("marble", marble_step), ("weighted_sum", weighted_step)):
        step()  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        print(f"rank {rank}/{world} {args.size} {name}: {time.perf_counter() - start:.3f} s, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
