"""The `marble` command line: LightningCLI fit on the tiny SD3 config, config round trip, errors,
per-run folders, export-lora, and a 2-process DDP run end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from marble_lightning.cli import FIT_MARKER, allocator_hint, main
from marble_lightning.lora_export import DIFFUSERS_LORA_FILE

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_sd3.yaml"
MARBLE = Path(sys.executable).parent / "marble"


def _fit_args(tiny_dir: str, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIG),
        f"--model.backbone.init_args.pretrained={tiny_dir}",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def test_print_config_round_trip(tiny_dir: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(tiny_dir, tmp_path, "--print_config"))
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["mode"] == "amortized"
    assert config["model"]["backbone"]["class_path"] == "marble_lightning.sd3.SD3Backbone"
    assert config["model"]["backbone"]["init_args"]["pretrained"] == tiny_dir
    assert [r["init_args"]["name"] for r in config["model"]["rewards"]] == ["brightness", "jpeg"]
    assert config["trainer"]["default_root_dir"] == str(tmp_path)
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(saved), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == config


def test_unknown_keys_fail_clearly(tiny_dir: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(tiny_dir, tmp_path, "--model.not_a_key=3"))
    assert exit_info.value.code not in (0, None)
    assert "not_a_key" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    config = yaml.safe_load(CONFIG.read_text())
    config["model"]["bogus_option"] = 1
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad), f"--model.backbone.init_args.pretrained={tiny_dir}"])
    assert exit_info.value.code not in (0, None)
    assert "bogus_option" in capsys.readouterr().err


def test_allocator_hint() -> None:
    assert "MALLOC_MMAP_THRESHOLD_" in allocator_hint({}, "linux")
    assert allocator_hint({"MALLOC_TRIM_THRESHOLD_": "1"}, "linux") is None
    assert allocator_hint({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "linux") is None
    assert allocator_hint({}, "darwin") is None


@pytest.mark.slow  # ~25 s on the shared 2-core VM, mostly imports in the fresh process
def test_console_script_fit_in_subprocess(tiny_dir: str, tmp_path) -> None:
    """`marble fit` in a fresh process, without MALLOC_* settings: exit 0, marker, hint, files."""
    root = tmp_path / "runs"
    proc = subprocess.run(
        [str(MARBLE), *_fit_args(tiny_dir, root, "--trainer.max_steps=1")],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = root / "lightning_logs" / "version_0"
    assert f"{FIT_MARKER} {run / 'checkpoints'}" in proc.stdout
    assert "marble: hint:" in proc.stderr
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    # Lightning's warnings that do not apply to this module are not shown
    for noise in (
        "has `__len__` defined",
        "module(s) in eval mode",
        "LeafSpec)` is deprecated",
        "try installing [lit",
    ):
        assert noise not in proc.stderr + proc.stdout, noise


def test_rerun_same_folder_and_export(tiny_dir: str, tmp_path, capsys) -> None:
    root = tmp_path / "runs"
    # 1), 2) two runs into the same root: each gets its own versioned folder
    for version in (0, 1):
        main(_fit_args(tiny_dir, root, "--trainer.max_steps=2"))
        run = root / "lightning_logs" / f"version_{version}"
        assert f"{FIT_MARKER} {run / 'checkpoints'}" in capsys.readouterr().out
        assert (run / "config.yaml").is_file()
    second = root / "lightning_logs" / "version_1"
    ckpt = second / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    # 3) export the policy adapter; the run's config.yaml is found next to checkpoints/
    with pytest.raises(SystemExit) as exit_info:
        main(["export-lora", "--ckpt", str(ckpt), "--out", str(tmp_path / "lora")])
    assert exit_info.value.code == 0
    exported = load_file(str(tmp_path / "lora" / DIFFUSERS_LORA_FILE))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    policy = {k: v for k, v in state.items() if ".policy." in k}
    assert len(exported) == len(policy) > 0
    for key, value in policy.items():
        module = key.split("backbone.denoiser.", 1)[1].replace(".policy.", ".")
        torch.testing.assert_close(exported[f"transformer.{module}"], value)
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert pipe.get_list_adapters()["transformer"]

    with pytest.raises(SystemExit) as exit_info:
        main(
            ["export-lora", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")]
        )
    assert exit_info.value.code == 2
    assert "missing.ckpt" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_processes_end_to_end(tiny_dir: str, tmp_path) -> None:
    root = tmp_path / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "marble_lightning",
            *_fit_args(
                tiny_dir,
                root,
                "--trainer.devices=2",
                "--trainer.strategy=ddp",
                "--trainer.accelerator=cpu",
            ),
        ],
        cwd=tmp_path,
        env=_env(MALLOC_TRIM_THRESHOLD_="100000000000"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    marker = f"{FIT_MARKER} {root / 'lightning_logs' / 'version_0' / 'checkpoints'}"
    # A rare teardown abort (134) was seen after a successful fit; the marker decides.
    assert proc.returncode == 0 or (proc.returncode == 134 and marker in proc.stdout), proc.stderr[
        -3000:
    ]
    assert proc.stdout.count(FIT_MARKER) == 1  # printed by global rank 0 only
    assert marker in proc.stdout
    assert "marble: hint:" not in proc.stderr
    ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] > 0 and any(".policy." in k for k in checkpoint["state_dict"])


def _class_paths(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return found + [p for value in node.values() for p in _class_paths(value)]
    if isinstance(node, list):
        return [p for value in node for p in _class_paths(value)]
    return []


def _import_class(path: str):
    import importlib

    module_name, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


@pytest.mark.parametrize(
    "config_path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_config_parses(config_path: Path, capsys) -> None:
    raw = yaml.safe_load(config_path.read_text())
    for class_path in _class_paths(raw):
        _import_class(class_path)  # every class a shipped config names must exist
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config_path), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]
    # names referenced by single/sequential modes must be rewards of the config
    names = []
    for reward in model["rewards"]:
        explicit = (reward.get("init_args") or {}).get("name")
        names.append(explicit or getattr(_import_class(reward["class_path"]), "name", None))
    assert len(set(names)) == len(names), names
    if model.get("single_reward") is not None:
        assert model["single_reward"] in names
    for stage_name, _steps in model.get("stages") or []:
        assert stage_name in names


@pytest.mark.parametrize(
    "config_path", sorted((REPO / "configs").glob("sd35m_*.yaml")), ids=lambda p: p.name
)
def test_sd35m_configs_follow_the_reference_setting(config_path: Path) -> None:
    """The reference SD3.5-M setting (see the configs' header), checked on the raw files."""
    config = yaml.safe_load(config_path.read_text())
    model = config["model"]
    backbone = model["backbone"]
    assert backbone["class_path"] == "marble_lightning.sd3.SD3Backbone"
    assert backbone["init_args"]["resolution"] == 512
    assert (model["lora_rank"], model["lora_alpha"]) == (32, 64)
    assert model["cfg_scale"] == 1.0 and model["group_size"] == 24
    assert model["sample_steps"] in (10, 25)
    assert (model["lr"], model["weight_decay"], model["grad_clip"], model["kl_weight"]) == (
        3e-4,
        1e-4,
        1.0,
        1e-4,
    )
    assert len(model["rewards"]) >= 2
    stages = model.get("stages")
    if stages:
        assert sum(steps for _, steps in stages) == config["trainer"]["max_steps"]
