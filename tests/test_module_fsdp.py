"""Sharded training (FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU ranks (gloo).

Lightning's ``ModelParallelStrategy`` runs on CPU with gloo (its CPU refusal is ``FSDPStrategy``'s
only), so everything here goes through Lightning. The strategy launches its ranks as scripts
(subprocess launcher), so the sharded runs are ``torchrun`` launches of ``tests/fsdp_worker.py``;
the single-process reference runs in this process.

* sharded == one process on the same global batch (marble, amortized, weighted_sum): alpha is
  identical on the ranks and equal to the reference (rtol 1e-5), adapters to rtol 1e-5;
* resume from a sharded (distributed) checkpoint == uninterrupted, bit for bit (AdamW state
  included), and the LoRA export gathers the whole adapter on rank 0;
* slow: LoRA replicated; two ``torchrun --nnodes=2 --nproc_per_node=1`` launches on localhost.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer

from marble_lightning.callbacks import EMACoefficientCallback, HarmonizationCallback
from marble_lightning.data import PromptDataModule
from marble_lightning.testing import PROMPTS, make_module

torch.set_num_threads(1)

WORKER = Path(__file__).with_name("fsdp_worker.py")
ROOT = WORKER.parent.parent
MODES = ["marble", "amortized", "weighted_sum"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _torchrun(out: Path, *args: str, nodes: int = 1, timeout: int = 600) -> None:
    """One 2-rank launch on localhost (``nodes=2``: two single-rank torchrun launches)."""
    port = _port()
    if nodes == 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   f"--master_port={port}", str(WORKER), "--out", str(out), *args]  # fmt: skip
        done = subprocess.run(
            command, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        return
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(WORKER),
                "--out",
                str(out),
                "--devices",
                "1",
                "--num-nodes",
                "2",
                *args,
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-6000:]


def _load(out: Path, mode: str) -> list[dict]:
    return [torch.load(out / mode / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _reference(mode: str) -> dict:
    """One process, devices=1, over the same global batch of 4 prompts (the worker's options)."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        from fsdp_worker import options_for
    finally:
        sys.path.remove(str(WORKER.parent))
    module = make_module(mode, **options_for(mode))
    callbacks = (
        [HarmonizationCallback(refresh_every=2), EMACoefficientCallback(decay=0.5)]
        if mode == "amortized"
        else []
    )
    trainer = Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=PromptDataModule(PROMPTS, prompts_per_step=4))
    return {
        "adapters": [
            p.detach().clone() for p in module.trainable_parameters + module.old_parameters
        ],
        "alpha_history": [r["alpha"] for r in module.history],
        "norms": module.cached_norms,
        "rewards": [r["reward/red_mean"] for r in module.history],
        "grad_norms": [r["grad/norm"] for r in module.history],
    }


def _check_equal(sharded: list[dict], one: dict, mode: str) -> None:
    rank0, rank1 = sharded
    assert rank0["updater"] == "ShardedNFTUpdate"
    # the denoiser really is sharded: each rank holds half of the frozen base and of the LoRA
    assert rank0["base_local"] + rank1["base_local"] == rank0["base_full"]
    assert rank0["lora_local"] + rank1["lora_local"] == rank0["lora_full"]
    assert rank0["base_local"] < rank0["base_full"] and rank0["lora_local"] < rank0["lora_full"]
    # identical on both ranks: the same all-reduced Gram, the same QP, the same gathered adapters
    assert rank0["alpha_history"] == rank1["alpha_history"]
    assert all(torch.equal(a, b) for a, b in zip(rank0["adapters"], rank1["adapters"]))
    # equal to one process over the same global batch
    torch.testing.assert_close(
        torch.tensor(rank0["alpha_history"]),
        torch.tensor(one["alpha_history"]),
        rtol=1e-5,
        atol=1e-7,
    )
    if mode != "weighted_sum":
        torch.testing.assert_close(rank0["norms"], one["norms"], rtol=1e-5, atol=1e-9)
    assert rank0["rewards"] == pytest.approx(one["rewards"], rel=1e-6)
    # the whole gradient's norm (clipped modes and weighted_sum, unclipped), not one shard's
    assert rank0["grad_norms"] == rank1["grad_norms"]
    # (float32 sums in another order: ~1e-4 relative on norms of ~1e-7; one shard would be ~x0.7)
    assert rank0["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-3)
    for a, b in zip(rank0["adapters"], one["adapters"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    _torchrun(out, "--modes", *MODES)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_sharded_two_ranks_match_one_process(sharded_runs: Path, mode: str) -> None:
    _check_equal(_load(sharded_runs, mode), _reference(mode), mode)


def test_sharded_resume_is_bit_exact_and_export_gathers(tmp_path: Path) -> None:
    full = tmp_path / "full"
    _torchrun(full, "--modes", "amortized", "--adam", "--save-every", "1")
    ckpt = full / "amortized" / "ckpts" / "step=1.ckpt"
    assert ckpt.is_dir() and {p.name for p in ckpt.iterdir()} == {
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "meta.pt",
    }
    # 8 prompts, 4 per step: step 1 is mid-epoch, step 2 an epoch's last batch
    for step in (2, 1):
        resumed = tmp_path / f"resumed{step}"
        ckpt = full / "amortized" / "ckpts" / f"step={step}.ckpt"
        _torchrun(resumed, "--modes", "amortized", "--adam", "--resume", str(ckpt), "--export")
        for a, b in zip(_load(full, "amortized"), _load(resumed, "amortized")):
            assert a["global_step"] == b["global_step"] == 3
            assert a["alpha_history"] == b["alpha_history"]
            assert a["rewards"] == b["rewards"]
            assert torch.equal(a["norms"], b["norms"])
            assert all(torch.equal(x, y) for x, y in zip(a["adapters"], b["adapters"]))

    # the exported LoRA (rank 0) is the whole policy adapter
    from safetensors.torch import load_file

    exported = load_file(resumed / "amortized" / "lora" / "adapter_model.safetensors")
    final = _load(resumed, "amortized")[0]
    module = make_module("amortized")
    whole = dict(zip(module.adapters.policy_names, final["adapters"]))
    assert len(exported) == len(whole)
    for name, value in whole.items():
        short = name.replace(".policy.", ".")
        match = [v for k, v in exported.items() if k.endswith(short)]
        assert len(match) == 1 and torch.equal(match[0], value), name

    # the last sharded folder reads back whole in one process (what `marble export-lora` does)
    from marble_lightning.lora_export import read_checkpoint

    folders = sorted(
        (full / "amortized" / "ckpts").glob("step=*.ckpt"), key=lambda p: p.stat().st_mtime
    )
    read = read_checkpoint(folders[-1])
    assert read["global_step"] == 3
    full_final = dict(zip(module.adapters.policy_names, _load(full, "amortized")[0]["adapters"]))
    for name, value in full_final.items():
        assert torch.equal(read["state_dict"]["backbone.denoiser." + name], value), name


# ---------------------------------------------------------------- configuration errors, no ranks
def test_tensor_parallel_mesh_is_refused() -> None:
    from marble_lightning.sharding import data_parallel_mesh

    mesh = {"tensor_parallel": SimpleNamespace(size=lambda: 2), "data_parallel": None}
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        data_parallel_mesh(SimpleNamespace(device_mesh=mesh))


def test_fsdp1_strategy_is_refused_and_ddp_is_untouched() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from marble_lightning.sharding import configure_sharding

    module = make_module("marble")
    module._trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(NotImplementedError, match="FSDP1"):
        configure_sharding(module)
    params = list(module.trainable_parameters)
    module._trainer = SimpleNamespace(strategy=DDPStrategy.__new__(DDPStrategy))
    assert configure_sharding(module) is False
    assert module.trainable_parameters == params and type(module.updater).__name__ == "NFTUpdate"
    module._trainer = None


# ---------------------------------------------------------------- slow
@pytest.mark.slow
def test_replicated_lora_matches_one_process(tmp_path: Path) -> None:
    _torchrun(tmp_path, "--modes", "marble", "--lora", "replicated")
    sharded = _load(tmp_path, "marble")
    one = _reference("marble")
    assert sharded[0]["updater"] == "NFTUpdate"  # the unsharded update path, unchanged
    assert sharded[0]["lora_local"] == sharded[0]["lora_full"]
    assert sharded[0]["base_local"] < sharded[0]["base_full"]
    assert sharded[0]["alpha_history"] == sharded[1]["alpha_history"]
    torch.testing.assert_close(
        torch.tensor(sharded[0]["alpha_history"]),
        torch.tensor(one["alpha_history"]),
        rtol=1e-5,
        atol=1e-7,
    )
    for a, b in zip(sharded[0]["adapters"], one["adapters"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_two_nodes_torchrun_sharded(tmp_path: Path) -> None:
    _torchrun(tmp_path, "--modes", "marble", nodes=2)
    _check_equal(_load(tmp_path, "marble"), _reference("marble"), "marble")
