"""marble_lightning/gram.py GradientEngine: name resolution, and the accumulators of every engine
give the same gradient rows as an independent per-row autograd loop (NFT losses built as in
marble_lightning/update.py)."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from marble_lightning.gram import GradientEngine
from marble_lightning.nft import (
    aggregate_coefficients,
    interpolation_coefficient,
    kl_loss,
    nft_objective,
    nft_terms,
)

torch.set_num_threads(1)

BETA, A_MAX, KL = 0.7, 2.0, 0.3
B = 4


class TinyNet(nn.Module):
    """Conv -> per-position linear -> conv, with a time input; no interaction between samples."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.mix = nn.Linear(6, 6)
        self.conv_out = nn.Conv2d(6, 3, 3, padding=1, stride=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.conv_in(x)) + t[:, None, None, None])
        h = self.mix(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv_out(torch.tanh(h))


def lora_model(seed: int = 0, targets=("conv_in", "mix", "conv_out")):
    torch.manual_seed(seed)
    model = TinyNet()
    model = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=4, target_modules=list(targets)), model
    )
    model.double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_B" in name:  # non-zero so that every LoRA matrix gets a gradient
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model, [p for p in model.parameters() if p.requires_grad]


def make_data(k: int, n_t: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    adv = torch.randn(B, k, generator=gen, dtype=torch.float64) * 2
    adv[0, 0] = 9.0  # beyond the clip
    r = interpolation_coefficient(adv, A_MAX).T.contiguous()  # [K, B]
    eps = [torch.randn(B, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(n_t)]
    times = [0.9, 0.55, 0.2][:n_t]
    old_shift = [
        torch.randn(B, 3, 4, 4, generator=gen, dtype=torch.float64) * 0.05 for _ in range(n_t)
    ]
    v_ref = [torch.randn(B, 3, 4, 4, generator=gen, dtype=torch.float64) * 0.5 for _ in range(n_t)]
    return x0, r, eps, times, old_shift, v_ref


def plan(kind: str, r: torch.Tensor):
    """Loss rows and scales as update.plan_losses builds them."""
    k = r.shape[0]
    if kind == "refresh":
        return r, torch.ones(k, dtype=r.dtype)
    w = torch.linspace(0.3, 1.7, k, dtype=r.dtype)
    r_bar, total = aggregate_coefficients(r, w)
    if kind == "aggregated":
        return r_bar[None], total.reshape(1)
    assert kind == "diagnostics"
    return torch.cat([r_bar[None], r]), torch.cat([total.reshape(1), torch.ones(k, dtype=r.dtype)])


def _timestep(model, x0, eps, t, shift, reuse_old, capture):
    tt = torch.full((B,), t, dtype=x0.dtype)
    x_t = (1.0 - t) * x0 + t * eps
    with capture():
        v = model(x_t, tt)
    v_old = v.detach() if reuse_old else (v.detach() + shift)
    return v, nft_terms(v, v_old, x_t, x0, tt, BETA)


def run_engine(name, model, params, rows, scales, data, *, use_kl, reuse_old):
    x0, _, eps, times, shifts, v_refs = data
    engine = GradientEngine(name, model, params)
    acc = engine.accumulator(rows.shape[0])
    for e, t, shift, v_ref in zip(eps, times, shifts, v_refs):
        v, terms = _timestep(model, x0, e, t, shift, reuse_old, acc.capture)
        losses = list(nft_objective(terms, rows, BETA, A_MAX) * scales)
        if use_kl:
            losses.append(KL * kl_loss(v, v_ref))
        acc.add(terms, losses, rows, use_kl, reuse_old)
    return engine, acc.result(len(times), scales, A_MAX / (BETA * B))


def reference(model, params, rows, scales, data, *, use_kl, reuse_old):
    """Independent: one fresh forward and one autograd.grad per (row, timestep)."""
    x0, _, eps, times, shifts, v_refs = data
    n_rows = rows.shape[0] + (1 if use_kl else 0)
    out = []
    for i in range(n_rows):
        total = None
        for e, t, shift, v_ref in zip(eps, times, shifts, v_refs):
            v, terms = _timestep(model, x0, e, t, shift, reuse_old, contextlib.nullcontext)
            if i < rows.shape[0]:
                per_sample = rows[i] * terms.positive + (1 - rows[i]) * terms.negative
                loss = scales[i] * A_MAX / BETA * per_sample.mean()
            else:
                loss = KL * ((v - v_ref) ** 2).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, params)
                ]
            )
            total = flat if total is None else total + flat
        out.append(total / len(times))
    return torch.stack(out)


@pytest.mark.parametrize(
    "kind, k", [("refresh", 3), ("refresh", 1), ("diagnostics", 2), ("aggregated", 3)]
)
@pytest.mark.parametrize("use_kl", [False, True])
@pytest.mark.parametrize("reuse_old", [False, True])
def test_accumulators_of_every_engine_equal_the_reference(kind, k, use_kl, reuse_old):
    model, params = lora_model()
    data = make_data(k, n_t=2, seed=k)
    rows, scales = plan(kind, data[1])
    expected = reference(model, params, rows, scales, data, use_kl=use_kl, reuse_old=reuse_old)
    assert expected.shape == (rows.shape[0] + use_kl, sum(p.numel() for p in params))
    assert bool((expected.norm(dim=1) > 0).all())
    for name in ("backward", "batched", "per_sample"):
        engine, got = run_engine(
            name, model, params, rows, scales, data, use_kl=use_kl, reuse_old=reuse_old
        )
        assert engine.name == name
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-7, msg=name)


def test_three_timesteps_and_many_rows():
    model, params = lora_model(seed=3)
    data = make_data(6, n_t=3, seed=11)
    rows, scales = plan("diagnostics", data[1])
    expected = reference(model, params, rows, scales, data, use_kl=True, reuse_old=False)
    results = {
        name: run_engine(name, model, params, rows, scales, data, use_kl=True, reuse_old=False)[1]
        for name in ("backward", "batched", "per_sample")
    }
    for name, got in results.items():
        torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-7, msg=name)


# --------------------------------------------------------------------------- name resolution
def test_auto_resolves_to_per_sample_when_supported(caplog):
    model, params = lora_model()
    with caplog.at_level(logging.INFO, logger="marble_lightning.gram"):
        engine = GradientEngine("auto", model, params)
    assert engine.name == "per_sample" and engine.per_sample is not None
    assert not [r for r in caplog.records if "does not apply" in r.getMessage()]
    # a single row (aggregated step) never uses the per-sample pass
    assert type(engine.accumulator(1)).__name__ == "_LossGradients"
    assert type(engine.accumulator(3)).__name__ == "_PerSampleRows"


def _unsupported():
    model, params = lora_model()
    model.norm.weight.requires_grad_(True)  # a GroupNorm parameter: no per-sample formula
    return model, [*params, model.norm.weight]


def test_auto_falls_back_to_backward_and_logs_the_reason(caplog, recwarn):
    model, params = _unsupported()
    with caplog.at_level(logging.INFO, logger="marble_lightning.gram"):
        engine = GradientEngine("auto", model, params)
    assert engine.name == "backward" and engine.per_sample is None
    messages = [r.getMessage() for r in caplog.records if r.name == "marble_lightning.gram"]
    assert any(
        "gram='auto'" in m and "norm.weight" in m and "GroupNorm" in m and "'backward'" in m
        for m in messages
    ), messages
    assert not [
        w for w in recwarn if "per-sample" in str(w.message)
    ]  # auto: a log line, no warning
    assert type(engine.accumulator(3)).__name__ == "_LossGradients"


def test_explicit_per_sample_on_unsupported_model_warns_and_falls_back():
    model, params = _unsupported()
    with pytest.warns(UserWarning, match=r"gram='per_sample'.*GroupNorm.*using 'backward'"):
        engine = GradientEngine("per_sample", model, params)
    assert engine.name == "backward"
    # the fallback still gives the reference gradients (GroupNorm weight included)
    data = make_data(2, n_t=1, seed=5)
    rows, scales = plan("refresh", data[1])
    expected = reference(model, params, rows, scales, data, use_kl=False, reuse_old=False)
    with pytest.warns(UserWarning, match="using 'backward'"):
        _, got = run_engine(
            "per_sample", model, params, rows, scales, data, use_kl=False, reuse_old=False
        )
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["backward", "batched"])
def test_explicit_engines_keep_their_name(name):
    model, params = _unsupported()
    engine = GradientEngine(name, model, params)
    assert engine.name == name and engine.per_sample is None


def test_unknown_engine_is_refused():
    model, params = lora_model()
    with pytest.raises(
        ValueError,
        match=r"`gram` should be one of \('auto', 'backward', 'batched', 'per_sample'\), "
        r"got 'fast'",
    ):
        GradientEngine("fast", model, params)


def test_engines_agree_on_the_tiny_sd3_denoiser():
    """The real LoRA pair on the tiny SD3 transformer (float32): per_sample == backward ==
    batched."""
    from marble_lightning.adapters import LoraAdapterPair
    from marble_lightning.testing import TinySD3Backbone

    backbone = TinySD3Backbone()
    pair = LoraAdapterPair(backbone.denoiser, 2, 4.0, TinySD3Backbone.lora_target_modules, 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pair.policy_params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    cond = backbone.encode_prompts(["a red cat", "a red cat", "green sky", "green sky"])
    x0 = torch.rand(B, 3, 8, 8, generator=gen) * 2 - 1
    eps = torch.randn(B, 3, 8, 8, generator=gen)
    r = interpolation_coefficient(torch.randn(B, 3, generator=gen) * 2, A_MAX).T.contiguous()
    rows, scales = r, torch.ones(3)
    t = 0.6
    tt = torch.full((B,), t)
    x_t = (1 - t) * x0 + t * eps
    results = {}
    for name in ("backward", "batched", "per_sample"):
        engine = GradientEngine(name, backbone.denoiser, pair.policy_params)
        assert engine.name == name
        acc = engine.accumulator(3)
        with acc.capture():
            v = backbone.velocity(x_t, tt, cond)
        terms = nft_terms(v, v.detach(), x_t, x0, tt, BETA)
        acc.add(terms, list(nft_objective(terms, rows, BETA, A_MAX) * scales), rows, False, True)
        results[name] = acc.result(1, scales, A_MAX / (BETA * B))
    scale = float(results["backward"].abs().max())
    assert scale > 0
    for name in ("batched", "per_sample"):
        torch.testing.assert_close(
            results[name], results["backward"], rtol=1e-3, atol=1e-5 * scale, msg=name
        )
