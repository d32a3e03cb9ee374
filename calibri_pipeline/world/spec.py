"""The abstract request behind a world prompt (its *spec*), as a JSON-able dict.

Format (every key is required unless marked optional)::

    {
      "category": "spatial",                      # one of CATEGORIES
      "objects": [                                # object groups, in the order the prompt names them
        {"color": "red", "shape": "circle",       # colour and shape are always requested
         "size": "large",                         # optional: only the "size" category asks for it
         "count": 3},                             # optional (default 1): only "counting" uses > 1
        ...
      ],
      "relation": {"type": "left_of",             # only "spatial": subject <relation> object
                   "subject": 0, "object": 1}     # indices into "objects"
    }

There are no positions: a spec is realised by placing its objects at random (see ``scene.realize``).
"""

from __future__ import annotations

from typing import Any

from calibri_pipeline.world.vocab import CATEGORIES, COLORS, MAX_COUNT, MIN_COUNT, RELATIONS, SHAPES, SIZES

# How many object groups, and which optional attributes, each category has.
_GROUPS_PER_CATEGORY = {"single": 1, "color_binding": 2, "spatial": 2, "counting": 1, "size": 2, "multi": 3}


def validate_spec(spec: Any) -> dict[str, Any]:
    """Check a spec and return it with defaults filled in (``count`` = 1). Raises ``ValueError``."""
    if not isinstance(spec, dict):
        raise TypeError(f"a world spec must be a dict, got {type(spec).__name__}")
    category = spec.get("category")
    if category not in CATEGORIES:
        raise ValueError(f"spec category {category!r} is not one of {list(CATEGORIES)}")
    objects = spec.get("objects")
    if not isinstance(objects, list) or not objects:
        raise ValueError(f"spec 'objects' must be a non-empty list, got {objects!r}")
    want = _GROUPS_PER_CATEGORY[category]
    if len(objects) != want:
        raise ValueError(f"a {category!r} spec has {want} object group(s), got {len(objects)}")
    clean_objects = []
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise ValueError(f"spec objects[{i}] must be a dict, got {obj!r}")
        unknown = set(obj) - {"color", "shape", "size", "count"}
        if unknown:
            raise ValueError(f"spec objects[{i}] has unknown keys {sorted(unknown)}")
        if obj.get("color") not in COLORS:
            raise ValueError(f"spec objects[{i}] colour {obj.get('color')!r} is not one of {list(COLORS)}")
        if obj.get("shape") not in SHAPES:
            raise ValueError(f"spec objects[{i}] shape {obj.get('shape')!r} is not one of {list(SHAPES)}")
        if "size" in obj and obj["size"] not in SIZES:
            raise ValueError(f"spec objects[{i}] size {obj['size']!r} is not one of {list(SIZES)}")
        if category == "size" and "size" not in obj:
            raise ValueError(f"a 'size' spec needs a size on every object (objects[{i}] has none)")
        count = obj.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool):
            raise ValueError(f"spec objects[{i}] count must be an int, got {count!r}")
        low = MIN_COUNT if category == "counting" else 1
        high = MAX_COUNT if category == "counting" else 1
        if not low <= count <= high:
            raise ValueError(f"spec objects[{i}] count {count} is outside [{low}, {high}] for {category!r}")
        clean_objects.append({**obj, "count": count})
    out: dict[str, Any] = {"category": category, "objects": clean_objects}
    relation = spec.get("relation")
    if category == "spatial":
        if not isinstance(relation, dict) or relation.get("type") not in RELATIONS:
            raise ValueError(f"a 'spatial' spec needs relation.type in {list(RELATIONS)}, got {relation!r}")
        if {relation.get("subject"), relation.get("object")} != {0, 1}:
            raise ValueError(f"relation subject/object must be the indices 0 and 1, got {relation!r}")
        out["relation"] = {"type": relation["type"], "subject": relation["subject"], "object": relation["object"]}
    elif relation is not None:
        raise ValueError(f"only 'spatial' specs have a relation; {category!r} has {relation!r}")
    return out


def requested_instances(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per object the image must contain (groups expanded by ``count``), with a ``group`` index."""
    spec = validate_spec(spec)
    out = []
    for g, obj in enumerate(spec["objects"]):
        attrs = {k: v for k, v in obj.items() if k != "count"}
        out.extend({**attrs, "group": g} for _ in range(obj["count"]))
    return out


def object_key(obj: dict[str, Any]) -> tuple:
    """The attributes an object group is requested with, as a hashable tuple (size only if requested)."""
    return (obj["color"], obj["shape"], obj.get("size"))
