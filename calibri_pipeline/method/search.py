"""CMA-ES search for Calibri vectors (paper §3.3-3.4, §4): the algorithm, on pycma's ask/tell.

:class:`CalibrationRun` optimises an abstract :class:`PopulationObjective` (anything that scores a
population of vectors on a bucket of training items, and a single vector on the fixed validation
set). It owns the bucket schedule (common random numbers: every candidate of a generation sees the
same prompts and noise), validation selection and the stopping rules, and knows nothing about
images: :mod:`calibri_pipeline.method.calibrate` binds it to a backbone and rewards. One generation
is ask -> score -> tell -> validate -> stop? -> record (:meth:`CalibrationRun._generation`).

What the loop uses lives beside it: the pycma strategy on a private RNG
(:mod:`~calibri_pipeline.method.strategy`), the buckets and seeds (:mod:`~calibri_pipeline.method.seeds`),
the noise probe (:mod:`~calibri_pipeline.method.noise`) and the final confirmation
(:mod:`~calibri_pipeline.method.confirmation`).

Resumption is by *replay* (:mod:`calibri_pipeline.method.journal` keeps every generation as JSON):
on restart a fresh strategy with the same seed re-asks and re-tells the stored generations; each
stored generation carries a SHA-256 of the strategy's state, so a replay that would not be
bit-identical (another pycma or NumPy version) fails loudly instead of silently diverging.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from calibri_pipeline.method.confirmation import confirm
from calibri_pipeline.method.journal import STATE_FORMAT, RunJournal, jsonable
from calibri_pipeline.method.noise import probe_noise
from calibri_pipeline.method.objective import PopulationObjective
from calibri_pipeline.method.search_config import SearchConfig, default_popsize
from calibri_pipeline.method.seeds import make_bucket
from calibri_pipeline.method.state_store import StateStore
from calibri_pipeline.method.strategy import Strategy

if TYPE_CHECKING:
    import polars as pl

GenerationCallback = Callable[[dict[str, Any]], None]


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
        config = config if config is not None else SearchConfig()
        if not isinstance(config, SearchConfig):
            raise TypeError(f"config must be a SearchConfig, got {type(config).__name__}")
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
        self.config = config.resolved(has_initial_stds=self.initial_stds is not None)
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

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> SearchResult:
        """Replay what the journal holds, then generations until a stopping rule fires."""
        fingerprint = self.fingerprint()
        strategy = Strategy(
            self.x0, self.config.sigma0, self._cma_options(), self.config.seed, self.config.honor_cma_stop
        )
        log = _RunLog()
        stored = self.journal.load(fingerprint) if self.resume else None
        stop_reason: str | None = None
        if stored is not None:
            for record in stored["generations"]:
                self._replay(strategy, record)
                log.add(record)
            stop_reason = stored["manifest"].get("stop_reason")
        replayed = len(log.generations)

        while stop_reason is None:
            record = self._generation(strategy, len(log.generations), log)
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
            confirmation = self.journal.load_extra("confirmation.json") or confirm(
                self.objective, log.validations, self.config.confirm_top, self.config.confirm_level
            )
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

    def _generation(self, strategy: Strategy, generation: int, log: _RunLog) -> dict[str, Any]:
        """ask -> score on the generation's bucket -> tell -> maybe validate -> stop? -> the record to keep."""
        cfg = self.config
        started = time.perf_counter()
        asked = strategy.ask(generation)
        population = np.array(asked, dtype=np.float64)
        bucket = make_bucket(
            cfg.seed, generation, self.objective.n_train_items, cfg.bucket_size, self._bucket_seeds(generation, log)
        )
        scores = self.objective.train(self._decoded(population), bucket)
        if scores.fitness.shape != (len(asked),):
            raise ValueError(
                f"objective.train returned {scores.fitness.shape} fitness values for {len(asked)} candidates"
            )
        told = strategy.tell(asked, scores.fitness)
        reason = self._stop_reason(generation + 1, log.sigmas + [told["sigma"]], told["cma_stop"])

        noise = None
        if generation == 0 and cfg.probe_buckets:
            noise = probe_noise(self.objective, cfg, self._decoded(self.x0[None]), scores).to_dict()
        validation = self._validate(generation, reason, told["mean"], population, scores.fitness, log)
        if reason is None and validation is not None and cfg.patience is not None:
            if validations_since_best(log.validations + [validation]) >= cfg.patience:
                reason = "no_val_gain"

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
            "strategy_sha256": strategy.digest(),
        }

    def _replay(self, strategy: Strategy, record: dict[str, Any]) -> None:
        """Re-ask and re-tell a stored generation; any difference from the stored run is an error."""
        asked = strategy.ask(record["generation"])
        expected = np.array(record["candidates"], dtype=np.float64)
        if len(asked) != expected.shape[0] or not np.array_equal(np.array(asked), expected):
            raise RuntimeError(
                f"replaying run {self.run_name!r}: CMA-ES proposed different candidates at generation "
                f"{record['generation']} than the stored run; the state cannot be resumed exactly"
            )
        strategy.tell(asked, np.array(record["fitness"], dtype=np.float64))
        if strategy.digest() != record["strategy_sha256"]:
            raise RuntimeError(
                f"replaying run {self.run_name!r}: the CMA-ES state after generation {record['generation']} "
                "differs from the stored one (different pycma/NumPy build?); start over with resume=False"
            )
        if record.get("noise") and self.config.target_gain is not None:
            self.objective.resize_validation(record["noise"]["val_seeds_per_prompt"])

    # -- the parts of a generation -------------------------------------------------------------

    def _bucket_seeds(self, generation: int, log: _RunLog) -> int:
        """Seeds per training prompt: the configured ones, or from generation 1 on what the noise probe asked for."""
        noise = log.generations_noise
        if generation > 0 and noise and self.config.target_gain is not None:
            return int(noise.get("bucket_seeds_per_prompt", self.config.seeds_per_prompt))
        return self.config.seeds_per_prompt

    def _validate(
        self,
        generation: int,
        reason: str | None,
        mean: np.ndarray,
        population: np.ndarray,
        fitness: np.ndarray,
        log: _RunLog,
    ) -> dict[str, Any] | None:
        """Generation 0 validates x0 (the baseline); then every ``val_every`` and the last generation."""
        if generation == 0:
            vector, source = self.x0.copy(), "x0"
        elif generation % self.config.val_every == 0 or reason is not None:
            if self.config.validate == "mean":
                vector, source = mean, "mean"
            else:
                vector, source = population[int(np.argmax(fitness))], "best"
        else:
            return None
        vector = self._decoded(vector[None, :])[0]
        scores = self.objective.validate(vector[None, :])
        score = float(scores.fitness[0])
        best = log.best_validation()
        return {
            "generation": generation,
            "source": source,
            "score": score,
            "components": {k: float(v[0]) for k, v in scores.components.items()},
            "vector": vector.tolist(),
            "is_best": bool(best is None or score > best["score"] + self.config.min_val_gain),
        }

    def _decoded(self, points: np.ndarray) -> np.ndarray:
        return np.array([self.decode(np.asarray(p, dtype=np.float64)) for p in points], dtype=np.float64)

    def _stop_reason(self, done: int, sigmas: list[float], cma_stop: list[str]) -> str | None:
        """The stopping rules known before validating (the patience rule needs the validation)."""
        cfg = self.config
        if done >= cfg.max_generations:
            return "max_generations"
        w = cfg.sigma_plateau_window
        if w is not None and len(sigmas) > w:
            ref = sigmas[-w - 1]
            if ref > 0 and max(abs(s / ref - 1.0) for s in sigmas[-w:]) < cfg.sigma_plateau_tol:
                return "sigma_plateau"
        if cma_stop:
            return "cma:" + ",".join(cma_stop)
        return None


def validations_since_best(validations: Sequence[dict[str, Any]]) -> int:
    """How many validations in a row, counted from the end, brought no new best (the patience count)."""
    stale = 0
    for v in validations:
        stale = 0 if v["is_best"] else stale + 1
    return stale


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


__all__ = ["CalibrationRun", "GenerationCallback", "SearchResult", "validations_since_best"]
