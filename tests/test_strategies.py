"""Every CPU strategy: ``ddp_fork`` and ``ddp_spawn`` in-process (2 ranks), ``ddp`` through the
CLI (Lightning's subprocess launcher), and multi-node through two ``torchrun --nnodes=2`` launches
on localhost. Alpha must be identical on both ranks and equal to one process over the same global
batch; after ``ddp_spawn`` / ``ddp_fork`` the main process must hold the state the workers reached
(:mod:`marble_lightning.strategies`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from marble_lightning.callbacks import (
    EMACoefficientCallback,
    HarmonizationCallback,
    RewardEvalCallback,
)
from marble_lightning.data import PromptDataModule
from marble_lightning.strategies import (
    MarbleDDPStrategy,
    MarbleMultiProcessingLauncher,
    register_strategies,
)
from marble_lightning.testing import PROMPTS, make_module

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
EVAL_PROMPTS = ["a green dog", "red house", "small box"]


class DumpAlpha(Callback):
    """Each rank writes its alpha, alpha history, step counters and policy LoRA to ``rank<r>.pt``
    (importable by name, so spawned workers and CLI subprocesses can build it)."""

    def __init__(self, directory: str) -> None:
        self.directory = str(directory)

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "alpha": pl_module.current_alpha.detach().cpu().clone(),
                "alpha_history": [r["alpha"] for r in pl_module.history],
                "global_step": trainer.global_step,
                "step_index": pl_module.step_index,
                "policy": [p.detach().cpu().clone() for p in pl_module.trainable_parameters],
                "world_size": trainer.world_size,
            },
            Path(self.directory) / f"rank{trainer.global_rank}.pt",
        )


def _load_ranks(directory: Path, n: int) -> list[dict]:
    return [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(n)]


def _assert_ranks_agree_and_match(ranks: list[dict], one: dict) -> None:
    rank0 = ranks[0]
    for other in ranks[1:]:
        assert (
            other["alpha_history"] == rank0["alpha_history"]
        )  # bitwise: same reduced grads, same QP
        assert torch.equal(other["alpha"], rank0["alpha"])
        for a, b in zip(other["policy"], rank0["policy"]):
            assert torch.equal(a, b)
    assert rank0["world_size"] == len(ranks) and one["world_size"] == 1
    torch.testing.assert_close(rank0["alpha"], one["alpha"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        torch.tensor(rank0["alpha_history"]),
        torch.tensor(one["alpha_history"]),
        rtol=1e-4,
        atol=1e-5,
    )


# ----------------------------------------------------------------- in-process: ddp_fork, ddp_spawn
def _fit_in_process(tmp: Path, strategy, devices: int, prompts_per_step: int):
    module = make_module("amortized")
    evaluator = RewardEvalCallback(EVAL_PROMPTS, every_n_steps=2, images_per_prompt=2)
    checkpoint = ModelCheckpoint(dirpath=str(tmp / "ckpt"), save_last=True, every_n_train_steps=2)
    trainer = Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp),
        callbacks=[
            HarmonizationCallback(refresh_every=2),
            EMACoefficientCallback(decay=0.5),
            evaluator,
            checkpoint,
            DumpAlpha(str(tmp / "dump")),
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=PromptDataModule(PROMPTS, prompts_per_step=prompts_per_step))
    return trainer, module, evaluator, checkpoint


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict:
    """One process over the global batch of two ranks (4 prompts per step)."""
    tmp = tmp_path_factory.mktemp("single")
    _fit_in_process(tmp, "auto", devices=1, prompts_per_step=4)
    return _load_ranks(tmp / "dump", 1)[0]


def _assert_main_process_state(trainer, module, evaluator, checkpoint, ranks) -> None:
    rank0 = ranks[0]
    assert trainer.global_step == rank0["global_step"] == 3
    assert module.step_index == rank0["step_index"] == 3
    assert torch.equal(module.current_alpha.cpu(), rank0["alpha"])
    assert [r["alpha"] for r in module.history] == rank0["alpha_history"]
    for a, b in zip(module.trainable_parameters, rank0["policy"]):
        assert torch.equal(a.detach().cpu(), b)
    assert checkpoint.last_model_path and Path(checkpoint.last_model_path).is_file()
    assert [(e["adapter"], e["step"]) for e in evaluator.history] == [
        ("base", 0),
        ("policy", 2),
        ("policy", 3),
    ]


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_multiprocessing_strategies(tmp_path, single_process, start_method) -> None:
    """``ddp_fork`` / ``ddp_spawn`` on 2 CPU ranks, through :class:`MarbleDDPStrategy`: ranks agree,
    match one process, and the main process ends in rank 0's state."""
    strategy = MarbleDDPStrategy(start_method=start_method)
    trainer, module, evaluator, checkpoint = _fit_in_process(
        tmp_path, strategy, devices=2, prompts_per_step=2
    )
    assert isinstance(trainer.strategy.launcher, MarbleMultiProcessingLauncher)
    ranks = _load_ranks(tmp_path / "dump", 2)
    _assert_ranks_agree_and_match(ranks, single_process)
    _assert_main_process_state(trainer, module, evaluator, checkpoint, ranks)


@pytest.mark.slow
def test_plain_ddp_spawn_string_after_registration(tmp_path, single_process) -> None:
    """``strategy="ddp_spawn"`` (Lightning's own name) once :func:`register_strategies` overrode it;
    the toy-world registry problem aside, this is what a user's Trainer gets."""
    from lightning.pytorch.strategies import StrategyRegistry

    saved = {name: dict(StrategyRegistry[name]) for name in ("ddp_spawn", "ddp_fork")}
    register_strategies(override_builtin=True)
    try:
        trainer, module, evaluator, checkpoint = _fit_in_process(
            tmp_path, "ddp_spawn", devices=2, prompts_per_step=2
        )
    finally:
        StrategyRegistry.update(saved)
    assert type(trainer.strategy) is MarbleDDPStrategy
    ranks = _load_ranks(tmp_path / "dump", 2)
    _assert_ranks_agree_and_match(ranks, single_process)
    _assert_main_process_state(trainer, module, evaluator, checkpoint, ranks)


def test_toy_clip_reward_loads_where_its_config_was_never_registered() -> None:
    """A ``ddp_spawn`` worker unpickles ToyCLIPReward with an empty open_clip registry."""
    import pickle

    import open_clip

    from marble_lightning.toy.rewards import ToyCLIPReward

    reward = ToyCLIPReward()
    open_clip.factory._MODEL_CONFIGS.pop(reward.model_name, None)  # as in a fresh process
    clone = pickle.loads(pickle.dumps(reward))
    scores = clone.score(torch.rand(2, 3, 32, 32), ["a red circle", 'the word "cat"'])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert reward.model_name in open_clip.list_models()


# ----------------------------------------------------------------- subprocess: ddp (CLI), torchrun
@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> str:
    from marble_lightning.testing import build_tiny_sd3_pipeline

    return str(build_tiny_sd3_pipeline(tmp_path_factory.mktemp("strategies_tiny_sd3")))


def _tiny_config(tmp: Path, pipeline: str, dump: Path, prompts_per_step: int) -> Path:
    """configs/tiny_sd3.yaml with our pipeline, folder, prompts per step and the DumpAlpha
    callback."""
    config = yaml.safe_load((REPO / "configs" / "tiny_sd3.yaml").read_text())
    config["model"]["backbone"]["init_args"]["pretrained"] = pipeline
    config["trainer"]["default_root_dir"] = str(tmp / "run")
    config["trainer"]["callbacks"].append(
        {"class_path": "test_strategies.DumpAlpha", "init_args": {"directory": str(dump)}}
    )
    config["data"]["prompts_per_step"] = prompts_per_step
    path = tmp / f"config_{prompts_per_step}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MALLOC_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_"))
    }
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]),
    )
    return env


def _cli_fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "marble_lightning", "fit", "--config", str(config), *extra],
        cwd=str(REPO),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def cli_single(tmp_path_factory, tiny_pipeline) -> dict:
    """The tiny config in one CLI process over the global batch (4 prompts per step)."""
    tmp = tmp_path_factory.mktemp("cli_single")
    proc = _cli_fit(_tiny_config(tmp, tiny_pipeline, tmp / "dump", prompts_per_step=4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _load_ranks(tmp / "dump", 1)[0]


def test_ddp_through_the_cli(tmp_path, tiny_pipeline, cli_single) -> None:
    """``marble fit --trainer.devices=2 --trainer.strategy=ddp``: Lightning re-launches the
    script."""
    config = _tiny_config(tmp_path, tiny_pipeline, tmp_path / "dump", prompts_per_step=2)
    proc = _cli_fit(config, "--trainer.devices=2", "--trainer.strategy=ddp")
    ok = proc.returncode == 0 or (
        proc.returncode == 134 and (tmp_path / "dump" / "rank1.pt").is_file()
    )
    assert ok, proc.stderr[-3000:]  # (a rare teardown abort after a finished fit is tolerated)
    _assert_ranks_agree_and_match(_load_ranks(tmp_path / "dump", 2), cli_single)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_nodes(commands: list[tuple[list[str], dict[str, str]]]) -> list:
    procs = [
        subprocess.Popen(
            cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd, env in commands
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=600))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [(proc.returncode, err) for proc, (_, err) in zip(procs, outputs)]


_TWO_NODES = ["--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp"]


def _check_two_nodes(tmp_path: Path, results: list, cli_single: dict) -> None:
    dumped = all((tmp_path / "dump" / f"rank{r}.pt").is_file() for r in (0, 1))
    assert dumped and all(rc in (0, 134) for rc, _ in results), "\n".join(
        err[-2000:] for _, err in results
    )
    _assert_ranks_agree_and_match(_load_ranks(tmp_path / "dump", 2), cli_single)


@pytest.mark.slow
def test_two_nodes_through_torchrun(tmp_path, tiny_pipeline, cli_single) -> None:
    """Two ``torchrun --nnodes=2 --nproc_per_node=1`` launches on localhost (one per "node")."""
    config = _tiny_config(tmp_path, tiny_pipeline, tmp_path / "dump", prompts_per_step=2)
    port = _free_port()
    torchrun = Path(sys.executable).parent / "torchrun"
    commands = [
        (
            [
                str(torchrun),
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "marble_lightning",
                "fit",
                "--config",
                str(config),
                *_TWO_NODES,
            ],
            _env(),
        )  # fmt: skip
        for node in (0, 1)
    ]
    _check_two_nodes(tmp_path, _run_two_nodes(commands), cli_single)


@pytest.mark.slow
def test_two_nodes_through_lightning_num_nodes(tmp_path, tiny_pipeline, cli_single) -> None:
    """Lightning's own multi-node launch: the same ``marble fit --trainer.num_nodes=2`` command on
    each "node", told its place by ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK``."""
    config = _tiny_config(tmp_path, tiny_pipeline, tmp_path / "dump", prompts_per_step=2)
    port = _free_port()
    commands = [
        (
            [sys.executable, "-m", "marble_lightning", "fit", "--config", str(config), *_TWO_NODES],
            {
                **_env(),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "NODE_RANK": str(node),
            },
        )
        for node in (0, 1)
    ]
    _check_two_nodes(tmp_path, _run_two_nodes(commands), cli_single)
