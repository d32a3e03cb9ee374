"""pycma's CMA-ES behind four calls (:class:`Strategy`): ask, tell, a digest of its state, and its options.

pycma draws from NumPy's global RNG, so every pycma call runs inside a private copy of that RNG
(:class:`PrivateNumpyRandom`): other code touching ``np.random`` can neither perturb the search nor
be perturbed by it. :meth:`Strategy.digest` hashes the whole state (mean, step size, covariance,
paths, RNG), so a replay that would not be bit-identical (another pycma or NumPy build) is caught.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np


class PrivateNumpyRandom:
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


def _strategy_digest(es: Any, rng: PrivateNumpyRandom) -> str:
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


class Strategy:
    """One CMA-ES strategy on a private RNG: ``ask``, ``tell``, ``digest``.

    ``options`` are pycma's (bounds, popsize, ...); the seed is derived from ``seed`` (pycma reads
    seed 0 as "use the clock"). Generation 0's first candidate is ``x0`` itself (injected), even
    where the bound transform is not the identity (a warm start on a bound).
    """

    def __init__(self, x0: np.ndarray, sigma0: float, options: dict[str, Any], seed: int, honor_stop: bool) -> None:
        import cma

        self.x0 = np.array(x0, dtype=np.float64)
        self.honor_stop = honor_stop
        self.rng = PrivateNumpyRandom(_pycma_seed(seed))
        with self.rng.active():  # seed nan: "do nothing", the private RNG is seeded
            self.es = cma.CMAEvolutionStrategy(self.x0.tolist(), sigma0, dict(options, seed=np.nan))

    def ask(self, generation: int) -> list[np.ndarray]:
        with self.rng.active():
            if generation == 0:
                self.es.inject([self.es.boundary_handler.inverse(self.x0.copy())], force=True)
            return self.es.ask()

    def tell(self, candidates: Sequence[np.ndarray], fitness: np.ndarray) -> dict[str, Any]:
        """Tell the fitness (higher is better); the new step size, mean and pycma's stop conditions."""
        with self.rng.active():
            self.es.tell(list(candidates), [-float(f) for f in fitness])  # pycma minimises
            stop = self.es.stop() if self.honor_stop else {}
            mean = np.array(self.es.result.xfavorite, dtype=np.float64)
        return {"sigma": float(self.es.sigma), "mean": mean, "cma_stop": sorted(str(k) for k in stop)}

    def digest(self) -> str:
        return _strategy_digest(self.es, self.rng)


__all__ = ["PrivateNumpyRandom", "Strategy"]
