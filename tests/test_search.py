"""CMA-ES search logic on analytic objectives (no model): x0 injection, bounds, buckets, validation
selection, stopping rules, records, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibri_pipeline.method.objective import PopulationScores
from calibri_pipeline.method.search import CalibrationRun
from calibri_pipeline.method.search_config import SearchConfig, default_popsize
from calibri_pipeline.method.seeds import Bucket, make_bucket, validation_seeds
from calibri_pipeline.method.state_store import MemoryStateStore


class QuadraticObjective:
    """fitness = -mean over the bucket of ||x - (target + item offset + seed noise)||^2.

    Deterministic in (vectors, bucket); records every call so tests can inspect what the search did.
    """

    def __init__(self, target, n_items: int = 40, val_target=None, noise: float = 0.05):
        self.target = np.asarray(target, dtype=np.float64)
        self.val_target = self.target if val_target is None else np.asarray(val_target, dtype=np.float64)
        self.n_train_items = n_items
        self.noise = noise
        offsets = np.random.default_rng(123).normal(size=(n_items, self.target.size))
        self.offsets = 0.1 * offsets
        self.train_calls: list[tuple[np.ndarray, Bucket]] = []
        self.val_calls: list[np.ndarray] = []

    def _item_target(self, item: int, seed: int) -> np.ndarray:
        jitter = np.random.default_rng(seed).normal(size=self.target.size) * self.noise
        return self.target + self.offsets[item] + jitter

    def train(self, vectors, bucket):
        self.train_calls.append((np.array(vectors), bucket))
        targets = np.stack([self._item_target(i, s) for i, s in zip(bucket.item_indices, bucket.seeds)])
        dist = ((vectors[:, None, :] - targets[None]) ** 2).sum(-1)  # [P, B]
        return PopulationScores(-dist.mean(1), {"dist": dist.mean(1)})

    def validate(self, vectors):
        self.val_calls.append(np.array(vectors))
        return PopulationScores(-((vectors - self.val_target) ** 2).sum(-1))

    def describe(self):
        return {"kind": "quadratic", "target": self.target.tolist(), "val_target": self.val_target.tolist()}


def box(d, lo=-1.0, hi=2.0):
    return [lo] * d, [hi] * d


def run_search(objective, x0, config, **kwargs):
    lower, upper = kwargs.pop("bounds", box(len(x0)))
    return CalibrationRun(objective, x0, lower, upper, config, **kwargs).run()


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d,expected", [(1, 4), (7, 9), (57, 16), (114, 18), (216, 20), (482, 22)])
def test_default_popsize_is_pycma_rule(d, expected):
    assert default_popsize(d) == expected == 4 + math.floor(3 * math.log(d))


def test_popsize_default_and_override():
    obj = QuadraticObjective([0.5] * 8)
    res = run_search(obj, [1.0] * 8, SearchConfig(max_generations=2, bucket_size=4))
    assert res.popsize == default_popsize(8)
    assert all(calls[0].shape == (default_popsize(8), 8) for calls in obj.train_calls)
    obj = QuadraticObjective([0.5] * 8)
    res = run_search(obj, [1.0] * 8, SearchConfig(max_generations=2, bucket_size=4, popsize=5))
    assert res.popsize == 5 and obj.train_calls[0][0].shape == (5, 8)


@pytest.mark.parametrize(
    "x0",
    [
        [1.0] * 6,  # all-ones coefficients
        [1.0, 1.0, 1.0, 1.0, 4.5, -3.5],  # CFG ensemble x0: (g, 1 - g)
        [2.0, -1.0, 1.9, 0.0, 10.0, -10.0],  # a warm start sitting on the bounds
    ],
)
def test_x0_is_the_first_candidate_of_generation_zero(x0):
    lower = [-1.0] * 4 + [-10.0] * 2
    upper = [2.0] * 4 + [10.0] * 2
    obj = QuadraticObjective([0.3] * 6)
    res = run_search(obj, x0, SearchConfig(max_generations=2, bucket_size=4), bounds=(lower, upper))
    first_population = obj.train_calls[0][0]
    np.testing.assert_allclose(first_population[0], x0, rtol=0, atol=1e-12)
    # only generation 0 carries it; the rest of generation 0 is sampled around it
    assert not np.allclose(first_population[1], x0)
    assert res.candidates[0]["injected_x0"] and not res.candidates[1]["injected_x0"]
    # generation 0's validation is x0 itself: the baseline score
    np.testing.assert_array_equal(obj.val_calls[0][0], np.asarray(x0))
    assert res.validations[0]["source"] == "x0" and res.validations[0]["generation"] == 0
    assert res.baseline_val_score == pytest.approx(-((np.asarray(x0) - 0.3) ** 2).sum())


def test_candidates_respect_per_coordinate_bounds():
    # the optimum lies far outside the box: CMA-ES pushes against the bounds, never past them
    d = 6
    lower = [-1.0] * 4 + [-10.0] * 2
    upper = [2.0] * 4 + [10.0] * 2
    obj = QuadraticObjective([5.0] * 4 + [20.0, -20.0], noise=0.0)
    res = run_search(
        obj,
        [1.0] * d,
        SearchConfig(max_generations=25, bucket_size=4, patience=None, sigma0=1.0),
        bounds=(lower, upper),
    )
    all_x = np.concatenate([calls[0] for calls in obj.train_calls])
    assert np.all(all_x >= np.array(lower)) and np.all(all_x <= np.array(upper))
    assert all_x[:, :4].max() > 1.95  # it did reach the upper coefficient bound
    assert np.all(res.vector >= np.array(lower)) and np.all(res.vector <= np.array(upper))


def test_common_random_numbers_and_bucket_schedule():
    obj = QuadraticObjective([0.5] * 5, n_items=20)
    cfg = SearchConfig(max_generations=6, bucket_size=8, seeds_per_prompt=2, seed=3, patience=None)
    res = run_search(obj, [1.0] * 5, cfg)
    buckets = [b for _, b in obj.train_calls]
    # one objective call per generation: every candidate sees the same items and noise seeds
    assert [b.generation for b in buckets] == list(range(6))
    for b in buckets:
        assert len(b.item_indices) == len(b.seeds) == 16
        assert b.item_indices[0::2] == b.item_indices[1::2]  # two seeds per prompt
        assert len(set(b.seeds)) == 16
    assert len({b.seeds for b in buckets}) == 6  # fresh noise each generation
    # the schedule is a pure function of (seed, generation): what a resumed run recomputes
    for b in buckets:
        assert make_bucket(3, b.generation, 20, 8, 2) == b
    # epochs: the first 20 prompts drawn are a permutation of all 20 training prompts
    drawn = [i for b in buckets for i in b.item_indices[0::2]]
    assert sorted(drawn[:20]) == list(range(20))
    assert [g["bucket_seeds"] for g in res.generations] == [list(b.seeds) for b in buckets]
    assert make_bucket(4, 0, 20, 8).item_indices != make_bucket(3, 0, 20, 8).item_indices


def test_validation_seeds_are_fixed_per_run_seed():
    assert validation_seeds(0, 5) == validation_seeds(0, 5)
    assert validation_seeds(0, 5) != validation_seeds(1, 5)
    assert len(validation_seeds(2, 4, seeds_per_prompt=3)) == 12


def test_result_is_best_by_validation_not_by_train():
    # training pulls towards 1.8 everywhere; validation prefers 1.2: the returned vector must be the
    # validated vector with the best validation score, which is not the best training candidate
    d = 4
    obj = QuadraticObjective([1.8] * d, val_target=[1.2] * d, noise=0.0)
    cfg = SearchConfig(max_generations=30, bucket_size=4, val_every=2, patience=None, sigma_plateau_window=None)
    res = run_search(obj, [1.0] * d, cfg)
    val_scores = [v["score"] for v in res.validations]
    best = int(np.argmax(val_scores))
    assert res.val_score == max(val_scores)
    np.testing.assert_array_equal(res.vector, np.array(res.validations[best]["vector"]))
    assert res.best_generation == res.validations[best]["generation"]
    # the final training optimum (near 1.8) validates worse than the selected vector
    final_mean = np.array(res.validations[-1]["vector"])
    assert np.abs(final_mean - 1.8).max() < 0.2
    assert res.val_score > res.validations[-1]["score"]
    best_train = max(res.candidates, key=lambda c: c["fitness"])
    assert not np.allclose(best_train["vector"], res.vector)
    # validations happen at generation 0, every val_every generations and at the last one
    assert [v["generation"] for v in res.validations] == list(range(0, 30, 2)) + [29]


def test_baseline_is_returned_when_nothing_beats_it():
    d = 3
    obj = QuadraticObjective([1.9] * d, val_target=[1.0] * d, noise=0.0)  # x0 is the validation optimum
    res = run_search(obj, [1.0] * d, SearchConfig(max_generations=6, bucket_size=4, val_every=1, patience=None))
    np.testing.assert_array_equal(res.vector, np.ones(d))
    assert res.best_generation == 0 and not res.improved
    assert res.val_score == res.baseline_val_score == 0.0


def test_validate_best_train_candidate_option():
    obj = QuadraticObjective([0.5] * 3, noise=0.0)
    res = run_search(
        obj, [1.0] * 3, SearchConfig(max_generations=4, bucket_size=4, val_every=1, validate="best", patience=None)
    )
    for v in res.validations[1:]:
        g = v["generation"]
        fits = [c["fitness"] for c in res.candidates if c["generation"] == g]
        top = [c for c in res.candidates if c["generation"] == g][int(np.argmax(fits))]
        assert v["source"] == "best"
        np.testing.assert_array_equal(v["vector"], top["vector"])


def test_stops_on_max_generations():
    obj = QuadraticObjective([0.5] * 3)
    res = run_search(obj, [1.0] * 3, SearchConfig(max_generations=7, bucket_size=4, patience=None))
    assert res.n_generations == 7 and res.stop_reason == "max_generations"


def test_stops_when_validation_stops_improving():
    d = 3
    obj = QuadraticObjective([1.9] * d, val_target=[1.0] * d, noise=0.0)  # no validation gain ever
    res = run_search(obj, [1.0] * d, SearchConfig(max_generations=100, bucket_size=4, val_every=3, patience=2))
    assert res.stop_reason == "no_val_gain"
    # baseline at 0, then validations at 3 and 6 without gain -> stop after generation 6
    assert [v["generation"] for v in res.validations] == [0, 3, 6]
    assert res.n_generations == 7


def test_stops_on_sigma_plateau():
    obj = QuadraticObjective([0.5] * 3)
    # a huge tolerance makes every window a plateau: stop as soon as the window is full
    res = run_search(
        obj,
        [1.0] * 3,
        SearchConfig(max_generations=100, bucket_size=4, patience=None, sigma_plateau_window=4, sigma_plateau_tol=1e9),
    )
    assert res.stop_reason == "sigma_plateau" and res.n_generations == 5
    # a zero tolerance never triggers
    res = run_search(
        obj,
        [1.0] * 3,
        SearchConfig(max_generations=12, bucket_size=4, patience=None, sigma_plateau_window=4, sigma_plateau_tol=0.0),
    )
    assert res.stop_reason == "max_generations"
    # the final generation is validated whatever stopped the run
    assert res.validations[-1]["generation"] == 11


def test_converges_on_a_quadratic_and_records_everything():
    d = 5
    target = np.array([0.2, 1.5, -0.5, 0.9, 1.1])
    obj = QuadraticObjective(target, noise=0.01)
    seen = []
    cfg = SearchConfig(max_generations=60, bucket_size=4, val_every=5, patience=None, sigma_plateau_window=None)
    res = run_search(obj, np.ones(d), cfg, on_generation=seen.append)
    assert np.abs(res.vector - target).max() < 0.15  # fitness is maximised (rewards are negated for pycma)
    assert res.val_score > res.baseline_val_score + 1.0
    assert len(seen) == res.n_generations == 60
    assert {"generation", "sigma", "train_mean", "train_best", "val_score"} <= set(seen[0])
    assert [g["generation"] for g in res.generations] == list(range(60))
    assert len(res.candidates) == 60 * res.popsize
    assert all(len(c["vector"]) == d for c in res.candidates)
    assert "train/dist" in res.candidates[0]
    gens = res.generations_frame()
    cands = res.candidates_frame()
    assert gens.height == 60 and cands.height == 60 * res.popsize
    assert cands.filter(cands["generation"] == 0)["fitness"].max() == pytest.approx(res.generations[0]["train_best"])
    assert res.generations[-1]["sigma"] < 0.25  # the distribution contracted from sigma0 (None: the paper's 0.25)


def test_same_seed_same_result_and_global_numpy_rng_is_isolated():
    class NoisyNeighbour(QuadraticObjective):
        def train(self, vectors, bucket):
            np.random.seed(999)  # code that reseeds/consumes NumPy's global RNG must not change the search
            np.random.rand(int(np.random.randint(1, 50)))
            return super().train(vectors, bucket)

    cfg = SearchConfig(max_generations=8, bucket_size=4, seed=5, patience=None)
    a = run_search(QuadraticObjective([0.4] * 4), [1.0] * 4, cfg)
    np.random.seed(1)
    b = run_search(NoisyNeighbour([0.4] * 4), [1.0] * 4, cfg)
    assert [c["vector"] for c in a.candidates] == [c["vector"] for c in b.candidates]
    state = np.random.get_state()
    run_search(QuadraticObjective([0.4] * 4), [1.0] * 4, SearchConfig(max_generations=2, bucket_size=4))
    assert np.array_equal(np.random.get_state()[1], state[1])  # and the search leaves the caller's RNG alone
    c = run_search(
        QuadraticObjective([0.4] * 4), [1.0] * 4, SearchConfig(max_generations=8, bucket_size=4, seed=6, patience=None)
    )
    assert [x["vector"] for x in a.candidates[4:]] != [x["vector"] for x in c.candidates[4:]]


def test_a_stored_finished_run_is_returned_without_recomputing():
    store = MemoryStateStore()
    cfg = SearchConfig(max_generations=5, bucket_size=4, patience=None)
    first = run_search(QuadraticObjective([0.4] * 4), [1.0] * 4, cfg, store=store)
    obj = QuadraticObjective([0.4] * 4)
    again = run_search(obj, [1.0] * 4, cfg, store=store)
    assert obj.train_calls == [] and obj.val_calls == []
    assert again.replayed_generations == 5
    np.testing.assert_array_equal(first.vector, again.vector)
    assert first.generations == again.generations and first.validations == again.validations


def test_resuming_with_different_settings_is_refused():
    store = MemoryStateStore()
    run_search(QuadraticObjective([0.4] * 4), [1.0] * 4, SearchConfig(max_generations=2, bucket_size=4), store=store)
    with pytest.raises(ValueError, match="different settings.*config.sigma0"):
        run_search(
            QuadraticObjective([0.4] * 4),
            [1.0] * 4,
            SearchConfig(max_generations=2, bucket_size=4, sigma0=0.3),
            store=store,
        )
    with pytest.raises(ValueError, match="objective.target"):
        run_search(
            QuadraticObjective([0.5] * 4), [1.0] * 4, SearchConfig(max_generations=2, bucket_size=4), store=store
        )
    # resume=False starts over and overwrites
    res = run_search(
        QuadraticObjective([0.5] * 4),
        [1.0] * 4,
        SearchConfig(max_generations=2, bucket_size=4),
        store=store,
        resume=False,
    )
    assert res.replayed_generations == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sigma0": 0}, "sigma0"),
        ({"popsize": 1}, "popsize"),
        ({"max_generations": 0}, "max_generations"),
        ({"bucket_size": 2.5}, "bucket_size"),
        ({"validate": "median"}, "validate"),
        ({"coefficient_bounds": (2.0, -1.0)}, "coefficient_bounds"),
        ({"seed": -1}, "seed"),
        ({"patience": 0}, "patience"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**kwargs)


def test_config_round_trips_through_dict():
    cfg = SearchConfig(popsize=7, coefficient_bounds=(-0.5, 1.5), patience=None)
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown SearchConfig fields"):
        SearchConfig.from_dict({"sigma": 0.1})


def test_bad_run_inputs_are_rejected():
    obj = QuadraticObjective([0.4] * 3, n_items=10)
    with pytest.raises(ValueError, match="outside the bounds"):
        CalibrationRun(obj, [1.0, 3.0, 1.0], *box(3))
    with pytest.raises(ValueError, match="bounds must have 3"):
        CalibrationRun(obj, [1.0] * 3, [-1.0] * 2, [2.0] * 2)
    with pytest.raises(ValueError, match="bucket_size=16 needs at least"):
        CalibrationRun(obj, [1.0] * 3, *box(3), SearchConfig(bucket_size=16))
    with pytest.raises(ValueError, match="NaN"):
        CalibrationRun(obj, [1.0, float("nan"), 1.0], *box(3))


def test_flat_fitness_does_not_stop_the_search():
    class Flat(QuadraticObjective):
        def train(self, vectors, bucket):
            self.train_calls.append((np.array(vectors), bucket))
            return PopulationScores(np.zeros(len(vectors)))  # e.g. accuracy 0 for everyone on this bucket

    res = run_search(Flat([0.5] * 3), [1.0] * 3, SearchConfig(max_generations=6, bucket_size=4, patience=None))
    assert res.n_generations == 6 and res.stop_reason == "max_generations"
