"""Whole-population evaluation on a tiny random-init toy backbone (the real FluxTransformer2DModel class,
the real MiniLM text encoder, the real sampler), and calibrate() end to end on it."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import pytest
import torch

from calibri_pipeline.method.calibrate import CalibrationOptions, RewardObjective, calibrate
from calibri_pipeline.method.ensemble import EnsembleLayout
from calibri_pipeline.method.population import (
    LocalEvaluator,
    SamplingSettings,
    estimate_image_memory_mb,
    evaluate_population,
    evaluate_population_loop,
    max_batch_for_budget,
)
from calibri_pipeline.method.search_config import SearchConfig
from calibri_pipeline.method.seeds import make_bucket, validation_seeds
from calibri_pipeline.method.space import CalibrationSpace, SearchSpace
from calibri_pipeline.method.state_store import MemoryStateStore
from calibri_pipeline.prompts.base import Prompt

#: images are quantised to 8 bits before they are scored, so a ~1e-7 difference between batch
#: compositions (other kernels) can flip one pixel's rounding: 1/255 over an 8x8 image moves a
#: mean-abs score by ~2e-5. Comparisons across batch shapes allow a few such steps.
SCORE_ATOL = 1e-4

WORDS = ["red", "green", "blue", "yellow", "cube", "ball", "star", "ring", "small", "big", "left", "right"]


class ColourMatch:
    """A simple exact reward: 1 - mean |image - the colour the prompt's hash picks| (higher is better)."""

    name = "colour_match"
    higher_is_better = True
    scale = (0.0, 1.0)

    def target(self, prompt: Prompt) -> torch.Tensor:
        h = hashlib.sha1(prompt.text.encode()).digest()
        return torch.tensor([h[0], h[1], h[2]], dtype=torch.float32) / 255.0

    def __call__(self, images, prompts):
        targets = torch.stack([self.target(p) for p in prompts])[:, :, None, None]
        return 1.0 - (images - targets).abs().mean(dim=(1, 2, 3))


class Contrast:
    """Pixel standard deviation, as a penalty (lower is better)."""

    name = "contrast"
    higher_is_better = False
    scale = (0.0, 0.5)

    def __call__(self, images, prompts):
        return images.flatten(1).std(dim=1)


def make_prompts(n: int, split: str, offset: int = 0) -> list[Prompt]:
    rng = np.random.default_rng(offset)
    return [Prompt(" ".join(rng.choice(WORDS, size=3)) + f" #{offset + i}", split=split) for i in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the tiny model's ops are too small to split: on a shared 2-core machine a second thread only
    # waits at barriers (measured 4x slower under load)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder():
    from calibri_pipeline.text_encoder import MiniLMTextEncoder

    return MiniLMTextEncoder(max_length=8)


@pytest.fixture(scope="module")
def backbone(encoder):
    from calibri_pipeline.backbones.toy import ToyBackbone

    from tiny_models import tiny_toy_transformer

    config, transformer = tiny_toy_transformer(2, gain=3.0)
    return ToyBackbone(transformer, config, encoder, default_steps=3, default_guidance=2.5)


def random_vectors(space: CalibrationSpace, n_models: int, p: int, guidance: float, seed: int = 0) -> torch.Tensor:
    layout = EnsembleLayout(space.size, n_models, cfg=True)
    x0 = layout.initial(guidance if layout.mode == "cfg" else None)
    g = torch.Generator().manual_seed(seed)
    return (x0 + 0.3 * torch.randn(p, x0.numel(), generator=g, dtype=torch.float64)).to(torch.float32)


@pytest.mark.parametrize("granularity,n_models,max_batch", [("block", 1, 4), ("gate", 2, 5), ("layer", 1, None)])
def test_batched_population_equals_per_candidate_loop(backbone, granularity, n_models, max_batch):
    space = CalibrationSpace.from_transformer(backbone.transformer, granularity)
    vectors = random_vectors(space, n_models, 5, 2.5)
    prompts = make_prompts(3, "train")
    seeds = [11, 12, 13]
    kw = dict(steps=2, guidance=2.5, n_models=n_models, max_batch=max_batch)
    batched = evaluate_population(backbone, space, vectors, prompts, seeds, ColourMatch(), **kw)
    loop = evaluate_population_loop(backbone, space, vectors, prompts, seeds, ColourMatch(), **kw)
    assert batched.shape == loop.shape == (5, 3)
    torch.testing.assert_close(batched, loop, atol=SCORE_ATOL, rtol=0)
    # candidates really differ (the test would be vacuous otherwise)
    assert batched.std(dim=0).min() > 1e-3


def test_x0_reproduces_the_unmodified_model(backbone):
    prompts, seeds = make_prompts(3, "val", 50), [1, 2, 3]
    space = CalibrationSpace.from_transformer(backbone.transformer, "gate")
    base = evaluate_population(backbone, None, None, prompts, seeds, ColourMatch(), steps=2, guidance=2.5)
    assert base.shape == (1, 3)
    for n_models in (1, 2):  # guided single model (w = 1) and the CFG ensemble (g, 1 - g)
        x0 = EnsembleLayout(space.size, n_models, cfg=True).initial(2.5)
        ours = evaluate_population(
            backbone, space, x0, prompts, seeds, ColourMatch(), steps=2, guidance=2.5, n_models=n_models
        )
        torch.testing.assert_close(ours, base, atol=1e-5, rtol=0)


def test_multiple_rewards_chunking_and_memory_budget(backbone):
    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    vectors = random_vectors(space, 1, 4, 2.5, seed=3)
    prompts, seeds = make_prompts(3, "train", 7), [5, 6, 7]
    rewards = [ColourMatch(), Contrast()]
    ref = evaluate_population(backbone, space, vectors, prompts, seeds, rewards, steps=2, guidance=2.5)
    assert set(ref) == {"colour_match", "contrast"} and ref["contrast"].shape == (4, 3)

    per_image = estimate_image_memory_mb(backbone, space, prompts[0], n_models=1, guidance=2.5)
    assert per_image > 0
    budget = 5.5 * per_image
    assert max_batch_for_budget(budget, per_image) == 5
    batch_sizes = []
    handle = backbone.transformer.register_forward_pre_hook(
        lambda m, a, kw: batch_sizes.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        budgeted = evaluate_population(
            backbone,
            space,
            vectors,
            prompts,
            seeds,
            rewards,
            steps=2,
            guidance=2.5,
            memory_budget_mb=budget,
            chunk_images=7,
        )
    finally:
        handle.remove()
    # 12 images in chunks of 7 + 5, forwards of <= 5 images (x2 passes for CFG)
    assert max(batch_sizes) == 10 and sorted(set(batch_sizes)) == [4, 10]
    for name in ref:
        torch.testing.assert_close(budgeted[name], ref[name], atol=SCORE_ATOL, rtol=0)


def test_bad_inputs_are_rejected(backbone):
    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    prompts = make_prompts(2, "train")
    with pytest.raises(ValueError, match=r"shape \[P, 5\]"):
        evaluate_population(backbone, space, torch.ones(3, 7), prompts, [1, 2], ColourMatch())
    with pytest.raises(ValueError, match="one seed per prompt"):
        evaluate_population(backbone, space, torch.ones(1, 5), prompts, [1], ColourMatch())
    with pytest.raises(ValueError, match="CalibrationSpace"):
        evaluate_population(backbone, None, torch.ones(1, 5), prompts, [1, 2], ColourMatch())
    with pytest.raises(ValueError, match="reward names must be unique"):
        evaluate_population(backbone, space, torch.ones(1, 5), prompts, [1, 2], [ColourMatch(), ColourMatch()])
    with pytest.raises(ValueError, match="max_batch"):
        evaluate_population(backbone, space, torch.ones(1, 5), prompts, [1, 2], ColourMatch(), max_batch=0)


def test_reward_objective_combines_rewards_with_signs(backbone):
    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    train, val = make_prompts(6, "train"), make_prompts(2, "val", 100)
    search = SearchSpace.for_model(space, 1, uses_cfg=True)

    def evaluator(rewards):
        return LocalEvaluator(backbone, search, rewards, SamplingSettings(steps=2, guidance=2.5))

    with pytest.raises(ValueError, match="reward_weights"):
        RewardObjective(evaluator([ColourMatch(), Contrast()]), train, val, val_seeds=[1, 2])
    with pytest.raises(ValueError, match="unknown rewards"):
        RewardObjective(evaluator([ColourMatch()]), train, val, reward_weights={"hps": 1.0}, val_seeds=[1, 2])
    obj = RewardObjective(
        evaluator([ColourMatch(), Contrast()]),
        train,
        val,
        reward_weights={"colour_match": 1.0, "contrast": 0.5},
        val_seeds=[1, 2],
    )
    vectors = random_vectors(space, 1, 3, 2.5).numpy().astype(np.float64)
    bucket = make_bucket(0, 0, 6, 4)
    scores = obj.train(vectors, bucket)
    expected = scores.components["colour_match"] - 0.5 * scores.components["contrast"]
    np.testing.assert_allclose(scores.fitness, expected, rtol=0, atol=1e-12)
    direct = evaluate_population(
        backbone,
        space,
        vectors,
        [train[i] for i in bucket.item_indices],
        bucket.seeds,
        ColourMatch(),
        steps=2,
        guidance=2.5,
    )
    np.testing.assert_allclose(scores.components["colour_match"], direct.double().mean(1).numpy(), atol=1e-6)


def test_calibrate_cfg_ensemble_end_to_end(backbone):
    space = CalibrationSpace.from_transformer(backbone.transformer, "gate")
    train, val = make_prompts(12, "train"), make_prompts(4, "val", 200)
    seen = []
    cfg = SearchConfig(max_generations=4, bucket_size=4, popsize=6, val_every=2, seed=1)
    result = calibrate(
        backbone,
        SearchSpace.for_model(space, 2, uses_cfg=True),
        train,
        val,
        ColourMatch(),
        SamplingSettings(steps=2, guidance=2.5, max_batch=64),
        CalibrationOptions(config=cfg, on_generation=seen.append),
    )
    layout = EnsembleLayout(space.size, 2, cfg=True)
    assert layout.search_size == space.search_size(2) == result.vector.size
    assert result.layout.mode == "cfg"
    x0 = result.search.x0
    np.testing.assert_array_equal(x0, np.r_[np.ones(2 * space.size), 2.5, -1.5])
    np.testing.assert_array_equal(result.search.candidates[0]["vector"], x0)
    # the baseline validation (x0) is exactly standard CFG at the pipeline's guidance
    base = evaluate_population(backbone, None, None, val, validation_seeds(1, 4), ColourMatch(), steps=2, guidance=2.5)
    assert result.baseline_val_score == pytest.approx(float(base.double().mean()), abs=1e-6)
    assert result.coefficients.shape == (2, space.size) and result.weights.shape == (2,)
    assert result.val_score >= result.baseline_val_score
    assert len(seen) == result.search.n_generations == 4
    lower, upper = layout.bounds()
    all_x = np.array([c["vector"] for c in result.search.candidates])
    assert np.all(all_x >= lower) and np.all(all_x <= upper)
    assert result.search.names == layout.names(space.names)
    summary = result.to_dict()
    assert summary["ensemble_mode"] == "cfg" and len(summary["names"]) == space.size


def test_calibrate_warm_start_and_resume_after_a_crash(backbone):
    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    train, val = make_prompts(8, "train"), make_prompts(3, "val", 300)
    cfg = SearchConfig(max_generations=5, bucket_size=4, popsize=4, val_every=2, seed=2, patience=None)
    warm = np.array([1.1, 0.9, 1.0, 1.2])
    search = SearchSpace.for_model(space, 1, uses_cfg=True)
    sampling = SamplingSettings(steps=2, guidance=2.5, max_batch=64)
    options = CalibrationOptions(config=cfg, warm_start=warm)
    reference = calibrate(backbone, search, train, val, ColourMatch(), sampling, options)
    np.testing.assert_array_equal(reference.search.x0, np.r_[warm, 1.0])

    class Crash(RuntimeError):
        pass

    def crash_at_three(row):
        if row["generation"] == 2:
            raise Crash("simulated crash")

    store = MemoryStateStore()
    with pytest.raises(Crash):
        crashing = options.with_(store=store, on_generation=crash_at_three)
        calibrate(backbone, search, train, val, ColourMatch(), sampling, crashing)
    resumed = calibrate(backbone, search, train, val, ColourMatch(), sampling, options.with_(store=store))
    assert resumed.search.replayed_generations == 3
    np.testing.assert_array_equal(resumed.vector, reference.vector)
    assert resumed.search.validations == reference.search.validations
    with pytest.raises(ValueError, match="warm_start must have 5 entries"):
        calibrate(backbone, search, train, val, ColourMatch(), sampling, options.with_(warm_start=[1.0, 1.0]))


def test_the_schedule_shift_is_a_sampling_setting_with_its_own_images(backbone):
    """A shift other than the backbone's changes the images and their cache key; the default shift
    keeps today's key, and the shift-tuned alternative is the best (shift, guidance) cell of its grid."""
    from calibri_pipeline.method.alternatives import tune_shift
    from calibri_pipeline.method.population import LocalEvaluator
    from calibri_pipeline.method.sampler import SamplingSettings

    prompts, seeds = make_prompts(3, "val", 70), [1, 2, 3]
    plain = LocalEvaluator(backbone, None, [ColourMatch()], SamplingSettings(steps=2))
    assert plain.sampling.shift == backbone.sigma_shift() == 1.0
    same = plain.with_sampling(shift=1.0)
    shifted = plain.with_sampling(shift=3.0)
    base, again, moved = (ev(None, prompts, seeds, keep_images=True) for ev in (plain, same, shifted))
    assert base.keys == again.keys and torch.equal(base.images, again.images)  # the same computation replayed
    assert not set(base.keys[0]) & set(moved.keys[0])
    assert (base.images - moved.images).abs().max() > 1e-2  # the schedule really changed
    # the sampler's own loop at that shift is what the evaluator made (8-bit images: 1/255 apart at most)
    direct = backbone.sample([p.text for p in prompts], seeds, SamplingSettings(steps=2, guidance=2.5, shift=3.0))
    torch.testing.assert_close(moved.images, direct, atol=1 / 255 + 1e-6, rtol=0)
    with pytest.raises(ValueError, match="shift must be"):
        SamplingSettings(shift=0.0)

    tuned = tune_shift(plain, prompts, [1], shifts=(1.0, 3.0), guidances=(1.5, 2.5))  # cells: prompts x seed 1
    grid = tuned.table.sort(["mean", "label"], descending=[True, False])
    assert tuned.table.height == 4 and set(tuned.table["shift"].to_list()) == {1.0, 3.0}
    assert tuned.label == grid["label"][0] and tuned.val_mean == pytest.approx(grid["mean"][0])
    assert tuned.params["shift"] == tuned.setting.shift and tuned.to_dict()["shift"] == tuned.setting.shift
    # its (3, 2.5) cell is the shifted evaluator's score on the same cells
    cell = tuned.table.filter((pl.col("shift") == 3.0) & (pl.col("guidance") == 2.5))
    expected = shifted(None, prompts, [1, 1, 1]).scores["colour_match"].mean()
    assert cell["mean"].item() == pytest.approx(float(expected), abs=1e-9)
    with pytest.raises(ValueError, match="shifts must be > 0"):
        tune_shift(plain, prompts, seeds, shifts=(0.0,), guidances=(2.5,))


def test_a_guidance_schedule_is_a_point_of_the_time_dependent_cfg_layout(backbone):
    """One guidance per part of the schedule: a constant one is bitwise the unmodified model (one cache
    entry), another one differs only where its part runs, and the tuner returns its grid's best."""
    from calibri_pipeline.method.alternatives import guidance_schedule_vector, tune_guidance_schedule
    from calibri_pipeline.method.population import LocalEvaluator
    from calibri_pipeline.method.sampler import SamplingSettings

    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    search = SearchSpace.for_model(space, 2, uses_cfg=True, segments=(0.9,))
    prompts, seeds = make_prompts(2, "val", 90), [4, 5]
    plain = LocalEvaluator(backbone, search, [ColourMatch()], SamplingSettings(steps=2, guidance=2.5))
    constant = guidance_schedule_vector(search, [2.5, 2.5])
    torch.testing.assert_close(constant, search.x0(2.5))
    base = plain(None, prompts, seeds, keep_images=True)
    same = plain(constant[None], prompts, seeds, keep_images=True)
    assert same.keys == base.keys and torch.equal(same.images, base.images)
    # guidance 1 in the first step: the unmodified model at guidance 1 for that step, 2.5 for the second
    first = plain(guidance_schedule_vector(search, [1.0, 2.5])[None], prompts, seeds, keep_images=True)
    assert (first.images - base.images).abs().max() > 1e-2
    with pytest.raises(ValueError, match="2 parts"):
        guidance_schedule_vector(search, [1.0, 2.0, 3.0])

    tuned = tune_guidance_schedule(plain, search, prompts, [4], around=2.5, offsets=(-1.5, 0.0))
    assert tuned.table.height == 4 and tuned.params["guidances"] in ([1.0, 1.0], [1.0, 2.5], [2.5, 1.0], [2.5, 2.5])
    grid = tuned.table.sort(["mean", "label"], descending=[True, False])
    assert tuned.label == grid["label"][0] and tuned.val_mean >= float(
        tuned.table.filter(pl.col("label") == "schedule 2.5 / 2.5")["mean"].item()
    )
    torch.testing.assert_close(tuned.setting.vector, guidance_schedule_vector(search, tuned.params["guidances"]))


def test_a_raced_grid_scores_only_the_leaders_on_every_cell(backbone):
    """Every setting on the first seed's cells, the best quarter (at least 3) and the reference on all of
    them; the first seed's images of the survivors come from the cache, and the choice is among the
    settings scored on every cell (the same as scoring those alone)."""
    from calibri_pipeline.method.alternatives import race_survivors, tune_shift
    from calibri_pipeline.method.population import LocalEvaluator, MemoryImageCache
    from calibri_pipeline.method.sampler import SamplingSettings

    assert [race_survivors(n) for n in (3, 9, 12, 13, 24)] == [3, 3, 3, 4, 6]
    prompts, seeds = make_prompts(3, "val", 110), [6, 7]
    cache = MemoryImageCache()
    plain = LocalEvaluator(backbone, None, [ColourMatch()], SamplingSettings(steps=2), cache=cache)
    tuned = tune_shift(plain, prompts, seeds, shifts=(1.0, 2.0, 3.0), guidances=(1.0, 1.5, 2.0, 3.0))
    t = tuned.table
    full = t.filter(pl.col("n_cells") == 6)
    # 3 shifts x 4 guidances and the model's own pair (shift 1, guidance 2.5), the reference
    assert t.height == 13 and set(t.filter(pl.col("n_cells") == 3)["label"]) | set(full["label"]) == set(t["label"])
    # the 4 leaders of 13 and the reference (unless it leads)
    assert full.height in (4, 5) and "shift 1 guidance 2.5" in full["label"].to_list()
    # 13 settings on 3 cells, then the survivors on 3 more: the cache served their first-seed images
    assert cache.misses == 13 * 3 + full.height * 3 and cache.hits == full.height * 3
    best = full.sort(["mean", "label"], descending=[True, False]).row(0, named=True)
    assert tuned.label == best["label"] and tuned.val_mean == pytest.approx(best["mean"])
    # a first-round leader's full row equals scoring it alone on every cell (8-bit images, same cells)
    alone = plain.with_sampling(shift=tuned.setting.shift, guidance=tuned.setting.guidance)
    cell_seeds = [s for _ in prompts for s in seeds]
    expected = alone(None, [p for p in prompts for _ in seeds], cell_seeds).scores["colour_match"].mean()
    assert tuned.val_mean == pytest.approx(float(expected), abs=1e-9)
    # without a cache (or with one seed) there is one round: every setting on every cell
    one_round = tune_shift(
        LocalEvaluator(backbone, None, [ColourMatch()], SamplingSettings(steps=2)),
        prompts,
        seeds,
        shifts=(1.0, 2.0, 3.0),
        guidances=(1.0, 1.5, 2.0, 3.0),
    )
    assert set(one_round.table["n_cells"]) == {6}
