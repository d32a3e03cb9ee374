"""The hyper-parameters of one CMA-ES calibration (:class:`SearchConfig`), apart from the loop that uses them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from calibri_pipeline.arguments import positive_int

VALIDATE_CHOICES = ("mean", "best")


@dataclass(frozen=True)
class SearchConfig:
    """Hyper-parameters of one CMA-ES calibration (defaults: the paper's, where it gives them).

    - ``popsize=None`` is pycma's default ``4 + floor(3 ln N)``.
    - ``bucket_size`` training prompts per generation (paper: 16), each with ``seeds_per_prompt``
      noise seeds; all candidates of a generation share prompts and seeds (common random numbers).
    - validation runs on generation 0 (x0, i.e. the baseline), then every ``val_every`` generations
      and at the last one; ``validate="mean"`` validates the distribution mean after the update,
      ``"best"`` the generation's best training candidate. The result is the best *validated* vector.
    - stopping: ``max_generations``; σ plateau (σ moved by less than ``sigma_plateau_tol``
      relative to its value ``sigma_plateau_window`` generations earlier, throughout that window);
      ``patience`` validations in a row without a gain of more than ``min_val_gain``; pycma's own
      numerical stopping criteria when ``honor_cma_stop`` (its fitness-based rules -- flat fitness,
      ``tolfun``, ``tolfunhist`` -- are disabled: every generation scores a different bucket, and a
      discrete reward such as accuracy is often flat on 16 prompts).
    - the initial step size of coordinate ``i`` is ``sigma0 * initial_stds[i]`` (pycma's ``CMA_stds``;
      :class:`CalibrationRun` takes ``initial_stds``, all ones by default). ``sigma0=None`` resolves to
      the paper's uniform 0.25 without ``initial_stds`` and to 1.0 with them (they are then each
      coordinate's absolute first step, as the scale sweep gives them); ``separable`` learns only a diagonal covariance (pycma's ``CMA_diagonal``), which
      needs far fewer generations per coordinate in large spaces (the paper's 216-482).
    - noise (off by default): ``probe_buckets > 0`` scores x0 on that many extra buckets at
      generation 0 and measures the fitness noise against the spread of the first population
      (:class:`NoiseReport`, kept with the run); with ``target_gain`` it then sizes validation to
      up to ``max_val_seeds`` seeds per prompt, so that three standard errors of a paired
      validation difference fit in the gain sought, and the training buckets from generation 1 on
      to up to ``max_bucket_seeds`` seeds per prompt, so that one generation's paired standard error
      does (a ranking that cannot see the gain sought is noise).
    - ``confirm_top > 0``: before returning, x0, the ``confirm_top`` best validated vectors and the
      final mean are re-scored on fresh seeds (``objective.confirm``); a vector replaces x0 only if
      its paired gain over x0 there has a one-sided lower confidence bound above 0 at
      ``confirm_level`` (Bonferroni-corrected over the candidates): a margin noise cannot fake.
    """

    sigma0: float | None = None  # resolved by the run: 0.25, or 1.0 with initial_stds (see above)
    popsize: int | None = None
    max_generations: int = 100
    bucket_size: int = 16
    seeds_per_prompt: int = 1
    val_every: int = 5
    validate: str = "mean"
    patience: int | None = 5
    min_val_gain: float = 0.0
    sigma_plateau_window: int | None = 20
    sigma_plateau_tol: float = 1e-3
    honor_cma_stop: bool = True
    coefficient_bounds: tuple[float, float] = (-1.0, 2.0)
    weight_bounds: tuple[float, float] = (-10.0, 10.0)
    seed: int = 0
    separable: bool = False
    probe_buckets: int = 0
    target_gain: float | None = None
    max_val_seeds: int = 1
    max_bucket_seeds: int = 1
    confirm_top: int = 0
    confirm_level: float = 0.95

    def __post_init__(self) -> None:
        if self.sigma0 is not None and not (
            isinstance(self.sigma0, (int, float)) and self.sigma0 > 0 and math.isfinite(self.sigma0)
        ):
            raise ValueError(f"SearchConfig.sigma0 must be a positive number or None, got {self.sigma0!r}")
        positive_int("SearchConfig.popsize", self.popsize, allow_none=True)
        if self.popsize is not None and self.popsize < 2:
            raise ValueError(f"SearchConfig.popsize must be >= 2 (CMA-ES ranks candidates), got {self.popsize}")
        positive_int("SearchConfig.max_generations", self.max_generations)
        positive_int("SearchConfig.bucket_size", self.bucket_size)
        positive_int("SearchConfig.seeds_per_prompt", self.seeds_per_prompt)
        positive_int("SearchConfig.val_every", self.val_every)
        positive_int("SearchConfig.patience", self.patience, allow_none=True)
        positive_int("SearchConfig.sigma_plateau_window", self.sigma_plateau_window, allow_none=True)
        if self.validate not in VALIDATE_CHOICES:
            raise ValueError(f"SearchConfig.validate must be one of {VALIDATE_CHOICES}, got {self.validate!r}")
        if not (self.min_val_gain >= 0):
            raise ValueError(f"SearchConfig.min_val_gain must be >= 0, got {self.min_val_gain!r}")
        if not (self.sigma_plateau_tol >= 0):
            raise ValueError(f"SearchConfig.sigma_plateau_tol must be >= 0, got {self.sigma_plateau_tol!r}")
        for name in ("coefficient_bounds", "weight_bounds"):
            value = getattr(self, name)
            if len(value) != 2 or not (float(value[0]) < float(value[1])):
                raise ValueError(f"SearchConfig.{name} must be (low, high) with low < high, got {value!r}")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SearchConfig.seed must be a non-negative int, got {self.seed!r}")
        positive_int("SearchConfig.max_val_seeds", self.max_val_seeds)
        positive_int("SearchConfig.max_bucket_seeds", self.max_bucket_seeds)
        for name in ("probe_buckets", "confirm_top"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SearchConfig.{name} must be an int >= 0, got {value!r}")
        if self.target_gain is not None and not (self.target_gain > 0 and math.isfinite(self.target_gain)):
            raise ValueError(f"SearchConfig.target_gain must be a positive number or None, got {self.target_gain!r}")
        if self.target_gain is not None and self.probe_buckets < 1:
            raise ValueError("SearchConfig.target_gain sizes validation from the noise probe: set probe_buckets >= 1")
        if not (0.5 < self.confirm_level < 1.0):
            raise ValueError(f"SearchConfig.confirm_level must be in (0.5, 1), got {self.confirm_level!r}")

    def resolved(self, has_initial_stds: bool) -> SearchConfig:
        """``sigma0`` filled in: 0.25 (the paper's, on every coordinate) or 1.0 (absolute initial stds)."""
        if self.sigma0 is not None:
            return self
        return replace(self, sigma0=1.0 if has_initial_stds else 0.25)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["coefficient_bounds"] = list(self.coefficient_bounds)
        d["weight_bounds"] = list(self.weight_bounds)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SearchConfig fields {unknown}; allowed: {sorted(known)}")
        d = dict(d)
        for name in ("coefficient_bounds", "weight_bounds"):
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)


def default_popsize(dimension: int) -> int:
    """pycma's default population size ``4 + floor(3 ln N)``."""
    if dimension < 1:
        raise ValueError(f"dimension must be >= 1, got {dimension}")
    return 4 + int(math.floor(3 * math.log(dimension)))


__all__ = ["SearchConfig", "VALIDATE_CHOICES", "default_popsize"]
