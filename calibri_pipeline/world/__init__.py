"""The embedded world: procedural compositional scenes, their prompts, and an exact scorer.

Images are 32x32 RGB: flat, non-overlapping shapes on a black background, every pixel exactly a
palette colour. Vocabulary:

- colours (6): red, green, blue, yellow, purple, cyan (pairwise >= 150 apart in RGB);
- shapes (4): circle, square, triangle (apex up), diamond;
- sizes (2): small (7 px box) and large (11 px box); objects keep >= 2 px apart and 1 px from the border.

Prompt categories (T2I-CompBench++-like), each a structured *spec* plus a grammar phrasing of it:

- ``single``: one object, colour + shape ("a red circle");
- ``color_binding``: two objects of different colours, each with its shape ("a blue square and a
  yellow triangle");
- ``spatial``: two objects and a relation left of / right of / above / below ("a green diamond to
  the left of a cyan circle"); the object must lie further along the relation's axis than across it;
- ``counting``: 1 to 5 identical objects ("three purple squares", "4 red discs");
- ``size``: two objects with size + colour + shape ("a large red circle and a small blue square");
- ``multi``: three objects, colour + shape each.

The grammar varies synonyms (scarlet, violet, turquoise, disc, block, rhombus, big, little, ...),
determiners, numerals as words or digits, noun-phrase order ("a circle in red") and frames ("a photo
of ...", "there are ...", "... on a dark background"). Splits are seeded and disjoint by text.

The scorer parses an image back into objects (each pixel read as a background/palette-colour mix,
objects = 8-connected pixels at least half one colour; shape = the template with the best soft IoU
against the object's coverage; size from the fitted box's extent; centre = box centre) and scores it
against the spec:

- ``correct``: exactly the requested objects, each with its requested attributes (and the relation
  for spatial prompts); plus ``count_ok``, ``color_ok``, ``shape_ok``, ``size_ok``, ``binding_ok``,
  ``relation_ok`` where they apply;
- ``alignment`` in [0, 1]: soft partial credit that an optimiser can climb (colour distance, shape
  IoU, extent; missing, extra and merged objects cost; relation margin for spatial prompts);
- ``quality`` in [0, 1]: crisp palette colours, no stray ink off the objects, and clean geometric
  shapes (it falls with blur, noise and smearing, as at very low step counts).
"""

from calibri_pipeline.world.grammar import SOURCE, phrase_spec, sample_prompt, sample_spec
from calibri_pipeline.world.scene import Scene, SceneObject, realize, render, shape_mask
from calibri_pipeline.world.scorer import (
    DetectedObject,
    parse_image,
    parse_images,
    score_image,
    score_images,
    to_hwc255,
)
from calibri_pipeline.world.spec import requested_instances, validate_spec
from calibri_pipeline.world.splits import make_splits
from calibri_pipeline.world.vocab import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    MAX_COUNT,
    MIN_COUNT,
    RELATIONS,
    SHAPES,
    SIZES,
)

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "COLORS",
    "DetectedObject",
    "IMAGE_SIZE",
    "MAX_COUNT",
    "MIN_COUNT",
    "Prompt",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SOURCE",
    "Scene",
    "SceneObject",
    "make_splits",
    "parse_image",
    "parse_images",
    "phrase_spec",
    "realize",
    "render",
    "requested_instances",
    "sample_prompt",
    "sample_spec",
    "score_image",
    "score_images",
    "shape_mask",
    "to_hwc255",
    "validate_spec",
]

from calibri_pipeline.prompts.base import Prompt  # noqa: E402  (re-exported for convenience)
