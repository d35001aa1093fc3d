"""The pretraining script: data, scoring, a tiny resumable run, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from marble_lightning.toy import pretrain
from marble_lightning.toy.backbone import ToyBackbone
from marble_lightning.toy.detector import ToyDetector
from marble_lightning.toy.prompts import heldout_prompts, parse_prompt, train_prompts
from marble_lightning.toy.world import render_scene, to_tensor_images

TINY = '{"block_out_channels": [8, 16, 32], "text_width": 32, "text_heads": 2, "text_layers": 1}'


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_training_data_is_train_split_and_deterministic():
    a = pretrain.sample_prompts(400, np.random.default_rng([0, 5]), p_uncond=0.1)
    b = pretrain.sample_prompts(400, np.random.default_rng([0, 5]), p_uncond=0.1)
    assert a == b
    assert not set(a) & set(heldout_prompts())
    assert set(a) - {""} <= set(train_prompts())
    assert 0.05 < a.count("") / len(a) < 0.16
    x = pretrain.render_batch(a[:8], np.random.default_rng(1))
    assert x.shape == (8, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        pretrain.render_batch(["a photo of a dog"], np.random.default_rng(0))


def test_score_scene_on_ground_truth_is_perfect_and_on_wrong_images_is_not():
    rng = np.random.default_rng(2)
    prompts = [p for p in heldout_prompts() if parse_prompt(p).family != "text"]
    imgs = to_tensor_images([render_scene(parse_prompt(p), rng).image for p in prompts])
    dets = ToyDetector().detect(imgs, [["circle", "square"]] * len(prompts))
    for p, d in zip(prompts, dets):
        assert all(v == 1.0 for v in pretrain.score_scene(parse_prompt(p), d, None).values()), p
    # the mirror image swaps left and right: every relation fails
    rel = [i for i, p in enumerate(prompts) if parse_prompt(p).family == "relation"]
    mirrored = ToyDetector().detect(imgs[rel].flip(-1), [["circle", "square"]] * len(rel))
    assert all(
        pretrain.score_scene(parse_prompt(prompts[i]), d, None)["relation"] == 0.0
        for i, d in zip(rel, mirrored)
    )
    # a blank image finds nothing: graded count 0
    spec = parse_prompt("three blue squares")
    assert pretrain.score_scene(spec, [], None)["count_graded"] == 0.0
    t = pretrain.score_scene(parse_prompt('the word "cat"'), [], "cot")
    assert t == {"ocr_exact": 0.0, "ocr_graded": pytest.approx(2 / 3)}


def test_tiny_run_resumes_and_exports(tmp_path, capsys):
    out, dest = tmp_path / "run", tmp_path / "assets"
    common = [
        "--out",
        str(out),
        "--batch",
        "4",
        "--model-config",
        TINY,
        "--eval-samples",
        "0",
        "--threads",
        "1",
        "--log-every",
        "1",
    ]
    pretrain.main([*common, "--max-steps", "2"])
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["step"] == 2
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain.main([*common, "--max-steps", "3"])
    pretrain.main([*common, "--max-steps", "3", "--resume"])
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["step"] == 3
    snap = (out / "final.txt").read_text().strip()
    assert json.loads((out / "snapshots" / snap / "eval.json").read_text())["step"] == 3
    pretrain.main(["--out", str(out), "--export", str(dest)])
    m = ToyBackbone(dest)
    assert m.config.block_out_channels == (8, 16, 32)
    with pytest.raises(FileNotFoundError, match="missing"):
        pretrain.main(["--out", str(out), "--export", str(dest), "--snapshot", "missing"])
    with pytest.raises(FileNotFoundError, match="state"):
        pretrain.main(["--out", str(tmp_path / "empty"), "--resume", "--max-steps", "1"])


def test_evaluate_runs_on_a_tiny_model():
    m = ToyBackbone.from_config(json.loads(TINY), seed=0).eval()
    res = pretrain.evaluate(
        m,
        samples_per_prompt=1,
        cfgs=(1.0,),
        steps=2,
        prompts=["two red circles", "a red circle left of a blue square"],
    )
    assert set(res) == {"cfg1.0"}
    assert {"count_exact", "count_graded", "relation", "relation_exact"} <= set(res["cfg1.0"])
