"""CompositionReward: GenEval-template parsing, strict and graded scoring on synthetic
detections."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from marble_lightning.rewards.composition import (
    CompositionReward,
    ObjectRequirement,
    PromptParser,
    graded_score,
    relative_position,
    singularize,
    strict_score,
)
from marble_lightning.rewards.detection import Detection

R = ObjectRequirement


def det(
    label: str,
    x: float,
    y: float = 0.5,
    color: str | None = None,
    score: float = 1.0,
    s: float = 0.1,
) -> Detection:
    """A box of side ``s`` centred at (x, y)."""
    return Detection(label, (x - s / 2, y - s / 2, x + s / 2, y + s / 2), score, color)


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # GenEval single_object / colors / counting / two_object / position / color_attr
        ("a photo of a dog", [R("dog")]),
        ("a photo of an orange", [R("orange")]),
        ("a photo of a traffic light", [R("traffic light")]),
        ("a photo of a red dog", [R("dog", color="red")]),
        ("a photo of a red orange", [R("orange", color="red")]),
        ("a photo of two cats", [R("cat", 2, True)]),
        ("a photo of four wine glasses", [R("wine glass", 4, True)]),
        ("a photo of three benches", [R("bench", 3, True)]),
        ("a photo of two people", [R("person", 2, True)]),
        ("a photo of a dog and a cat", [R("dog"), R("cat")]),
        ("a photo of a dog left of a cat", [R("cat"), R("dog", position=("left of", 0))]),
        ("a photo of a bus below a hot dog", [R("hot dog"), R("bus", position=("below", 0))]),
        ("a photo of a cup above a tv", [R("tv"), R("cup", position=("above", 0))]),
        ("a photo of a red dog and a blue cat", [R("dog", color="red"), R("cat", color="blue")]),
        # toy world phrasings
        ("two red circles", [R("circle", 2, True, "red")]),
        ("a red circle", [R("circle", color="red")]),
        ("3 green squares", [R("square", 3, True, "green")]),
        ("one blue square", [R("square", 1, True, "blue")]),
        (
            "a blue square left of a yellow circle",
            [R("circle", color="yellow"), R("square", color="blue", position=("left of", 0))],
        ),
        (
            "A Green Circle to the right of a red square.",
            [R("square", color="red"), R("circle", color="green", position=("right of", 0))],
        ),
    ],
)
def test_parse_templates(prompt: str, expected: list[ObjectRequirement]) -> None:
    assert PromptParser()(prompt) == expected


@pytest.mark.parametrize(
    "prompt",
    [
        'a sign that says "cat"',
        'the word "cat"',
        'a label reading "cat"',
        "",
        "cats",
        "a photo of",
        "a dog and a cat and a bird",
        "a very very very big dog",
        "zero dogs",
    ],
)
def test_no_spec(prompt: str) -> None:
    assert PromptParser()(prompt) is None


def test_count_mode_and_classes() -> None:
    assert PromptParser(count_mode="exact")("a red circle") == [R("circle", 1, True, "red")]
    toy = PromptParser(colors=("red", "green", "blue", "yellow"), classes=("circle", "square"))
    assert toy("two red circles") == [R("circle", 2, True, "red")]
    assert toy("a photo of a dog") is None
    with pytest.raises(ValueError, match="count_mode"):
        PromptParser(count_mode="most")


def test_singularize() -> None:
    cases = {"cats": "cat", "buses": "bus", "benches": "bench", "knives": "knife", "ties": "tie",
             "skis": "ski", "wine glasses": "wine glass", "boxes": "box", "cherries": "cherry",
             "sheep": "sheep", "people": "person", "giraffes": "giraffe"}  # fmt: skip
    for plural, single in cases.items():
        assert singularize(plural) == single


# ---------------------------------------------------------------- geometry
def test_relative_position() -> None:
    a, b = det("x", 0.2), det("y", 0.8)
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    up, down = det("x", 0.5, 0.1), det("y", 0.5, 0.9)
    assert relative_position(up, down) == {"above"}
    assert relative_position(det("x", 0.1, 0.1), det("y", 0.9, 0.9)) == {"left of", "above"}
    assert relative_position(det("x", 0.5), det("y", 0.52)) == set()  # within the size margin
    steep_a, steep_b = det("x", 0.3, 0.1), det("y", 0.5, 0.9)  # mostly vertical offset
    assert relative_position(steep_a, steep_b) == {"above"}
    assert relative_position(steep_a, steep_b, rule="axis") == {"left of", "above"}
    assert relative_position(det("x", 0.49, 0.1), det("y", 0.5, 0.9), rule="axis") == {"above"}
    with pytest.raises(ValueError, match="rule"):
        relative_position(steep_a, steep_b, rule="polar")


# ---------------------------------------------------------------- scoring: known values
def test_counting_scores() -> None:
    spec = PromptParser()("two red circles")
    two = [det("circle", 0.2, color="red"), det("circle", 0.7, color="red")]
    assert strict_score(spec, two) == 1.0 and graded_score(spec, two) == 1.0
    three = [*two, det("circle", 0.5, color="red")]
    assert strict_score(spec, three) == 0.0
    assert graded_score(spec, three) == pytest.approx((0.5 + 1.0) / 2)  # count 1 - 1/2, colour 2/2
    one = two[:1]
    assert graded_score(spec, one) == pytest.approx((0.5 + 0.5) / 2)
    assert graded_score(spec, []) == 0.0
    mixed = [det("circle", 0.2, color="blue"), det("circle", 0.7, color="red")]
    assert graded_score(spec, mixed) == pytest.approx((1.0 + 0.5) / 2)
    assert strict_score(spec, mixed) == 0.0
    four = [det("circle", x, color="red") for x in (0.1, 0.3, 0.5, 0.7)]
    assert graded_score(spec, four) == pytest.approx((0.0 + 1.0) / 2)  # count credit clipped at 0


def test_counting_threshold_filters_low_scores() -> None:
    spec = PromptParser()("a photo of two cats")
    dets = [det("cat", 0.2, score=0.95), det("cat", 0.7, score=0.95), det("cat", 0.5, score=0.5)]
    assert strict_score(spec, dets) == 1.0  # the 0.5 detection is below GenEval's 0.9
    assert strict_score(spec, dets, counting_threshold=0.3) == 0.0


def test_at_least_counts_and_top_by_score() -> None:
    spec = PromptParser()("a photo of a red dog")
    # GenEval checks only the top-1 dog by score; graded prefers the red one
    dets = [det("dog", 0.2, color="blue", score=0.9), det("dog", 0.7, color="red", score=0.5)]
    assert strict_score(spec, dets) == 0.0
    assert graded_score(spec, dets) == 1.0
    assert strict_score(spec, dets[::-1]) == 0.0  # order in the list does not matter, score does
    assert strict_score(spec, [dets[1]]) == 1.0
    assert graded_score(spec, [det("cat", 0.5, color="red")]) == 0.0


def test_position_scores() -> None:
    spec = PromptParser()("a blue square left of a yellow circle")
    good = [det("square", 0.2, color="blue"), det("circle", 0.8, color="yellow")]
    swapped = [det("square", 0.8, color="blue"), det("circle", 0.2, color="yellow")]
    assert strict_score(spec, good) == 1.0 and graded_score(spec, good) == 1.0
    assert strict_score(spec, swapped) == 0.0
    # circle: count 1, colour 1 -> 1; square: count 1, colour 1, position 0 -> 2/3
    assert graded_score(spec, swapped) == pytest.approx((1 + 2 / 3) / 2)
    wrong_colour_target = [det("square", 0.2, color="blue"), det("circle", 0.8, color="red")]
    assert strict_score(spec, wrong_colour_target) == 0.0  # target group unmatched
    assert graded_score(spec, wrong_colour_target) == pytest.approx((0.5 + 1.0) / 2)
    no_target = [det("square", 0.2, color="blue")]
    assert graded_score(spec, no_target) == pytest.approx((0.0 + 2 / 3) / 2)


def test_two_objects_and_colour_attribution() -> None:
    spec = PromptParser()("a photo of a red dog and a blue cat")
    assert graded_score(spec, [det("dog", 0.2, color="red"), det("cat", 0.8, color="blue")]) == 1.0
    swapped = [det("dog", 0.2, color="blue"), det("cat", 0.8, color="red")]
    assert graded_score(spec, swapped) == pytest.approx(0.5)
    assert strict_score(spec, swapped) == 0.0
    assert graded_score(spec, [det("dog", 0.2, color="red")]) == pytest.approx(0.5)


# ---------------------------------------------------------------- scoring: properties
LABELS = ("circle", "square")
COLORS = ("red", "blue")


@st.composite
def scenes(draw):
    kind = draw(st.sampled_from(["count", "relation", "pair"]))
    if kind == "count":
        n = draw(st.integers(1, 3))
        exact = draw(st.booleans()) or n > 1
        specs = [R(draw(st.sampled_from(LABELS)), n, exact, draw(st.sampled_from((None, *COLORS))))]
    elif kind == "pair":
        specs = [R(lab, 1, draw(st.booleans()), draw(st.sampled_from(COLORS))) for lab in LABELS]
    else:
        rel = draw(st.sampled_from(["left of", "right of", "above", "below"]))
        specs = [R("circle", 1, False, draw(st.sampled_from(COLORS))),
                 R("square", 1, False, draw(st.sampled_from(COLORS)), (rel, 0))]  # fmt: skip
    dets = draw(
        st.lists(
            st.builds(
                det,
                st.sampled_from(LABELS),
                st.floats(0.05, 0.95),
                st.floats(0.05, 0.95),
                st.sampled_from(COLORS),
                st.sampled_from([0.2, 0.5, 0.95, 0.97, 1.0]),
            ),
            max_size=5,
        )
    )
    return specs, dets


@settings(max_examples=300, deadline=None)
@given(scenes())
def test_graded_bounds_and_strict_implies_full_credit(scene) -> None:
    specs, dets = scene
    g, s = graded_score(specs, dets), strict_score(specs, dets)
    assert 0.0 <= g <= 1.0 and math.isfinite(g)
    assert s in (0.0, 1.0)
    if s == 1.0:
        assert g == pytest.approx(1.0)
    if g == 1.0 and all(r.exact for r in specs):
        assert s == 1.0


@settings(max_examples=100, deadline=None)
@given(scenes())
def test_invariant_to_detection_order_and_unrelated_labels(scene) -> None:
    specs, dets = scene
    assume(len({d.score for d in dets}) == len(dets))  # ties are broken by detector order
    noisy = [
        *reversed(dets),
        det("dog", 0.5, color="red"),
        det("circle", 0.3, color="red", score=0.1),
    ]
    assert graded_score(specs, noisy) == pytest.approx(graded_score(specs, dets))
    assert strict_score(specs, noisy) == strict_score(specs, dets)


# ---------------------------------------------------------------- the reward module
class FakeDetector:
    """Returns fixed detections per image; records queries."""

    def __init__(self, per_image: list[list[Detection]]) -> None:
        self.per_image = per_image
        self.queries: list = []

    def detect(self, images, queries):
        self.queries.append([list(q) for q in queries])
        return [self.per_image[i] for i in range(images.shape[0])]


def test_reward_masks_and_scores() -> None:
    prompts = ["two red circles", 'a sign that says "cat"', "a blue square left of a yellow circle"]
    per_image = [
        [det("circle", 0.2, color="red"), det("circle", 0.7, color="red")],
        [det("square", 0.8, color="blue"), det("circle", 0.2, color="yellow")],
    ]
    fake = FakeDetector(per_image)
    reward = CompositionReward(fake)
    values = reward(torch.rand(3, 3, 16, 16), prompts)
    assert reward.applies_to(prompts).tolist() == [True, False, True]
    assert values.tolist() == pytest.approx([1.0, 0.0, (1 + 2 / 3) / 2])
    assert fake.queries == [[["circle"], ["circle", "square"]]]  # masked prompt never queried
    strict = CompositionReward(FakeDetector(per_image), mode="strict")
    assert strict(torch.rand(3, 3, 16, 16), prompts).tolist() == [1.0, 0.0, 0.0]


def test_toy_world_renders_score_one() -> None:
    """End to end with the toy world's exact detector on ground-truth renders of every prompt."""
    import numpy as np

    toy_prompts = pytest.importorskip("marble_lightning.toy.prompts")
    from marble_lightning.toy.detector import ToyDetector
    from marble_lightning.toy.world import SHAPES, render_scene, to_tensor_images

    prompts = toy_prompts.train_prompts() + toy_prompts.heldout_prompts()
    rng = np.random.default_rng(0)
    images = to_tensor_images(
        [render_scene(toy_prompts.parse_prompt(p), rng).image for p in prompts]
    )
    reward = CompositionReward(
        ToyDetector(),
        count_mode="exact",
        position_rule="axis",
        colors=toy_prompts.COLORS,
        classes=SHAPES,
    )
    mask = reward.applies_to(prompts)
    families = [toy_prompts.prompt_family(p) for p in prompts]
    assert mask.tolist() == [f != "text" for f in families]
    values = reward(images, prompts)
    assert torch.all(values[mask] == 1.0)
    # swapping the sides in relation prompts must lower the score
    swapped = [
        p.replace("left of", "RIGHT").replace("right of", "left of").replace("RIGHT", "right of")
        for p in prompts
    ]
    rel = torch.tensor([f == "relation" for f in families])
    assert torch.all(reward(images, swapped)[rel] < 1.0)


def test_reward_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        CompositionReward(FakeDetector([]), mode="soft")
    with pytest.raises(TypeError, match="detect"):
        CompositionReward(object())
    with pytest.raises(ValueError, match="position_rule"):
        CompositionReward(FakeDetector([]), position_rule="polar")
    with pytest.raises(ValueError, match="score_threshold"):
        CompositionReward(FakeDetector([]), score_threshold=2.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CompositionReward(FakeDetector([[]]))(torch.rand(1, 3, 8, 8) * 255, ["a dog"])
