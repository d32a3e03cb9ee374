"""Concrete scenes (objects with positions), random realisation of a spec, and exact rendering.

Coordinates are in pixels of an ``IMAGE_SIZE`` canvas: pixel ``(row i, column j)`` covers
``[j, j+1] x [i, i+1]``, so its centre is ``(j + 0.5, i + 0.5)``; ``y`` grows downwards.
A shape of size ``s`` centred at ``(cx, cy)`` is inscribed in the box ``[cx - s/2, cx + s/2]`` (same in
y). Sizes are odd and realised centres are pixel centres, so boxes are integer-aligned and a pixel is
inside a shape exactly when its centre is (no anti-aliasing: every pixel is a palette colour).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from calibri_pipeline.world.spec import requested_instances, validate_spec
from calibri_pipeline.world.vocab import (
    BACKGROUND,
    BORDER,
    COLORS,
    IMAGE_SIZE,
    MIN_GAP,
    RELATION_MARGIN,
    RELATIONS,
    SHAPES,
    SIZES,
)


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    cx: float
    cy: float

    @property
    def side(self) -> int:
        return SIZES[self.size]

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` of the bounding box in pixel coordinates."""
        half = self.side / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(tuple(SceneObject(**o) for o in d["objects"]))


def shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, box: tuple[Any, Any, Any, Any]) -> np.ndarray:
    """Boolean mask: which points ``(xs, ys)`` lie inside ``shape`` inscribed in ``box``.

    ``box`` is ``(x0, y0, x1, y1)`` (may be non-square); its entries may be arrays that broadcast
    against ``xs``/``ys`` to test several boxes at once.
    """
    x0, y0, x1, y1 = (np.asarray(c, dtype=float) for c in box)
    half_w, half_h = (x1 - x0) / 2, (y1 - y0) / 2
    if np.any(half_w <= 0) or np.any(half_h <= 0):
        raise ValueError(f"shape box must have positive width and height, got {box}")
    u = (xs - (x0 + half_w)) / half_w  # -1 .. 1 across the box
    v = (ys - (y0 + half_h)) / half_h
    eps = 1e-9  # boundaries fall between pixel centres for realised boxes; this only guards rounding
    if shape == "square":
        return (np.abs(u) <= 1 + eps) & (np.abs(v) <= 1 + eps)
    if shape == "circle":
        return u * u + v * v <= 1 + eps
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (v <= 1 + eps) & (np.abs(u) <= (v + 1) / 2 + eps)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1 + eps
    raise ValueError(f"unknown shape {shape!r}; allowed: {list(SHAPES)}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a scene as ``uint8 [size, size, 3]``. ``size`` other than ``IMAGE_SIZE`` scales the geometry."""
    if not isinstance(scene, Scene):
        raise TypeError(f"render expects a Scene, got {type(scene).__name__}")
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"render size must be an int >= 8, got {size!r}")
    scale = size / IMAGE_SIZE
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in scene.objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; allowed: {list(COLORS)}")
        x0, y0, x1, y1 = (c * scale for c in obj.box)
        # Only evaluate the pixels the box touches.
        c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), size)
        r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), size)
        if c0 >= c1 or r0 >= r1:
            continue
        ys, xs = np.mgrid[r0:r1, c0:c1] + 0.5
        mask = shape_mask(obj.shape, xs, ys, (x0, y0, x1, y1))
        image[r0:r1, c0:c1][mask] = COLORS[obj.color]
    return image


def _boxes_clear(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """True when two boxes are at least ``MIN_GAP`` apart along x or along y."""
    return a[2] + MIN_GAP <= b[0] or b[2] + MIN_GAP <= a[0] or a[3] + MIN_GAP <= b[1] or b[3] + MIN_GAP <= a[1]


def _random_centre(rng: np.random.Generator, side: int) -> tuple[float, float]:
    # Integer box corner -> centre on a pixel centre (side is odd).
    low, high = BORDER, IMAGE_SIZE - BORDER - side
    x0, y0 = rng.integers(low, high + 1, size=2)
    return float(x0 + side / 2), float(y0 + side / 2)


def _relation_holds(subject: SceneObject, obj: SceneObject, relation: str, margin: float) -> bool:
    dx, dy = RELATIONS[relation]
    offx, offy = obj.cx - subject.cx, obj.cy - subject.cy
    along = offx * dx + offy * dy
    across = abs(offx * dy - offy * dx)
    return along - across >= margin


def realize(spec: dict[str, Any], rng: np.random.Generator, max_tries: int = 200) -> Scene:
    """A random concrete scene satisfying ``spec``: objects inside the canvas, never overlapping.

    Attributes the spec leaves open (size, outside the "size" category) are drawn at random, one size
    per group, so "three red squares" shows three identical squares.
    """
    spec = validate_spec(spec)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    instances = requested_instances(spec)
    relation = spec.get("relation")
    size_names = list(SIZES)
    for attempt in range(max_tries):
        # Crowded scenes (several large objects) may not fit: after a while fall back to small ones.
        force_small = attempt >= max_tries // 2
        group_size = {}
        for g, group in enumerate(spec["objects"]):
            if "size" in group:
                group_size[g] = group["size"]
            else:
                group_size[g] = "small" if force_small else size_names[rng.integers(len(size_names))]
        placed: list[SceneObject] = []
        for inst in instances:
            size = group_size[inst["group"]]
            for _ in range(60):
                cx, cy = _random_centre(rng, SIZES[size])
                cand = SceneObject(inst["color"], inst["shape"], size, cx, cy)
                if all(_boxes_clear(cand.box, other.box) for other in placed):
                    placed.append(cand)
                    break
            else:
                break
        if len(placed) != len(instances):
            continue
        if relation is not None:
            subject, obj = placed[relation["subject"]], placed[relation["object"]]
            if not _relation_holds(subject, obj, relation["type"], RELATION_MARGIN):
                continue
        return Scene(tuple(placed))
    raise RuntimeError(f"could not place the objects of {spec} without overlap in {max_tries} tries")
