"""Every Gram engine returns the same per-reward gradients as K explicit backward passes."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from marble_lightning.gram import (
    PerSampleGradients,
    UnsupportedModelError,
    per_reward_gradients,
)
from marble_lightning.nft import interpolation_coefficient, nft_objective, nft_terms

torch.set_num_threads(1)


class ConvAttnNet(nn.Module):
    """A velocity model with convs, GroupNorm, per-sample self-attention and linear layers."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.norm = nn.GroupNorm(2, channels)
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)
        self.up = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.conv_in(x) + t[:, None, None, None]))
        h = self.down(h)
        b, c, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2)
        q, k, v = self.to_q(seq), self.to_k(seq), self.to_v(seq)
        att = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1)
        seq = seq + self.to_out(att @ v)
        h = self.up(seq.transpose(1, 2).reshape(b, c, hh, ww))
        return self.conv_out(torch.nn.functional.silu(h))


def combine_per_sample(positive, negative, r, *, beta, a_max, batch_size):
    """Reference: ``(a_max / (beta B)) * (r @ P + (1 - r) @ N)`` from full per-sample matrices."""
    r = r.to(positive.dtype)
    return (a_max / (beta * batch_size)) * (r @ positive + (1.0 - r) @ negative)


def lora_model(seed: int = 0) -> tuple[nn.Module, list[nn.Parameter]]:
    torch.manual_seed(seed)
    model = ConvAttnNet().double()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["conv_in", "down", "to_q", "to_v", "to_out", "conv_out"]
    )
    model = inject_adapter_in_model(config, model)
    model.double()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:  # non-zero B so that every LoRA matrix gets a gradient
            nn.init.normal_(p, std=0.3)
    return model, [p for p in model.parameters() if p.requires_grad]


def make_batch(b: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    adv = torch.randn(b, k, generator=gen, dtype=torch.float64) * 4  # |A| > a_max=5 on some samples
    adv[0, 0] = 9.0
    return gen, x0, interpolation_coefficient(adv, 5.0).T.contiguous()  # r: [K, B]


@pytest.mark.parametrize("k", [1, 3, 7])
def test_engines_agree_over_accumulated_timesteps(k: int) -> None:
    b, beta, a_max = 5, 0.7, 5.0
    model, params = lora_model()
    gen, x0, r = make_batch(b, k, seed=k)
    assert (r == 1.0).any() or (r == 0.0).any(), "the clamp must be active on some samples"
    reference = torch.zeros(k, sum(p.numel() for p in params), dtype=torch.float64)
    batched = torch.zeros_like(reference)
    pos_acc = torch.zeros(b, reference.shape[1], dtype=torch.float64)
    neg_acc = torch.zeros_like(pos_acc)
    engine = PerSampleGradients(model, params)
    for t_value in (0.3, 0.8):
        t = torch.full((b,), t_value, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        with torch.no_grad():
            v_old = model(x_t, t) + 0.05 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        with engine.capture():
            v = model(x_t, t)
        terms = nft_terms(v, v_old, x_t, x0, t, beta)
        losses = nft_objective(terms, r, beta, a_max)
        reference += per_reward_gradients(losses, params, engine="backward", retain_graph=True)
        batched += per_reward_gradients(losses, params, engine="batched", retain_graph=True)
        pos_acc += engine.gradients(terms.positive.sum(), retain_graph=True)
        neg_acc += engine.gradients(terms.negative.sum())
    per_sample = combine_per_sample(pos_acc, neg_acc, r, beta=beta, a_max=a_max, batch_size=b)
    assert reference.abs().max() > 1e-3
    torch.testing.assert_close(batched, reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(per_sample, reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        per_sample @ per_sample.T, reference @ reference.T, rtol=1e-9, atol=1e-12
    )


def test_per_sample_rows_are_single_sample_gradients() -> None:
    model, params = lora_model(seed=3)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    engine = PerSampleGradients(model, params)
    with engine.capture():
        out = model(x, t)
    per_sample = engine.gradients(out.square().flatten(1).sum(1).sum())
    for i in range(4):
        single = model(x[i : i + 1], t[i : i + 1]).square().sum()
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(single, params)])
        torch.testing.assert_close(per_sample[i], expected, rtol=1e-9, atol=1e-12)


def test_unsupported_layers_are_reported() -> None:
    model, _ = lora_model()
    norm_params = list(model.norm.parameters())
    with pytest.raises(UnsupportedModelError, match="GroupNorm"):
        PerSampleGradients(model, norm_params)
    with pytest.raises(UnsupportedModelError, match="ConvTranspose2d"):
        PerSampleGradients(model, [model.up.weight])
    with pytest.raises(ValueError, match="engine"):
        per_reward_gradients(torch.zeros(2, requires_grad=True), [], engine="magic")


def test_projected_gradients_equal_projection_of_per_sample_rows() -> None:
    model, params = lora_model(seed=5)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64)
    project = torch.rand(3, 6, dtype=torch.float64)
    engine = PerSampleGradients(model, params)
    with engine.capture():
        out = model(x, t)
    loss = out.square().flatten(1).mean(1).sum()
    full = engine.gradients(loss, retain_graph=True)
    projected = engine.gradients(loss, project=project)
    assert projected.shape == (3, full.shape[1])
    torch.testing.assert_close(projected, project @ full, rtol=1e-10, atol=1e-12)
