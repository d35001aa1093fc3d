"""marble_lightning/adapters.py: the policy / old LoRA pair on a tiny SD3 denoiser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from marble_lightning.adapters import ADAPTERS, BASE, OLD, POLICY, LoraAdapterPair
from marble_lightning.testing import TinySD3Backbone

torch.set_num_threads(1)

TARGETS = TinySD3Backbone.lora_target_modules


def make_pair(seed: int = 0, model_seed: int = 0, rank: int = 2):
    backbone = TinySD3Backbone(seed=model_seed)
    return backbone, LoraAdapterPair(backbone.denoiser, rank, 4.0, TARGETS, seed)


def randomise(params, seed: int, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def inputs(backbone, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    t = torch.tensor([0.7, 0.2])
    return x, t, backbone.encode_prompts(["a red cat", "green sky"])


def out(backbone, data):
    with torch.no_grad():
        return backbone.velocity(*data)


def assert_grad_flags(pair):
    assert all(p.requires_grad for p in pair.policy_params)
    assert not any(p.requires_grad for p in pair.old_params)


def test_names_are_aligned_sorted_and_policy_equals_old_at_start():
    backbone, pair = make_pair()
    assert pair.policy_names == sorted(pair.policy_names)
    assert len(pair.policy_names) == len(pair.old_names) > 0
    for p_name, o_name in zip(pair.policy_names, pair.old_names):
        assert ".lora_" in p_name and ".policy." in p_name
        assert o_name == p_name.replace(".policy.", ".old.")
    named = dict(backbone.denoiser.named_parameters())
    for name, p in zip(pair.policy_names, pair.policy_params):
        assert named[name] is p
    for p, o in zip(pair.policy_params, pair.old_params):
        assert p is not o and torch.equal(p, o)
    assert pair.old_is_policy
    assert_grad_flags(pair)
    # every target module got an adapter (7 projections x 2 blocks x A/B)
    assert len(pair.policy_names) == 2 * 2 * len(TARGETS)


def test_base_output_equals_the_model_without_lora():
    plain = TinySD3Backbone(seed=0)
    backbone, pair = make_pair()
    data = inputs(backbone)
    reference = out(plain, data)
    randomise(pair.policy_params, 1)
    randomise(pair.old_params, 2)
    with pair.using(BASE):
        # a second model instance: BLAS may sum in another order (alignment-dependent on some
        # CPUs), so equal to float32 rounding, not bit for bit; a live adapter differs by >1e-4
        torch.testing.assert_close(out(backbone, data), reference, rtol=1e-6, atol=1e-6)
        assert_grad_flags(pair)
    assert not torch.allclose(out(backbone, data), reference, atol=1e-4)


def test_fresh_lora_is_the_identity_on_the_base_model():
    plain = TinySD3Backbone(seed=0)
    backbone, _ = make_pair()
    data = inputs(backbone)
    torch.testing.assert_close(out(backbone, data), out(plain, data), rtol=1e-6, atol=1e-6)


def test_using_old_runs_the_old_adapter_and_restores_the_policy():
    backbone, pair = make_pair()
    data = inputs(backbone)
    randomise(pair.policy_params, 1)
    randomise(pair.old_params, 2)
    policy_out = out(backbone, data)

    # independent reference: a second model whose *policy* adapter holds the old weights
    other, other_pair = make_pair()
    with torch.no_grad():
        for dst, src in zip(other_pair.policy_params, pair.old_params):
            dst.copy_(src)
    old_reference = out(other, data)

    with pair.using(OLD):
        old_out = out(backbone, data)
        assert_grad_flags(pair)
    torch.testing.assert_close(old_out, old_reference, rtol=1e-6, atol=1e-6)  # another instance
    assert not torch.allclose(old_out, policy_out, atol=1e-4)
    torch.testing.assert_close(out(backbone, data), policy_out, rtol=0, atol=0)
    assert_grad_flags(pair)


def test_using_restores_the_policy_after_an_exception():
    backbone, pair = make_pair()
    data = inputs(backbone)
    randomise(pair.policy_params, 1)
    randomise(pair.old_params, 2)
    policy_out = out(backbone, data)
    for adapter in (OLD, BASE):
        with pytest.raises(KeyError, match="boom"), pair.using(adapter):
            assert not torch.allclose(out(backbone, data), policy_out, atol=1e-4)
            raise KeyError("boom")
        torch.testing.assert_close(out(backbone, data), policy_out, rtol=0, atol=0)
        assert_grad_flags(pair)


def test_unknown_adapter_is_refused_and_changes_nothing():
    backbone, pair = make_pair()
    data = inputs(backbone)
    randomise(pair.policy_params, 1)
    before = out(backbone, data)
    with pytest.raises(ValueError, match="'ema'"), pair.using("ema"):
        pass
    torch.testing.assert_close(out(backbone, data), before, rtol=0, atol=0)
    assert ADAPTERS == (POLICY, OLD, BASE)


def test_only_policy_requires_grad_after_any_sequence_of_switches():
    backbone, pair = make_pair()
    for adapter in (OLD, BASE, POLICY, OLD, OLD, BASE, BASE, POLICY):
        pair.activate(adapter)
        assert_grad_flags(pair)
        with pair.using(adapter):
            assert_grad_flags(pair)
        assert_grad_flags(pair)
    # gradients reach the policy adapter, never the old one
    data = inputs(backbone)
    randomise(pair.policy_params, 1)
    backbone.velocity(*data).square().mean().backward()
    assert all(p.grad is not None for p in pair.policy_params)
    assert all(p.grad is None for p in pair.old_params)


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.9, 1.0])
def test_soft_update_equals_independent_mix(eta):
    _, pair = make_pair()
    randomise(pair.policy_params, 1)
    randomise(pair.old_params, 2)
    policy_before = [p.detach().clone() for p in pair.policy_params]
    old_before = [p.detach().clone() for p in pair.old_params]
    pair.soft_update(eta)
    for old, o0, p0, p in zip(pair.old_params, old_before, policy_before, pair.policy_params):
        torch.testing.assert_close(old, eta * o0 + (1.0 - eta) * p0, rtol=1e-6, atol=1e-7)
        assert torch.equal(p, p0)  # the policy is untouched
    assert pair.old_is_policy is (eta == 0.0)
    if eta == 0.0:
        for old, p in zip(pair.old_params, pair.policy_params):
            assert torch.equal(old, p)
    assert_grad_flags(pair)


def test_soft_update_then_copy_resets_the_flag():
    _, pair = make_pair()
    randomise(pair.policy_params, 1)
    pair.soft_update(0.5)
    assert not pair.old_is_policy
    pair.soft_update(0.0)
    assert pair.old_is_policy


def test_write_gradients_round_trip():
    _, pair = make_pair()
    total = sum(p.numel() for p in pair.policy_params)
    flat = torch.randn(total, dtype=torch.float64)
    pair.write_gradients(flat)
    offset = 0
    for p in pair.policy_params:
        assert p.grad is not None and p.grad.dtype == p.dtype and p.grad.shape == p.shape
        torch.testing.assert_close(p.grad.reshape(-1), flat[offset : offset + p.numel()].float())
        offset += p.numel()
    back = torch.cat([p.grad.reshape(-1) for p in pair.policy_params])
    torch.testing.assert_close(back, flat.float())
    assert all(p.grad is None for p in pair.old_params)
    # the gradients are copies, not views of the input
    flat.zero_()
    assert back.abs().sum() > 0 and pair.policy_params[0].grad.abs().sum() > 0


def test_write_gradients_too_long_is_an_error_naming_both_sizes():
    _, pair = make_pair()
    total = sum(p.numel() for p in pair.policy_params)
    with pytest.raises(ValueError, match=rf"{total + 3} entries, the policy has {total}"):
        pair.write_gradients(torch.zeros(total + 3))


def test_write_gradients_too_short_is_the_same_clear_error():
    _, pair = make_pair()
    total = sum(p.numel() for p in pair.policy_params)
    with pytest.raises(ValueError, match=rf"{total - 3} entries, the policy has {total}"):
        pair.write_gradients(torch.zeros(total - 3))
    assert all(p.grad is None for p in pair.policy_params)  # nothing written before the check


def test_state_keys_and_check_state():
    _, pair = make_pair()
    keys = pair.state_keys("model.")
    assert keys == ["model." + n for n in pair.policy_names + pair.old_names]
    state = {k: torch.zeros(1) for k in keys}
    pair.check_state(state, "model.")  # exact match passes

    missing = dict(state)
    gone = keys[3]
    del missing[gone]
    with pytest.raises(ValueError, match="1 missing, 0 unexpected") as info:
        pair.check_state(missing, "model.")
    assert repr(gone) in str(info.value)

    extra = dict(state)
    extra["model.transformer_blocks.9.attn.to_q.lora_A.policy.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="0 missing, 1 unexpected") as info:
        pair.check_state(extra, "model.")
    assert "transformer_blocks.9" in str(info.value)

    with pytest.raises(ValueError, match=f"{len(keys)} missing, {len(keys)} unexpected"):
        pair.check_state(state, "other.")


def test_denoiser_without_peft_methods_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Linear\) lacks `add_adapter`.*PeftAdapterMixin"):
        LoraAdapterPair(nn.Linear(3, 3), 2, 4.0, ["weight"], 0)


def test_targets_matching_nothing_are_a_clear_error():
    backbone = TinySD3Backbone()
    with pytest.raises(ValueError, match="no_such_layer"):
        LoraAdapterPair(backbone.denoiser, 2, 4.0, ["no_such_layer"], 0)


def test_initialisation_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    _, a = make_pair(seed=3)
    assert torch.equal(torch.rand(4), expected)

    torch.manual_seed(99)  # a different global state does not change the LoRA
    _, b = make_pair(seed=3)
    _, c = make_pair(seed=4)
    for pa, pb in zip(a.policy_params, b.policy_params):
        assert torch.equal(pa, pb)
    a_weights = [p for n, p in zip(a.policy_names, a.policy_params) if ".lora_A." in n]
    c_weights = [p for n, p in zip(c.policy_names, c.policy_params) if ".lora_A." in n]
    assert a_weights and all(not torch.equal(x, y) for x, y in zip(a_weights, c_weights))
    # LoRA B starts at zero (PEFT's default init), so the adapters start as the identity
    assert all(
        float(p.detach().abs().sum()) == 0
        for n, p in zip(a.policy_names, a.policy_params)
        if ".lora_B." in n
    )


def test_lora_scale_is_alpha_over_rank():
    """One LoRA layer: delta output = (alpha / rank) * B A x, checked by hand."""
    backbone, pair = make_pair(rank=2)
    randomise(pair.policy_params, 1)
    layer = backbone.denoiser.transformer_blocks[0].attn.to_q
    x = torch.randn(3, layer.in_features)
    a = layer.lora_A["policy"].weight
    b = layer.lora_B["policy"].weight
    with torch.no_grad():
        expected = layer.base_layer(x) + (4.0 / 2) * x @ a.T @ b.T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def hand_merged_state(backbone, adapter: str) -> dict:
    """The plain model's state with ``scale * B @ A`` of ``adapter`` added by hand (linear and
    convolution LoRA layers), independent of PEFT's merge code."""
    named = dict(backbone.denoiser.named_modules())
    state = {}
    for name, module in named.items():
        if not hasattr(module, "lora_A") or adapter not in module.lora_A:
            continue
        a = module.lora_A[adapter].weight.detach()
        b = module.lora_B[adapter].weight.detach()
        scale = module.scaling[adapter]
        if a.ndim == 4:  # conv: A is k x k (r, Cin, k, k), B is 1 x 1 (Cout, r, 1, 1)
            delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        else:
            delta = b @ a
        state[f"{name}.weight"] = module.base_layer.weight.detach() + scale * delta
    return state


@pytest.mark.parametrize("family", ["sd3", "toy"])
@pytest.mark.parametrize("adapter", [POLICY, OLD])
def test_inference_equals_an_independently_merged_model(family, adapter):
    if family == "sd3":
        backbone, pair = make_pair()
        plain = TinySD3Backbone(seed=0)
        data = inputs(backbone)
    else:
        from marble_lightning.toy.backbone import ToyBackbone

        backbone, plain = ToyBackbone(), ToyBackbone()
        pair = LoraAdapterPair.for_backbone(backbone, 4, 8.0, None, 0)
        gen = torch.Generator().manual_seed(3)
        data = (
            torch.randn(3, 3, 32, 32, generator=gen),
            torch.tensor([0.9, 0.5, 0.1]),
            backbone.encode_prompts(["two red circles", "the word cat", ""]),
        )
    randomise(pair.policy_params, 1, std=0.05)
    randomise(pair.old_params, 2, std=0.05)
    before = {k: v.clone() for k, v in backbone.denoiser.state_dict().items()}
    storages = [p.data_ptr() for p in backbone.denoiser.parameters()]
    with torch.no_grad():
        with pair.using(adapter):
            unmerged = out(backbone, data)
        with pair.inference(adapter):
            merged = out(backbone, data)
            assert_grad_flags(pair)
    merged_state = hand_merged_state(backbone, adapter)
    plain.denoiser.load_state_dict(merged_state, strict=False)
    reference = out(plain, data)
    torch.testing.assert_close(merged, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    with pair.using(BASE):
        assert not torch.allclose(merged, out(backbone, data), atol=1e-4)  # the LoRA matters
    # base weights restored bit for bit (same storage), the policy active again
    after = backbone.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert storages == [p.data_ptr() for p in backbone.denoiser.parameters()]
    with pair.using(POLICY):
        expected = out(backbone, data)
    torch.testing.assert_close(out(backbone, data), expected, rtol=0, atol=0)


def test_inference_restores_the_weights_after_an_exception_and_merge_false_is_using():
    backbone, pair = make_pair()
    data = inputs(backbone)
    randomise(pair.policy_params, 1)
    randomise(pair.old_params, 2)
    before = {k: v.clone() for k, v in backbone.denoiser.state_dict().items()}
    policy_out = out(backbone, data)
    with pytest.raises(KeyError, match="boom"), pair.inference(OLD):
        raise KeyError("boom")
    after = backbone.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(out(backbone, data), policy_out, rtol=0, atol=0)
    assert_grad_flags(pair)
    pair.merge = False
    with pair.using(OLD):
        expected = out(backbone, data)
    with pair.inference(OLD):
        torch.testing.assert_close(out(backbone, data), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="'nope'"), pair.inference("nope"):
        pass
