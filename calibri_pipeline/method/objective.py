"""What a search optimises: the protocols an objective implements and the scores it returns.

:class:`PopulationObjective` is all :class:`~calibri_pipeline.method.search.CalibrationRun` needs;
the noise probe (``SearchConfig.probe_buckets``) also needs :class:`NoisyObjective`, the final
confirmation (``SearchConfig.confirm_top``) :class:`ConfirmingObjective`.
:class:`~calibri_pipeline.method.calibrate.RewardObjective` implements all three over images and rewards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from calibri_pipeline.method.seeds import Bucket


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


class NoisyObjective(PopulationObjective, Protocol):
    """An objective whose validation can be resized by the noise probe."""

    n_val_items: int

    def resize_validation(self, seeds_per_prompt: int) -> int:
        """Validate every prompt with ``seeds_per_prompt`` seeds from now on; return the validation images."""
        ...


class ConfirmingObjective(Protocol):
    def confirm(self, vectors: np.ndarray) -> PopulationScores:
        """Score ``vectors [K, D]`` on fresh seeds, with per-image ``cells``."""
        ...


__all__ = ["ConfirmingObjective", "NoisyObjective", "PopulationObjective", "PopulationScores"]
