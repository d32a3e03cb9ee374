"""Rewriting the embedded world's prompts with an LLM, each rewrite checked back against its spec.

- :func:`rewrite_world_prompts`: the LLM (:class:`~calibri_pipeline.prompts.llm.PromptLLM`) rephrases
  grammar prompts of the embedded world; every rewrite is checked back against the prompt's spec by
  :func:`check_rewrite` (each colour, shape, size, count and relation named with the world's words, bound
  to the right object, and nothing else); rejected rewrites fall back to the grammar text. The acceptance
  rate is reported in a :class:`RewriteReport`.

Rewriting is deterministic for a given seed, outputs are de-duplicated, and every accepted rewrite records
``source = "llm:<model name>"``.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.prompts.llm import PromptLLM, clean_completion, text_tokens

# =====================================================================================================
# Checking a rewrite against its world spec
# =====================================================================================================


@dataclasses.dataclass(frozen=True)
class _Vocabulary:
    colors: dict[str, str]  # token -> canonical colour
    shapes: dict[str, tuple[str, bool]]  # token -> (canonical shape, plural)
    sizes: dict[str, str]  # token -> canonical size
    numbers: dict[str, int]  # token -> value
    prepositions: list[tuple[tuple[str, ...], str]]  # relation phrase tokens -> relation, longest first
    pair_phrases: list[tuple[tuple[str, ...], str, int]]  # ("on the left") -> (relation, side 0=subject/1=object)


# Words that name something the world cannot draw, or a count/colour/shape outside it: never allowed.
OTHER_COLOR_WORDS = frozenset(
    "orange pink brown white gray grey magenta teal indigo maroon navy lime olive beige silver gold crimson "
    "azure lavender tan khaki colorful colourful multicolored multicoloured rainbow pastel".split()
)
OTHER_SHAPE_WORDS = frozenset(
    "rectangle rectangles oval ovals ellipse ellipses star stars hexagon hexagons pentagon pentagons octagon "
    "octagons heart hearts cross crosses ring rings sphere spheres cube cubes pyramid pyramids cone cones "
    "cylinder cylinders polygon polygons dot dots ball balls line lines arrow arrows crescent crescents "
    "spiral spirals box boxes".split()
)
VAGUE_QUANTITY_WORDS = frozenset("several many few couple pair pairs multiple numerous dozen dozens some".split())
# The world draws separate objects at random places: containment, overlap or absolute positions are not in
# any spec, so a rewrite that adds them asks for something else.
PLACEMENT_WORDS = frozenset(
    "inside within filled containing contains contained surrounded surrounding overlapping overlaps around "
    "between center centre centered centred middle corner edge".split()
)
INDEFINITE_DETERMINERS = frozenset({"a", "an", "one", "another", "single"})
# A rewrite must describe the picture, not talk about the text.
META_WORDS = frozenset("sentence description original rewrite rewritten rephrased prompt phrase words word".split())
EXTRA_NUMBER_WORDS = {
    "zero": 0,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "single": 1,
}
DIRECTION_WORDS = frozenset("left right above over top below under beneath underneath bottom higher lower atop".split())
INVERSE_RELATION = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
# Common phrasings of the relations beyond the grammar's own (the LLM uses them).
EXTRA_RELATION_PHRASES = {
    "left_of": ["at the left of"],
    "right_of": ["at the right of"],
    "above": ["on top of", "atop"],
    "below": ["lower than"],
}
BINDING_WINDOW = 4  # an attribute word belongs to the nearest shape noun at most this many words away


def _world_vocabulary() -> _Vocabulary:
    from calibri_pipeline.world import COLORS, RELATIONS, SHAPES, SIZES
    from calibri_pipeline.world.grammar import (
        COLOR_WORDS,
        NUMBER_WORDS,
        RELATION_PAIRS,
        RELATION_WORDS,
        SHAPE_WORDS,
        SIZE_WORDS,
    )

    colors: dict[str, str] = {}
    for canonical in COLORS:
        for phrase in COLOR_WORDS.get(canonical, {canonical: 1}):
            colors[text_tokens(phrase)[-1]] = canonical  # "deep blue" -> the colour word is "blue"
    shapes: dict[str, tuple[str, bool]] = {}
    for canonical in SHAPES:
        for singular, plural in SHAPE_WORDS.get(canonical, {(canonical, canonical + "s"): 1}):
            shapes[singular] = (canonical, False)
            shapes[plural] = (canonical, True)
    sizes = {word: canonical for canonical in SIZES for word in SIZE_WORDS.get(canonical, {canonical: 1})}
    sizes.update({"huge": "large", "giant": "large"})
    numbers = {word: value for value, word in NUMBER_WORDS.items()} | EXTRA_NUMBER_WORDS
    prepositions: list[tuple[tuple[str, ...], str]] = []
    for relation in RELATIONS:
        phrases = list(RELATION_WORDS.get(relation, {})) + EXTRA_RELATION_PHRASES.get(relation, [])
        prepositions.extend((tuple(text_tokens(p)), relation) for p in phrases)
    prepositions.sort(key=lambda item: -len(item[0]))
    pairs = [
        (tuple(text_tokens(phrase)), relation, side)
        for relation, both in RELATION_PAIRS.items()
        for side, phrase in enumerate(both)
        if relation in ("left_of", "above")  # right_of/below pairs are the same phrases, mirrored
    ]
    return _Vocabulary(colors, shapes, sizes, numbers, prepositions, pairs)


@dataclasses.dataclass
class _ShapeMention:
    index: int
    shape: str
    plural: bool
    colors: set[str] = dataclasses.field(default_factory=set)
    sizes: set[str] = dataclasses.field(default_factory=set)
    numbers: set[int] = dataclasses.field(default_factory=set)
    start: int = -1  # first word of the noun phrase (its earliest bound attribute or the noun)

    def __post_init__(self) -> None:
        self.start = self.index


# "a circle in red", "squares, all purple", "a circle that is red": the attribute follows its noun
POSTPOSITIVE_CUES = frozenset({"in", "all", "is", "are"})
ARTICLES = frozenset({"a", "an", "the", "one"})


def _bind(index: int, tokens: list[str], mentions: list[_ShapeMention]) -> _ShapeMention | None:
    """The shape noun an attribute word at ``index`` describes.

    Adjectives precede their noun ("a big red circle"), so the nearest following noun within
    ``BINDING_WINDOW`` words wins, unless a cue just before the word ("in", "all", "is") says it follows
    its noun; either way the other direction is the fallback.
    """
    following = [m for m in mentions if 0 < m.index - index <= BINDING_WINDOW]
    preceding = [m for m in mentions if 0 < index - m.index <= BINDING_WINDOW]
    after = following[0] if following else None
    before = preceding[-1] if preceding else None
    previous = tokens[index - 1] if index >= 1 else ""
    before_previous = tokens[index - 2] if index >= 2 else ""
    # "in red", "in deep blue" -- but not "is a red circle", where an article opens a new noun phrase
    if previous in POSTPOSITIVE_CUES or (before_previous in POSTPOSITIVE_CUES and previous not in ARTICLES):
        return before or after
    return after or before


def _match_phrases(tokens: list[str], phrases: Iterable[tuple[tuple[str, ...], Any]]) -> list[tuple[int, int, Any]]:
    """Non-overlapping (start, end, payload) matches, longest phrase first at each position."""
    phrases = sorted(phrases, key=lambda item: -len(item[0]))
    found, i = [], 0
    while i < len(tokens):
        for words, payload in phrases:
            if tuple(tokens[i : i + len(words)]) == words:
                found.append((i, i + len(words), payload))
                i += len(words)
                break
        else:
            i += 1
    return found


def check_rewrite(text: str, spec: Mapping[str, Any], *, original: str | None = None) -> list[str]:
    """Problems that make ``text`` an unfaithful phrasing of the world ``spec`` (empty list = accepted).

    Accepted means: exactly the spec's colours, shapes and (if requested) sizes are named, each colour/size
    word sits next to (binds to) the right shape noun, counts are right (number words and singular/plural),
    spatial prompts state the relation (or its mirror image with the objects swapped) and non-spatial ones
    state none, and nothing else is named: no other colour, shape, number or quantity words. ``original``:
    reject a "rewrite" that only repeats it.
    """
    from calibri_pipeline.world import validate_spec

    spec = validate_spec(dict(spec))
    vocab = _world_vocabulary()
    tokens = text_tokens(text)
    if not tokens:
        return ["empty rewrite"]
    if len(tokens) > 40:
        return [f"too long ({len(tokens)} words)"]
    if original is not None and tokens == text_tokens(original):
        return ["unchanged: same words as the grammar prompt"]
    problems: list[str] = []
    objects = spec["objects"]
    n_groups = len(objects)

    # --- words that must not appear at all --------------------------------------------------------
    for i, tok in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok in ("black", "dark") and following in ("background", "backdrop"):
            continue  # the world's background is black; the grammar says so too
        if tok in OTHER_COLOR_WORDS or tok in ("black", "dark"):
            problems.append(f"colour word {tok!r} is not in the world/spec")
        elif tok in OTHER_SHAPE_WORDS:
            problems.append(f"shape word {tok!r} is not in the world")
        elif tok in VAGUE_QUANTITY_WORDS:
            problems.append(f"vague quantity {tok!r}")
        elif tok in META_WORDS:
            problems.append(f"talks about the text ({tok!r}) instead of the picture")
        elif tok in PLACEMENT_WORDS:
            problems.append(f"placement word {tok!r} asks for something no spec has")

    # --- mentions and binding ---------------------------------------------------------------------
    mentions = [_ShapeMention(i, *vocab.shapes[t]) for i, t in enumerate(tokens) if t in vocab.shapes]
    for i, tok in enumerate(tokens):
        if tok in vocab.colors or tok in vocab.sizes:
            kind, value = ("colour", vocab.colors[tok]) if tok in vocab.colors else ("size", vocab.sizes[tok])
            target = _bind(i, tokens, mentions)
            if target is None:
                problems.append(f"{kind} word {tok!r} is not next to a shape")
            else:
                (target.colors if kind == "colour" else target.sizes).add(value)
                target.start = min(target.start, i)
        elif tok.isdigit() or tok in vocab.numbers:
            value = int(tok) if tok.isdigit() else vocab.numbers[tok]
            later = [m for m in mentions if 0 < m.index - i <= BINDING_WINDOW]  # "three squares"
            target = later[0] if later else None
            if target is not None:
                target.numbers.add(value)
            allowed = {objects[0]["count"]} if spec["category"] == "counting" else {1, n_groups}
            if value not in allowed:
                problems.append(f"number {tok!r} is not what the spec asks for (allowed: {sorted(allowed)})")

    text_colors = {vocab.colors[t] for t in tokens if t in vocab.colors}
    text_shapes = {m.shape for m in mentions}
    text_sizes = {vocab.sizes[t] for t in tokens if t in vocab.sizes}
    want_colors = {o["color"] for o in objects}
    want_shapes = {o["shape"] for o in objects}
    want_sizes = {o["size"] for o in objects if "size" in o}
    for label, have, want in (
        ("colour", text_colors, want_colors),
        ("shape", text_shapes, want_shapes),
        ("size", text_sizes, want_sizes),
    ):
        if want - have:
            problems.append(f"missing {label}(s) {sorted(want - have)}")
        if have - want:
            problems.append(f"extra {label}(s) {sorted(have - want)}")

    def group_of(mention: _ShapeMention) -> int | None:
        for g, obj in enumerate(objects):
            if obj["shape"] == mention.shape and mention.colors == {obj["color"]}:
                if not mention.sizes or mention.sizes == {obj.get("size")}:
                    return g
        return None

    bound = [m for m in mentions if m.colors or m.sizes]
    for m in bound:
        if len(m.colors) > 1 or len(m.sizes) > 1:
            problems.append(f"one {m.shape} is given several colours/sizes {sorted(m.colors | m.sizes)}")
        elif group_of(m) is None:
            attrs = " ".join(sorted(m.sizes) + sorted(m.colors))
            problems.append(f"'{attrs} {m.shape}' is not an object of the spec")
    for g, obj in enumerate(objects):
        own = [m for m in bound if group_of(m) == g]
        if not own:
            attrs = " ".join(x for x in (obj.get("size"), obj["color"], obj["shape"]) if x)
            problems.append(f"'{attrs}' is not named with its colour{' and size' if 'size' in obj else ''}")
            continue
        if "size" in obj and not any(m.sizes for m in own):
            problems.append(f"the {obj['color']} {obj['shape']} lost its size")
        count = obj["count"]
        introduced = [m for m in own if m.start > 0 and tokens[m.start - 1] in INDEFINITE_DETERMINERS]
        if count == 1 and len(introduced) > 1:
            problems.append(f"'{obj['color']} {obj['shape']}' is introduced {len(introduced)} times (one object)")
        if count == 1 and any(m.plural for m in own):
            problems.append(f"'{obj['color']} {obj['shape']}' is one object but is written in the plural")
        if count > 1:
            if not any(m.plural for m in own):
                problems.append(f"{count} {obj['shape']}s are written in the singular")
            if not any(count in m.numbers for m in own):
                problems.append(f"the count {count} is not stated next to the {obj['shape']}s")

    problems.extend(_check_relation(tokens, spec, vocab, mentions, group_of))
    return problems


def _check_relation(tokens, spec, vocab: _Vocabulary, mentions, group_of) -> list[str]:
    # one pass, longest phrase first, so "on the left of" is a preposition and not the side phrase "on the left"
    matches = _match_phrases(
        tokens,
        [(words, ("prep", rel)) for words, rel in vocab.prepositions]
        + [(words, ("pair", rel, side)) for words, rel, side in vocab.pair_phrases],
    )
    preps = [(s, e, payload[1]) for s, e, payload in matches if payload[0] == "prep"]
    pairs = [(s, e, payload[1:]) for s, e, payload in matches if payload[0] == "pair"]
    covered = {i for start, end, _ in preps + pairs for i in range(start, end)}
    stray = [t for i, t in enumerate(tokens) if t in DIRECTION_WORDS and i not in covered]
    if spec["category"] != "spatial":
        found = [" ".join(tokens[s:e]) for s, e, _ in preps + pairs] + stray
        return [f"states a spatial relation {found} the spec does not ask for"] if found else []
    problems = [f"stray direction word {t!r}" for t in stray]
    rel = spec["relation"]
    wanted = {
        (rel["subject"], rel["type"], rel["object"]),
        (rel["object"], INVERSE_RELATION[rel["type"]], rel["subject"]),
    }
    bound = [m for m in mentions if m.colors]
    if preps and not pairs:
        if len(preps) > 1:
            return problems + [f"several relations {[' '.join(tokens[s:e]) for s, e, _ in preps]}"]
        start, end, relation = preps[0]
        after = [m for m in bound if end <= m.index <= end + BINDING_WINDOW]
        if not after or group_of(after[0]) is None:
            return problems + ["no object named right after the relation"]
        text_object = group_of(after[0])
        text_subject = 1 - text_object
        if (text_subject, relation, text_object) not in wanted:
            problems.append(f"relation is wrong: says object {text_subject} {relation} object {text_object}")
        return problems
    if pairs and not preps:
        sides: dict[int, tuple[str, int]] = {}
        for start, _, (relation, side) in pairs:
            before = [m for m in bound if start - BINDING_WINDOW <= m.index < start]
            if not before or group_of(before[-1]) is None:
                return problems + ["a side phrase ('on the left' ...) does not follow an object"]
            sides[group_of(before[-1])] = (relation, side)
        if len(sides) != 2 or {s for _, s in sides.values()} != {0, 1} or len({r for r, _ in sides.values()}) != 1:
            return problems + ["side phrases do not place both objects on opposite sides"]
        relation = next(iter(sides.values()))[0]
        first = next(g for g, (_, s) in sides.items() if s == 0)
        if (first, relation, 1 - first) not in wanted:
            problems.append(f"relation is wrong: says object {first} {relation} object {1 - first}")
        return problems
    if preps and pairs:
        return problems + ["mixes relation phrasings"]
    return problems + [f"relation {rel['type']!r} is not stated"]


# =====================================================================================================
# Rewriting world prompts
# =====================================================================================================

REWRITE_SYSTEM = (
    "You rewrite short descriptions of simple pictures of coloured shapes. Use different wording but keep exactly "
    "the same shapes, colours, sizes, numbers and positions. Add nothing else. Answer with the new description only."
)
REWRITE_EXAMPLES = (
    ("a green triangle to the left of a yellow diamond", "a green triangle placed to the left of a yellow diamond"),
    ("three purple squares", "a picture of three squares, all purple"),
    ("a large cyan circle and a small red diamond", "a small red diamond next to a large cyan circle"),
    ("a blue square", "an image showing one blue square"),
)


def rewrite_conversation(text: str) -> list[dict[str, str]]:
    """The chat the LLM sees: a system instruction, a few worked examples, then ``text``."""
    turns = [{"role": "system", "content": REWRITE_SYSTEM}]
    for before, after in REWRITE_EXAMPLES:
        turns += [{"role": "user", "content": f"Rewrite: {before}"}, {"role": "assistant", "content": after}]
    turns.append({"role": "user", "content": f"Rewrite: {text}"})
    return turns


@dataclasses.dataclass
class RewriteReport:
    """What happened to the rewrites.

    ``acceptance_rate`` = candidates that passed :func:`check_rewrite` / candidates generated;
    ``coverage`` = variant slots filled by an LLM rewrite / slots (the rest fell back to the grammar text).
    """

    n_prompts: int
    n_variants: int
    n_candidates: int
    n_accepted: int
    n_used: int
    rejections: Counter
    examples_rejected: list[tuple[str, str, list[str]]]

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_candidates if self.n_candidates else 0.0

    @property
    def n_slots(self) -> int:
        return self.n_prompts * self.n_variants

    @property
    def n_fallback(self) -> int:
        return self.n_slots - self.n_used

    @property
    def coverage(self) -> float:
        return self.n_used / self.n_slots if self.n_slots else 0.0

    def summary(self) -> str:
        common = ", ".join(f"{reason} ({n})" for reason, n in self.rejections.most_common(5))
        return (
            f"{self.n_accepted}/{self.n_candidates} LLM rewrites accepted ({100 * self.acceptance_rate:.1f} %); "
            f"{self.n_used}/{self.n_slots} variant slots of {self.n_prompts} prompts filled by the LLM, "
            f"{self.n_fallback} fell back to the grammar text" + (f"; top rejections: {common}" if common else "")
        )


def _reason_kind(problem: str) -> str:
    """Collapse a problem message to its kind, for counting: "extra colour(s) ['red']" -> "extra colours _"."""
    problem = problem.replace("(s)", "s")
    return re.sub(r"\s+", " ", re.sub(r"'[^']*'|\[[^\]]*\]|\([^)]*\)|\d+", "_", problem)).strip()


def rewrite_world_prompts(
    prompts: Sequence[Prompt],
    llm: PromptLLM,
    n_variants: int = 1,
    seed: int = 0,
    *,
    attempts: int = 1,
    max_new_tokens: int = 40,
    temperature: float = 0.5,
    progress: bool = False,
) -> tuple[list[Prompt], RewriteReport]:
    """Rewrite each world prompt into ``n_variants`` phrasings with ``llm``.

    ``attempts`` candidates are sampled per variant; the first ones that pass :func:`check_rewrite` (and
    differ from the grammar text and from each other) are kept, and a variant with no accepted candidate
    falls back to the grammar text. Returns the de-duplicated prompts — accepted rewrites carry
    ``source = "llm:<model>"``, the same spec/category and ``meta["rewritten_from"]``; fallbacks are the
    original prompts — and a :class:`RewriteReport`. (Temperature 0.5 gave the best acceptance for
    SmolLM2-135M among 0 (greedy), 0.5 and 0.8 on 24 test prompts.)
    """
    if n_variants < 1 or attempts < 1:
        raise ValueError(f"n_variants and attempts must be >= 1, got {n_variants} and {attempts}")
    for i, p in enumerate(prompts):
        if not isinstance(p, Prompt) or p.spec is None:
            raise ValueError(f"prompts[{i}] is not a world prompt with a spec: {p!r}")
    completions = llm.generate(
        [rewrite_conversation(p.text) for p in prompts],
        num_return_sequences=n_variants * attempts,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        seed=seed,
        progress=progress,
        progress_desc="rewriting world prompts",
    )
    out: list[Prompt] = []
    seen: set[str] = set()
    rejections: Counter = Counter()
    rejected_examples: list[tuple[str, str, list[str]]] = []
    n_accepted = n_used = 0
    for prompt, candidates in zip(prompts, completions):
        kept = 0
        for raw in candidates:
            candidate = clean_completion(raw)
            problems = check_rewrite(candidate, prompt.spec, original=prompt.text)
            if problems:
                rejections.update({_reason_kind(p) for p in problems})
                if len(rejected_examples) < 20:
                    rejected_examples.append((prompt.text, candidate, problems))
                continue
            n_accepted += 1
            if kept < n_variants and candidate not in seen:
                seen.add(candidate)
                kept += 1
                out.append(
                    dataclasses.replace(
                        prompt,
                        text=candidate,
                        source=llm.source,
                        meta={**prompt.meta, "rewritten_from": prompt.text, "seed": seed},
                    )
                )
        n_used += kept
        if kept < n_variants and prompt.text not in seen:
            seen.add(prompt.text)
            out.append(prompt)
    report = RewriteReport(
        n_prompts=len(prompts),
        n_variants=n_variants,
        n_candidates=len(prompts) * n_variants * attempts,
        n_accepted=n_accepted,
        n_used=n_used,
        rejections=rejections,
        examples_rejected=rejected_examples,
    )
    if progress:
        print(report.summary(), flush=True)
    return out, report
