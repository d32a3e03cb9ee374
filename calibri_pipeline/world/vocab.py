"""The embedded world's vocabulary: palette, shapes, sizes and prompt categories.

Everything here is data. The palette is chosen so that every pair of colours (and the background)
is far apart in RGB (>= 150 of 255 per pair), which keeps nearest-colour parsing exact even when a
generator is a little off.
"""

from __future__ import annotations

IMAGE_SIZE = 32

#: RGB of the plain background every scene is drawn on.
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

#: canonical colour name -> RGB (uint8). Dict order is the palette index order used by the scorer.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (30, 60, 240),
    "yellow": (240, 220, 40),
    "purple": (190, 60, 230),
    "cyan": (40, 210, 220),
}

#: shapes are drawn inscribed in an axis-aligned square box; triangles point up, diamonds are
#: the box's inscribed rhombus.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

#: size name -> side of the shape's bounding box in pixels at ``IMAGE_SIZE`` (odd, so a shape
#: centred on a pixel centre has an integer-aligned box and renders symmetrically).
SIZES: dict[str, int] = {"small": 7, "large": 11}

#: prompt categories (T2I-CompBench++-like). See ``calibri_pipeline.world`` for what each asks.
CATEGORIES: tuple[str, ...] = ("single", "color_binding", "spatial", "counting", "size", "multi")

#: spatial relations: name -> unit direction (dx, dy) from the *subject* to the *object*
#: in image coordinates (y grows downwards). "A left_of B" means B lies to the right of A.
RELATIONS: dict[str, tuple[int, int]] = {
    "left_of": (1, 0),
    "right_of": (-1, 0),
    "above": (0, 1),
    "below": (0, -1),
}

#: counts the "counting" category asks for.
MIN_COUNT = 1
MAX_COUNT = 5

#: smallest gap (pixels) between the bounding boxes of two objects, and between a box and the border.
MIN_GAP = 2
BORDER = 1

#: a "spatial" scene puts the object at least this much further along the relation's axis than
#: across it, so the relation is unambiguous in the ground truth.
RELATION_MARGIN = 4.0
