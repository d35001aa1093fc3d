"""What several test files share: a plain ``sys.argv``, the CPU allocator settings for training
subprocesses, and one tiny SD3 pipeline written by ``marble make-tiny-sd3``."""

from __future__ import annotations

import sys

import pytest
import torch

ALLOCATOR = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
    "MALLOC_TOP_PAD_": "1073741824",
}
"""The glibc allocator settings the README's run command uses (for training subprocesses)."""


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """``main(args)`` runs LightningCLI in-process; keep pytest's own argv out of its way."""
    monkeypatch.setattr(sys, "argv", ["marble"])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random SD3 pipeline folder, written once by the ``marble make-tiny-sd3`` command."""
    from marble_lightning.cli import main

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny_sd3_cli") / "pipe"
    with pytest.raises(SystemExit) as exit_info:
        main(["make-tiny-sd3", "--out", str(out)])
    assert exit_info.value.code == 0
    assert (out / "model_index.json").is_file()
    return str(out)
