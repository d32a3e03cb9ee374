"""A search scaled to the model and honest about noise, on analytic objectives (no model):
per-coordinate initial deviations, separable CMA, search coordinates decoded for the objective, the
noise probe and the validation it sizes, and the confirmation that keeps x0 unless a gain is real."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibri_pipeline.method.confirmation import confirm_choice
from calibri_pipeline.method.noise import measure_noise, validation_seeds_needed
from calibri_pipeline.method.objective import PopulationScores
from calibri_pipeline.method.search import CalibrationRun
from calibri_pipeline.method.search_config import SearchConfig
from calibri_pipeline.method.state_store import MemoryStateStore


class NoisyLinear:
    """Per-image fitness = w . x + a per-(item, seed) effect shared by every candidate + N(0, sigma) per image.

    The shared effect is what common random numbers cancel; ``sigma`` is the paired noise. Validation
    and confirmation cells are (prompt, seed) pairs like the real objective's, and can be resized.
    """

    def __init__(self, w, sigma: float = 0.2, n_items: int = 40, n_val: int = 10):
        self.w = np.asarray(w, dtype=np.float64)
        self.sigma = sigma
        self.n_train_items = n_items
        self.n_val_items = n_val
        self.k = 1
        self.resized: list[int] = []
        self.confirm_calls: list[np.ndarray] = []
        self.train_vectors: list[np.ndarray] = []

    def _cells(self, vectors, cells):
        vectors = np.asarray(vectors, dtype=np.float64)
        shared = np.array([np.random.default_rng([7, i, s]).normal() for i, s in cells])
        noise = np.stack(
            [
                [np.random.default_rng([11, i, s, int(1e6 * v.sum()) % 2**31]).normal() * self.sigma for i, s in cells]
                for v in vectors
            ]
        )
        values = vectors @ self.w
        return values[:, None] + shared[None] + noise

    def _scores(self, vectors, cells):
        c = self._cells(vectors, cells)
        return PopulationScores(c.mean(1), {}, c)

    def train(self, vectors, bucket):
        self.train_vectors.append(np.array(vectors))
        return self._scores(vectors, list(zip(bucket.item_indices, bucket.seeds)))

    def validate(self, vectors):
        return self._scores(vectors, [(1000 + i, s) for s in range(self.k) for i in range(self.n_val_items)])

    def resize_validation(self, k):
        self.resized.append(k)
        self.k = k
        return k * self.n_val_items

    def confirm(self, vectors):
        self.confirm_calls.append(np.array(vectors))
        return self._scores(vectors, [(2000 + i, 500 + s) for s in range(self.k) for i in range(self.n_val_items)])

    def describe(self):
        return {"kind": "noisy-linear", "w": self.w.tolist(), "sigma": self.sigma}


def _run(objective, config, d, **kwargs):
    return CalibrationRun(objective, [1.0] * d, [-5.0] * d, [5.0] * d, config, **kwargs).run()


def test_initial_stds_set_each_coordinates_first_step():
    obj = NoisyLinear([0.0, 0.0, 0.0])
    cfg = SearchConfig(sigma0=1.0, max_generations=1, bucket_size=4, popsize=200)
    _run(obj, cfg, 3, initial_stds=[0.01, 0.1, 1.0])
    first = obj.train_vectors[0][1:]  # candidate 0 is x0
    spread = first.std(axis=0)
    np.testing.assert_allclose(spread, [0.01, 0.1, 1.0], rtol=0.25)
    with pytest.raises(ValueError, match="initial_stds must be 3 positive"):
        _run(obj, cfg, 3, initial_stds=[0.1, -1.0, 1.0])


def test_separable_cma_keeps_a_diagonal_covariance():
    obj = NoisyLinear([1.0, -1.0, 0.5, 0.0])
    run = CalibrationRun(
        obj, [1.0] * 4, [-5.0] * 4, [5.0] * 4, SearchConfig(max_generations=4, bucket_size=4, separable=True)
    )
    assert run._cma_options()["CMA_diagonal"] is True
    res = run.run()
    assert res.n_generations == 4


def test_search_coordinates_are_decoded_for_the_objective_and_the_result():
    obj = NoisyLinear([1.0, 1.0])

    def decode(z):  # the second coordinate searched on a log scale
        return np.array([z[0], math.exp(z[1])])

    res = CalibrationRun(
        obj, [1.0, 0.0], [-5.0, -2.0], [5.0, 2.0], SearchConfig(max_generations=3, bucket_size=4), decode=decode
    ).run()
    np.testing.assert_allclose(obj.train_vectors[0][0], [1.0, 1.0])  # x0 = (1, log 1) decoded
    assert res.validations[0]["vector"] == [1.0, 1.0]
    assert np.all(obj.train_vectors[1][:, 1] > 0)  # every candidate the objective saw is decoded
    assert all(row["vector"][1] > 0 for row in res.candidates)


def test_noise_report_separates_paired_noise_from_the_population_spread():
    rng = np.random.default_rng(0)
    true = np.array([0.0, 0.05, -0.05, 0.1, -0.1, 0.0, 0.02, 0.08])
    shared = rng.normal(size=400)
    cells = true[:, None] + shared[None] + rng.normal(scale=0.3, size=(8, 400))
    report = measure_noise(cells, 0, [0.70, 0.74, 0.66])
    assert report.pair_sd == pytest.approx(0.3 * math.sqrt(2), rel=0.1)  # difference of two noisy images
    assert report.bucket_pair_se == pytest.approx(report.pair_sd / 20, rel=1e-9)
    assert report.population_sd == pytest.approx(np.std(cells.mean(1), ddof=1))
    assert report.x0_bucket_sd == pytest.approx(0.04)
    assert 0.5 < report.reliability < 1.0  # the true spread (~0.06) dominates the noise on 400 images
    assert measure_noise(cells[:, :4], 0, [0.7]).reliability < report.reliability  # 4 images: mostly noise


def test_validation_is_sized_so_three_standard_errors_fit_in_the_gain():
    # (3 * 0.2 / 0.02)^2 = 900 images over 50 prompts -> 18 seeds, capped at 16 or 4
    assert validation_seeds_needed(0.2, 0.02, 50, max_seeds=32) == 18
    assert validation_seeds_needed(0.2, 0.02, 50, max_seeds=4) == 4
    assert validation_seeds_needed(0.2, 0.02, 50, max_seeds=32, z=2.0) == 8  # (2 * 0.2 / 0.02)^2 = 400
    assert validation_seeds_needed(0.01, 0.02, 50, max_seeds=4) == 1
    assert validation_seeds_needed(0.0, 0.02, 50, max_seeds=4) == 1


def test_the_probe_measures_noise_at_generation_0_and_resizes_validation():
    obj = NoisyLinear([1.0, -1.0, 0.0], sigma=0.3, n_val=10)
    cfg = SearchConfig(max_generations=3, bucket_size=8, probe_buckets=2, target_gain=0.1, max_val_seeds=5, val_every=1)
    store = MemoryStateStore()
    res = _run(obj, cfg, 3, store=store)
    noise = res.noise
    assert noise["bucket_images"] == 8 and len(noise["x0_bucket_means"]) == 3
    expected = validation_seeds_needed(noise["pair_sd"], 0.1, 10, 5)
    assert noise["val_seeds_per_prompt"] == expected and obj.resized == [expected]
    assert noise["val_images"] == 10 * expected
    assert noise["val_pair_se"] == pytest.approx(noise["pair_sd"] / math.sqrt(10 * expected))
    # x0 was probed on two more buckets (single-vector calls), after the first population
    assert [v.shape[0] for v in obj.train_vectors[:3]] == [res.popsize, 1, 1]
    assert noise["bucket_seeds_per_prompt"] == 1  # max_bucket_seeds = 1: the buckets stay as configured
    # resuming re-applies the sizing from the journal, without probing again
    again = NoisyLinear([1.0, -1.0, 0.0], sigma=0.3, n_val=10)
    resumed = _run(again, cfg, 3, store=store)
    assert resumed.replayed_generations == 3 and again.resized == [expected] and again.train_vectors == []
    assert resumed.noise == noise
    with pytest.raises(ValueError, match="probe_buckets >= 1"):
        SearchConfig(target_gain=0.1)


def test_confirm_choice_keeps_x0_unless_the_gain_beats_its_margin():
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=200)
    noise = rng.normal(scale=0.1, size=(3, 200))
    cells = np.stack([x0, x0 + 0.005 + noise[0], x0 + 0.1 + noise[1], x0 + 0.03 + noise[2]])
    choice = confirm_choice(cells, ["x0", "tiny", "big", "medium"], level=0.95)
    assert choice["chosen"] == 2 and choice["rows"][2]["qualifies"] and not choice["rows"][1]["qualifies"]
    from statistics import NormalDist

    assert choice["z"] == pytest.approx(NormalDist().inv_cdf(1 - 0.05 / 3))  # Bonferroni over 3 candidates
    big = choice["rows"][2]
    d = cells[2] - cells[0]
    assert big["gain"] == pytest.approx(d.mean()) and big["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(200))
    assert big["lower"] == pytest.approx(big["gain"] - choice["z"] * big["se"])
    # nothing better than noise: x0 stays
    flat = np.stack([x0, x0 + rng.normal(scale=0.1, size=200), x0 - 0.02 + rng.normal(scale=0.1, size=200)])
    assert confirm_choice(flat, ["x0", "a", "b"], level=0.95)["chosen"] == 0


def test_confirmation_rescores_the_best_validated_on_fresh_seeds_and_is_kept_with_the_run():
    obj = NoisyLinear([0.5, 0.5], sigma=0.05, n_val=20)
    cfg = SearchConfig(max_generations=6, bucket_size=8, val_every=1, confirm_top=2, patience=None)
    store = MemoryStateStore()
    res = _run(obj, cfg, 2, store=store)
    conf = res.confirmation
    assert conf is not None and len(obj.confirm_calls) == 1
    assert obj.confirm_calls[0].shape == (3, 2)  # x0 + the 2 best validated
    np.testing.assert_allclose(obj.confirm_calls[0][0], [1.0, 1.0])
    assert [r["label"] for r in conf["rows"]][0] == "x0"
    chosen = conf["candidates"][conf["chosen"]]
    np.testing.assert_allclose(res.vector, chosen["vector"])
    assert res.val_score == chosen["score"]
    # a strong, clean gradient: the search moved uphill and the confirmation took a candidate
    assert conf["chosen"] > 0 and res.vector.sum() > 2.0
    again = NoisyLinear([0.5, 0.5], sigma=0.05, n_val=20)
    resumed = _run(again, cfg, 2, store=store)
    assert again.confirm_calls == [] and resumed.confirmation == conf  # read back, not re-scored


def test_the_probe_sizes_the_training_buckets_when_allowed():
    obj = NoisyLinear([1.0, -1.0, 0.0], sigma=0.3, n_val=10)
    cfg = SearchConfig(
        max_generations=3,
        bucket_size=8,
        probe_buckets=1,
        target_gain=0.1,
        max_val_seeds=5,
        max_bucket_seeds=4,
        val_every=1,
    )
    res = _run(obj, cfg, 3, store=MemoryStateStore())
    k = res.noise["bucket_seeds_per_prompt"]
    # one standard error of a generation's paired difference within the gain: (pair_sd / 0.1)^2 images
    assert k == validation_seeds_needed(res.noise["pair_sd"], 0.1, 8, 4, z=1.0) and k > 1
    sizes = [row["bucket_items"] for row in res.generations]
    assert len(sizes[0]) == 8 and all(len(items) == 8 * k for items in sizes[1:])
