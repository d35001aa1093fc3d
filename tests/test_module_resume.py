"""Checkpoint and resume: 2 + 2 steps == 4 steps; a SIGKILL'd run resumes from its last
checkpoint."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from marble_lightning.callbacks import EMACoefficientCallback, HarmonizationCallback
from marble_lightning.testing import fit, make_module

torch.set_num_threads(1)

OPTIONS = dict(
    kl_weight=0.05,
    sample_steps=3,
    train_timesteps=2,
    old_policy={"start": 1, "rate": 0.3, "max_decay": 0.6},
)


def _callbacks() -> list:
    return [HarmonizationCallback(refresh_every=2), EMACoefficientCallback(decay=0.5)]


def _snapshot(module) -> dict:
    return {
        "params": [p.detach().clone() for p in module.trainable_parameters + module.old_parameters],
        "alpha": module.current_alpha.clone(),
        "norms": module.cached_norms.clone(),
        "history": [
            {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in module.history
        ],
        "tracker": module.tracker.state_dict(),
    }


def _assert_same(a: dict, b: dict) -> None:
    for x, y in zip(a["params"], b["params"]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(a["alpha"], b["alpha"], rtol=0, atol=0)
    torch.testing.assert_close(a["norms"], b["norms"], rtol=0, atol=0)
    assert a["tracker"] == b["tracker"]
    assert a["history"] == b["history"]


def test_resume_two_plus_two_equals_four(tmp_path):
    # 8 prompts, 2 per step: 4 batches per epoch, so the resume happens mid-epoch
    straight = make_module("amortized", **OPTIONS)
    fit(straight, max_steps=4, callbacks=_callbacks())
    expected = _snapshot(straight)
    assert [r["refresh"] for r in straight.history] == [True, False, True, False]

    first = make_module("amortized", **OPTIONS)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
    fit(first, max_steps=2, callbacks=[*_callbacks(), ckpt], enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    # only the adapters are saved, plus the module's own state
    assert all(".lora_" in key for key in saved["state_dict"])
    assert len(saved["state_dict"]) == 2 * len(first.trainable_parameters)
    assert saved["marble"]["step_index"] == 2

    second = make_module("amortized", **OPTIONS)
    callbacks = _callbacks()
    fit(second, max_steps=4, callbacks=callbacks, ckpt_path=str(tmp_path / "last.ckpt"))
    _assert_same(_snapshot(second), expected)
    # the EMA callback's state was restored: its average equals the straight run's module alpha
    torch.testing.assert_close(callbacks[1].alpha_ema, expected["alpha"])


def test_checkpoint_of_other_lora_rank_is_rejected(tmp_path):
    module = make_module("marble")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    fit(module, max_steps=1, callbacks=[ckpt], enable_checkpointing=True)
    other = make_module("marble", lora_targets=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj"])
    with pytest.raises(ValueError, match="lora_targets: checkpoint"):
        fit(other, max_steps=2, ckpt_path=str(tmp_path / "last.ckpt"))


@pytest.mark.parametrize(("key", "value"), [("lora_rank", 4), ("lora_alpha", 8)])
def test_changed_lora_setting_fails_naming_both_values_before_restoring(tmp_path, key, value):
    module = make_module("marble")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    fit(module, max_steps=1, callbacks=[ckpt], enable_checkpointing=True)
    other = make_module("marble", **{key: value})
    before = [p.detach().clone() for p in other.trainable_parameters]
    saved = module.hparams[key]
    with pytest.raises(ValueError, match=rf"{key}: checkpoint {saved}, module {value}"):
        fit(other, max_steps=2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert other.step_index == 0 and other.history == [] and other.tracker.prompts == []
    assert all(torch.equal(a, b) for a, b in zip(before, other.trainable_parameters))


_SCRIPT = textwrap.dedent(
    """
    import torch
    torch.set_num_threads(1)
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from marble_lightning.testing import fit, make_module
    from marble_lightning.callbacks import EMACoefficientCallback, HarmonizationCallback

    class Slow(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            print("STEP", pl_module.step_index, flush=True)
            if {slow}:
                import time; time.sleep(0.5)

    module = make_module(
        "amortized", kl_weight=0.05, old_policy={{"start": 1, "rate": 0.3, "max_decay": 0.6}}
    )
    ckpt = ModelCheckpoint(dirpath={ckpt_dir!r}, save_last=True, every_n_train_steps=1)
    callbacks = [
        HarmonizationCallback(refresh_every=2), EMACoefficientCallback(decay=0.5), ckpt, Slow()
    ]
    resume = {resume!r}
    fit(module, max_steps={steps}, callbacks=callbacks, enable_checkpointing=True, ckpt_path=resume)
    torch.save([p.detach() for p in module.trainable_parameters + module.old_parameters], {out!r})
    print("FIT-DONE", module.step_index, flush=True)
    """
)


def _script(tmp: Path, name: str, *, slow: bool, resume: str | None, steps: int, out: Path) -> Path:
    path = tmp / f"{name}.py"
    path.write_text(
        _SCRIPT.format(
            slow=slow, ckpt_dir=str(tmp / name), resume=resume, steps=steps, out=str(out)
        )
    )
    return path


@pytest.mark.slow
def test_sigkilled_run_resumes_from_last_checkpoint(tmp_path):
    steps = 8
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    # uninterrupted reference run
    ref = _script(tmp_path, "ref", slow=False, resume=None, steps=steps, out=tmp_path / "ref.pt")
    done = subprocess.run(
        [sys.executable, str(ref)], capture_output=True, text=True, env=env, timeout=300
    )
    assert "FIT-DONE 8" in done.stdout, done.stderr[-2000:]

    # a run killed with SIGKILL once a checkpoint of step >= 3 exists
    crash = _script(
        tmp_path, "crash", slow=True, resume=None, steps=steps, out=tmp_path / "never.pt"
    )
    proc = subprocess.Popen(
        [sys.executable, str(crash)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    deadline = time.time() + 240
    seen = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("STEP"):
            seen = int(line.split()[1])
            if seen >= 4:  # step 3 (0-based) is done and its checkpoint written
                break
        assert time.time() < deadline
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    last = tmp_path / "crash" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    resumed_from = state["marble"]["step_index"]
    assert 3 <= resumed_from < steps  # lost at most the steps since that checkpoint

    resume = _script(
        tmp_path, "crash", slow=False, resume=str(last), steps=steps, out=tmp_path / "resumed.pt"
    )
    done = subprocess.run(
        [sys.executable, str(resume)], capture_output=True, text=True, env=env, timeout=300
    )
    assert "FIT-DONE 8" in done.stdout, done.stderr[-2000:]
    first_step = int(done.stdout.split("STEP", 1)[1].split()[0])
    assert first_step == resumed_from + 1
    for a, b in zip(
        torch.load(tmp_path / "ref.pt", weights_only=True),
        torch.load(tmp_path / "resumed.pt", weights_only=True),
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Batches(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(tuple(batch))


@pytest.mark.parametrize("stop", ["mid_epoch", "epoch_boundary"])
def test_resume_sees_the_same_prompt_stream(tmp_path, stop):
    """Resuming anywhere (also from a checkpoint written on an epoch's last batch, where
    Lightning counts the epoch again) continues the prompt stream of the uninterrupted run."""
    from marble_lightning.testing import PROMPTS

    per_epoch = len(PROMPTS) // 2  # prompts_per_step=2
    total = per_epoch + 2
    full = _Batches()
    fit(make_module("marble"), max_steps=total, callbacks=[full])
    first, second = _Batches(), _Batches()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    at = per_epoch if stop == "epoch_boundary" else per_epoch - 1
    fit(make_module("marble"), max_steps=at, callbacks=[first, ckpt], enable_checkpointing=True)
    fit(
        make_module("marble"),
        max_steps=total,
        callbacks=[second],
        ckpt_path=str(tmp_path / "last.ckpt"),
    )
    assert first.seen + second.seen == full.seen
