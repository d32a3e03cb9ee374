"""Read a world image back into objects and score it against a spec (exact, no learned model).

Parsing: every pixel is read as a mix ``(1 - t) * background + t * colour`` of the background and the
palette colour whose mixing segment passes closest to it; pixels at least half that colour (t >= 0.5)
and close to the segment belong to that colour, the 50 % coverage contour being where an anti-aliased
or mildly blurred edge really is. Same-colour pixels form objects by 8-connected components
(components smaller than ``MIN_AREA`` are debris). An object's shape is the template (circle, square,
triangle, diamond inscribed in a box) with the best soft IoU against the object's coverage map, the box
being its bounding box or that box grown by a pixel where blur has thinned a tip, and the template
crisp or (for objects no crisp template explains) blurred; its size is the nominal size closest to the
fitted box's extent; its centre is the box centre. Blur thus costs quality, not correctness, until
shapes really dissolve.

Scores (see :func:`score_images`):

- per-attribute booleans and ``correct`` (everything the prompt asks for is right and nothing else is
  there);
- ``alignment`` in [0, 1] with partial credit: requested objects are matched to detected ones
  (Hungarian assignment on a soft attribute agreement: hue distance, shape-template IoU, extent),
  summed and divided by ``max(requested, detected)`` so missing, extra and merged objects all cost;
  spatial prompts add a margin-based relation term;
- ``quality`` in [0, 1]: geometric mean of crispness (how close non-background pixels are to a palette
  colour; blur and colour mixing make it fall), cleanliness (stray ink away from the objects) and shape
  fit (mean over objects of best crisp-template IoU times closeness of the extent to a nominal size;
  0 when there is no object).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from calibri_pipeline.world.scene import shape_mask
from calibri_pipeline.world.spec import requested_instances, validate_spec
from calibri_pipeline.world.vocab import BACKGROUND, COLORS, IMAGE_SIZE, RELATION_MARGIN, RELATIONS, SHAPES, SIZES

# --- parsing thresholds (RGB distances on the 0..255 scale, areas in pixels at IMAGE_SIZE) ---
#: a pixel is read as a mix ``(1 - t) * background + t * colour`` of the background and the palette
#: colour whose mixing segment passes closest to it; it belongs to that colour's objects when the mix is
#: at least half colour (the 50 % coverage contour, so mild blur keeps shapes) and it lies within this
#: distance of the segment (further off, e.g. a mix of two colours, it belongs to nothing)
UNKNOWN_DISTANCE = 60.0
COVERAGE_THRESHOLD = 0.5
#: a side of an object's box may grow by a pixel (for shape fitting) where coverage just outside reaches this
TIP_COVERAGE = 0.2
#: objects whose best crisp-template soft IoU is below CRISP_FIT are also fitted with templates blurred
#: by these Gaussian sigmas (pixels), so a blurry triangle still reads as a triangle
CRISP_FIT = 0.9
TEMPLATE_BLURS = (0.5, 0.7, 0.9, 1.2, 1.5)
#: components smaller than this are debris (the smallest ground-truth objects have 25 pixels)
MIN_AREA = 14
#: a pixel this far from the background counts as ink (for quality)
INK_DISTANCE = 24.0

# --- soft scores ---
COLOR_SIGMA = 70.0  # colour agreement exp(-(d / sigma)^2), d = mean colour's distance from the requested hue
SHAPE_TEMPERATURE = 0.05  # softmax temperature over template IoUs
SHAPE_IOU_FULL_CREDIT = 0.7  # a requested shape fitting at least this well gets full shape credit
CRISP_SIGMA = 40.0  # crispness exp(-(d / sigma)^2) of an ink pixel at distance d from its nearest palette colour
STRAY_INK_SCALE = 0.03  # cleanliness exp(-stray / scale), stray = fraction of the image with ink off the objects
SIZE_TOLERANCE = 1.5  # object extents this far (pixels) from every nominal size lower its shape fit by 1/e
RELATION_WEIGHT = 0.3  # share of a spatial prompt's alignment that is the relation

_COLOR_NAMES = list(COLORS)
_PALETTE = np.asarray([BACKGROUND, *COLORS.values()], dtype=np.float32)  # index 0 = background
_DIRECTIONS = _PALETTE[1:] - _PALETTE[0]  # background -> colour segments
_DIRECTION_SQ = (_DIRECTIONS * _DIRECTIONS).sum(1)
_PAD = 2  # pixels of context around an object for shape fitting
_CHUNK = 512  # images parsed at once (bounds memory: ~100 MB per chunk at 32x32)
_SIZE_NAMES = list(SIZES)
_SIZE_SIDES = np.asarray([SIZES[s] for s in _SIZE_NAMES], dtype=np.float32)
# 8-connectivity inside each image, no connection across the batch axis.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


@dataclass(frozen=True)
class DetectedObject:
    """One object read back from an image.

    ``cx``, ``cy`` and ``extent`` are in ``IMAGE_SIZE`` pixel units whatever the image resolution (so
    they compare with scene coordinates); ``box`` and ``area`` are in pixels of the parsed image.
    """

    color: str
    shape: str
    size: str
    cx: float
    cy: float
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive ends)
    area: int
    extent: float  # longer side of the best-fitting shape box, in IMAGE_SIZE pixels
    shape_ious: dict[str, float]  # soft IoU with each shape's best-fitting (crisp or blurred) template
    crisp_fit: float  # best soft IoU with any crisp template (blur lowers it)
    mean_rgb: tuple[float, float, float]
    color_distance: float  # from mean_rgb to the palette colour it was assigned

    @property
    def shape_fit(self) -> float:
        """How clean the object is: best crisp-template IoU times closeness of its extent to a nominal size."""
        off_size = float(np.abs(_SIZE_SIDES - self.extent).min())
        return self.crisp_fit * float(np.exp(-((off_size / SIZE_TOLERANCE) ** 2)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_hwc255(images: Any) -> np.ndarray:
    """Images as float32 ``[N, H, W, 3]`` on the 0..255 scale.

    Accepts one image or a batch, numpy or torch, uint8 (0..255) or float (0..1), channels first
    (``[3, H, W]``, ``[N, 3, H, W]``) or last (``[H, W, 3]``, ``[N, H, W, 3]``).
    """
    if hasattr(images, "detach"):  # a torch tensor; avoid importing torch here
        tensor = images.detach().cpu()
        images = (tensor.float() if tensor.is_floating_point() else tensor).numpy()  # bf16 has no numpy dtype
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"images must be [H,W,3], [3,H,W] or a batch of them, got shape {images.shape}")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        hwc = images
    elif images.shape[1] == 3:
        hwc = np.moveaxis(images, 1, -1)
    else:
        raise ValueError(f"cannot find the 3 colour channels in image shape {images.shape}")
    if hwc.shape[1] != hwc.shape[2] or hwc.shape[1] < 8:
        raise ValueError(f"world images must be square and at least 8x8, got {hwc.shape[1]}x{hwc.shape[2]}")
    if hwc.dtype == np.uint8:
        return hwc.astype(np.float32)
    if not np.issubdtype(hwc.dtype, np.floating):
        raise TypeError(f"images must be uint8 or float in [0, 1], got dtype {hwc.dtype}")
    if not np.isfinite(hwc).all():
        raise ValueError("images contain NaN or infinite values")
    return np.clip(hwc.astype(np.float32), 0.0, 1.0) * 255.0


def _fit_shapes(coverage: np.ndarray, box: tuple[int, int, int, int]) -> tuple[dict[str, float], float, float]:
    """Soft IoU of an object's coverage map with each shape template; the best over candidate fits.

    ``coverage`` is a window around the object (the object's box padded by up to ``_PAD`` pixels, in
    window coordinates) holding how much of the object's colour each pixel has (0..1), with other
    objects blanked out. ``box`` is the bounding box of the object's >= 50 % pixels in the window.
    Soft IoU = sum(min(c, t)) / sum(max(c, t)); it is the plain IoU for crisp images.

    Blur is a quality problem, not a different shape, so the fit tolerates it: where the coverage just
    outside a side of the box is substantial (blur pushes thin tips such as a triangle's apex below
    50 % first) the box may grow by a pixel on that side, and when no crisp template explains the object
    well, templates blurred like the image are tried too.

    Returns the IoU per shape (best over all fits), the best crisp-template IoU (for quality), and the
    extent (longer side, pixels) of the best-fitting box.
    """
    x0, y0, x1, y1 = box
    h, w = coverage.shape
    options = []
    for lo_side, hi_side, lo, hi, axis in ((x0, x1, y0, y1, "x"), (y0, y1, x0, x1, "y")):
        lows, highs = [lo_side], [hi_side]
        strip = (
            (lambda i, lo=lo, hi=hi: coverage[lo:hi, i])
            if axis == "x"
            else (lambda i, lo=lo, hi=hi: coverage[i, lo:hi])
        )
        if lo_side > 0 and strip(lo_side - 1).max() >= TIP_COVERAGE:
            lows.append(lo_side - 1)
        limit = w if axis == "x" else h
        if hi_side < limit and strip(hi_side).max() >= TIP_COVERAGE:
            highs.append(hi_side + 1)
        options.append((lows, highs))
    (xl, xh), (yl, yh) = options
    cand = np.asarray([(a, b, c, d) for a in xl for b in yl for c in xh for d in yh], dtype=float)
    bx0, by0, bx1, by1 = (cand[:, i, None, None] for i in range(4))  # [B, 1, 1]
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    n_boxes = len(cand)
    # All shapes x candidate boxes at once: [S * B, h, w].
    templates = np.concatenate([shape_mask(s, xs, ys, (bx0, by0, bx1, by1)) for s in SHAPES]).astype(np.float32)

    def soft_iou(stack: np.ndarray) -> np.ndarray:  # [S * B, h, w] -> [S, B]
        inter = np.minimum(coverage, stack).sum((1, 2))
        return (inter / np.maximum(coverage, stack).sum((1, 2))).reshape(len(SHAPES), n_boxes)

    iou = soft_iou(templates)
    crisp_fit = float(iou.max())
    best = iou
    if crisp_fit < CRISP_FIT:
        for sigma in TEMPLATE_BLURS:
            # Separable Gaussian blur (zero outside the window) as two small matrix products.
            blurred = _gaussian_matrix(h, sigma) @ templates @ _gaussian_matrix(w, sigma).T
            best = np.maximum(best, soft_iou(blurred))
    ious = {shape: float(best[i].max()) for i, shape in enumerate(SHAPES)}
    box_index = int(best.max(0).argmax())
    x0b, y0b, x1b, y1b = cand[box_index]
    return ious, crisp_fit, float(max(x1b - x0b, y1b - y0b))


@functools.lru_cache(maxsize=256)
def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """``[n, n]`` matrix applying a 1-D Gaussian blur with zero padding (like ``mode="constant"``)."""
    radius = int(np.ceil(4 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    matrix = np.where(np.abs(offsets) <= radius, kernel[np.clip(offsets + radius, 0, 2 * radius)], 0.0)
    return matrix.astype(np.float32)


@dataclass
class _Analysis:
    objects: list[list[DetectedObject]]
    crispness: np.ndarray  # [N]
    cleanliness: np.ndarray  # [N]


def _analyse(images255: np.ndarray) -> _Analysis:
    """Parse a batch in chunks (the per-pixel work holds ~20 float arrays of the chunk's size)."""
    if len(images255) <= _CHUNK:
        return _analyse_chunk(images255)
    parts = [_analyse_chunk(images255[i : i + _CHUNK]) for i in range(0, len(images255), _CHUNK)]
    return _Analysis(
        [objs for part in parts for objs in part.objects],
        np.concatenate([part.crispness for part in parts]),
        np.concatenate([part.cleanliness for part in parts]),
    )


def _analyse_chunk(images255: np.ndarray) -> _Analysis:
    from scipy import ndimage  # imported here: scipy costs ~0.5 s, and importing the world must stay light

    n, size = images255.shape[0], images255.shape[1]
    scale = size / IMAGE_SIZE
    min_area = max(1, int(round(MIN_AREA * scale * scale)))
    # Channel-major arrays and one pass per palette entry: far faster than [..., K, 3] broadcasting.
    channels = np.ascontiguousarray(np.moveaxis(images255, -1, 0))  # [3, N, H, W]
    dist = np.stack([np.sqrt(sum((channels[c] - ref[c]) ** 2 for c in range(3))) for ref in _PALETTE])
    dmin = dist.min(0)
    d_bg = dist[0]
    # Each pixel as a mix (1 - t) * background + t * colour: t along, and distance from, each segment.
    offset = channels - _PALETTE[0][:, None, None, None]
    offset_sq = (offset * offset).sum(0)
    along = np.stack([sum(offset[c] * direction[c] for c in range(3)) for direction in _DIRECTIONS])
    t = np.maximum(along / _DIRECTION_SQ[:, None, None, None], 0.0)  # [colours, N, H, W]
    residual = np.sqrt(np.maximum(offset_sq - 2 * t * along + t * t * _DIRECTION_SQ[:, None, None, None], 0.0))
    on_segment = residual <= UNKNOWN_DISTANCE
    coverage = np.minimum(t, 1.0) * on_segment
    best = residual.argmin(0)[None]
    is_object_pixel = (np.take_along_axis(t, best, 0) >= COVERAGE_THRESHOLD) & np.take_along_axis(on_segment, best, 0)
    classes = np.where(is_object_pixel[0], best[0] + 1, 0)  # 0 = background / nothing, k = colour k

    objects: list[list[DetectedObject]] = [[] for _ in range(n)]
    object_pixels = np.zeros(classes.shape, dtype=bool)
    for k, color in enumerate(_COLOR_NAMES, start=1):
        labels, count = ndimage.label(classes == k, structure=_STRUCTURE)
        if count == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        keep = np.flatnonzero(areas >= min_area)
        keep = keep[keep > 0]
        if keep.size == 0:
            continue
        slices = ndimage.find_objects(labels)
        for label in keep:
            bs, rs, cs = slices[label - 1]
            b = bs.start
            mask = labels[b, rs, cs] == label
            object_pixels[b, rs, cs] |= mask
            # Coverage window around the object, with other same-colour objects blanked out.
            r0, r1 = max(rs.start - _PAD, 0), min(rs.stop + _PAD, size)
            c0, c1 = max(cs.start - _PAD, 0), min(cs.stop + _PAD, size)
            window_labels = labels[b, r0:r1, c0:c1]
            window = coverage[k - 1, b, r0:r1, c0:c1] * ((window_labels == 0) | (window_labels == label))
            box = (cs.start - c0, rs.start - r0, cs.stop - c0, rs.stop - r0)
            ious, crisp_fit, fitted_extent = _fit_shapes(window, box)
            extent = fitted_extent / scale
            mean_rgb = images255[b, rs, cs][mask].mean(0)
            objects[b].append(
                DetectedObject(
                    color=color,
                    shape=max(ious, key=ious.get),
                    size=_SIZE_NAMES[int(np.abs(_SIZE_SIDES - extent).argmin())],
                    cx=(cs.start + cs.stop) / 2 / scale,
                    cy=(rs.start + rs.stop) / 2 / scale,
                    box=(cs.start, rs.start, cs.stop, rs.stop),
                    area=int(areas[label]),
                    extent=float(extent),
                    shape_ious=ious,
                    crisp_fit=crisp_fit,
                    mean_rgb=tuple(float(v) for v in mean_rgb),
                    color_distance=float(np.linalg.norm(mean_rgb - _PALETTE[k])),
                )
            )
    for objs in objects:  # reading order, so results do not depend on colour order
        objs.sort(key=lambda o: (o.cy, o.cx))

    ink = d_bg > INK_DISTANCE
    crisp_pixel = np.exp(-((dmin / CRISP_SIGMA) ** 2))
    ink_count = ink.sum((1, 2))
    crispness = np.where(ink_count > 0, (crisp_pixel * ink).sum((1, 2)) / np.maximum(ink_count, 1), 1.0)
    # Ink more than a pixel away from every object is stray (noise, ghosts, halos of heavy blur).
    near_objects = ndimage.binary_dilation(object_pixels, structure=_STRUCTURE)
    # Faint deviations (a generator's background is never exactly black) cost nothing below INK_DISTANCE.
    ink_weight = np.clip((d_bg - INK_DISTANCE) / (100.0 - INK_DISTANCE), 0.0, 1.0)
    stray = (ink_weight * ~near_objects).mean((1, 2))
    cleanliness = np.exp(-stray / STRAY_INK_SCALE)
    return _Analysis(objects, crispness.astype(np.float64), cleanliness.astype(np.float64))


def parse_images(images: Any) -> list[list[DetectedObject]]:
    """Detected objects of each image in a batch (see :func:`to_hwc255` for accepted inputs)."""
    return _analyse(to_hwc255(images)).objects


def parse_image(image: Any) -> list[DetectedObject]:
    """Detected objects of one image, in reading order (top to bottom, then left to right)."""
    arr = to_hwc255(image)
    if arr.shape[0] != 1:
        raise ValueError(f"parse_image takes one image, got a batch of {arr.shape[0]}; use parse_images")
    return _analyse(arr).objects[0]


def _segment_distance(rgb: tuple[float, float, float], color: str) -> float:
    """Distance of ``rgb`` from the segment background -> ``color`` (0 for any mix of the two)."""
    direction = _DIRECTIONS[_COLOR_NAMES.index(color)]
    offset = np.asarray(rgb, dtype=np.float64) - _PALETTE[0]
    t = float(np.clip(offset @ direction / (direction @ direction), 0.0, 1.0))
    return float(np.linalg.norm(offset - t * direction))


def _pair_scores(requests: list[dict[str, Any]], objects: list[DetectedObject]) -> np.ndarray:
    """Soft agreement in [0, 1] of every requested object with every detected one: ``[R, D]``."""
    scores = np.zeros((len(requests), len(objects)))
    large_minus_small = float(_SIZE_SIDES.max() - _SIZE_SIDES.min())
    for d, obj in enumerate(objects):
        ious = np.asarray([obj.shape_ious[s] for s in SHAPES])
        shape_prob = np.exp((ious - ious.max()) / SHAPE_TEMPERATURE)
        shape_prob /= shape_prob.sum()
        for r, req in enumerate(requests):
            # Hue agreement: distance of the mean colour from the background->requested-colour segment,
            # so a dimmed (blurred) object of the right colour still agrees; quality sees the dimming.
            parts = [np.exp(-((_segment_distance(obj.mean_rgb, req["color"]) / COLOR_SIGMA) ** 2))]
            i = SHAPES.index(req["shape"])
            parts.append(shape_prob[i] * min(1.0, ious[i] / SHAPE_IOU_FULL_CREDIT))
            if "size" in req:
                parts.append(max(0.0, 1.0 - abs(obj.extent - SIZES[req["size"]]) / large_minus_small))
            scores[r, d] = float(np.mean(parts))
    return scores


def _relation_margin(subject: DetectedObject, obj: DetectedObject, relation: str) -> float:
    """How far (pixels) the object lies along the relation's direction beyond its offset across it."""
    dx, dy = RELATIONS[relation]
    offx, offy = obj.cx - subject.cx, obj.cy - subject.cy
    return float((offx * dx + offy * dy) - abs(offx * dy - offy * dx))


def _score_one(spec: dict[str, Any], objects: list[DetectedObject], crisp: float, clean: float) -> dict[str, Any]:
    spec = validate_spec(spec)
    category = spec["category"]
    requests = requested_instances(spec)
    with_size = any("size" in r for r in requests)

    def key(o: Any) -> tuple:
        get = o.get if isinstance(o, dict) else lambda a: getattr(o, a)
        return (get("color"), get("shape"), get("size") if with_size else None)

    out: dict[str, Any] = {"category": category, "n_requested": len(requests), "n_detected": len(objects)}
    out["count_ok"] = len(objects) == len(requests)
    out["color_ok"] = Counter(r["color"] for r in requests) == Counter(o.color for o in objects)
    out["shape_ok"] = Counter(r["shape"] for r in requests) == Counter(o.shape for o in objects)
    if with_size:
        out["size_ok"] = Counter(r["size"] for r in requests) == Counter(o.size for o in objects)
    # Binding: the detected objects are exactly the requested ones, attribute tuples and all.
    out["binding_ok"] = Counter(key(r) for r in requests) == Counter(key(o) for o in objects)
    if category == "counting":
        out["count_error"] = len(objects) - len(requests)

    from scipy.optimize import linear_sum_assignment

    pair = _pair_scores(requests, objects)
    matched: dict[int, int] = {}
    if objects:
        rows, cols = linear_sum_assignment(-pair)
        matched = dict(zip(rows.tolist(), cols.tolist()))
    attribute_score = sum(pair[r, d] for r, d in matched.items()) / max(len(requests), len(objects))
    alignment = attribute_score
    correct = out["binding_ok"]
    if category == "spatial":
        rel = spec["relation"]
        s, o = rel["subject"], rel["object"]  # groups have count 1, so group index == request index
        if s in matched and o in matched:
            margin = _relation_margin(objects[matched[s]], objects[matched[o]], rel["type"])
            relation_score = float(np.clip(0.5 + margin / (2 * RELATION_MARGIN), 0.0, 1.0))
            out["relation_ok"] = bool(margin > 0) and bool(
                key(objects[matched[s]]) == key(requests[s]) and key(objects[matched[o]]) == key(requests[o])
            )
            out["relation_margin"] = margin
        else:
            relation_score, out["relation_ok"], out["relation_margin"] = 0.0, False, None
        out["relation_score"] = relation_score
        alignment = (1 - RELATION_WEIGHT) * attribute_score + RELATION_WEIGHT * relation_score
        correct = correct and out["relation_ok"]
    shape_fit = float(np.mean([o.shape_fit for o in objects])) if objects else 0.0
    out.update(
        correct=bool(correct),
        attribute_score=float(attribute_score),
        alignment=float(np.clip(alignment, 0.0, 1.0)),
        crispness=float(crisp),
        cleanliness=float(clean),
        shape_fit=shape_fit,
        quality=float((crisp * clean * shape_fit) ** (1.0 / 3.0)),
    )
    return out


def _score_batch(images255: np.ndarray, specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(specs) != images255.shape[0]:
        raise ValueError(f"got {images255.shape[0]} images but {len(specs)} specs")
    analysis = _analyse(images255)
    return [
        _score_one(spec, objs, c, q)
        for spec, objs, c, q in zip(specs, analysis.objects, analysis.crispness, analysis.cleanliness)
    ]


def score_images(images: Any, specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Score a batch of images against one spec each. Returns one dict per image (see module doc)."""
    return _score_batch(to_hwc255(images), specs)


def score_image(image: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Score one image against its spec: ``correct``, per-attribute ``*_ok``, ``alignment``, ``quality`` ..."""
    arr = to_hwc255(image)
    if arr.shape[0] != 1:
        raise ValueError(f"score_image takes one image, got a batch of {arr.shape[0]}; use score_images")
    return _score_batch(arr, [spec])[0]
