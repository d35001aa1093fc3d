"""``rollout_precision="auto"``: bfloat16 only on hardware with native bf16, else float32."""

from __future__ import annotations

import pytest
import torch

from marble_lightning import precision
from marble_lightning.precision import autocast_context, native_bf16, resolve_rollout_precision


def test_auto_picks_float32_when_the_capability_is_avx2(monkeypatch: pytest.MonkeyPatch) -> None:
    # the hardware has bf16 but torch dispatches AVX2 kernels (an AVX2-only CPU, or
    # ATEN_CPU_CAPABILITY=avx2): bf16 would run on generic kernels
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert resolve_rollout_precision("auto", "cpu") == "float32"


def test_auto_picks_float32_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    # an AVX2-only CPU: neither torch's probe nor /proc/cpuinfo report avx512_bf16 / amx_bf16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "fma", "sse4_2"})
    assert not native_bf16("cpu")
    assert resolve_rollout_precision("auto", torch.device("cpu")) == "float32"


@pytest.mark.parametrize("flags", [{"avx2", "avx512_bf16"}, {"avx2", "amx_bf16"}])
def test_auto_picks_bfloat16_with_native_bf16(monkeypatch: pytest.MonkeyPatch, flags: set) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve_rollout_precision("auto", "cpu") == "bfloat16"


def test_auto_trusts_torch_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: set())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve_rollout_precision("auto", "cpu") == "bfloat16"


def test_explicit_values_pass_through_and_bad_values_are_named() -> None:
    for value in ("float32", "bfloat16", "float16"):
        assert resolve_rollout_precision(value, "cpu") == value
    with pytest.raises(ValueError, match="rollout_precision.*'int8'"):
        resolve_rollout_precision("int8", "cpu")


def test_auto_is_the_module_default_and_is_resolved_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from marble_lightning.testing import make_module

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2"})
    module = make_module("marble", rollout_precision="auto")
    with autocast_context("float32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    module.rollout(["a red image", "a blue image"])
    assert module._rollout_dtype == "float32"


def test_bfloat16_autocasts() -> None:
    with autocast_context("bfloat16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
