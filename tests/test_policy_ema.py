"""PolicyEMACallback: EMA of the policy LoRA weights vs an independent recomputation; resume
bit-exact; RewardEvalCallback(use_ema=True); export-lora --ema."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from marble_lightning.callbacks import PolicyEMACallback, RewardEvalCallback
from marble_lightning.lora_export import export_lora
from marble_lightning.testing import fit, make_module

torch.set_num_threads(1)


class _Record(Callback):
    """The policy tensors after every step (runs before the EMA callback in the list)."""

    def __init__(self) -> None:
        self.states: list[list[torch.Tensor]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.states.append([p.detach().clone() for p in pl_module.trainable_parameters])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append([p.detach().clone() for p in pl_module.trainable_parameters])


def test_ema_matches_independent_recursion() -> None:
    module = make_module("marble")
    record, ema = _Record(), PolicyEMACallback(decay=0.6)
    fit(module, max_steps=3, callbacks=[record, ema])
    expected = [s.float().clone() for s in record.states[0]]
    for state in record.states[1:]:
        expected = [0.6 * e + 0.4 * s.float() for e, s in zip(expected, state)]
    assert ema.updates == 3
    for (name, _), e in zip(ema._named(module), expected):
        torch.testing.assert_close(ema.weights[name], e, rtol=1e-6, atol=1e-7)
    # applied() swaps the average in and restores the policy
    before = [p.detach().clone() for p in module.trainable_parameters]
    with ema.applied(module):
        for p, e in zip(module.trainable_parameters, expected):
            torch.testing.assert_close(p.detach(), e.to(p.dtype), rtol=1e-6, atol=1e-7)
    for p, b in zip(module.trainable_parameters, before):
        assert torch.equal(p.detach(), b)


def test_resume_bit_exact_and_export(tmp_path) -> None:
    straight_ema = PolicyEMACallback(decay=0.9)
    fit(make_module("marble"), max_steps=4, callbacks=[straight_ema])

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
    fit(
        make_module("marble"),
        max_steps=2,
        callbacks=[PolicyEMACallback(decay=0.9), ckpt],
        enable_checkpointing=True,
    )
    resumed_ema = PolicyEMACallback(decay=0.9)
    fit(
        make_module("marble"),
        max_steps=4,
        callbacks=[resumed_ema],
        ckpt_path=str(tmp_path / "last.ckpt"),
    )
    assert resumed_ema.updates == straight_ema.updates == 4
    for name, w in straight_ema.weights.items():
        assert torch.equal(resumed_ema.weights[name], w)

    # export-lora --ema writes the average, plain export the policy
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    weights = saved["callbacks"]["PolicyEMACallback"]["weights"]
    out = export_lora(
        str(tmp_path / "last.ckpt"), tmp_path / "ema", ema=True, format="peft", lora_alpha=4
    )
    plain = export_lora(
        str(tmp_path / "last.ckpt"), tmp_path / "plain", format="peft", lora_alpha=4
    )
    exported, policy = load_file(str(out)), load_file(str(plain))
    assert exported.keys() == policy.keys()
    differs = 0
    for name, w in weights.items():
        module_name, ab = name.removeprefix("backbone.denoiser.").split(".lora_")
        key = f"base_model.model.{module_name}.lora_{ab[0]}.weight"
        torch.testing.assert_close(exported[key], w.to(exported[key].dtype), rtol=0, atol=0)
        differs += int(not torch.equal(exported[key], policy[key]))
    assert differs > 0
    with pytest.raises(ValueError, match="no policy EMA"):
        bare = tmp_path / "bare.ckpt"
        torch.save({"state_dict": saved["state_dict"], "callbacks": {}}, bare)
        export_lora(str(bare), tmp_path / "x", ema=True, lora_alpha=4)


def test_reward_eval_uses_the_ema_when_asked() -> None:
    prompts = ["a red cat", "small box"]
    module = make_module("marble")
    ema = PolicyEMACallback(decay=0.5)
    with_ema = RewardEvalCallback(prompts, every_n_steps=100, log_images=False, use_ema=True)
    without = RewardEvalCallback(prompts, every_n_steps=99, log_images=False)
    trainer = fit(module, max_steps=2, callbacks=[ema, with_ema, without])
    a, b = with_ema.history[-1], without.history[-1]
    assert a["adapter"] == b["adapter"] == "policy"
    assert a["eval/red"] != b["eval/red"]
    with ema.applied(module):  # the EMA evaluation equals evaluating the swapped-in weights
        direct = without.evaluate(trainer, module, adapter="policy")
    assert direct["eval/red"] == pytest.approx(a["eval/red"], rel=1e-6)
    with pytest.raises(ValueError, match="needs a PolicyEMACallback"):
        fit(
            make_module("marble"),
            max_steps=1,
            callbacks=[RewardEvalCallback(prompts, use_ema=True, log_images=False)],
        )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="decay"):
        PolicyEMACallback(decay=1.0)
    with pytest.raises(ValueError, match="every_n_steps"):
        PolicyEMACallback(every_n_steps=0)
