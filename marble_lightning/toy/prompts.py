"""Prompts of the toy world: templates, the parser, and the train / held-out splits.

Phrasings (the whole grammar; ``parse_prompt`` inverts it exactly):

* ``count`` template: ``"a red circle"`` (one object), ``"two blue squares"``,
  ``"three green circles"``.
* ``relation`` template: ``"a green circle left of a yellow square"``,
  ``"a red square right of a blue circle"`` (the two colours always differ).
* ``text`` template, three phrasings of one request: ``'a sign that says "cat"'``,
  ``'the word "cat"'``, ``'a label reading "cat"'``.

Colours: red, green, blue, yellow. Shapes: circle, square. Words: :data:`~.world.WORDS`.

Splits. The held-out prompts are whole combinations never seen in training, while every single
attribute (colour, shape, count, relation, word) still occurs in training:

* ``count``: held out when ``(colour_index + shape_index + count) % 4 == 0`` (6 of 24);
* ``relation``: held out when ``(c1 + 2 * c2 + s1 + s2 + relation_index) % 4 == 0`` (24 of 96);
* ``text``: held out when ``(word_index + phrasing_index) % 3 == 0`` (24 of 72): every word is
  trained in two phrasings and held out in the third.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from marble_lightning.checks import check_choice
from marble_lightning.toy.world import (
    COUNTS,
    PALETTE,
    RELATIONS,
    SHAPES,
    WORDS,
    ObjectSpec,
    SceneSpec,
)

TEMPLATES: tuple[str, ...] = ("count", "relation", "text")
"""Template (prompt family) names."""

COLORS: tuple[str, ...] = tuple(PALETTE)
NUMBER_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
TEXT_PHRASINGS: tuple[str, ...] = ('a sign that says "{}"', 'the word "{}"', 'a label reading "{}"')

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_COUNT_RE = re.compile(rf"^(a|two|three) ({_COLOR}) ({_SHAPE})(s?)$")
_REL_RE = re.compile(rf"^a ({_COLOR}) ({_SHAPE}) (left of|right of) a ({_COLOR}) ({_SHAPE})$")
_TEXT_RES = tuple(
    re.compile("^" + re.escape(p).replace(re.escape("{}"), "([a-z]+)") + "$")
    for p in TEXT_PHRASINGS
)


def check_templates(templates: Iterable[str] | None) -> tuple[str, ...]:
    """Return ``templates`` (default: all) as a tuple; ``ValueError`` naming any unknown name."""
    if templates is None:
        return TEMPLATES
    if isinstance(templates, str):
        templates = [templates]
    out = tuple(templates)
    for name in out:
        check_choice("templates", name, TEMPLATES)
    if not out:
        raise ValueError("no toy prompt templates selected (empty list)")
    return out


def make_prompt(spec: SceneSpec, phrasing: int = 0) -> str:
    """The prompt text of ``spec``; ``phrasing`` selects one of :data:`TEXT_PHRASINGS` for text."""
    if spec.family == "count":
        (o,) = spec.objects
        plural = "s" if o.count > 1 else ""
        return f"{NUMBER_WORDS[o.count]} {o.color} {o.shape}{plural}"
    if spec.family == "relation":
        a, b = spec.objects
        return f"a {a.color} {a.shape} {spec.relation} a {b.color} {b.shape}"
    if not 0 <= phrasing < len(TEXT_PHRASINGS):
        raise ValueError(
            f"text phrasing index must be in [0, {len(TEXT_PHRASINGS)}), got {phrasing}"
        )
    return TEXT_PHRASINGS[phrasing].format(spec.text)


def parse_prompt(prompt: str) -> SceneSpec | None:
    """Recover the :class:`SceneSpec` of a toy prompt, or ``None`` if it is not one.

    Matching is exact up to surrounding whitespace and letter case (``"Two Red Circles"`` parses;
    ``"two red circle"`` and ``"a red circles"`` do not).
    """
    p = " ".join(prompt.strip().lower().split())
    m = _COUNT_RE.match(p)
    if m:
        number, color, shape, plural = m.groups()
        count = {"a": 1, "two": 2, "three": 3}[number]
        if (count > 1) != (plural == "s"):
            return None
        return SceneSpec("count", (ObjectSpec(shape, color, count),))
    m = _REL_RE.match(p)
    if m:
        c1, s1, rel, c2, s2 = m.groups()
        if c1 == c2:
            return None
        return SceneSpec("relation", (ObjectSpec(s1, c1), ObjectSpec(s2, c2)), relation=rel)
    for rx in _TEXT_RES:
        m = rx.match(p)
        if m and m.group(1) in WORDS:
            return SceneSpec("text", text=m.group(1))
    return None


def _all_prompts(template: str) -> list[tuple[str, bool]]:
    """Every prompt of one template with its held-out flag, in a fixed order."""
    out: list[tuple[str, bool]] = []
    if template == "count":
        for ci, c in enumerate(COLORS):
            for si, s in enumerate(SHAPES):
                for n in COUNTS:
                    spec = SceneSpec("count", (ObjectSpec(s, c, n),))
                    out.append((make_prompt(spec), (ci + si + n) % 4 == 0))
    elif template == "relation":
        for c1i, c1 in enumerate(COLORS):
            for c2i, c2 in enumerate(COLORS):
                if c1 == c2:
                    continue
                for s1i, s1 in enumerate(SHAPES):
                    for s2i, s2 in enumerate(SHAPES):
                        for ri, rel in enumerate(RELATIONS):
                            spec = SceneSpec(
                                "relation", (ObjectSpec(s1, c1), ObjectSpec(s2, c2)), rel
                            )
                            held = (c1i + 2 * c2i + s1i + s2i + ri) % 4 == 0
                            out.append((make_prompt(spec), held))
    elif template == "text":
        for wi, w in enumerate(WORDS):
            for pi in range(len(TEXT_PHRASINGS)):
                out.append((make_prompt(SceneSpec("text", text=w), pi), (wi + pi) % 3 == 0))
    else:
        raise ValueError(f"unknown toy prompt template {template!r}; expected one of {TEMPLATES}")
    return out


def train_prompts(templates: Sequence[str] | str | None = None) -> list[str]:
    """Training prompts of the given templates (default: all), in a fixed order."""
    return [p for t in check_templates(templates) for p, held in _all_prompts(t) if not held]


def heldout_prompts(templates: Sequence[str] | str | None = None) -> list[str]:
    """Held-out prompts (never in :func:`train_prompts`) of the given templates, in a fixed
    order."""
    return [p for t in check_templates(templates) for p, held in _all_prompts(t) if held]


def prompt_family(prompt: str) -> str | None:
    """The template name of a toy prompt (``"count"``, ``"relation"``, ``"text"``) or ``None``."""
    spec = parse_prompt(prompt)
    return None if spec is None else spec.family
