"""A small generative grammar: random specs per category, and varied English phrasings of a spec.

Phrasing variety comes from synonyms (colours, shapes, sizes, relations), determiners ("a", "one"),
numerals as words or digits, several noun-phrase orders ("a red circle", "a circle in red") and
sentence frames ("a photo of ...", "there are ...", "... on a dark background"). The spec keeps the
canonical request, so every phrasing of one spec is scored the same way.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.world.spec import object_key, validate_spec
from calibri_pipeline.world.vocab import CATEGORIES, COLORS, MAX_COUNT, MIN_COUNT, RELATIONS, SHAPES, SIZES

SOURCE = "world-grammar"

# word -> weight. The canonical word is the most likely one.
COLOR_WORDS: dict[str, dict[str, float]] = {
    "red": {"red": 4, "scarlet": 1},
    "green": {"green": 4, "emerald": 1},
    "blue": {"blue": 4, "deep blue": 1},
    "yellow": {"yellow": 4, "golden": 1},
    "purple": {"purple": 4, "violet": 1},
    "cyan": {"cyan": 4, "turquoise": 1, "aqua": 1},
}
# (singular, plural) -> weight
SHAPE_WORDS: dict[str, dict[tuple[str, str], float]] = {
    "circle": {("circle", "circles"): 5, ("disc", "discs"): 1, ("disk", "disks"): 1},
    "square": {("square", "squares"): 5, ("block", "blocks"): 1},
    "triangle": {("triangle", "triangles"): 1},
    "diamond": {("diamond", "diamonds"): 4, ("rhombus", "rhombuses"): 1},
}
SIZE_WORDS: dict[str, dict[str, float]] = {
    "small": {"small": 3, "little": 2, "tiny": 1},
    "large": {"large": 3, "big": 3},
}
RELATION_WORDS: dict[str, dict[str, float]] = {
    "left_of": {"to the left of": 4, "left of": 2, "on the left of": 1, "on the left side of": 1},
    "right_of": {"to the right of": 4, "right of": 2, "on the right of": 1, "on the right side of": 1},
    "above": {"above": 4, "over": 1, "higher than": 1},
    "below": {"below": 4, "under": 2, "beneath": 1, "underneath": 1},
}
# "A on the left and B on the right" style phrasings of each relation (A is the subject).
RELATION_PAIRS: dict[str, tuple[str, str]] = {
    "left_of": ("on the left", "on the right"),
    "right_of": ("on the right", "on the left"),
    "above": ("at the top", "at the bottom"),
    "below": ("at the bottom", "at the top"),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def _choice(rng: np.random.Generator, options: Sequence[Any] | dict[Any, float]) -> Any:
    if isinstance(options, dict):
        keys = list(options)
        weights = np.asarray([options[k] for k in keys], dtype=float)
        return keys[rng.choice(len(keys), p=weights / weights.sum())]
    return options[rng.integers(len(options))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_DETERMINERS = {"A": 5, "one": 1}  # "A" stands for the right indefinite article


def _noun_phrase(obj: dict[str, Any], rng: np.random.Generator, dets: dict[str, float] = _DETERMINERS) -> str:
    """'a red circle', 'one large blue square', 'a triangle in green', 'a yellow-colored disc' ..."""
    color = _choice(rng, COLOR_WORDS[obj["color"]])
    noun = _choice(rng, SHAPE_WORDS[obj["shape"]])[0]
    size = _choice(rng, SIZE_WORDS[obj["size"]]) if obj.get("size") else None
    form = _choice(rng, {"adj": 6, "in": 1, "colored": 1})
    if form == "adj":
        words = f"{size} {color} {noun}" if size else f"{color} {noun}"
    elif form == "in":
        words = f"{size} {noun} in {color}" if size else f"{noun} in {color}"
    else:
        words = f"{size} {color}-colored {noun}" if size else f"{color}-colored {noun}"
    det = _choice(rng, dets)
    return f"{_article(words) if det == 'A' else det} {words}"


def _frame(body: str, plural: bool, rng: np.random.Generator) -> str:
    """Wrap a noun-phrase body in a sentence frame."""
    frame = _choice(
        rng,
        {
            "{}": 6,
            "a photo of {}": 2,
            "an image of {}": 2,
            "a picture of {}": 1,
            "a drawing of {}": 1,
            "a simple render of {}": 1,
            "THERE {}": 2,
            "{} on a black background": 1,
            "{} on a dark background": 1,
            "draw {}": 1,
            "show {}": 1,
        },
    )
    if frame == "THERE {}":
        frame = "there are {}" if plural else "there is {}"
    text = frame.format(body)
    if rng.random() < 0.15:  # sentence case with a full stop: free variety for the tokenizer
        text = text[0].upper() + text[1:] + "."
    return text


def _count_phrase(obj: dict[str, Any], rng: np.random.Generator) -> tuple[str, bool]:
    count = obj["count"]
    color = _choice(rng, COLOR_WORDS[obj["color"]])
    singular, plural_noun = _choice(rng, SHAPE_WORDS[obj["shape"]])
    if count == 1:
        numeral = _choice(rng, {"one": 3, "1": 1, "a single": 2, "exactly one": 1, "just one": 1})
        noun = singular
    else:
        word = NUMBER_WORDS[count] if rng.random() < 0.6 else str(count)
        numeral = _choice(rng, {word: 5, f"exactly {word}": 1})
        noun = plural_noun
    form = _choice(rng, {"adj": 5, "in": 1, "all": 1 if count > 1 else 0, "identical": 1 if count > 1 else 0})
    if form == "adj":
        body = f"{numeral} {color} {noun}"
    elif form == "in":
        body = f"{numeral} {noun} in {color}"
    elif form == "all":
        body = f"{numeral} {noun}, all {color}"
    else:
        body = f"{numeral} identical {color} {noun}"
    return body, count > 1


def phrase_spec(spec: dict[str, Any], rng: np.random.Generator) -> str:
    """One random English phrasing of ``spec``."""
    spec = validate_spec(spec)
    category, objs = spec["category"], spec["objects"]
    if category == "single":
        body = _noun_phrase(objs[0], rng, {"A": 8, "one": 1, "a single": 1, "just one": 1, "only one": 1})
        return _frame(body, False, rng)
    if category == "counting":
        body, plural = _count_phrase(objs[0], rng)
        return _frame(body, plural, rng)
    if category in ("color_binding", "size"):
        a, b = (_noun_phrase(o, rng) for o in objs)
        join = _choice(
            rng,
            {
                "{} and {}": 6,
                "{} next to {}": 2,
                "{} together with {}": 1,
                "{} with {}": 1,
                "{} beside {}": 1,
                "{} as well as {}": 1,
                "two shapes: {} and {}": 1,
            },
        )
        # "there is a red circle and a blue square", but "there are two shapes: ..."
        return _frame(join.format(a, b), join.startswith("two"), rng)
    if category == "multi":
        a, b, c = (_noun_phrase(o, rng) for o in objs)
        join = _choice(
            rng,
            {
                "{}, {} and {}": 5,
                "{}, {}, and {}": 2,
                "three shapes: {}, {} and {}": 1,
                "{} next to {} and {}": 1,
                "{}, {} as well as {}": 1,
            },
        )
        return _frame(join.format(a, b, c), join.startswith("three"), rng)
    if category == "spatial":
        rel = spec["relation"]
        subject = _noun_phrase(objs[rel["subject"]], rng, {"A": 1})
        other = _noun_phrase(objs[rel["object"]], rng, {"A": 1})
        if rng.random() < 0.15:
            left, right = RELATION_PAIRS[rel["type"]]
            return _frame(f"{subject} {left} and {other} {right}", False, rng)
        words = _choice(rng, RELATION_WORDS[rel["type"]])
        verb = _choice(rng, {"": 5, "placed ": 1, "positioned ": 1, "sitting ": 1})
        body = f"{subject} {verb}{words} {other}"
        if rng.random() < 0.2:  # a full sentence rather than a noun phrase
            return f"{subject} is {words} {other}"
        return _frame(body, False, rng)
    raise AssertionError(category)  # validate_spec guarantees a known category


def _distinct_objects(rng: np.random.Generator, n: int, with_size: bool) -> list[dict[str, Any]]:
    """``n`` object groups with pairwise different (colour, shape[, size])."""
    while True:
        objs = []
        for _ in range(n):
            obj = {"color": _choice(rng, list(COLORS)), "shape": _choice(rng, list(SHAPES))}
            if with_size:
                obj["size"] = _choice(rng, list(SIZES))
            objs.append(obj)
        if len({object_key(o) for o in objs}) == n:
            return objs


def sample_spec(rng: np.random.Generator, category: str) -> dict[str, Any]:
    """A random spec of ``category``."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; allowed: {list(CATEGORIES)}")
    if category == "single":
        objs = _distinct_objects(rng, 1, False)
    elif category == "color_binding":
        # Two different colours (a binding test needs them); the shapes may coincide.
        while True:
            objs = _distinct_objects(rng, 2, False)
            if objs[0]["color"] != objs[1]["color"]:
                break
    elif category == "spatial":
        objs = _distinct_objects(rng, 2, False)
    elif category == "counting":
        objs = _distinct_objects(rng, 1, False)
        objs[0]["count"] = int(rng.integers(MIN_COUNT, MAX_COUNT + 1))
    elif category == "size":
        objs = _distinct_objects(rng, 2, True)
    else:  # multi
        objs = _distinct_objects(rng, 3, False)
    spec: dict[str, Any] = {"category": category, "objects": objs}
    if category == "spatial":
        spec["relation"] = {"type": _choice(rng, list(RELATIONS)), "subject": 0, "object": 1}
    return validate_spec(spec)


def sample_prompt(rng: np.random.Generator, category: str | None = None) -> Prompt:
    """A random world prompt (uniform over categories when ``category`` is None)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    if category is None:
        category = _choice(rng, list(CATEGORIES))
    spec = sample_spec(rng, category)
    return Prompt(text=phrase_spec(spec, rng), spec=spec, category=category, source=SOURCE)
