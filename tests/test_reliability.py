"""Crash, interrupt, bad input and resume as a user meets them (docs/reliability.md).

Fast tests run in-process; the subprocess ones (signals, kill -9 and resume) are ``slow``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ALLOCATOR

from marble_lightning.cli import FIT_MARKER, main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_sd3.yaml"
MARBLE = Path(sys.executable).parent / "marble"


def _env() -> dict[str, str]:
    env = dict(os.environ, **ALLOCATOR)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run_config(tmp_path: Path, *, every: int = 2, report: bool = True) -> Path:
    """tiny_sd3.yaml with the shipped configs' logger section (both loggers, no save_dir)."""
    config = yaml.safe_load(TINY.read_text())
    shipped = yaml.safe_load((REPO / "configs" / "marble.yaml").read_text())
    loggers = shipped["trainer"]["logger"]
    for logger in loggers:
        if logger["class_path"].endswith("CSVLogger"):  # write every step (the tests watch it)
            logger["init_args"]["flush_logs_every_n_steps"] = 1
    config["trainer"]["logger"] = loggers
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = every
    if report:
        config["trainer"]["callbacks"].append(
            {"class_path": "marble_lightning.report.RunReportCallback"}
        )
    path = tmp_path / "configs" / "run.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _fit(config: Path, tiny_dir: str, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(config),
        f"--model.backbone.init_args.pretrained={tiny_dir}",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------- pickle


def _crafted_pickle(path: Path, marker: Path) -> Path:
    """A torch file whose unpickling would create ``marker`` (``open(marker, "w")``)."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload()}, path)
    return path


def test_no_weights_only_false_anywhere() -> None:
    """Every torch.load in the package, scripts and benchmarks uses weights_only=True."""
    offenders, loads = [], []
    for folder in ("marble_lightning", "scripts", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            # (Lightning's dump_checkpoint(weights_only=...) means "without optimizer state")
            unsafe = re.sub(r"dump_checkpoint\(weights_only\s*=\s*False\)", "", text)
            if re.search(r"weights_only\s*=\s*False", unsafe):
                offenders.append(f"{path}: weights_only=False")
            for match in re.finditer(r"torch\.load\(", text):
                call = text[match.end() : match.end() + 300].split("\n)")[0]
                loads.append(path.name)
                if "weights_only=True" not in call:
                    offenders.append(f"{path}: torch.load without weights_only=True")
    assert not offenders, offenders
    assert loads  # the scan found the loaders


def test_crafted_pickle_is_refused_by_every_loading_path(
    tmp_path: Path, capsys, tiny_dir: str
) -> None:
    marker = tmp_path / "PWNED"

    # the payload is live: an unsafe load would create the marker
    evil = _crafted_pickle(tmp_path / "probe.pt", marker)
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    # 1) reward weight loader (aesthetic, HPS, CLIP heads use it)
    from marble_lightning.rewards._loading import load_state_dict_file

    with pytest.raises(ValueError, match=r"reward 'aesthetic': cannot load .* safely"):
        load_state_dict_file(_crafted_pickle(tmp_path / "head.pt", marker), "aesthetic")
    assert not marker.exists()

    # 2) LoRA export, API and `marble export-lora`
    from marble_lightning.lora_export import export_lora

    ckpt = _crafted_pickle(tmp_path / "run" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        export_lora(ckpt, tmp_path / "lora", lora_alpha=4)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "export-lora",
                "--ckpt",
                str(ckpt),
                "--out",
                str(tmp_path / "lora2"),
                "--lora-alpha",
                "4",
            ]
        )
    assert exit_info.value.code == 2
    assert "safely" in capsys.readouterr().err
    assert not marker.exists()

    # 3) toy pretraining --resume
    from marble_lightning.toy import pretrain

    out = tmp_path / "pretrain"
    _crafted_pickle(out / "state.pt", marker)
    with pytest.raises(ValueError, match="cannot load pretraining state .* safely"):
        pretrain.main(["--out", str(out), "--resume", "--max-steps", "1", "--eval-samples", "0"])
    assert not marker.exists()

    # 4) toy assets loader: safetensors + JSON only, a pickle in their place is just a bad file
    from marble_lightning.toy.backbone import ASSET_NAME, ToyBackbone

    assets = tmp_path / "assets"
    _crafted_pickle(assets / f"{ASSET_NAME}.safetensors", marker)
    (assets / f"{ASSET_NAME}.json").write_text("{}")
    with pytest.raises(Exception):  # noqa: B017  (safetensors' own header error)
        ToyBackbone(assets / f"{ASSET_NAME}.safetensors")
    assert not marker.exists()

    # 5) Lightning checkpoints through `marble fit --ckpt_path` (explicit path and `last`)
    root = tmp_path / "root"
    last = _crafted_pickle(
        root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", marker
    )
    for ckpt_arg in (str(last), "last"):
        with pytest.raises(SystemExit) as exit_info:
            main(_fit(TINY, tiny_dir, root, "--ckpt_path", ckpt_arg))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"cannot load checkpoint {last} safely" in err, err[-2000:]
        assert not marker.exists()
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]


# ---------------------------------------------------------------------------------- bad input


def test_reward_error_keeps_identity_with_a_two_argument_exception() -> None:
    from marble_lightning.rewards.base import MultiReward, RewardError, RewardModel

    class SensorError(Exception):
        def __init__(self, code: int, detail: str) -> None:
            super().__init__(f"[{code}] {detail}")
            self.code = code

    class Bright(RewardModel):
        name = "bright"

        def score(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    class Flaky(RewardModel):
        name = "flaky"

        def score(self, images, prompts):
            raise SensorError(7, "sensor offline")

    multi = MultiReward([Bright(), Flaky()])
    prompts = ["a red circle", "a red circle", "two blue squares"]
    with pytest.raises(RewardError) as info:
        multi(torch.rand(3, 3, 8, 8), prompts, step=3)
    err = info.value
    assert (err.reward, err.step, err.prompts) == ("flaky", 3, prompts)
    assert isinstance(err.__cause__, SensorError) and err.__cause__.code == 7
    text = str(err)
    for part in (
        "'flaky'",
        "step 3",
        "'a red circle'",
        "'two blue squares'",
        "SensorError",
        "sensor offline",
    ):
        assert part in text, (part, text)
    # without a step (callers that do not pass one) and through a `type(err)(message)` re-raise
    with pytest.raises(RewardError, match="unknown step"):
        multi(torch.rand(1, 3, 8, 8), ["x"])
    again = type(err)(f"at step 3: {err}")
    assert isinstance(again, RewardError) and "sensor offline" in str(again)
    import pickle

    copy = pickle.loads(pickle.dumps(err))
    assert (copy.reward, copy.step, str(copy)) == ("flaky", 3, text)


def test_callback_argument_error_is_the_last_line(tiny_dir: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            _fit(
                TINY,
                tiny_dir,
                tmp_path / "root",
                "--trainer.callbacks+=marble_lightning.callbacks.HarmonizationCallback",
                "--trainer.callbacks.refresh_every=-1",
            )
        )
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "refresh_every" in last and "-1" in last, last
    assert "Union" not in last


def test_malformed_yaml_names_the_file(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("trainer:\n  max_steps: [1,\n  devices: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"config file {bad} is not valid YAML" in err and "line" in err


# -------------------------------------------------------------------------------------- resume


def _fake_checkpoint(path: Path, **hparams) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 2, "state_dict": {}, "hyper_parameters": hparams}, path)
    return path


def test_changed_lora_settings_on_resume_fail_naming_both_values(
    tiny_dir: str, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "root"
    config = yaml.safe_load(TINY.read_text())["model"]
    hparams = {k: v for k, v in config.items() if k not in ("backbone", "rewards")}
    hparams.update(
        lora_rank=16, lora_alpha=32, _instantiator="lightning.pytorch.cli.instantiate_module"
    )
    _fake_checkpoint(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", **hparams)
    with pytest.raises(SystemExit) as exit_info:
        main(
            _fit(
                TINY,
                tiny_dir,
                root,
                "--ckpt_path",
                "last",
                "--model.lora_rank=8",
                "--model.lora_alpha=64",
            )
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.lora_rank: checkpoint 16, requested 8" in err
    assert "model.lora_alpha: checkpoint 32, requested 64" in err
    assert "nothing was restored" in err
    # refused before anything was built: no new run folder, nothing written into the old one
    assert _files(root) == [root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"]


def test_ckpt_path_last_without_a_run_fails_and_auto_starts_fresh(
    tiny_dir: str, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "root"
    with pytest.raises(SystemExit) as exit_info:
        main(_fit(TINY, tiny_dir, root, "--ckpt_path", "last"))
    assert exit_info.value.code == 2
    assert "no run to resume" in capsys.readouterr().err
    main(_fit(TINY, tiny_dir, root, "--ckpt_path", "auto", "--trainer.max_steps=1"))
    captured = capsys.readouterr()
    assert "nothing to resume" in captured.err
    assert f"{FIT_MARKER} {root / 'lightning_logs' / 'version_0' / 'checkpoints'}" in captured.out
    # auto again: resumes version_0 (the newest run with a last.ckpt), applying the new max_steps
    # ... and merge_lora (float rounding only) and the evaluation's sampler steps
    main(
        _fit(
            TINY, tiny_dir, root, "--ckpt_path", "auto", "--trainer.max_steps=2",
            "--model.merge_lora=false", "--model.eval_sample_steps=3",
        )
    )  # fmt: skip
    captured = capsys.readouterr()
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"marble: resuming from {last}" in captured.out
    assert "trainer.max_steps: checkpoint run 1, now 2 (applied)" in captured.err
    assert "model.merge_lora: checkpoint run true, now false (applied)" in captured.err
    assert "model.eval_sample_steps: checkpoint run null, now 3 (applied)" in captured.err
    assert not (root / "lightning_logs" / "version_1").exists()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2


# -------------------------------------------------------------------------------------- paths


def test_shipped_configs_leave_logger_save_dir_to_the_root() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        trainer = yaml.safe_load(path.read_text()).get("trainer") or {}
        loggers = trainer.get("logger") or []
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, dict):
                assert "save_dir" not in (logger.get("init_args") or {}), path.name


def test_every_output_under_default_root_dir(
    tiny_dir: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    config = _run_config(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = tmp_path / "custom_root"
    main(_fit(config, tiny_dir, root, "--trainer.max_steps=2"))
    assert FIT_MARKER in capsys.readouterr().out
    assert _files(cwd) == []
    assert _files(tmp_path / "configs") == [config]
    outside = [p for p in _files(tmp_path) if root not in p.parents and p.parent != config.parent]
    assert outside == []
    run = root / "lightning_logs" / "version_0"
    for name in ("config.yaml", "checkpoints/last.ckpt", "report/history.json"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    assert (root / "csv" / "version_0" / "metrics.csv").is_file()


# ---------------------------------------------------------------------------- subprocess runs


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(MARBLE), *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended early ({proc.returncode}): {err[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _steps_logged(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    lines = [line for line in metrics.read_text().splitlines()[1:] if line.strip()]
    return len(lines)


@pytest.mark.slow  # ~60 s: two runs in fresh processes
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_resumable_checkpoint_and_report(sig, tiny_dir: str, tmp_path: Path) -> None:
    config = _run_config(tmp_path, every=1000)  # ModelCheckpoint alone would not save in this run
    root = tmp_path / "root"
    args = _fit(config, tiny_dir, root, "--trainer.max_steps=10000")
    proc = _start(args, tmp_path)
    metrics = root / "csv" / "version_0" / "metrics.csv"
    _wait_for(lambda: _steps_logged(metrics) >= 1, proc)
    sent = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert time.time() - sent < 60
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "resume with the same command plus --ckpt_path last" in err
    assert FIT_MARKER not in out
    run = root / "lightning_logs" / "version_0"
    checkpoint = torch.load(
        run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    steps = checkpoint["global_step"]
    assert 1 <= steps < 10000
    import json

    history = json.loads((run / "report" / "history.json").read_text())
    assert len(history["train"]) == steps  # the report covers what ran
    if sig == signal.SIGINT:  # and the checkpoint resumes, in the same run folder
        done = subprocess.run(
            [
                str(MARBLE),
                *_fit(config, tiny_dir, root, f"--trainer.max_steps={steps + 1}"),
                "--ckpt_path",
                "last",
            ],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"marble: resuming from {run / 'checkpoints' / 'last.ckpt'}" in done.stdout
        assert FIT_MARKER in done.stdout
        history = json.loads((run / "report" / "history.json").read_text())
        assert [r["step"] for r in history["train"]] == list(
            range(steps + 1)
        )  # continued, not restarted
        assert not (root / "lightning_logs" / "version_1").exists()


def _lora(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in checkpoint["state_dict"].items() if ".lora_" in k}, checkpoint[
        "global_step"
    ]


@pytest.mark.slow  # ~90 s: three runs in fresh processes
def test_kill9_then_ckpt_path_last_resumes_bit_identically(tiny_dir: str, tmp_path: Path) -> None:
    config = _run_config(tmp_path, every=3, report=False)
    steps = "--trainer.max_steps=6"

    reference_root = tmp_path / "reference"
    done = subprocess.run(
        [str(MARBLE), *_fit(config, tiny_dir, reference_root, steps)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reference, reference_step = _lora(
        reference_root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    )
    assert reference_step == 6 and reference

    # the documented crash-and-resume: the same command, killed, then re-run with --ckpt_path last
    root = tmp_path / "root"
    command = _fit(config, tiny_dir, root, steps)
    proc = _start(command, tmp_path)
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"

    def first_checkpoint_written() -> bool:
        try:
            return _lora(last)[1] == 3
        except Exception:
            return False

    _wait_for(first_checkpoint_written, proc)
    proc.kill()  # SIGKILL
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert _lora(last)[1] == 3

    # a changed model setting is refused before anything is restored
    refused = subprocess.run(
        [str(MARBLE), *command, "--ckpt_path", "last", "--model.lora_rank=8"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert refused.returncode == 2
    assert "model.lora_rank: checkpoint 2, requested 8" in refused.stderr

    done = subprocess.run(
        [str(MARBLE), *command, "--ckpt_path", "last"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"marble: resuming from {last}" in done.stdout
    assert f"{FIT_MARKER} {last.parent}" in done.stdout
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]
    resumed, resumed_step = _lora(last)
    assert resumed_step == 6
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
