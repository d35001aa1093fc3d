"""``gradient_checkpointing=True`` on a diffusers backbone: same training, every gradient engine.

diffusers checkpoints with ``torch.utils.checkpoint(use_reentrant=False)``: the graph between the
blocks stays whole and only the activations inside a block are dropped and recomputed in the
backward. The per-sample engine's forward hooks on the LoRA layers are removed when the captured
forward ends, before any backward, so the recomputed forward adds no capture, and the gradient
at a captured layer output is the same tensor whether its block is recomputed or not: the three
engines give bit-identical updates with and without checkpointing (checked here on tiny FLUX).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_backbones import FAMILIES, _backbone, _fit, _module


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FAMILIES["flux"].build(tmp_path_factory.mktemp("tiny_flux_gc"))


@pytest.mark.parametrize("engine", ["backward", "batched", "per_sample"])
def test_checkpointing_gives_identical_updates(flux_dir: str, engine: str) -> None:
    family = FAMILIES["flux"]
    results, block_calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone = _backbone(family, flux_dir, gradient_checkpointing=checkpointing)
        assert backbone.denoiser.is_gradient_checkpointing is checkpointing
        module = _module(backbone, "marble", gram=engine)
        assert module.gram == engine  # no fallback needed
        calls: list[int] = []
        block = backbone.denoiser.transformer_blocks[0]
        block.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        _fit(module, steps=2)
        results.append([p.detach().clone() for p in module.trainable_parameters])
        block_calls.append(len(calls))
    # the checkpointed blocks ran again in every backward (a pre-hook: the recomputation stops
    # early, once the tensors the backward needs are back, so a block's forward hook never fires)
    assert block_calls[1] > block_calls[0]
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_checkpointing_flag_is_checked(flux_dir: str) -> None:
    with pytest.raises(TypeError, match="gradient_checkpointing"):
        _backbone(FAMILIES["flux"], flux_dir, gradient_checkpointing="yes")
