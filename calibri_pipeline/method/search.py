"""CMA-ES search for Calibri vectors (paper §3.3-3.4, §4): the algorithm, on pycma's ask/tell.

:class:`CalibrationRun` optimises an abstract :class:`PopulationObjective` (anything that scores a
population of vectors on a bucket of training items, and a single vector on the fixed validation
set). It owns the bucket schedule (common random numbers: every candidate of a generation sees the
same prompts and noise), validation selection and the stopping rules, and knows nothing about
images: :mod:`calibri_pipeline.method.calibrate` binds it to a backbone and rewards. One generation
is ask -> score -> tell -> validate -> record (:meth:`CalibrationRun._generation`).

Resumption is by *replay* (:mod:`calibri_pipeline.method.journal` keeps every generation as JSON):
on restart a fresh ``CMAEvolutionStrategy`` with the same seed re-asks and re-tells the stored
generations. pycma draws from NumPy's global RNG, so every pycma call runs inside a private copy of
that RNG (:class:`_PrivateNumpyRandom`): other code touching ``np.random`` can neither perturb the
search nor be perturbed by it. Each stored generation carries a SHA-256 of the strategy's state
(mean, step size, covariance, paths, RNG), so a replay that would not be bit-identical (another
pycma or NumPy version) fails loudly instead of silently diverging.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from calibri_pipeline.arguments import positive_int
from calibri_pipeline.method.journal import STATE_FORMAT, RunJournal, jsonable
from calibri_pipeline.method.state_store import StateStore

if TYPE_CHECKING:
    import polars as pl

VALIDATE_CHOICES = ("mean", "best")

GenerationCallback = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


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
      :class:`CalibrationRun` takes ``initial_stds``, all ones by default: the paper's uniform
      σ0 = 0.25); ``separable`` learns only a diagonal covariance (pycma's ``CMA_diagonal``), which
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

    sigma0: float = 0.25
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
        if not (isinstance(self.sigma0, (int, float)) and self.sigma0 > 0 and math.isfinite(self.sigma0)):
            raise ValueError(f"SearchConfig.sigma0 must be a positive number, got {self.sigma0!r}")
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


# --------------------------------------------------------------------------------------------
# Buckets: which training items and noise seeds a generation sees
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    """The training images of one generation: item (prompt) indices and their noise seeds, ``[B]`` each.

    Every candidate of the generation is scored on exactly these (common random numbers).
    """

    generation: int
    item_indices: tuple[int, ...]
    seeds: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.item_indices)

    def to_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "item_indices": list(self.item_indices), "seeds": list(self.seeds)}


def make_bucket(
    seed: int, generation: int, n_items: int, bucket_size: int, seeds_per_prompt: int = 1, *, probe: int = 0
) -> Bucket:
    """The bucket of ``generation``: a pure function of its arguments, so a resumed run gets the same data.

    Items are drawn epoch by epoch from seeded permutations of all training items (every item is
    used once per epoch; buckets may straddle two epochs), noise seeds from a per-generation stream.
    ``probe > 0`` draws the noise probe's extra bucket number ``probe`` from streams of its own.
    """
    if n_items < bucket_size:
        raise ValueError(
            f"bucket_size={bucket_size} needs at least that many training prompts, got {n_items}; "
            "lower SearchConfig.bucket_size or add training prompts"
        )
    start = generation * bucket_size
    picked: list[int] = []
    epoch = start // n_items
    offset = start % n_items
    if probe:
        picked = [int(i) for i in np.random.default_rng([seed, 0x9B0BE, probe]).permutation(n_items)[:bucket_size]]
    while len(picked) < bucket_size:
        order = np.random.default_rng([seed, 0xB0C4E7, epoch]).permutation(n_items)
        take = order[offset : offset + bucket_size - len(picked)]
        picked.extend(int(i) for i in take)
        epoch, offset = epoch + 1, 0
    stream = [seed, 0x5EED5, generation] + ([0x9B0BE, probe] if probe else [])
    noise = np.random.default_rng(stream).integers(0, 2**31 - 1, size=bucket_size * seeds_per_prompt)
    items = tuple(i for i in picked for _ in range(seeds_per_prompt))
    return Bucket(generation, items, tuple(int(s) for s in noise))


def validation_seeds(seed: int, n_items: int, seeds_per_prompt: int = 1) -> list[int]:
    """Fixed noise seeds of the validation images (the same for every validated vector)."""
    rng = np.random.default_rng([seed, 0x7A11D])
    return [int(s) for s in rng.integers(0, 2**31 - 1, size=n_items * seeds_per_prompt)]


# --------------------------------------------------------------------------------------------
# The objective the search optimises
# --------------------------------------------------------------------------------------------


@dataclass
class PopulationScores:
    """Scores of a population, higher is better: ``fitness [P]`` and named components ``[P]`` each."""

    fitness: np.ndarray
    components: dict[str, np.ndarray] = field(default_factory=dict)
    cells: np.ndarray | None = None  # [P, N] per-image fitness (its row means are ``fitness``), if known

    def __post_init__(self) -> None:
        self.fitness = np.asarray(self.fitness, dtype=np.float64).reshape(-1)
        if self.cells is not None:
            self.cells = np.asarray(self.cells, dtype=np.float64)
            if self.cells.ndim != 2 or self.cells.shape[0] != self.fitness.size:
                raise ValueError(f"cells must be [P, N] for {self.fitness.size} candidates, got {self.cells.shape}")
        self.components = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in self.components.items()}
        for name, values in self.components.items():
            if values.shape != self.fitness.shape:
                raise ValueError(f"component {name!r} has {values.size} scores for {self.fitness.size} candidates")
        if not np.all(np.isfinite(self.fitness)):
            raise ValueError("the objective returned non-finite fitness values")


class PopulationObjective(Protocol):
    """What :class:`CalibrationRun` optimises. Both methods must be deterministic."""

    n_train_items: int

    def train(self, vectors: np.ndarray, bucket: Bucket) -> PopulationScores:
        """Score ``vectors [P, D]`` on the bucket (all candidates see the same items and seeds)."""
        ...

    def validate(self, vectors: np.ndarray) -> PopulationScores:
        """Score ``vectors [K, D]`` on the fixed validation items and seeds."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the objective (data, rewards, sampler settings) for resume checks."""
        ...

    # Optional (needed by the noise features of SearchConfig):
    #   resize_validation(seeds_per_prompt: int) -> int      validation images after resizing
    #   confirm(vectors [K, D]) -> PopulationScores           on fresh seeds, with ``cells``


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


def confirm_choice(cells: np.ndarray, labels: Sequence[str], level: float) -> dict[str, Any]:
    """Pick among re-scored candidates (row 0 is x0): the best whose paired gain over x0 is real.

    A candidate qualifies when ``mean(d) - z * se(d) > 0`` for its per-image differences ``d`` to x0,
    with ``z`` the one-sided normal quantile at ``level``, Bonferroni-corrected over the candidates;
    among those the largest mean gain wins; none: x0.
    """
    from statistics import NormalDist

    cells = np.asarray(cells, dtype=np.float64)
    k = cells.shape[0] - 1
    z = NormalDist().inv_cdf(1.0 - (1.0 - level) / max(1, k)) if k else 0.0
    rows = []
    for i, label in enumerate(labels):
        d = cells[i] - cells[0]
        se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
        gain = float(d.mean())
        rows.append(
            {
                "label": label,
                "mean": float(cells[i].mean()),
                "gain": gain,
                "se": se,
                "lower": gain - z * se,
                "qualifies": bool(i > 0 and gain - z * se > 0),
            }
        )
    winners = [i for i, r in enumerate(rows) if r["qualifies"]]
    chosen = max(winners, key=lambda i: rows[i]["gain"]) if winners else 0
    return {"rows": rows, "chosen": chosen, "z": z, "level": level, "images": int(cells.shape[1])}


# --------------------------------------------------------------------------------------------
# pycma plumbing
# --------------------------------------------------------------------------------------------


class _PrivateNumpyRandom:
    """A private NumPy global-RNG stream: pycma only ever sees this one, nobody else touches it.

    Not thread-safe with respect to other threads using ``np.random`` at the same moment.
    """

    def __init__(self, seed: int) -> None:
        saved = np.random.get_state()
        try:
            np.random.seed(seed)
            self._state = np.random.get_state()
        finally:
            np.random.set_state(saved)

    @contextmanager
    def active(self) -> Iterator[None]:
        saved = np.random.get_state()
        np.random.set_state(self._state)
        try:
            yield
        finally:
            self._state = np.random.get_state()
            np.random.set_state(saved)

    def digest(self) -> bytes:
        kind, keys, pos, has_gauss, cached = self._state
        return hashlib.sha256(
            kind.encode()
            + np.asarray(keys, dtype=np.uint32).tobytes()
            + np.array([pos, has_gauss], np.int64).tobytes()
            + np.float64(cached).tobytes()
        ).digest()


def _pycma_seed(seed: int) -> int:
    # pycma treats seed 0 as "use the clock": derive a non-zero 32-bit seed from ours
    return int(np.random.SeedSequence([seed, 0xC4A]).generate_state(1)[0]) or 1


def _strategy_digest(es: Any, rng: _PrivateNumpyRandom) -> str:
    parts = [
        np.asarray(es.mean, dtype=np.float64).tobytes(),
        np.float64(es.sigma).tobytes(),
        # the full sampler keeps C; the separable one (CMA_diagonal) a constant sampler and per-coordinate scales
        np.asarray(
            getattr(es.sm, "C", None) if hasattr(es.sm, "C") else es.sm.covariance_matrix, dtype=np.float64
        ).tobytes(),
        np.asarray(getattr(getattr(es, "sigma_vec", None), "scaling", 1.0), dtype=np.float64).tobytes(),
        np.asarray(es.pc, dtype=np.float64).tobytes(),
        np.asarray(getattr(es.adapt_sigma, "ps", np.zeros(1)), dtype=np.float64).tobytes(),
        np.array([es.countiter, es.countevals], dtype=np.int64).tobytes(),
        rng.digest(),
    ]
    return hashlib.sha256(b"".join(parts)).hexdigest()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """Outcome of a search. ``vector`` is the best by validation (x0 when nothing beat the baseline)."""

    vector: np.ndarray
    val_score: float
    baseline_val_score: float
    best_generation: int
    x0: np.ndarray
    stop_reason: str
    generations: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    validations: list[dict[str, Any]]
    popsize: int
    dimension: int
    replayed_generations: int = 0
    names: list[str] | None = None  # one per coordinate of the vectors, when the caller gave them
    noise: dict[str, Any] | None = None  # NoiseReport.to_dict() when the run probed its noise
    confirmation: dict[str, Any] | None = None  # confirm_choice() output when the run confirmed its pick

    @property
    def n_generations(self) -> int:
        return len(self.generations)

    @property
    def improved(self) -> bool:
        return self.val_score > self.baseline_val_score

    def generations_frame(self) -> pl.DataFrame:
        import polars as pl

        return pl.DataFrame(self.generations)

    def candidates_frame(self) -> pl.DataFrame:
        import polars as pl

        return pl.DataFrame(self.candidates)

    def validations_frame(self) -> pl.DataFrame:
        import polars as pl

        return pl.DataFrame(self.validations)


class CalibrationRun:
    """One CMA-ES search over vectors of length ``len(x0)`` within per-coordinate bounds.

    ``run()`` resumes from ``store`` when it holds a run named ``run_name`` with the same
    fingerprint (configuration, x0, bounds and ``objective.describe()``); a different fingerprint is
    an error, so a stale state is never silently continued. ``resume=False`` starts over.
    """

    def __init__(
        self,
        objective: PopulationObjective,
        x0: Sequence[float] | np.ndarray,
        lower: Sequence[float],
        upper: Sequence[float],
        config: SearchConfig | None = None,
        *,
        store: StateStore | None = None,
        run_name: str = "calibration",
        on_generation: GenerationCallback | None = None,
        resume: bool = True,
        names: Sequence[str] | None = None,
        initial_stds: Sequence[float] | None = None,
        decode: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.objective = objective
        self.config = config if config is not None else SearchConfig()
        if not isinstance(self.config, SearchConfig):
            raise TypeError(f"config must be a SearchConfig, got {type(self.config).__name__}")
        self.x0 = np.array(x0, dtype=np.float64).reshape(-1)
        self.lower = np.array(lower, dtype=np.float64).reshape(-1)
        self.upper = np.array(upper, dtype=np.float64).reshape(-1)
        d = self.x0.size
        if d < 1:
            raise ValueError("x0 must have at least one coordinate")
        if self.lower.size != d or self.upper.size != d:
            raise ValueError(
                f"bounds must have {d} entries like x0, got lower={self.lower.size}, upper={self.upper.size}"
            )
        if not np.all(np.isfinite(self.x0)):
            raise ValueError("x0 contains NaN or infinite values")
        if not np.all(self.lower < self.upper):
            raise ValueError("every lower bound must be below its upper bound")
        outside = np.flatnonzero((self.x0 < self.lower) | (self.x0 > self.upper))
        if outside.size:
            i = int(outside[0])
            raise ValueError(
                f"x0 lies outside the bounds at {outside.size} coordinate(s), e.g. [{i}] = {self.x0[i]} not in "
                f"[{self.lower[i]}, {self.upper[i]}]; widen the bounds or clip the warm start"
            )
        if names is not None and len(names) != d:
            raise ValueError(f"names must have {d} entries, got {len(names)}")
        self.initial_stds = None if initial_stds is None else np.array(initial_stds, dtype=np.float64).reshape(-1)
        if self.initial_stds is not None and (
            self.initial_stds.size != d or not np.all(np.isfinite(self.initial_stds)) or np.any(self.initial_stds <= 0)
        ):
            raise ValueError(f"initial_stds must be {d} positive finite numbers, got {initial_stds!r}")
        self._bucket_seeds = self.config.seeds_per_prompt  # the probe may raise it from generation 1 on
        # search coordinates -> the vectors the objective scores (identity unless a reparameterisation)
        self.decode = decode if decode is not None else (lambda z: np.array(z, dtype=np.float64))
        self.names = list(names) if names is not None else None
        n_items = int(objective.n_train_items)
        if n_items < self.config.bucket_size:
            raise ValueError(
                f"bucket_size={self.config.bucket_size} needs at least that many training prompts, got {n_items}"
            )
        self.popsize = self.config.popsize or default_popsize(d)
        self.journal = RunJournal(store, run_name)
        self.run_name = self.journal.run_name
        self.on_generation = on_generation
        self.resume = resume

    def fingerprint(self) -> dict[str, Any]:
        import cma

        return jsonable(
            {
                "format": STATE_FORMAT,
                "config": self.config.to_dict(),
                "popsize": self.popsize,
                "x0": self.x0.tolist(),
                "lower": self.lower.tolist(),
                "upper": self.upper.tolist(),
                "initial_stds": None if self.initial_stds is None else self.initial_stds.tolist(),
                "decoded_x0": self._decoded(self.x0[None])[0].tolist(),
                "objective": self.objective.describe(),
                "cma_options": self._cma_options(),
                "pycma": cma.__version__,
                "numpy": np.__version__,
            }
        )

    # -- pycma -------------------------------------------------------------------------------

    def _cma_options(self) -> dict[str, Any]:
        return {
            "popsize": self.popsize,
            "bounds": [self.lower.tolist(), self.upper.tolist()],
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            # fitness-based termination compares values across generations, but every generation
            # scores a different bucket: those differences are data noise, not convergence
            "tolflatfitness": 10**9,
            "tolfun": 0,
            "tolfunhist": 0,
            "maxiter": 10**9,
            **({"CMA_stds": self.initial_stds.tolist()} if self.initial_stds is not None else {}),
            **({"CMA_diagonal": True} if self.config.separable else {}),
        }

    def _new_strategy(self) -> tuple[Any, _PrivateNumpyRandom]:
        import cma

        rng = _PrivateNumpyRandom(_pycma_seed(self.config.seed))
        options = dict(self._cma_options(), seed=np.nan)  # nan: "do nothing", the private RNG is seeded
        with rng.active():
            es = cma.CMAEvolutionStrategy(self.x0.tolist(), self.config.sigma0, options)
        return es, rng

    def _ask(self, es: Any, rng: _PrivateNumpyRandom, generation: int) -> list[np.ndarray]:
        with rng.active():
            if generation == 0:
                # inject x0's genotype so the first candidate *is* x0 even where the bound transform
                # is not the identity (a warm start on a bound)
                es.inject([es.boundary_handler.inverse(self.x0.copy())], force=True)
            return es.ask()

    def _tell(
        self, es: Any, rng: _PrivateNumpyRandom, candidates: list[np.ndarray], fitness: np.ndarray
    ) -> dict[str, Any]:
        with rng.active():
            es.tell(candidates, [-float(f) for f in fitness])  # pycma minimises
            stop = es.stop() if self.config.honor_cma_stop else {}
            mean = np.array(es.result.xfavorite, dtype=np.float64)
        return {"sigma": float(es.sigma), "mean": mean, "cma_stop": sorted(str(k) for k in stop)}

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> SearchResult:
        """Replay what the journal holds, then generations until a stopping rule fires."""
        fingerprint = self.fingerprint()
        es, rng = self._new_strategy()
        log = _RunLog()
        stored = self.journal.load(fingerprint) if self.resume else None
        stop_reason: str | None = None
        if stored is not None:
            for record in stored["generations"]:
                self._replay(es, rng, record)
                if record.get("noise") and self.config.target_gain is not None:
                    self.objective.resize_validation(record["noise"]["val_seeds_per_prompt"])
                    self._bucket_seeds = int(record["noise"].get("bucket_seeds_per_prompt", self._bucket_seeds))
                log.add(record)
            stop_reason = stored["manifest"].get("stop_reason")
        replayed = len(log.generations)

        while stop_reason is None:
            record = self._generation(es, rng, len(log.generations), log)
            stop_reason = record["stop_reason"]
            self.journal.save_generation(record, fingerprint, stop_reason=stop_reason)
            row = log.add(record)
            if self.on_generation is not None:
                self.on_generation(row)

        best = log.best_validation()
        if best is None:  # only possible for a stored run from before its first validation
            raise RuntimeError(f"run {self.run_name!r} finished without any validation")
        confirmation = None
        if self.config.confirm_top > 0:
            confirmation = self.journal.load_extra("confirmation.json") or self._confirm(log)
            self.journal.save_extra("confirmation.json", confirmation)
            best = confirmation["candidates"][confirmation["chosen"]]
        return SearchResult(
            vector=np.array(best["vector"], dtype=np.float64),
            val_score=float(best["score"]),
            baseline_val_score=float(log.validations[0]["score"]),
            best_generation=int(best["generation"]),
            x0=self.x0.copy(),
            stop_reason=stop_reason,
            generations=log.generations,
            candidates=log.candidates,
            validations=log.validations,
            popsize=self.popsize,
            dimension=self.x0.size,
            replayed_generations=replayed,
            names=self.names,
            noise=log.generations_noise,
            confirmation=confirmation,
        )

    def _confirm(self, log: _RunLog) -> dict[str, Any]:
        """Re-score x0 and the best validated vectors on fresh seeds; keep x0 unless one really is better."""
        x0 = log.validations[0]
        others = sorted((v for v in log.validations[1:]), key=lambda v: -v["score"])
        picked: list[dict[str, Any]] = []
        for v in others:
            if len(picked) == self.config.confirm_top:
                break
            if not any(np.array_equal(v["vector"], p["vector"]) for p in [x0, *picked]):
                picked.append(v)
        candidates = [x0, *picked]
        scores = self.objective.confirm(np.array([c["vector"] for c in candidates], dtype=np.float64))
        if scores.cells is None:
            raise ValueError("objective.confirm must return per-image scores (PopulationScores.cells)")
        labels = ["x0"] + [f"generation {c['generation']} ({c['source']})" for c in picked]
        choice = confirm_choice(scores.cells, labels, self.config.confirm_level)
        choice["candidates"] = candidates
        return choice

    def _replay(self, es: Any, rng: _PrivateNumpyRandom, record: dict[str, Any]) -> None:
        """Re-ask and re-tell a stored generation; any difference from the stored run is an error."""
        asked = self._ask(es, rng, record["generation"])
        expected = np.array(record["candidates"], dtype=np.float64)
        if len(asked) != expected.shape[0] or not np.array_equal(np.array(asked), expected):
            raise RuntimeError(
                f"replaying run {self.run_name!r}: CMA-ES proposed different candidates at generation "
                f"{record['generation']} than the stored run; the state cannot be resumed exactly"
            )
        self._tell(es, rng, asked, np.array(record["fitness"], dtype=np.float64))
        if _strategy_digest(es, rng) != record["strategy_sha256"]:
            raise RuntimeError(
                f"replaying run {self.run_name!r}: the CMA-ES state after generation {record['generation']} "
                "differs from the stored one (different pycma/NumPy build?); start over with resume=False"
            )

    def _generation(self, es: Any, rng: _PrivateNumpyRandom, generation: int, log: _RunLog) -> dict[str, Any]:
        """ask -> score on the generation's bucket -> tell -> maybe validate -> the record to keep."""
        cfg = self.config
        started = time.perf_counter()
        asked = self._ask(es, rng, generation)
        population = np.array(asked, dtype=np.float64)
        seeds = self._bucket_seeds if generation > 0 else cfg.seeds_per_prompt
        bucket = make_bucket(cfg.seed, generation, self.objective.n_train_items, cfg.bucket_size, seeds)
        scores = self.objective.train(self._decoded(population), bucket)
        if scores.fitness.shape != (len(asked),):
            raise ValueError(
                f"objective.train returned {scores.fitness.shape} fitness values for {len(asked)} candidates"
            )
        told = self._tell(es, rng, asked, scores.fitness)
        sigmas = log.sigmas + [told["sigma"]]
        done = generation + 1
        reason = self._stop_reason(done, sigmas, told["cma_stop"], log.stale)

        noise = self._probe_noise(scores) if generation == 0 and cfg.probe_buckets else None
        validation = None
        val_vector, val_source = self._to_validate(generation, reason, told["mean"], population, scores.fitness)
        if val_vector is not None:
            val_vector = self._decoded(val_vector[None, :])[0]
            val_scores = self.objective.validate(val_vector[None, :])
            score = float(val_scores.fitness[0])
            best = log.best_validation()
            is_best = best is None or score > best["score"] + cfg.min_val_gain
            validation = {
                "generation": generation,
                "source": val_source,
                "score": score,
                "components": {k: float(v[0]) for k, v in val_scores.components.items()},
                "vector": val_vector.tolist(),
                "is_best": bool(is_best),
            }
            stale = 0 if is_best else log.stale + (1 if generation > 0 else 0)
            if reason is None:
                reason = self._stop_reason(done, sigmas, told["cma_stop"], stale)

        best_index = int(np.argmax(scores.fitness))
        return {
            "generation": generation,
            "bucket": bucket.to_dict(),
            "candidates": population.tolist(),
            "vectors": self._decoded(population).tolist(),
            "fitness": scores.fitness.tolist(),
            "components": {k: v.tolist() for k, v in scores.components.items()},
            "sigma": told["sigma"],
            "mean": told["mean"].tolist(),
            "train_mean": float(np.mean(scores.fitness)),
            "train_best": float(scores.fitness[best_index]),
            "train_best_index": best_index,
            "validation": validation,
            "noise": noise,
            "stop_reason": reason,
            "seconds": time.perf_counter() - started,
            "strategy_sha256": _strategy_digest(es, rng),
        }

    def _decoded(self, points: np.ndarray) -> np.ndarray:
        return np.array([self.decode(np.asarray(p, dtype=np.float64)) for p in points], dtype=np.float64)

    def _probe_noise(self, scores: PopulationScores) -> dict[str, Any]:
        """Generation 0's noise probe: x0 on extra buckets against the first population's spread."""
        cfg = self.config
        if scores.cells is None:
            raise ValueError("the noise probe needs per-image scores: objective.train must fill PopulationScores.cells")
        x0 = self._decoded(self.x0[None])
        means = [float(scores.fitness[0])]  # candidate 0 of generation 0 is x0 (injected)
        for b in range(1, cfg.probe_buckets + 1):
            bucket = make_bucket(
                cfg.seed, 0, self.objective.n_train_items, cfg.bucket_size, cfg.seeds_per_prompt, probe=b
            )
            means.append(float(self.objective.train(x0, bucket).fitness[0]))
        report = measure_noise(scores.cells, 0, means)
        if cfg.target_gain is not None:
            n_prompts = int(self.objective.n_val_items)
            seeds = validation_seeds_needed(report.pair_sd, cfg.target_gain, n_prompts, cfg.max_val_seeds)
            report.val_seeds_per_prompt = seeds
            report.val_images = int(self.objective.resize_validation(seeds))
            report.val_pair_se = report.pair_sd / math.sqrt(report.val_images)
            report.target_gain = cfg.target_gain
            # the same rule for a generation's ranking, at one standard error
            per_prompt = validation_seeds_needed(
                report.pair_sd, cfg.target_gain, cfg.bucket_size, cfg.max_bucket_seeds, z=1.0
            )
            report.bucket_seeds_per_prompt = max(cfg.seeds_per_prompt, per_prompt)
            self._bucket_seeds = report.bucket_seeds_per_prompt
        return report.to_dict()

    def _to_validate(
        self, generation: int, reason: str | None, mean: np.ndarray, population: np.ndarray, fitness: np.ndarray
    ) -> tuple[np.ndarray | None, str | None]:
        """Generation 0 validates x0 (the baseline); then every ``val_every`` and the last generation."""
        if generation == 0:
            return self.x0.copy(), "x0"
        if generation % self.config.val_every == 0 or reason is not None:
            if self.config.validate == "mean":
                return mean, "mean"
            return population[int(np.argmax(fitness))], "best"
        return None, None

    # -- helpers -----------------------------------------------------------------------------

    def _stop_reason(self, done: int, sigmas: list[float], cma_stop: list[str], stale: int) -> str | None:
        cfg = self.config
        if done >= cfg.max_generations:
            return "max_generations"
        if cfg.patience is not None and stale >= cfg.patience:
            return "no_val_gain"
        w = cfg.sigma_plateau_window
        if w is not None and len(sigmas) > w:
            ref = sigmas[-w - 1]
            if ref > 0 and max(abs(s / ref - 1.0) for s in sigmas[-w:]) < cfg.sigma_plateau_tol:
                return "sigma_plateau"
        if cma_stop:
            return "cma:" + ",".join(cma_stop)
        return None


class _RunLog:
    """What the run has seen so far, in the shapes :class:`SearchResult` reports."""

    def __init__(self) -> None:
        self.generations: list[dict[str, Any]] = []
        self.candidates: list[dict[str, Any]] = []
        self.validations: list[dict[str, Any]] = []
        self.sigmas: list[float] = []
        self.generations_noise: dict[str, Any] | None = None

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        """Take in one generation record; return its row of :attr:`generations`."""
        g = record["generation"]
        if record.get("noise"):
            self.generations_noise = record["noise"]
        for i, (vector, fit) in enumerate(zip(record.get("vectors", record["candidates"]), record["fitness"])):
            row = {"generation": g, "index": i, "fitness": fit, "injected_x0": g == 0 and i == 0}
            for name, values in record["components"].items():
                row[f"train/{name}"] = values[i]
            row["vector"] = vector
            self.candidates.append(row)
        val = record["validation"]
        if val is not None:
            self.validations.append(val)
        self.sigmas.append(record["sigma"])
        row = {
            "generation": g,
            "sigma": record["sigma"],
            "train_mean": record["train_mean"],
            "train_best": record["train_best"],
            "train_best_index": record["train_best_index"],
            "val_score": None if val is None else val["score"],
            "val_source": None if val is None else val["source"],
            "val_is_best": None if val is None else val["is_best"],
            "bucket_items": record["bucket"]["item_indices"],
            "bucket_seeds": record["bucket"]["seeds"],
            "seconds": record["seconds"],
            "stop_reason": record["stop_reason"],
        }
        self.generations.append(row)
        return row

    def best_validation(self) -> dict[str, Any] | None:
        best = None
        for v in self.validations:
            if v["is_best"]:
                best = v
        return best

    @property
    def stale(self) -> int:
        """Validations since the last new best."""
        stale = 0
        for v in self.validations:
            stale = 0 if v["is_best"] else stale + 1
        return stale


__all__ = [
    "SearchConfig",
    "SearchResult",
    "CalibrationRun",
    "PopulationObjective",
    "PopulationScores",
    "Bucket",
    "make_bucket",
    "validation_seeds",
    "default_popsize",
]
