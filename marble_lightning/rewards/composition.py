"""GenEval-style compositional reward: parse object specs from the prompt, check detections.

Prompt grammar (case-insensitive, an optional trailing period; GenEval's templates and the toy
world's phrasings are both instances)::

    prompt   := [("a" | "an") ("photo" | "picture" | "image") "of"] clause [sep clause]
    sep      := "and" | "left of" | "right of" | "above" | "below"
                | ("to" | "on") "the" ("left" | "right") "of"
    clause   := quantity [colour] noun
    quantity := "a" | "an" | "one" .. "ten" | digits
    noun     := 1-3 lowercase words (plural after numbers > 1: singularised for the detector)

Examples: ``"a photo of a red dog"``, ``"a photo of two cats"``, ``"a photo of a dog left of a
cat"``, ``"a photo of a red dog and a blue cat"``, ``"two red circles"``, ``"a blue square left of
a yellow circle"``. Prompts with a double quote (text prompts such as ``'a sign that says "cat"'``)
or that do not match have no spec: :meth:`CompositionReward.applies_to` is False for them.

Specs follow GenEval's metadata. ``"A rel B"`` becomes ``[B, A(position=(rel, 0))]`` (the target
first); ``"A and B"`` becomes ``[A, B]``. An article (``a``/``an``) asks for *at least* one object;
an explicit number asks for *exactly* that many (GenEval's counting prompts: include ``n``, exclude
``n + 1``), or every count is exact with ``count_mode="exact"``.

Candidates for a requirement on class ``c``: detections labelled ``c`` with score >= threshold
(``counting_threshold`` if the prompt has an exact count > 1, else ``score_threshold``: GenEval's
0.9 / 0.3). ``N`` = number of candidates, ``n`` = wanted count, ``n_c`` = total count wanted of
class ``c`` over all requirements (``n`` unless two clauses name the same class, as in ``"a red
circle left of a blue circle"``: then an exact count means exactly ``n_c`` objects of that class).

Strict score (``mode="strict"``, GenEval's rule, 0 or 1): take the top-``n`` candidates by detector
score; fail if ``N < n`` (or ``N > n_c`` for exact counts); fail if fewer than ``n`` of them have
the wanted colour; a positional requirement fails unless its target requirement passed and every
(object, target object) pair has the relation. Score 1 iff nothing fails.

Graded score (``mode="graded"``, default, in ``[0, 1]``): the chosen objects are the top-``n``
candidates ordered by (wanted colour first, then detector score). Per requirement::

    q_count = max(0, 1 - |N - n_c| / n_c)  exact count
            = min(N, n) / n                 at-least count
    q_color = (# chosen with the wanted colour) / n                      if a colour is wanted
    q_pos   = (# (a, b) pairs with the relation) / (n * n_target)        if a position is wanted
              a over the chosen objects, b over the target requirement's chosen objects
    q_req   = mean of the terms that apply

    score = mean over requirements of q_req

If the strict score is 1 the graded score is 1; with exact counts the converse holds too.

Relation of A to B (GenEval's ``relative_position``, on boxes normalised to ``[0, 1]``): offset =
centre_A - centre_B; shrink each component by ``position_threshold * (size_A + size_B)`` towards 0
(clipped at 0); if both are ~0 there is no relation; else with (dx, dy) = shrunk offset / |offset|:
left of if dx < -0.5, right of if dx > 0.5, above if dy < -0.5, below if dy > 0.5 (y points down).
With ``position_rule="axis"`` each axis is judged alone: left of iff the shrunk x offset is < 0,
right of iff > 0, above / below likewise in y (for worlds whose "left of" says nothing about y).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from marble_lightning.checks import check_choice, check_float
from marble_lightning.rewards.base import RewardModel
from marble_lightning.rewards.detection import Detection, Detector

GENEVAL_COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
)  # fmt: skip
"""The colour names of GenEval's colour prompts."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

NUMBER_WORDS: dict[str, int] = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}  # fmt: skip

_RELATION_SYNONYMS = {
    "to the left of": "left of",
    "on the left of": "left of",
    "to the right of": "right of",
    "on the right of": "right of",
}
_RESERVED = ("and", "of", "left", "right", "above", "below", "a", "an", "the", "on", "to", "that")
_IRREGULAR_PLURALS = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
    "geese": "goose", "teeth": "tooth", "feet": "foot", "knives": "knife", "wolves": "wolf",
    "leaves": "leaf", "shelves": "shelf", "sheep": "sheep", "fish": "fish", "deer": "deer",
    "scissors": "scissors", "skis": "ski", "giraffes": "giraffe", "ties": "tie",
}  # fmt: skip


@dataclass(frozen=True)
class ObjectRequirement:
    """One GenEval "include" entry.

    Attributes:
        label: object class name as the detector is queried (singular), e.g. ``"dog"``.
        count: wanted number of objects, >= 1.
        exact: True if exactly ``count`` are wanted, False for at least ``count``.
        color: wanted colour name, or ``None``.
        position: ``(relation, target_index)``: every object must be ``relation`` (one of
            :data:`RELATIONS`) to every object of requirement ``target_index`` (an earlier entry).
    """

    label: str
    count: int = 1
    exact: bool = False
    color: str | None = None
    position: tuple[str, int] | None = None


def singularize(noun: str) -> str:
    """English plural -> singular for object names (last word only); heuristic, covers COCO."""
    words = noun.split(" ")
    w = words[-1]
    if w in _IRREGULAR_PLURALS:
        w = _IRREGULAR_PLURALS[w]
    elif w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith(("sses", "shes", "ches", "xes", "zes", "uses", "oes")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    return " ".join([*words[:-1], w])


def _build_pattern(colors: Sequence[str]) -> re.Pattern[str]:
    qty = r"(?:an?|" + "|".join(NUMBER_WORDS) + r"|\d+)"
    color = "|".join(re.escape(c) for c in sorted(colors, key=len, reverse=True))
    word = r"(?!(?:" + "|".join(_RESERVED) + r")\b)[a-z][a-z\-]*"
    noun = rf"{word}(?: {word}){{0,2}}"

    def clause(i: int) -> str:
        return rf"(?P<q{i}>{qty}) (?:(?P<c{i}>{color}) )?(?P<n{i}>{noun})"

    rels = sorted([*RELATIONS, *_RELATION_SYNONYMS, "and"], key=len, reverse=True)
    sep = "|".join(re.escape(r) for r in rels)
    pattern = (
        r"^(?:an? (?:photo|picture|image) of )?"
        + clause(1)
        + rf"(?: (?P<sep>{sep}) "
        + clause(2)
        + r")?$"
    )
    return re.compile(pattern)


class PromptParser:
    """Prompt -> list of :class:`ObjectRequirement` (GenEval metadata), or ``None``.

    Args:
        colors: colour words recognised before a noun.
        classes: if given, only these (singular) object names are accepted; other prompts give
            ``None``.
        count_mode: ``"geneval"`` (articles: at least one; numbers: exact) or ``"exact"``.
    """

    def __init__(
        self,
        colors: Sequence[str] = GENEVAL_COLORS,
        classes: Sequence[str] | None = None,
        count_mode: str = "geneval",
    ) -> None:
        check_choice("count_mode", count_mode, ("geneval", "exact"))
        self.colors = tuple(c.lower() for c in colors)
        self.classes = None if classes is None else frozenset(c.lower() for c in classes)
        self.count_mode = count_mode
        self._pattern = _build_pattern(self.colors)

    def _clause(self, m: re.Match[str], i: int) -> ObjectRequirement | None:
        q, color, noun = m.group(f"q{i}"), m.group(f"c{i}"), m.group(f"n{i}")
        explicit = q not in ("a", "an")
        count = 1 if not explicit else NUMBER_WORDS.get(q) or int(q)
        if count < 1:
            return None
        label = singularize(noun) if count > 1 else noun
        if self.classes is not None and label not in self.classes:
            return None
        exact = explicit or self.count_mode == "exact"
        return ObjectRequirement(label=label, count=count, exact=exact, color=color)

    def __call__(self, prompt: str) -> list[ObjectRequirement] | None:
        if '"' in prompt or "\u201c" in prompt:
            return None
        text = " ".join(prompt.strip().lower().rstrip(".").split())
        m = self._pattern.match(text)
        if m is None:
            return None
        first = self._clause(m, 1)
        if first is None:
            return None
        sep = m.group("sep")
        if sep is None:
            return [first]
        second = self._clause(m, 2)
        if second is None:
            return None
        if sep == "and":
            return [first, second]
        relation = _RELATION_SYNONYMS.get(sep, sep)
        return [second, ObjectRequirement(**{**first.__dict__, "position": (relation, 0)})]


def relative_position(
    a: Detection, b: Detection, threshold: float = 0.1, rule: str = "geneval"
) -> set[str]:
    """Relations of ``a`` to ``b`` among :data:`RELATIONS` (rules in the module docstring).

    Args:
        a, b: the two detections (normalised boxes).
        threshold: margin as a fraction of the summed box sizes along each axis.
        rule: ``"geneval"`` (the direction must be within 60 degrees of the axis) or ``"axis"``
            (each axis on its own: left of iff the shrunk x offset is negative, etc.).
    """
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    offset = ((ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2)
    dims = ((ax1 - ax0) + (bx1 - bx0), (ay1 - ay0) + (by1 - by0))
    revised = [
        math.copysign(max(abs(o) - threshold * abs(d), 0.0), o) for o, d in zip(offset, dims)
    ]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    if rule == "geneval":
        norm = math.hypot(*offset)
        dx, dy = revised[0] / norm, revised[1] / norm
    elif rule == "axis":  # the sign of each shrunk offset alone decides
        dx, dy = (math.copysign(1.0, r) if abs(r) >= 1e-3 else 0.0 for r in revised)
    else:
        raise ValueError(f"position rule must be 'geneval' or 'axis', got {rule!r}")
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _candidates(detections: Sequence[Detection], label: str, threshold: float) -> list[Detection]:
    found = [d for d in detections if d.label.lower() == label and d.score >= threshold]
    return sorted(found, key=lambda d: -d.score)  # stable: ties keep the detector's order


def _threshold(
    specs: Sequence[ObjectRequirement], score_threshold: float, counting_threshold: float
) -> float:
    return counting_threshold if any(r.exact and r.count > 1 for r in specs) else score_threshold


def _label_totals(specs: Sequence[ObjectRequirement]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for r in specs:
        totals[r.label] = totals.get(r.label, 0) + r.count
    return totals


def strict_score(
    specs: Sequence[ObjectRequirement],
    detections: Sequence[Detection],
    score_threshold: float = 0.3,
    counting_threshold: float = 0.9,
    position_threshold: float = 0.1,
    position_rule: str = "geneval",
) -> float:
    """GenEval's pass/fail rule -> 1.0 or 0.0 (see module docstring)."""
    thr = _threshold(specs, score_threshold, counting_threshold)
    totals = _label_totals(specs)
    groups: list[list[Detection] | None] = []
    ok = True
    for req in specs:
        found = _candidates(detections, req.label, thr)
        chosen = found[: req.count]
        matched = len(chosen) >= req.count and not (req.exact and len(found) > totals[req.label])
        if matched and req.color is not None:
            matched = sum(d.color == req.color for d in chosen) >= req.count
        if matched and req.position is not None:
            rel, target = req.position
            group = groups[target]
            matched = group is not None and all(
                rel in relative_position(a, b, position_threshold, position_rule)
                for a in chosen
                for b in group
            )
        ok = ok and matched
        groups.append(chosen if matched else None)
    return float(ok)


def graded_score(
    specs: Sequence[ObjectRequirement],
    detections: Sequence[Detection],
    score_threshold: float = 0.3,
    counting_threshold: float = 0.9,
    position_threshold: float = 0.1,
    position_rule: str = "geneval",
) -> float:
    """Partial-credit score in ``[0, 1]`` (formula in the module docstring)."""
    if not specs:
        raise ValueError("graded_score needs at least one object requirement")
    thr = _threshold(specs, score_threshold, counting_threshold)
    totals = _label_totals(specs)
    chosen_groups: list[list[Detection]] = []
    credits = []
    for req in specs:
        found = _candidates(detections, req.label, thr)
        if req.color is not None:
            found = sorted(found, key=lambda d: d.color != req.color)  # stable: keeps score order
        chosen = found[: req.count]
        n, big_n = req.count, len(found)
        if req.exact:
            total = totals[req.label]
            q_count = max(0.0, 1.0 - abs(big_n - total) / total)
        else:
            q_count = min(big_n, n) / n
        terms = [q_count]
        if req.color is not None:
            terms.append(sum(d.color == req.color for d in chosen) / n)
        if req.position is not None:
            rel, target = req.position
            targets = chosen_groups[target]
            hits = sum(
                rel in relative_position(a, b, position_threshold, position_rule)
                for a in chosen
                for b in targets
            )
            terms.append(hits / (n * specs[target].count))
        credits.append(sum(terms) / len(terms))
        chosen_groups.append(chosen)
    return sum(credits) / len(credits)


class CompositionReward(RewardModel):
    """GenEval-style object/count/colour/position reward over a pluggable detector.

    Args:
        detector: any :class:`~marble_lightning.rewards.detection.Detector` (the toy world's exact
            ``ToyDetector``, :class:`~marble_lightning.rewards.owl_detector.OwlDetector`, ...). It
            must set ``Detection.color`` for colour prompts (``None`` never matches a colour).
        mode: ``"graded"`` (partial credit, default) or ``"strict"`` (GenEval's 0/1).
        count_mode: ``"geneval"`` (``a``/``an`` = at least one, numbers exact) or ``"exact"``.
        score_threshold: minimum detector score of a candidate (GenEval: 0.3).
        counting_threshold: minimum score when the prompt has an exact count > 1 (GenEval: 0.9).
        position_threshold: GenEval's relative-size margin for positions (0.1).
        position_rule: ``"geneval"`` or ``"axis"`` (see :func:`relative_position`; the toy world,
            whose "left of" only constrains x, wants ``"axis"``).
        colors: recognised colour words.
        classes: if given, prompts naming other objects are not scored (mask False).
        name: reward name in logs.
    """

    name = "composition"

    def __init__(
        self,
        detector: Detector,
        mode: str = "graded",
        count_mode: str = "geneval",
        score_threshold: float = 0.3,
        counting_threshold: float = 0.9,
        position_threshold: float = 0.1,
        position_rule: str = "geneval",
        colors: Sequence[str] = GENEVAL_COLORS,
        classes: Sequence[str] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        check_choice("mode", mode, ("graded", "strict"))
        if not callable(getattr(detector, "detect", None)):
            raise TypeError(
                f"CompositionReward: detector {detector!r} has no detect(images, queries) method"
            )
        self.detector = detector  # registered as a submodule if it is an nn.Module
        self.mode = mode
        self.parser = PromptParser(colors=colors, classes=classes, count_mode=count_mode)
        self.score_threshold = check_float(
            "score_threshold", score_threshold, minimum=0.0, maximum=1.0
        )
        self.counting_threshold = check_float(
            "counting_threshold", counting_threshold, minimum=0.0, maximum=1.0
        )
        self.position_threshold = float(position_threshold)
        self.position_rule = check_choice("position_rule", position_rule, ("geneval", "axis"))

    def parse(self, prompt: str) -> list[ObjectRequirement] | None:
        """The prompt's object requirements, or ``None`` if it has no object spec."""
        return self.parser(prompt)

    def applies_to(self, prompts: Sequence[str]) -> Tensor:
        return torch.tensor([self.parse(p) is not None for p in prompts], dtype=torch.bool)

    def score_detections(
        self, specs: Sequence[ObjectRequirement], detections: Sequence[Detection]
    ) -> float:
        """Score one image's detections against its requirements (``mode`` selects the rule)."""
        fn = graded_score if self.mode == "graded" else strict_score
        return fn(
            specs,
            detections,
            self.score_threshold,
            self.counting_threshold,
            self.position_threshold,
            self.position_rule,
        )

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        specs = [self.parse(p) for p in prompts]
        values = torch.zeros(len(prompts), dtype=torch.float32)
        idx = [i for i, s in enumerate(specs) if s is not None]
        if idx:
            queries = [sorted({r.label for r in specs[i]}) for i in idx]
            detections = self.detector.detect(images[idx], queries)
            if len(detections) != len(idx):
                raise ValueError(
                    f"CompositionReward: detector returned {len(detections)} result lists for "
                    f"{len(idx)} images"
                )
            for i, dets in zip(idx, detections):
                values[i] = self.score_detections(specs[i], dets)
        return values.to(images.device)


__all__ = [
    "GENEVAL_COLORS",
    "RELATIONS",
    "CompositionReward",
    "ObjectRequirement",
    "PromptParser",
    "graded_score",
    "relative_position",
    "singularize",
    "strict_score",
]
