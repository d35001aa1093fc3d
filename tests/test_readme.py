"""The README's Python examples run as written.

Every ```python block of README.md is executed in a fresh namespace, in a temporary working
directory. Rewards that a block defines (subclasses of ``RewardModel``) are also called on a random
image batch and checked against the reward contract.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from marble_lightning.rewards.base import RewardModel

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(
    r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL
)


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2, (
        "README.md should hold the Python example and the custom-reward example"
    )
    assert any("(RewardModel)" in block for block in BLOCKS), (
        "no custom-reward example in README.md"
    )


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_readme_python_block_runs(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"readme_block_{index}"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machines are small and shared
    try:
        exec(compile(BLOCKS[index], f"README.md:block{index}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)

    prompts = ["two red circles", 'a sign that says "cat"', "a red square", "three blue squares"]
    images = torch.rand(len(prompts), 3, 32, 32)
    checked = 0
    for value in list(namespace.values()):
        if (
            isinstance(value, type)
            and issubclass(value, RewardModel)
            and value.__module__ == namespace["__name__"]
        ):
            reward = value()
            scores = reward(images, prompts)
            assert scores.shape == (len(prompts),) and scores.dtype == torch.float32
            assert torch.isfinite(scores).all()
            mask = reward.applies_to(prompts)
            assert mask.dtype == torch.bool and mask.shape == (len(prompts),)
            assert (scores[~mask] == 0).all()
            checked += 1
    if "(RewardModel)" in BLOCKS[index]:
        assert checked >= 1, "the block defines a reward that the test did not find"
