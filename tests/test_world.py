"""The embedded world: vocabulary, grammar, specs, scene realisation, rendering, splits and grids."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import calibri_pipeline.world as world
from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.viz import image_grid, save_png
from calibri_pipeline.world.grammar import COLOR_WORDS, NUMBER_WORDS, RELATION_WORDS, SHAPE_WORDS, SIZE_WORDS
from calibri_pipeline.world.vocab import BORDER, MIN_GAP, RELATION_MARGIN


def _spec(category: str, seed: int = 0) -> dict:
    return world.sample_spec(np.random.default_rng(seed), category)


# ---------------------------------------------------------------- vocabulary


def test_vocabulary_contract():
    assert world.IMAGE_SIZE == 32
    assert {"single", "color_binding", "spatial", "counting"} <= set(world.CATEGORIES)
    assert len(world.CATEGORIES) >= 5
    assert len(world.COLORS) >= 6 and {"circle", "square", "triangle"} <= set(world.SHAPES)
    assert set(world.SIZES) == {"small", "large"}
    assert all(side % 2 == 1 for side in world.SIZES.values())  # odd: symmetric rasters
    palette = [np.asarray(world.BACKGROUND, float)] + [np.asarray(c, float) for c in world.COLORS.values()]
    closest = min(np.linalg.norm(a - b) for a, b in itertools.combinations(palette, 2))
    assert closest >= 150, f"palette colours too close to parse reliably: {closest:.0f}"


# ---------------------------------------------------------------- specs and prompts


@pytest.mark.parametrize("category", world.CATEGORIES)
def test_sample_prompt_per_category(category):
    rng = np.random.default_rng(1)
    for _ in range(30):
        prompt = world.sample_prompt(rng, category)
        assert isinstance(prompt, Prompt)
        assert prompt.category == category and prompt.spec["category"] == category
        assert prompt.source == "world-grammar" and prompt.split is None
        assert world.validate_spec(prompt.spec) == prompt.spec
        # JSON round trip of the spec and of the whole record keeps the id.
        assert json.loads(json.dumps(prompt.spec)) == prompt.spec
        again = Prompt.from_dict(json.loads(json.dumps(prompt.to_dict())))
        assert again == prompt and again.prompt_id == prompt.prompt_id
        assert "  " not in prompt.text and prompt.text == prompt.text.strip()


def test_sample_prompt_covers_categories_and_is_seeded():
    texts_a = [world.sample_prompt(np.random.default_rng(5)).text for _ in range(1)]
    texts_b = [world.sample_prompt(np.random.default_rng(5)).text for _ in range(1)]
    assert texts_a == texts_b
    rng = np.random.default_rng(0)
    seen = Counter(world.sample_prompt(rng).category for _ in range(600))
    assert set(seen) == set(world.CATEGORIES)
    assert min(seen.values()) > 600 / len(world.CATEGORIES) * 0.6


def test_spec_contents_per_category():
    rng = np.random.default_rng(2)
    counts = Counter()
    for _ in range(300):
        spec = world.sample_spec(rng, "counting")
        counts[spec["objects"][0]["count"]] += 1
    assert set(counts) == set(range(world.MIN_COUNT, world.MAX_COUNT + 1))
    for _ in range(50):
        cb = world.sample_spec(rng, "color_binding")
        assert cb["objects"][0]["color"] != cb["objects"][1]["color"]
        sp = world.sample_spec(rng, "spatial")
        assert sp["relation"]["type"] in world.RELATIONS
        a, b = sp["objects"]
        assert (a["color"], a["shape"]) != (b["color"], b["shape"])  # subject and object are tellable apart
        sz = world.sample_spec(rng, "size")
        assert all("size" in o for o in sz["objects"])
        assert len(world.sample_spec(rng, "multi")["objects"]) == 3
        assert all("size" not in o for o in world.sample_spec(rng, "single")["objects"])


def _words_of(table: dict) -> set[str]:
    out = set()
    for options in table.values():
        for word in options:
            out.update(word if isinstance(word, tuple) else (word,))
    return out


@pytest.mark.parametrize("category", world.CATEGORIES)
def test_grammar_variety_and_faithfulness(category):
    """Many distinct phrasings per spec, and each names every requested attribute."""
    spec = _spec(category, seed=3)
    rng = np.random.default_rng(0)
    texts = {world.phrase_spec(spec, rng) for _ in range(300)}
    minimum = {"single": 25, "counting": 25}.get(category, 60)
    assert len(texts) >= minimum, f"only {len(texts)} phrasings of {spec}"
    for text in texts:
        low = text.lower()
        for obj in spec["objects"]:
            assert any(re.search(rf"\b{w}\b", low) for w in COLOR_WORDS[obj["color"]]), (text, obj)
            nouns = [w for pair in SHAPE_WORDS[obj["shape"]] for w in pair]
            assert any(re.search(rf"\b{w}\b", low) for w in nouns), (text, obj)
            if "size" in obj:
                assert any(re.search(rf"\b{w}\b", low) for w in SIZE_WORDS[obj["size"]]), (text, obj)
        if category == "counting":
            n = spec["objects"][0]["count"]
            numerals = f"{NUMBER_WORDS[n]}|{n}" + ("|single" if n == 1 else "")
            assert re.search(rf"\b({numerals})\b", low), text
        if category == "spatial":
            rel = spec["relation"]["type"]
            pair_words = {"left_of": "left", "right_of": "right", "above": "top", "below": "bottom"}
            assert any(w in low for w in RELATION_WORDS[rel]) or pair_words[rel] in low, text


def test_grammar_numerals_words_and_digits():
    spec = {"category": "counting", "objects": [{"color": "red", "shape": "square", "count": 3}]}
    rng = np.random.default_rng(0)
    texts = [world.phrase_spec(spec, rng) for _ in range(200)]
    assert any(re.search(r"\bthree\b", t.lower()) for t in texts)
    assert any(re.search(r"\b3\b", t) for t in texts)
    assert any(t.lower().startswith("there are") for t in texts)
    assert not any(t.lower().startswith("there is") for t in texts)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"category": "nope", "objects": []}, "category"),
        ({"category": "single", "objects": [{"color": "pink", "shape": "circle"}]}, "colour"),
        ({"category": "single", "objects": [{"color": "red", "shape": "star"}]}, "shape"),
        ({"category": "single", "objects": [{"color": "red", "shape": "circle", "size": "huge"}]}, "size"),
        ({"category": "single", "objects": [{"color": "red", "shape": "circle", "count": 2}]}, "count"),
        ({"category": "counting", "objects": [{"color": "red", "shape": "circle", "count": 9}]}, "count"),
        ({"category": "single", "objects": [{"color": "red", "shape": "circle"}] * 2}, "group"),
        ({"category": "spatial", "objects": [{"color": "red", "shape": "circle"}] * 2}, "relation"),
        ({"category": "size", "objects": [{"color": "red", "shape": "circle"}] * 2}, "size"),
        ({"category": "single", "objects": [{"color": "red", "shape": "circle", "hue": 3}]}, "unknown keys"),
    ],
)
def test_validate_spec_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        world.validate_spec(bad)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="category"):
        world.sample_prompt(np.random.default_rng(0), "colour")
    with pytest.raises(TypeError, match="Generator"):
        world.sample_prompt(0)
    with pytest.raises(TypeError, match="dict"):
        world.validate_spec("a red circle")


# ---------------------------------------------------------------- scenes and rendering


@pytest.mark.parametrize("category", world.CATEGORIES)
def test_realize_satisfies_spec_without_overlap(category):
    rng = np.random.default_rng(4)
    for _ in range(60):
        spec = world.sample_spec(rng, category)
        scene = world.realize(spec, rng)
        requested = Counter((r["color"], r["shape"], r.get("size")) for r in world.requested_instances(spec))
        drawn = Counter((o.color, o.shape, o.size if category == "size" else None) for o in scene.objects)
        assert drawn == requested
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert x0 >= BORDER and y0 >= BORDER and x1 <= world.IMAGE_SIZE - BORDER and y1 <= world.IMAGE_SIZE - BORDER
            assert x0 == int(x0) and y0 == int(y0)  # integer-aligned boxes: exact rasters
        for a, b in itertools.combinations(scene.objects, 2):
            ax0, ay0, ax1, ay1 = a.box
            bx0, by0, bx1, by1 = b.box
            gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
            assert gap >= MIN_GAP
        if category == "counting":
            assert len({o.size for o in scene.objects}) == 1  # "N identical objects"
        if category == "spatial":
            rel = spec["relation"]
            s, o = scene.objects[rel["subject"]], scene.objects[rel["object"]]
            dx, dy = world.RELATIONS[rel["type"]]
            offx, offy = o.cx - s.cx, o.cy - s.cy
            assert offx * dx + offy * dy - abs(offx * dy - offy * dx) >= RELATION_MARGIN
            # Plain-language meaning (image y grows downwards): "A left of B" puts A at smaller x, etc.
            expected = {"left_of": s.cx < o.cx, "right_of": s.cx > o.cx, "above": s.cy < o.cy, "below": s.cy > o.cy}
            assert expected[rel["type"]]


def test_realize_is_seeded_and_varied():
    spec = _spec("multi")
    a = world.realize(spec, np.random.default_rng(9))
    b = world.realize(spec, np.random.default_rng(9))
    assert a == b
    layouts = {world.realize(spec, np.random.default_rng(s)).to_dict().__repr__() for s in range(20)}
    assert len(layouts) == 20
    assert world.Scene.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_render_is_exact():
    expected_area = {
        ("square", "small"): 49,
        ("square", "large"): 121,
        ("circle", "small"): 37,
        ("diamond", "small"): 25,
    }
    for (shape, size), area in expected_area.items():
        scene = world.Scene((world.SceneObject("red", shape, size, 10.5, 12.5),))
        img = world.render(scene)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert (img == world.COLORS["red"]).all(-1).sum() == area
        assert ((img == world.COLORS["red"]).all(-1) | (img == world.BACKGROUND).all(-1)).all()
    # Triangles point up: rows widen downwards. Scaling the canvas scales areas by its square.
    tri = world.Scene((world.SceneObject("blue", "triangle", "large", 16.5, 16.5),))
    rows = (world.render(tri) != 0).any(-1).sum(1)
    rows = rows[rows > 0]
    assert rows[0] == 1 and rows[-1] == 11 and (np.diff(rows) >= 0).all()
    assert (world.render(tri, size=64) != 0).any(-1).sum() == pytest.approx(4 * (rows.sum()), rel=0.1)


def test_render_only_palette_colours():
    rng = np.random.default_rng(0)
    allowed = np.asarray([world.BACKGROUND, *world.COLORS.values()])
    for _ in range(30):
        img = world.render(world.realize(world.sample_spec(rng, "multi"), rng)).reshape(-1, 3)
        assert (img[:, None, :] == allowed[None]).all(-1).any(-1).all()


def test_render_rejects_bad_input():
    with pytest.raises(TypeError, match="Scene"):
        world.render({"objects": []})
    with pytest.raises(ValueError, match="size"):
        world.render(world.Scene(()), size=4)
    with pytest.raises(ValueError, match="shape"):
        world.render(world.Scene((world.SceneObject("red", "star", "small", 10.5, 10.5),)))


# ---------------------------------------------------------------- splits


def test_make_splits_balanced_disjoint_reproducible():
    splits = world.make_splits(seed=11, n_train=240, n_val=60, n_test=61)
    assert {k: len(v) for k, v in splits.items()} == {"train": 240, "val": 60, "test": 61}
    for name, prompts in splits.items():
        assert all(p.split == name and p.spec is not None and p.source == "world-grammar" for p in prompts)
        per_cat = Counter(p.category for p in prompts)
        assert set(per_cat) == set(world.CATEGORIES)
        assert max(per_cat.values()) - min(per_cat.values()) <= 1
    texts = {name: [p.text for p in prompts] for name, prompts in splits.items()}
    for name in texts:
        assert len(set(texts[name])) == len(texts[name])  # no duplicates inside a split
    for a, b in itertools.combinations(texts, 2):
        assert not set(texts[a]) & set(texts[b]), f"{a} and {b} share prompt texts"
    again = world.make_splits(seed=11, n_train=240, n_val=60, n_test=61)
    assert [p.to_dict() for p in again["train"]] == [p.to_dict() for p in splits["train"]]
    other = world.make_splits(seed=12, n_train=240, n_val=60, n_test=61)
    assert [p.text for p in other["test"]] != texts["test"]
    # Held-out splits do not move when only the training set grows.
    bigger = world.make_splits(seed=11, n_train=480, n_val=60, n_test=61)
    assert [p.text for p in bigger["test"]] == texts["test"]
    assert [p.text for p in bigger["val"]] == texts["val"]


def test_make_splits_categories_and_errors():
    splits = world.make_splits(0, 20, 4, 4, categories=["spatial", "counting"])
    assert {p.category for ps in splits.values() for p in ps} == {"spatial", "counting"}
    with pytest.raises(ValueError, match="categories"):
        world.make_splits(0, 10, 0, 0, categories=["colour"])
    with pytest.raises(ValueError, match="n_val"):
        world.make_splits(0, 10, -1, 0)
    with pytest.raises(ValueError, match="distinct"):
        # A one-spec world cannot give 10,000 different texts; the error says so instead of looping.
        world.make_splits(0, 10_000, 0, 0, categories=["single"], max_attempts_per_prompt=2)


# ---------------------------------------------------------------- image grids


def test_image_grid_and_save_png(tmp_path):
    rng = np.random.default_rng(0)
    prompts = [world.sample_prompt(rng) for _ in range(5)]
    images = np.stack([world.render(world.realize(p.spec, rng)) for p in prompts]).transpose(0, 3, 1, 2) / 255.0
    grid = image_grid(images, [p.text for p in prompts], ncols=3, scale=4)
    assert isinstance(grid, Image.Image)
    assert grid.width >= 3 * 128 and grid.height >= 2 * 128
    arr = np.asarray(grid)
    # The first image is pasted exactly (nearest-neighbour upscaling) at the top-left cell.
    cell = arr[4 : 4 + 128, 4 : 4 + 128]
    assert (cell[::4, ::4] == (images[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)).all()
    # Caption text is drawn under it (dark pixels on the white caption band).
    assert (arr[4 + 128 : 4 + 128 + 30, 4 : 4 + 128] < 100).any()
    path = save_png(grid, tmp_path / "sub" / "grid.png")
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["grid.png"]
    assert Image.open(path).size == grid.size
    torch = pytest.importorskip("torch")
    assert image_grid(torch.from_numpy(images).float(), None, ncols=5, scale=2).size[1] < grid.size[1]
    with pytest.raises(ValueError, match="captions"):
        image_grid(images, ["one"], ncols=3)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        image_grid(images[0], None)
    with pytest.raises(TypeError, match="PIL"):
        save_png(images, tmp_path / "x.png")
