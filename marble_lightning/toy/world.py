"""Procedural scenes of the toy world: specs, layout and rendering.

A scene is described by a :class:`SceneSpec` (what the prompt asks for) and drawn by
:func:`render_scene` into a ``32 x 32`` RGB image on a white background:

* ``count`` scenes: ``count`` (1-3) objects of one shape and one colour;
* ``relation`` scenes: two objects of different colours, the first left (or right) of the second;
* ``text`` scenes: one short black word, drawn large, centred with a small jitter.

Objects are filled circles or squares in one of four well-separated palette colours, drawn without
anti-aliasing and kept at least :data:`MIN_GAP` pixels apart, so an exact detector
(:class:`marble_lightning.toy.detector.ToyDetector`) can read a rendered scene back perfectly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from marble_lightning.checks import check_choice

IMAGE_SIZE = 32
"""Height and width of every toy image, in pixels."""

BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""Background colour (RGB, 0-255): plain white."""

TEXT_COLOR: tuple[int, int, int] = (0, 0, 0)
"""Colour of rendered words (RGB, 0-255)."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 20),
}
"""Object colours (RGB, 0-255), chosen far apart from each other, from white and from black."""

SHAPES: tuple[str, ...] = ("circle", "square")
"""Object shapes."""

COUNTS: tuple[int, ...] = (1, 2, 3)
"""Object counts that ``count`` prompts ask for."""

RELATIONS: tuple[str, ...] = ("left of", "right of")
"""Spatial relations between the two objects of a ``relation`` prompt."""

WORDS: tuple[str, ...] = (
    "cat",
    "dog",
    "sun",
    "car",
    "box",
    "hat",
    "pen",
    "cup",
    "bus",
    "fox",
    "owl",
    "bee",
    "map",
    "key",
    "egg",
    "ant",
    "bat",
    "cow",
    "pig",
    "jam",
    "net",
    "toy",
    "web",
    "ink",
)
"""The 24 three-letter words of the text family (none is a colour, shape or number word)."""

FONT_SIZE = 15
"""Pixel size of Pillow's bundled default TrueType font for words (every word fits in 32 px)."""

OBJECT_SIZES: tuple[int, ...] = (8, 9, 10, 11)
"""Side length / diameter choices of an object, in pixels."""

MIN_GAP = 2
"""Minimum number of background pixels between two objects' bounding boxes."""

MIN_RELATION_DX = 8
"""Minimum horizontal distance (pixels) between the centres of the two objects of a relation.

The vertical distance between the centres is also kept at most the horizontal one (the pair is
within 45 degrees of horizontal), so the scene reads as "left of" under GenEval's direction rule
(within 60 degrees of the axis) as well as under a pure x-order rule."""


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of one shape and colour.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: one of the keys of :data:`PALETTE`.
        count: how many, in :data:`COUNTS`.
    """

    shape: str
    color: str
    count: int = 1

    def __post_init__(self) -> None:
        check_choice("shape", self.shape, SHAPES)
        check_choice("color", self.color, PALETTE)
        check_choice("count", self.count, COUNTS)


@dataclass(frozen=True)
class SceneSpec:
    """What a prompt asks for.

    Attributes:
        family: ``"count"``, ``"relation"`` or ``"text"``.
        objects: one group for ``count``, two single objects for ``relation``, none for ``text``.
        relation: for ``relation`` scenes, ``"left of"`` or ``"right of"``: ``objects[0]`` is
            (relation) ``objects[1]``.
        text: for ``text`` scenes, the word to write (one of :data:`WORDS`).
    """

    family: str
    objects: tuple[ObjectSpec, ...] = ()
    relation: str | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        check_choice("family", self.family, ("count", "relation", "text"))
        if self.family == "count":
            if len(self.objects) != 1 or self.relation is not None or self.text is not None:
                raise ValueError(f"a count scene has exactly one object group, got {self}")
        elif self.family == "relation":
            if len(self.objects) != 2 or any(o.count != 1 for o in self.objects):
                raise ValueError(f"a relation scene has two single objects, got {self}")
            check_choice("relation", self.relation, RELATIONS)
            if self.objects[0].color == self.objects[1].color:
                raise ValueError(f"the two objects of a relation need different colours: {self}")
        elif self.objects or self.text not in WORDS:  # text
            raise ValueError(f"a text scene needs a word from WORDS and no objects, got {self}")


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object. ``box`` is ``(x0, y0, x1, y1)`` in pixels, exclusive end."""

    shape: str
    color: str
    box: tuple[int, int, int, int]

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass
class RenderedScene:
    """A rendered scene: ``image`` uint8 ``[H, W, 3]`` and the objects drawn on it, in spec
    order."""

    image: np.ndarray
    objects: list[PlacedObject] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def word_font() -> ImageFont.FreeTypeFont:
    """Pillow's bundled TrueType font at :data:`FONT_SIZE` (no system font needed)."""
    font = ImageFont.load_default(size=FONT_SIZE)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow built without FreeType
        raise TypeError("the toy world needs Pillow with FreeType support to draw words")
    return font


def _boxes_clear(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in others:
        if x0 < a1 + MIN_GAP and a0 < x1 + MIN_GAP and y0 < b1 + MIN_GAP and b0 < y1 + MIN_GAP:
            return False
    return True


def _random_box(
    rng: np.random.Generator, x_range: tuple[int, int] | None = None
) -> tuple[int, int, int, int]:
    s = int(rng.choice(OBJECT_SIZES))
    lo, hi = x_range if x_range is not None else (1, IMAGE_SIZE - 1 - s)
    x0 = int(rng.integers(lo, max(lo, hi) + 1))
    y0 = int(rng.integers(1, IMAGE_SIZE - 1 - s + 1))
    return (x0, y0, x0 + s, y0 + s)


def layout_scene(spec: SceneSpec, rng: np.random.Generator) -> list[PlacedObject]:
    """Place the objects of ``spec`` at random, non-touching positions (rejection sampling).

    Returns the placed objects in spec order (for relations: ``objects[0]`` first).
    """
    for _ in range(1000):
        placed: list[PlacedObject] = []
        if spec.family == "count":
            (obj,) = spec.objects
            boxes: list[tuple[int, int, int, int]] = []
            for _ in range(obj.count):
                for _ in range(200):
                    box = _random_box(rng)
                    if _boxes_clear(box, boxes):
                        boxes.append(box)
                        break
            if len(boxes) == obj.count:
                return [PlacedObject(obj.shape, obj.color, b) for b in boxes]
        elif spec.family == "relation":
            a, b = spec.objects
            box_a, box_b = _random_box(rng), _random_box(rng)
            pa = PlacedObject(a.shape, a.color, box_a)
            pb = PlacedObject(b.shape, b.color, box_b)
            dx = (
                pb.center_x - pa.center_x
                if spec.relation == "left of"
                else pa.center_x - pb.center_x
            )
            dy = abs((box_a[1] + box_a[3]) - (box_b[1] + box_b[3])) / 2
            if dx >= MIN_RELATION_DX and dy <= dx and _boxes_clear(box_a, [box_b]):
                placed = [pa, pb]
                return placed
        else:
            return []
    raise RuntimeError(f"could not lay out {spec} in 1000 attempts")  # pragma: no cover


def render_scene(spec: SceneSpec, rng: np.random.Generator) -> RenderedScene:
    """Draw ``spec`` with a random layout.

    Args:
        spec: the scene to draw.
        rng: source of the random layout (and text jitter).

    Returns:
        The image (uint8 ``[32, 32, 3]``) and the placed objects.
    """
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    objects = layout_scene(spec, rng)
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        fill = PALETTE[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    if spec.family == "text":
        assert spec.text is not None
        font = word_font()
        left, top, right, bottom = draw.textbbox((0, 0), spec.text, font=font)
        w, h = right - left, bottom - top
        jx = int(rng.integers(-1, 2)) if w <= IMAGE_SIZE - 4 else 0
        jy = int(rng.integers(-3, 4))
        x = (IMAGE_SIZE - w) // 2 - left + jx
        y = (IMAGE_SIZE - h) // 2 - top + jy
        draw.text((x, y), spec.text, font=font, fill=TEXT_COLOR)
    return RenderedScene(image=np.asarray(img, dtype=np.uint8).copy(), objects=objects)


def to_tensor_images(images: list[np.ndarray]):
    """Stack uint8 ``[H, W, 3]`` arrays into a float tensor ``[B, 3, H, W]`` in ``[0, 1]``."""
    import torch

    arr = np.stack(images).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
