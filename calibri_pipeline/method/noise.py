"""How noisy the fitness is, and how many images it takes to see a gain through that noise.

Generation 0 of a search may probe its noise (:func:`probe_noise`): x0 scored on extra buckets and the
first population's per-image scores give a :class:`NoiseReport`; with a target gain the report then
sizes validation (``NoisyObjective.resize_validation``) and the training buckets, so that a
ranking or a validation can see the gain sought.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from calibri_pipeline.method.seeds import make_bucket

if TYPE_CHECKING:
    from calibri_pipeline.method.objective import NoisyObjective, PopulationScores
    from calibri_pipeline.method.search_config import SearchConfig


@dataclass
class NoiseReport:
    """How noisy the fitness is, measured at generation 0 (see :func:`measure_noise`).

    - ``x0_bucket_sd``: the spread of x0's mean fitness over buckets of ``bucket_images`` images
      (what one bucket's number can be off by);
    - ``population_sd``: the spread of fitness within the first population (same bucket);
    - ``pair_sd``: the per-image standard deviation of a candidate's score minus x0's on the same
      image (common random numbers); ``bucket_pair_se`` = ``pair_sd / sqrt(bucket_images)`` is the
      noise on a paired comparison within a generation;
    - ``reliability``: the share of the population's fitness variance that is not that noise
      (1: rankings are all signal; 0: all noise);
    - ``val_seeds_per_prompt`` / ``val_images`` / ``val_pair_se``: how validation was sized;
      ``bucket_seeds_per_prompt``: how the training buckets were, from generation 1 on.
    """

    bucket_images: int
    x0_bucket_means: list[float]
    x0_bucket_sd: float
    population_sd: float
    pair_sd: float
    bucket_pair_se: float
    reliability: float
    val_seeds_per_prompt: int = 1
    bucket_seeds_per_prompt: int = 1
    val_images: int | None = None
    val_pair_se: float | None = None
    target_gain: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_noise(population_cells: np.ndarray, x0_index: int, x0_bucket_means: Sequence[float]) -> NoiseReport:
    """A :class:`NoiseReport` from the first generation's per-image scores and x0's extra buckets."""
    cells = np.asarray(population_cells, dtype=np.float64)
    n = cells.shape[1]
    diffs = np.delete(cells, x0_index, axis=0) - cells[x0_index]
    pair_sd = float(np.sqrt(np.mean(np.var(diffs, axis=1, ddof=1)))) if n > 1 and diffs.size else 0.0
    fitness = cells.mean(axis=1)
    population_sd = float(np.std(fitness, ddof=1)) if fitness.size > 1 else 0.0
    noise_var = pair_sd**2 / n
    reliability = 0.0 if population_sd == 0 else float(max(0.0, 1.0 - noise_var / population_sd**2))
    means = [float(m) for m in x0_bucket_means]
    return NoiseReport(
        bucket_images=n,
        x0_bucket_means=means,
        x0_bucket_sd=float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
        population_sd=population_sd,
        pair_sd=pair_sd,
        bucket_pair_se=float(math.sqrt(noise_var)),
        reliability=reliability,
    )


def validation_seeds_needed(pair_sd: float, target_gain: float, n_prompts: int, max_seeds: int, z: float = 3.0) -> int:
    """Seeds per validation prompt so that ``z`` standard errors of a paired difference fit in ``target_gain``.

    ``z = 3``: the confirmation accepts a gain only when its lower bound (about 2 standard errors
    below it) clears 0, so a true gain of ``target_gain`` must be 3 standard errors to pass reliably.
    """
    if pair_sd <= 0:
        return 1
    images = math.ceil((z * pair_sd / target_gain) ** 2 - 1e-9)  # 900.0000001 is 900 images
    return int(min(max_seeds, max(1, math.ceil(images / max(1, n_prompts)))))


def probe_noise(
    objective: NoisyObjective,
    config: SearchConfig,
    x0: np.ndarray,
    scores: PopulationScores,
) -> NoiseReport:
    """Generation 0's noise probe: x0 (decoded, ``[1, D]``) on extra buckets against the first population's spread.

    With ``config.target_gain`` it resizes the objective's validation and says how many seeds per
    prompt the training buckets need from generation 1 on (``bucket_seeds_per_prompt``).
    """
    cfg = config
    if scores.cells is None:
        raise ValueError("the noise probe needs per-image scores: objective.train must fill PopulationScores.cells")
    means = [float(scores.fitness[0])]  # candidate 0 of generation 0 is x0 (injected)
    for b in range(1, cfg.probe_buckets + 1):
        bucket = make_bucket(cfg.seed, 0, objective.n_train_items, cfg.bucket_size, cfg.seeds_per_prompt, probe=b)
        means.append(float(objective.train(x0, bucket).fitness[0]))
    report = measure_noise(scores.cells, 0, means)
    if cfg.target_gain is not None:
        n_prompts = int(objective.n_val_items)
        seeds = validation_seeds_needed(report.pair_sd, cfg.target_gain, n_prompts, cfg.max_val_seeds)
        report.val_seeds_per_prompt = seeds
        report.val_images = int(objective.resize_validation(seeds))
        report.val_pair_se = report.pair_sd / math.sqrt(report.val_images)
        report.target_gain = cfg.target_gain
        # the same rule for a generation's ranking, at one standard error
        per_prompt = validation_seeds_needed(
            report.pair_sd, cfg.target_gain, cfg.bucket_size, cfg.max_bucket_seeds, z=1.0
        )
        report.bucket_seeds_per_prompt = max(cfg.seeds_per_prompt, per_prompt)
    return report


__all__ = ["NoiseReport", "measure_noise", "probe_noise", "validation_seeds_needed"]
