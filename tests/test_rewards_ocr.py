"""OCRReward: RapidOCR reads PIL-rendered words; score formula; masking; bad input."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFont

from marble_lightning.rewards.ocr import (
    OCRReward,
    ctc_casefold_probability,
    edit_distance,
    normalize_text,
    ocr_similarity,
    quoted_text,
)


def render(word: str, size: int = 64, font_size: int = 22) -> torch.Tensor:
    """Black word on white, centred -> float [3, size, size] in [0, 1]."""
    im = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(im)
    draw.text(
        (size // 2, size // 2),
        word,
        fill="black",
        font=ImageFont.load_default(size=font_size),
        anchor="mm",
    )
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def reward() -> OCRReward:
    torch.set_num_threads(1)
    return OCRReward(num_threads=1)


def test_quoted_text() -> None:
    assert quoted_text('a sign that says "cat"') == "cat"
    assert quoted_text("a sign that says \u201cHello World\u201d") == "Hello World"
    assert quoted_text('"ab" and "cd"') == "ab cd"
    assert quoted_text("two red circles") is None
    assert quoted_text('a sign that says ""') is None
    assert quoted_text('a sign that says "  "') is None


def brute_levenshtein(a: str, b: str) -> int:
    """Independent recursive definition (memoised)."""

    @functools.cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


@settings(max_examples=200, deadline=None)
@given(st.text("abc ", max_size=7), st.text("abc", max_size=7))
def test_edit_distance_matches_recursive_definition(a: str, b: str) -> None:
    assert edit_distance(a, b) == brute_levenshtein(a, b) == edit_distance(b, a)


def test_similarity_formula() -> None:
    assert ocr_similarity("CAT", "cat") == 1.0
    assert ocr_similarity("the cat sat", "c a t") == 1.0  # substring after removing spaces
    assert ocr_similarity("cot", "cat") == pytest.approx(1 - 1 / 3)
    assert ocr_similarity("", "cat") == 0.0
    assert ocr_similarity("xxxxxxxxxx", "cat") == 0.0  # distance clipped at len(target)
    assert ocr_similarity("hel lo", "Hello") == 1.0
    with pytest.raises(ValueError, match="empty"):
        ocr_similarity("abc", "  ")
    assert normalize_text(" He llo\t") == "hello"


def test_reads_rendered_words(reward: OCRReward) -> None:
    words = ["cat", "dog", "sun", "red"]
    images = torch.stack([render(w) for w in words])
    prompts = [f'a sign that says "{w}"' for w in words]
    values = reward(images, prompts)
    assert values.dtype == torch.float32 and values.shape == (4,)
    assert torch.all(values == 1.0), (values, reward.read(images))


def test_misspelling_blank_and_masking(reward: OCRReward) -> None:
    images = torch.stack([render("cat"), render("cot"), torch.ones(3, 64, 64), render("cat")])
    prompts = ['"cat"', 'a sign that says "cat"', 'a sign that says "cat"', "a photo of a cat"]
    values = reward(images, prompts)
    assert values[0] == 1.0
    assert 0.0 <= values[1] < 1.0
    assert values[2] == 0.0
    assert values[3] == 0.0 and torch.isfinite(values).all()
    assert reward.applies_to(prompts).tolist() == [True, True, True, False]


def test_all_masked_batch_never_reads(reward: OCRReward) -> None:
    values = reward(torch.rand(2, 3, 32, 32), ["two red circles", "a dog"])
    assert values.tolist() == [0.0, 0.0]


def test_small_renders_with_upscale() -> None:
    r = OCRReward(upscale=2.0, num_threads=1)
    images = torch.stack([render("cat", 32, 11), render("sun", 32, 11)])
    values = r(images, ['"cat"', '"sun"'])
    assert values.min() >= 2 / 3, r.read(images)


def test_bad_input(reward: OCRReward) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(torch.stack([render("cat")]) * 255, ['"cat"'])
    with pytest.raises(ValueError, match="shape"):
        reward(torch.rand(3, 64, 64), ['"cat"'])
    with pytest.raises(ValueError, match="prompts"):
        reward(torch.rand(2, 3, 64, 64), ['"cat"'])
    with pytest.raises(ValueError, match="upscale"):
        OCRReward(upscale=0)


def test_time_per_image(reward: OCRReward) -> None:
    images = torch.stack([render(w) for w in ["cat", "dog", "sun", "red"] * 4])
    prompts = ['"cat"', '"dog"', '"sun"', '"red"'] * 4
    reward(images[:1], prompts[:1])  # warm-up
    t0 = time.perf_counter()
    reward(images, prompts)
    ms = (time.perf_counter() - t0) / len(prompts) * 1000
    print(f"OCRReward: {ms:.1f} ms/image at 64x64")
    assert ms < 500


def test_detection_mode_reads_a_wide_sign() -> None:
    im = Image.new("RGB", (256, 128), "white")
    ImageDraw.Draw(im).text(
        (128, 64), "hello world", fill="black", font=ImageFont.load_default(size=28), anchor="mm"
    )
    sign = torch.from_numpy(np.array(im)).permute(2, 0, 1).float()[None] / 255
    r = OCRReward(use_det=True, use_cls=True)
    assert r(sign, ['a sign that says "Hello World"']).item() == 1.0
    assert r(torch.ones(1, 3, 64, 64), ['"cat"']).item() == 0.0  # nothing detected -> empty text


def brute_ctc_probability(probs: np.ndarray, chars: list[str], target: str) -> float:
    """Sum over every frame labelling whose CTC collapse reads ``target`` (case folded)."""
    import itertools

    total = 0.0
    frames, classes = probs.shape
    for path in itertools.product(range(classes), repeat=frames):
        collapsed = [c for i, c in enumerate(path) if c != 0 and (i == 0 or path[i - 1] != c)]
        if "".join(chars[c] for c in collapsed).lower() == target:
            total += float(np.prod(probs[np.arange(frames), path]))
    return total


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(2, 5),
    st.sampled_from(["a", "ab", "ba", "aa", "abb", "ca"]),
)
def test_target_likelihood_matches_brute_force_alignment_sum(
    seed: int, frames: int, target: str
) -> None:
    from types import SimpleNamespace

    chars = ["blank", "a", "A", "b", "c", " "]  # RapidOCR's layout: blank first, space last
    r = OCRReward(num_threads=1, likelihood_weight=1.0)
    r._engine = SimpleNamespace(
        text_rec=SimpleNamespace(postprocess_op=SimpleNamespace(character=chars))
    )
    probs = np.random.default_rng(seed).dirichlet(np.ones(len(chars)), size=frames)
    expected = brute_ctc_probability(probs, chars, target)
    got = r.target_likelihood(probs, target)
    classes = [r._folded_classes(c) for c in target]
    forward = ctc_casefold_probability(probs, classes, max_spellings=0)  # the forward-pass path
    if expected == 0.0:  # too few frames for this target
        assert got == 0.0 and forward == 0.0
    else:
        assert got == pytest.approx(expected ** (1 / len(target)), rel=1e-9)
        assert forward == pytest.approx(expected, rel=1e-9)


def test_likelihood_term_on_renders(reward: OCRReward) -> None:
    dense = OCRReward(num_threads=1, likelihood_weight=1.0)
    mixed = OCRReward(num_threads=1, likelihood_weight=0.5)
    images = torch.stack([render("cat"), render("cot"), torch.ones(3, 64, 64), render("sun")])
    prompts = ['"cat"', '"cat"', '"cat"', "no quotes"]
    q = dense(images, prompts)
    assert q[0] > 0.5 and q[2] < 0.1 and q[3] == 0.0
    assert q[2] < q[1] < q[0]  # a misspelling is more likely than a blank, less than the word
    edit = reward(images, prompts)
    assert torch.allclose(mixed(images, prompts), 0.5 * edit + 0.5 * q, atol=1e-6)
    # one pass of the recogniser gives the same text as RapidOCR's own recognition-only call
    arrays = reward._arrays(images)
    own = [reward.engine(a, use_det=False, use_cls=False, use_rec=True)[0][0][0] for a in arrays]
    assert reward.read(images) == own
    with pytest.raises(ValueError, match="likelihood_weight"):
        OCRReward(likelihood_weight=1.5)
    with pytest.raises(ValueError, match="use_det"):
        OCRReward(likelihood_weight=0.5, use_det=True)


def test_two_rewards_on_the_same_images_read_them_once(monkeypatch) -> None:
    edit = OCRReward(num_threads=1)
    mixed = OCRReward(num_threads=1, likelihood_weight=0.5)
    images = torch.stack([render("cat"), render("sun"), torch.ones(3, 64, 64)])
    prompts = ['"cat"', '"sun"', '"dog"']
    expected_edit, expected_mixed = edit(images, prompts), mixed(images, prompts)
    calls = []
    for reward in (edit, mixed):
        session = reward.engine.text_rec.session
        monkeypatch.setattr(
            reward.engine.text_rec,
            "session",
            lambda batch, session=session: calls.append(batch.shape) or session(batch),
        )
    other = torch.stack([render("dog"), render("cat", font_size=18), torch.zeros(3, 64, 64)])
    assert torch.equal(mixed(other, prompts), mixed(other, prompts))
    assert len(calls) == 3  # the repeat was served from the latest batch's readings
    calls.clear()
    assert torch.equal(mixed(images, prompts), expected_mixed)
    assert torch.equal(edit(images, prompts), expected_edit)  # same images: no new reading
    assert len(calls) == 3
    calls.clear()
    half = OCRReward(num_threads=1, upscale=2.0)
    half(images, prompts)
    assert half.engine.text_rec.session is not None and len(calls) == 0  # own (unpatched) engine
    assert mixed(images, prompts).equal(expected_mixed) and len(calls) == 3  # upscale: new key


def _intra_op_threads(reward: OCRReward) -> int:
    return reward.engine.text_rec.session.session.get_session_options().intra_op_num_threads


def test_num_threads_torch_follows_torch() -> None:
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert _intra_op_threads(OCRReward(num_threads="torch")) == threads
        torch.set_num_threads(2)
        assert _intra_op_threads(OCRReward()) == 1
        assert _intra_op_threads(OCRReward(num_threads=2)) == 2
    finally:
        torch.set_num_threads(before)
    for bad in (0, "all", 1.5, True):
        with pytest.raises(ValueError, match="num_threads"):
            OCRReward(num_threads=bad)
