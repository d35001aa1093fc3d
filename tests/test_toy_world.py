"""The toy world: renderer vs exact detector, prompt grammar and splits, OCR on ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marble_lightning.rewards.detection import Detector
from marble_lightning.toy.detector import ToyDetector, connected_components
from marble_lightning.toy.prompts import (
    TEMPLATES,
    TEXT_PHRASINGS,
    heldout_prompts,
    make_prompt,
    parse_prompt,
    prompt_family,
    train_prompts,
)
from marble_lightning.toy.world import (
    COUNTS,
    PALETTE,
    SHAPES,
    WORDS,
    ObjectSpec,
    SceneSpec,
    render_scene,
    to_tensor_images,
)


def _random_spec(rng: np.random.Generator) -> SceneSpec:
    fam = TEMPLATES[int(rng.integers(3))]
    colors = list(PALETTE)
    if fam == "count":
        return SceneSpec(
            "count",
            (
                ObjectSpec(
                    SHAPES[rng.integers(2)], colors[rng.integers(4)], int(rng.choice(COUNTS))
                ),
            ),
        )
    if fam == "relation":
        c1, c2 = rng.choice(4, size=2, replace=False)
        return SceneSpec(
            "relation",
            (
                ObjectSpec(SHAPES[rng.integers(2)], colors[c1]),
                ObjectSpec(SHAPES[rng.integers(2)], colors[c2]),
            ),
            relation=["left of", "right of"][rng.integers(2)],
        )
    return SceneSpec("text", text=WORDS[rng.integers(len(WORDS))])


def test_detector_reads_every_rendered_scene_exactly():
    rng = np.random.default_rng(123)
    det = ToyDetector()
    assert isinstance(det, Detector)
    specs = [_random_spec(rng) for _ in range(400)]
    scenes = [render_scene(s, rng) for s in specs]
    images = to_tensor_images([s.image for s in scenes])
    found = det.detect(images, [["circle", "square"]] * len(specs))
    for spec, scene, dets in zip(specs, scenes, found):
        want = sorted((o.shape, o.color, tuple(v / 32 for v in o.box)) for o in scene.objects)
        got = sorted((d.label, d.color, d.box) for d in dets)
        assert got == want, (spec, got, want)
        # the spec itself (independent of the layout record): counts, colours, sides
        if spec.family == "count":
            (o,) = spec.objects
            assert len(dets) == o.count and all(
                d.label == o.shape and d.color == o.color for d in dets
            )
        elif spec.family == "relation":
            a, b = spec.objects
            (da,) = [d for d in dets if d.color == a.color]
            (db,) = [d for d in dets if d.color == b.color]
            assert (da.label, db.label) == (a.shape, b.shape)
            assert (da.center[0] < db.center[0]) == (spec.relation == "left of")
            assert abs(da.center[1] - db.center[1]) <= abs(
                da.center[0] - db.center[0]
            )  # within 45 deg
        else:
            assert dets == []


def test_detector_query_filter_and_bad_input():
    rng = np.random.default_rng(0)
    scene = render_scene(
        SceneSpec(
            "relation", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "left of"
        ),
        rng,
    )
    img = to_tensor_images([scene.image])
    det = ToyDetector()
    assert [d.label for d in det.detect(img, [["square"]])[0]] == ["square"]
    assert det.detect(img, [["dog"]]) == [[]]
    with pytest.raises(ValueError, match="query lists"):
        det.detect(img, [["circle"], ["square"]])
    with pytest.raises(TypeError, match="string"):
        det.detect(img, ["circle"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        det.detect(img * 255, [["circle"]])


def test_connected_components_against_brute_force_flood():
    rng = np.random.default_rng(5)
    for _ in range(30):
        mask = rng.random((12, 12)) < 0.45
        comps = connected_components(mask)
        # every foreground pixel in exactly one component
        labels = -np.ones(mask.shape, dtype=int)
        for i, c in enumerate(comps):
            assert (labels[c[:, 0], c[:, 1]] == -1).all()
            labels[c[:, 0], c[:, 1]] = i
        assert ((labels >= 0) == mask).all()
        # 4-neighbours in the mask share a label; components are connected (checked by the
        # count: the number of components equals n_pixels - n_spanning-forest-edges, via union-find)
        parent = list(range(mask.size))

        def find(a: int, parent: list[int] = parent) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for y, x in zip(*np.nonzero(mask)):
            for ny, nx in ((y + 1, x), (y, x + 1)):
                if ny < 12 and nx < 12 and mask[ny, nx]:
                    assert labels[y, x] == labels[ny, nx]
                    parent[find(y * 12 + x)] = find(ny * 12 + nx)
        roots = {find(y * 12 + x) for y, x in zip(*np.nonzero(mask))}
        assert len(roots) == len(comps)


def test_prompts_round_trip_and_splits():
    train, held = train_prompts(), heldout_prompts()
    assert len(train) == 138 and len(held) == 54
    assert not set(train) & set(held)
    assert len(set(train)) == len(train) and len(set(held)) == len(held)
    for p in train + held:
        spec = parse_prompt(p)
        assert spec is not None, p
        phr = (
            next(i for i, f in enumerate(TEXT_PHRASINGS) if f.split("{")[0] in p)
            if spec.family == "text"
            else 0
        )
        assert make_prompt(spec, phr) == p
    # every attribute still occurs in training
    words = " ".join(train)
    for token in [
        *PALETTE,
        *SHAPES,
        "two",
        "three",
        "left of",
        "right of",
        *(f'"{w}"' for w in WORDS),
    ]:
        assert token in words, token
    for t in TEMPLATES:
        assert set(train_prompts(t)) | set(heldout_prompts(t)) == {
            p for p in train + held if prompt_family(p) == t
        }


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("Two  Red Circles ", SceneSpec("count", (ObjectSpec("circle", "red", 2),))),
        ("a yellow square", SceneSpec("count", (ObjectSpec("square", "yellow", 1),))),
        (
            "a green circle right of a blue square",
            SceneSpec(
                "relation",
                (ObjectSpec("circle", "green"), ObjectSpec("square", "blue")),
                "right of",
            ),
        ),
        ('a label reading "owl"', SceneSpec("text", text="owl")),
        ("two red circle", None),
        ("a red circles", None),
        ("a red circle left of a red square", None),
        ('the word "zebra"', None),
        ("a photo of a dog", None),
        ("", None),
    ],
)
def test_parse_prompt(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_bad_input_errors():
    with pytest.raises(ValueError, match="'triangles'"):
        train_prompts(["count", "triangles"])
    with pytest.raises(ValueError, match="'nope'"):
        heldout_prompts("nope")
    with pytest.raises(ValueError, match="'purple'"):
        ObjectSpec("circle", "purple")
    with pytest.raises(ValueError, match="count"):
        ObjectSpec("circle", "red", 4)
    with pytest.raises(ValueError, match="different colours"):
        SceneSpec("relation", (ObjectSpec("circle", "red"), ObjectSpec("square", "red")), "left of")
    with pytest.raises(ValueError, match="family"):
        SceneSpec("scribble")


def test_rendering_is_deterministic_given_rng():
    spec = SceneSpec("count", (ObjectSpec("square", "green", 3),))
    a = render_scene(spec, np.random.default_rng(7)).image
    b = render_scene(spec, np.random.default_rng(7)).image
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)


def test_ocr_reads_ground_truth_words():
    torch.set_num_threads(1)
    from marble_lightning.toy.pretrain import ocr_read

    rng = np.random.default_rng(3)
    words = [WORDS[i % len(WORDS)] for i in range(48)]
    images = to_tensor_images([render_scene(SceneSpec("text", text=w), rng).image for w in words])
    read = ocr_read(images)
    acc = np.mean([r == w for r, w in zip(read, words)])
    assert acc >= 0.95, list(zip(read, words))


def test_asset_path_names_missing_files():
    from marble_lightning.toy import asset_path

    with pytest.raises(FileNotFoundError, match="no_such_asset.bin"):
        asset_path("no_such_asset.bin")
