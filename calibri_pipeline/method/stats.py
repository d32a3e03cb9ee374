"""Bootstrap confidence intervals for mean rewards and paired reward differences.

Scores come as one value per *cell* (a prompt x seed pair). A paired comparison of two settings
evaluated on the same cells (same prompts, same noise) bootstraps the per-cell differences, which
removes the prompt-to-prompt variance both settings share. ``clusters`` (e.g. the prompt of each
cell) switches to a cluster bootstrap that resamples whole prompts, for when cells of one prompt are
too alike to count as independent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean with its percentile-bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    level: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def format(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    clusters: Sequence[object] | np.ndarray | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Mean of ``values`` and its percentile bootstrap interval (cells, or whole clusters, resampled).

    Deterministic for a given ``seed``. A single value gives a zero-width interval.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_ci got NaN or infinite values")
    if not (0.0 < level < 1.0):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    mean = float(x.mean())
    rng = np.random.default_rng(seed)
    if clusters is None:
        if x.size == 1:
            return Interval(mean, mean, mean, 1, level)
        boot = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    else:
        labels = np.asarray(clusters, dtype=object).reshape(-1)
        if labels.size != x.size:
            raise ValueError(f"clusters must label every value: {labels.size} labels for {x.size} values")
        _, inverse = np.unique(labels.astype(str), return_inverse=True)
        n_clusters = int(inverse.max()) + 1
        if n_clusters == 1:
            return Interval(mean, mean, mean, x.size, level)
        sums = np.bincount(inverse, weights=x, minlength=n_clusters)
        counts = np.bincount(inverse, minlength=n_clusters).astype(np.float64)
        picks = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
        boot = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return Interval(mean, float(low), float(high), int(x.size), level)


def paired_difference_ci(
    treatment: Sequence[float] | np.ndarray,
    control: Sequence[float] | np.ndarray,
    **kwargs,
) -> Interval:
    """Bootstrap interval of ``mean(treatment - control)`` over matched cells."""
    a = np.asarray(treatment, dtype=np.float64).reshape(-1)
    b = np.asarray(control, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must match cell for cell: {a.size} vs {b.size} values")
    return bootstrap_ci(a - b, **kwargs)


__all__ = ["Interval", "bootstrap_ci", "paired_difference_ci"]
