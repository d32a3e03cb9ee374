"""The exact scorer and the world rewards: validity on ground truth, noise, blanks, blur and edits.

Run with ``-s`` to see the validation table (per-category accuracy on ground-truth renders etc.).
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pytest
import torch

import calibri_pipeline.world as world
from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.rewards.base import Reward
from calibri_pipeline.rewards.world import WorldAccuracy, WorldAlignment, WorldQuality, WorldScore
from calibri_pipeline.world.validation import blur, ground_truth_batch, validate_scorer

PER_CATEGORY = 120


@pytest.fixture(scope="module")
def ground_truth():
    """Ground-truth renders of random prompts of every category: (images uint8 [N,H,W,3], prompts)."""
    return ground_truth_batch(PER_CATEGORY, seed=2024)


def _mean_by_category(results, key):
    groups = defaultdict(list)
    for r in results:
        groups[r["category"]].append(float(r[key]))
    return {c: float(np.mean(v)) for c, v in groups.items()}


def test_ground_truth_scores_correct(ground_truth):
    images, prompts = ground_truth
    results = world.score_images(images, [p.spec for p in prompts])
    accuracy = _mean_by_category(results, "correct")
    alignment = _mean_by_category(results, "alignment")
    quality = _mean_by_category(results, "quality")
    print("\ncategory        GT accuracy  GT alignment  GT quality")
    for c in world.CATEGORIES:
        print(f"{c:15s} {accuracy[c]:11.3f}  {alignment[c]:12.3f}  {quality[c]:10.3f}")
    for c in world.CATEGORIES:
        assert accuracy[c] >= 0.98, f"{c}: ground-truth accuracy {accuracy[c]:.3f}"
        assert alignment[c] >= 0.98, f"{c}: ground-truth alignment {alignment[c]:.3f}"
        assert quality[c] >= 0.98, f"{c}: ground-truth quality {quality[c]:.3f}"
    for r in results:
        for key in ("count_ok", "color_ok", "shape_ok", "binding_ok"):
            assert r[key] is True
        assert r.get("size_ok", True) and r.get("relation_ok", True)
        assert 0.0 <= r["alignment"] <= 1.0 and 0.0 <= r["quality"] <= 1.0


def test_noise_and_blank_score_near_zero(ground_truth):
    _, prompts = ground_truth
    specs = [p.spec for p in prompts]
    rng = np.random.default_rng(0)
    noise = rng.random((len(specs), 32, 32, 3)).astype(np.float32)
    gaussian = np.clip(0.5 + 0.5 * rng.standard_normal((len(specs), 3, 32, 32)), 0, 1).astype(np.float32)
    blank = np.zeros((len(specs), 32, 32, 3), dtype=np.uint8)
    grey = np.full((len(specs), 32, 32, 3), 0.5, dtype=np.float32)
    print()
    for name, imgs in (("uniform noise", noise), ("gaussian noise", gaussian), ("blank", blank), ("grey", grey)):
        res = world.score_images(imgs, specs)
        acc = np.mean([r["correct"] for r in res])
        align = np.mean([r["alignment"] for r in res])
        qual = np.mean([r["quality"] for r in res])
        print(f"{name:15s} accuracy {acc:.4f}  alignment {align:.4f}  quality {qual:.4f}")
        assert acc <= 0.01, name
        assert align <= 0.05, name
        assert qual <= 0.05, name


def test_alignment_prefers_the_right_spec(ground_truth):
    images, prompts = ground_truth
    specs = [p.spec for p in prompts]
    own = np.asarray([r["alignment"] for r in world.score_images(images, specs)])
    shifted = specs[1:] + specs[:1]  # neighbours share a category but differ in content
    other = np.asarray([r["alignment"] for r in world.score_images(images, shifted)])
    same = np.asarray([a == b for a, b in zip(specs, shifted)])
    print(f"\nalignment: own spec {own.mean():.3f}, another spec {other[~same].mean():.3f}")
    assert own.mean() - other[~same].mean() > 0.5
    assert (own[~same] > other[~same]).mean() >= 0.98


def test_quality_falls_monotonically_with_blur_and_noise(ground_truth):
    images, prompts = ground_truth
    subset = slice(0, None, 4)
    imgs, specs = images[subset], [p.spec for p in prompts][subset]
    print()
    blur_quality, blur_accuracy, blur_alignment = [], [], []
    for sigma in (0.0, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0):
        res = world.score_images(blur(imgs, sigma), specs)
        blur_quality.append(np.mean([r["quality"] for r in res]))
        blur_accuracy.append(np.mean([r["correct"] for r in res]))
        blur_alignment.append(np.mean([r["alignment"] for r in res]))
        print(
            f"gaussian blur sigma {sigma:3.1f}: quality {blur_quality[-1]:.3f}  "
            f"accuracy {blur_accuracy[-1]:.3f}  alignment {blur_alignment[-1]:.3f}"
        )
    assert blur_quality[0] >= 0.99
    assert all(a > b for a, b in zip(blur_quality, blur_quality[1:])), blur_quality
    assert blur_quality[3] < 0.8 and blur_quality[-1] < 0.2
    # The scorer reads blurred-but-recognisable shapes correctly: blur is a quality problem, not a
    # wrong answer; heavy blur (shapes dissolve into blobs) does break the answers.
    assert min(blur_accuracy[:5]) >= 0.95 and min(blur_alignment[:5]) >= 0.85
    assert blur_accuracy[-1] < 0.3 and blur_alignment[-1] < 0.5
    rng = np.random.default_rng(1)
    noise = rng.random(imgs.shape)
    mix_quality = []
    for t in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5):
        mixed = ((1 - t) * imgs / 255.0 + t * noise).astype(np.float32)
        res = world.score_images(mixed, specs)
        mix_quality.append(np.mean([r["quality"] for r in res]))
        print(f"noise mix {t:4.2f}: quality {mix_quality[-1]:.3f}")
    assert all(a > b for a, b in zip(mix_quality, mix_quality[1:])), mix_quality


def _scene(*objs) -> world.Scene:
    return world.Scene(tuple(world.SceneObject(*o) for o in objs))


def test_partial_credit_and_attribute_flags():
    spec = {
        "category": "multi",
        "objects": [
            {"color": "red", "shape": "circle"},
            {"color": "blue", "shape": "square"},
            {"color": "green", "shape": "triangle"},
        ],
    }
    full = _scene(
        ("red", "circle", "small", 6.5, 6.5),
        ("blue", "square", "large", 20.5, 8.5),
        ("green", "triangle", "small", 10.5, 24.5),
    )
    r_full = world.score_image(world.render(full), spec)
    assert r_full["correct"] and r_full["alignment"] > 0.98
    # One object missing: about two thirds of the alignment, count wrong.
    r_missing = world.score_image(world.render(world.Scene(full.objects[:2])), spec)
    assert not r_missing["correct"] and not r_missing["count_ok"]
    assert r_missing["alignment"] == pytest.approx(2 / 3 * r_full["alignment"], abs=0.02)
    # Wrong colour on one object: colour and binding flags fail, shapes still right.
    recoloured = _scene(
        ("red", "circle", "small", 6.5, 6.5),
        ("yellow", "square", "large", 20.5, 8.5),
        ("green", "triangle", "small", 10.5, 24.5),
    )
    r_colour = world.score_image(world.render(recoloured), spec)
    assert r_colour["shape_ok"] and r_colour["count_ok"] and not r_colour["color_ok"] and not r_colour["correct"]
    assert r_missing["alignment"] < r_colour["alignment"] < r_full["alignment"]
    # Wrong shape on one object.
    reshaped = _scene(
        ("red", "diamond", "small", 6.5, 6.5),
        ("blue", "square", "large", 20.5, 8.5),
        ("green", "triangle", "small", 10.5, 24.5),
    )
    r_shape = world.score_image(world.render(reshaped), spec)
    assert r_shape["color_ok"] and not r_shape["shape_ok"] and not r_shape["correct"]
    # An extra object costs as much as a missing one.
    extra = world.Scene(full.objects + (world.SceneObject("cyan", "circle", "small", 26.5, 26.5),))
    r_extra = world.score_image(world.render(extra), spec)
    assert not r_extra["correct"] and r_extra["alignment"] == pytest.approx(0.75 * r_full["alignment"], abs=0.02)
    # Swapped colours between two objects: counts of colours and shapes are right, the binding is not.
    swapped = _scene(
        ("blue", "circle", "small", 6.5, 6.5),
        ("red", "square", "large", 20.5, 8.5),
        ("green", "triangle", "small", 10.5, 24.5),
    )
    r_swap = world.score_image(world.render(swapped), spec)
    assert r_swap["color_ok"] and r_swap["shape_ok"] and not r_swap["binding_ok"] and not r_swap["correct"]


def test_counting_credit_follows_count_error():
    spec = {"category": "counting", "objects": [{"color": "purple", "shape": "square", "count": 4}]}
    spots = [(5.5, 5.5), (16.5, 5.5), (27.5, 5.5), (5.5, 18.5), (16.5, 18.5)]
    scores = []
    for n in range(6):
        scene = world.Scene(tuple(world.SceneObject("purple", "square", "small", x, y) for x, y in spots[:n]))
        r = world.score_image(world.render(scene), spec)
        assert r["correct"] == (n == 4) and r["count_error"] == n - 4
        scores.append(r["alignment"])
    assert scores[0] == 0.0 and scores[0] < scores[1] < scores[2] < scores[3] < scores[4]
    assert scores[5] < scores[4]


def test_merged_objects_are_not_counted_twice():
    spec = {"category": "counting", "objects": [{"color": "red", "shape": "square", "count": 2}]}
    touching = _scene(("red", "square", "small", 10.5, 10.5), ("red", "square", "small", 16.5, 10.5))
    r = world.score_image(world.render(touching), spec)
    assert r["n_detected"] == 1 and not r["correct"] and r["alignment"] < 0.5


def test_spatial_relation_and_margin():
    spec = {
        "category": "spatial",
        "objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}],
        "relation": {"type": "left_of", "subject": 0, "object": 1},
    }
    scores = {}
    for name, (x_red, x_blue) in {"right": (6.5, 24.5), "close": (13.5, 18.5), "wrong": (24.5, 6.5)}.items():
        scene = _scene(("red", "circle", "small", x_red, 16.5), ("blue", "square", "small", x_blue, 16.5))
        scores[name] = world.score_image(world.render(scene), spec)
    assert scores["right"]["correct"] and scores["right"]["relation_ok"]
    assert not scores["wrong"]["relation_ok"] and not scores["wrong"]["correct"]
    assert scores["wrong"]["binding_ok"]  # the objects are right, only the relation is not
    assert scores["wrong"]["alignment"] < scores["close"]["alignment"] <= scores["right"]["alignment"]
    # Diagonal placement where the other object is more below than right of: not "left of".
    diagonal = _scene(("red", "circle", "small", 8.5, 5.5), ("blue", "square", "small", 12.5, 24.5))
    assert not world.score_image(world.render(diagonal), spec)["relation_ok"]
    for relation, (dx, dy) in world.RELATIONS.items():
        s = dict(spec, relation={"type": relation, "subject": 0, "object": 1})
        scene = _scene(
            ("red", "circle", "small", 16.5 - 8 * dx, 16.5 - 8 * dy),
            ("blue", "square", "small", 16.5 + 8 * dx, 16.5 + 8 * dy),
        )
        assert world.score_image(world.render(scene), s)["correct"], relation


def test_size_attribute():
    spec = {
        "category": "size",
        "objects": [
            {"color": "red", "shape": "circle", "size": "large"},
            {"color": "blue", "shape": "square", "size": "small"},
        ],
    }
    good = _scene(("red", "circle", "large", 8.5, 8.5), ("blue", "square", "small", 24.5, 24.5))
    flipped = _scene(("red", "circle", "small", 8.5, 8.5), ("blue", "square", "large", 22.5, 22.5))
    r_good, r_flip = (world.score_image(world.render(s), spec) for s in (good, flipped))
    assert r_good["correct"] and r_good["size_ok"]
    assert r_flip["size_ok"] and not r_flip["binding_ok"] and not r_flip["correct"]
    assert r_flip["alignment"] < r_good["alignment"] - 0.2


def test_parse_image_reads_objects_back():
    scene = _scene(("yellow", "triangle", "large", 8.5, 9.5), ("cyan", "diamond", "small", 24.5, 24.5))
    objs = world.parse_image(world.render(scene))
    assert [(o.color, o.shape, o.size, o.cx, o.cy) for o in objs] == [
        ("yellow", "triangle", "large", 8.5, 9.5),
        ("cyan", "diamond", "small", 24.5, 24.5),
    ]
    assert objs[0].shape_ious["triangle"] == pytest.approx(1.0) and objs[0].color_distance == pytest.approx(0.0)
    # Same result at twice the resolution (coordinates stay in 32-pixel units).
    big = world.parse_image(world.render(scene, size=64))
    assert [(o.color, o.shape, o.size) for o in big] == [(o.color, o.shape, o.size) for o in objs]
    # (a triangle's apex is thinner than a pixel at 64 px, so its box may lose half a 32-px pixel)
    assert np.allclose([(o.cx, o.cy) for o in big], [(o.cx, o.cy) for o in objs], atol=0.5)


def test_input_formats_agree():
    rng = np.random.default_rng(3)
    prompt = world.sample_prompt(rng, "color_binding")
    img = world.render(world.realize(prompt.spec, rng))
    chw = img.transpose(2, 0, 1).astype(np.float32) / 255.0
    reference = world.score_image(img, prompt.spec)
    for variant in (chw, chw.transpose(1, 2, 0), torch.from_numpy(chw), torch.from_numpy(img)):
        assert world.score_image(variant, prompt.spec) == reference
    batch = world.score_images(torch.from_numpy(np.stack([chw, chw])), [prompt.spec] * 2)
    assert batch == [reference, reference]
    with pytest.raises(ValueError, match="channels"):
        world.score_image(np.zeros((32, 32, 4)), prompt.spec)
    with pytest.raises(ValueError, match="NaN"):
        world.score_image(np.full((3, 32, 32), np.nan, dtype=np.float32), prompt.spec)
    with pytest.raises(ValueError, match="specs"):
        world.score_images(np.stack([img, img]), [prompt.spec])
    with pytest.raises(ValueError, match="one image"):
        world.score_image(np.stack([img, img]), prompt.spec)
    with pytest.raises(TypeError, match="uint8 or float"):
        world.score_image(img.astype(np.int64), prompt.spec)


def test_scores_do_not_depend_on_the_batch(ground_truth):
    images, prompts = ground_truth
    n = 600  # more than one internal chunk
    specs = [p.spec for p in prompts][:n]
    noisy = np.clip(images[:n] / 255.0 + 0.1 * np.random.default_rng(0).standard_normal(images[:n].shape), 0, 1)
    together = world.score_images(noisy, specs)
    apart = [r for i in range(0, n, 50) for r in world.score_images(noisy[i : i + 50], specs[i : i + 50])]
    assert together == apart
    assert world.score_image(noisy[123], specs[123]) == together[123]


def test_scoring_is_fast(ground_truth):
    images, prompts = ground_truth
    reps = -(-1000 // len(prompts))
    imgs = np.concatenate([images] * reps)[:1000]
    specs = ([p.spec for p in prompts] * reps)[:1000]
    start = time.perf_counter()
    world.score_images(imgs, specs)
    elapsed = time.perf_counter() - start
    print(f"\nscored 1000 images in {elapsed:.2f} s")
    assert elapsed < 10.0  # ~1 s on an idle core; generous for a loaded CI machine


# ---------------------------------------------------------------- reward objects


def test_world_rewards(ground_truth):
    images, prompts = ground_truth
    idx = np.arange(0, len(prompts), 10)
    batch = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255.0
    batch_prompts = [prompts[i] for i in idx]
    # Mild blur costs quality (and so the score); only heavy blur breaks the answers.
    blurred = {
        sigma: torch.from_numpy(blur(images[idx], sigma)).permute(0, 3, 1, 2).float() / 255.0 for sigma in (1.0, 2.5)
    }
    rewards = [WorldAlignment(), WorldAccuracy(), WorldQuality(), WorldScore()]
    assert [r.name for r in rewards] == ["world_alignment", "world_accuracy", "world_quality", "world_score"]
    values = {}
    for reward in rewards:
        assert isinstance(reward, Reward) and reward.higher_is_better and reward.scale == (0.0, 1.0)
        scores = reward(batch, batch_prompts)
        assert scores.dtype == torch.float32 and scores.shape == (len(idx),)
        assert ((scores >= 0) & (scores <= 1)).all()
        values[reward.name] = scores
        sigma = 2.5 if reward.name in ("world_accuracy", "world_alignment") else 1.0
        assert reward(blurred[sigma], batch_prompts).mean() < scores.mean() - 0.1, reward.name
    assert set(values["world_accuracy"].unique().tolist()) == {1.0}
    expected = 0.7 * values["world_alignment"] + 0.3 * values["world_quality"]
    assert torch.allclose(values["world_score"], expected, atol=1e-6)
    custom = WorldScore(alignment_weight=1.0, quality_weight=0.0)(batch, batch_prompts)
    assert torch.allclose(custom, values["world_alignment"], atol=1e-6)


def test_world_rewards_reject_bad_input():
    reward = WorldScore()
    img = torch.zeros(2, 3, 32, 32)
    free_text = [Prompt("a red circle"), Prompt("a blue square")]
    with pytest.raises(ValueError, match="no spec"):
        reward(img, free_text)
    prompt = world.sample_prompt(np.random.default_rng(0))
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(img, [prompt])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        reward(torch.zeros(3, 32, 32), [prompt])
    with pytest.raises(ValueError, match="weight"):
        WorldScore(alignment_weight=-1.0)


def test_validation_report():
    report = validate_scorer(n_per_category=15, seed=5)
    assert report["n_images"] == 15 * len(world.CATEGORIES)
    assert set(report["ground_truth"]) == set(world.CATEGORIES)
    assert all(v["accuracy"] >= 0.98 for v in report["ground_truth"].values())
    assert report["uniform_noise"]["accuracy"] <= 0.02 and report["blank"]["accuracy"] == 0.0
    assert report["other_spec_alignment"] < 0.5
    blur_quality = [v["quality"] for v in report["blur"].values()]
    assert blur_quality == sorted(blur_quality, reverse=True)
