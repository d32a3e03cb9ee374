"""Calibrating a real backbone: the CMA-ES search bound to a backbone, a calibration space and rewards.

:class:`RewardObjective` is the :class:`~calibri_pipeline.method.search.PopulationObjective` of a
backbone (images from its sampler, scored by rewards); :func:`calibrate` builds it with the search
vector's layout (:class:`~calibri_pipeline.method.ensemble.EnsembleLayout`), runs
:class:`~calibri_pipeline.method.search.CalibrationRun` and returns a :class:`CalibrationResult`
that says what the selected vector means for the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from calibri_pipeline.method.ensemble import EnsembleLayout
from calibri_pipeline.method.population import as_reward_list, evaluate_population
from calibri_pipeline.method.search import (
    Bucket,
    CalibrationRun,
    GenerationCallback,
    PopulationScores,
    SearchConfig,
    SearchResult,
    validation_seeds,
)
from calibri_pipeline.method.state_store import StateStore

if TYPE_CHECKING:
    from calibri_pipeline.backbones.base import Backbone
    from calibri_pipeline.method.space import CalibrationSpace
    from calibri_pipeline.prompts.base import Prompt
    from calibri_pipeline.rewards.base import Reward


# --------------------------------------------------------------------------------------------
# The CMA-ES objective on a real backbone
# --------------------------------------------------------------------------------------------


class RewardObjective:
    """:class:`~calibri_pipeline.method.search.PopulationObjective` for a backbone and rewards.

    fitness = ``sum_r weight_r * sign_r * mean(scores_r)`` over the bucket (sign -1 for rewards with
    ``higher_is_better=False``); every reward is scored and reported as a component, including
    ones with weight 0 (tracked, not optimised).
    """

    def __init__(
        self,
        backbone: "Backbone",
        space: "CalibrationSpace",
        train_prompts: Sequence["Prompt"],
        val_prompts: Sequence["Prompt"],
        rewards: Reward | Sequence[Reward] | Mapping[str, Reward],
        *,
        reward_weights: Mapping[str, float] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        n_models: int = 1,
        val_seeds: Sequence[int],
        max_batch: int | None = None,
        memory_budget_mb: float | None = None,
        evaluator: Any = None,
    ) -> None:
        self.backbone = backbone
        self.space = space
        self.train_prompts = list(train_prompts)
        self.val_prompts = list(val_prompts)
        if not self.train_prompts:
            raise ValueError("calibration needs training prompts")
        if not self.val_prompts:
            raise ValueError("calibration needs validation prompts (the result is selected on them)")
        self.rewards = as_reward_list(rewards)
        names = [r.name for r in self.rewards]
        if reward_weights is None:
            if len(self.rewards) > 1:
                raise ValueError(
                    f"several rewards {names} given: say how to combine them with reward_weights "
                    "(e.g. {'world_score': 1.0}; rewards left out are tracked with weight 0)"
                )
            reward_weights = {names[0]: 1.0}
        unknown = sorted(set(reward_weights) - set(names))
        if unknown:
            raise ValueError(f"reward_weights name unknown rewards {unknown}; rewards given: {names}")
        self.reward_weights = {n: float(reward_weights.get(n, 0.0)) for n in names}
        if not any(w != 0 for w in self.reward_weights.values()):
            raise ValueError("at least one reward weight must be non-zero")
        self.steps = steps if steps is not None else backbone.default_steps
        self.guidance = guidance
        self.n_models = n_models
        self.val_seeds = [int(s) for s in val_seeds]
        if len(self.val_seeds) != len(self.val_prompts):
            raise ValueError(f"need one validation seed per validation prompt: {len(self.val_prompts)} prompts, {len(self.val_seeds)} seeds")
        self.max_batch = max_batch
        self.memory_budget_mb = memory_budget_mb
        # anything with evaluate_population's signature (e.g. ray_eval.RayPopulationEvaluator);
        # not part of describe(): where images are computed does not change the run
        self.evaluator = evaluator

    @property
    def n_train_items(self) -> int:
        return len(self.train_prompts)

    def _scores(self, vectors: np.ndarray, prompts: Sequence["Prompt"], seeds: Sequence[int]) -> PopulationScores:
        evaluate = evaluate_population if self.evaluator is None else self.evaluator.evaluate_population
        per_reward = evaluate(
            self.backbone,
            self.space,
            torch.as_tensor(np.asarray(vectors, dtype=np.float64)),
            prompts,
            seeds,
            self.rewards,
            steps=self.steps,
            guidance=self.guidance,
            n_models=self.n_models,
            max_batch=self.max_batch,
            memory_budget_mb=self.memory_budget_mb,
        )
        components = {name: s.to(torch.float64).mean(dim=1).numpy() for name, s in per_reward.items()}
        fitness = np.zeros(len(vectors), dtype=np.float64)
        for r in self.rewards:
            sign = 1.0 if getattr(r, "higher_is_better", True) else -1.0
            fitness += self.reward_weights[r.name] * sign * components[r.name]
        return PopulationScores(fitness, components)

    def train(self, vectors: np.ndarray, bucket: Bucket) -> PopulationScores:
        prompts = [self.train_prompts[i] for i in bucket.item_indices]
        return self._scores(vectors, prompts, bucket.seeds)

    def validate(self, vectors: np.ndarray) -> PopulationScores:
        return self._scores(vectors, self.val_prompts, self.val_seeds)

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": getattr(self.backbone, "name", type(self.backbone).__name__),
            "space": {"granularity": self.space.granularity, "names": list(self.space.names)},
            "train_prompts": [p.prompt_id for p in self.train_prompts],
            "val_prompts": [p.prompt_id for p in self.val_prompts],
            "val_seeds": self.val_seeds,
            "rewards": self.reward_weights,
            "steps": self.steps,
            "guidance": self.guidance,
            "n_models": self.n_models,
        }



# --------------------------------------------------------------------------------------------
# Calibrating a real backbone
# --------------------------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    """A finished calibration: the search result plus its meaning for the model."""

    search: SearchResult
    layout: EnsembleLayout
    coefficient_names: list[str]
    granularity: str
    steps: int
    guidance: float | None

    @property
    def vector(self) -> np.ndarray:
        return self.search.vector

    @property
    def n_models(self) -> int:
        return self.layout.n_models

    @property
    def coefficients(self) -> np.ndarray:
        """``[n_models, size]``: the coefficients of every ensemble member."""
        n, s = self.layout.n_models, self.layout.size
        return self.search.vector[: n * s].reshape(n, s).copy()

    @property
    def weights(self) -> np.ndarray:
        """``[n_models]`` ensemble weights."""
        return self.search.vector[self.layout.n_models * self.layout.size :].copy()

    @property
    def val_score(self) -> float:
        return self.search.val_score

    @property
    def baseline_val_score(self) -> float:
        return self.search.baseline_val_score

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (what the pipeline stores next to the coefficients)."""
        return {
            "granularity": self.granularity,
            "n_models": self.layout.n_models,
            "ensemble_mode": self.layout.mode,
            "names": list(self.coefficient_names),
            "coefficients": self.coefficients.tolist(),
            "weights": self.weights.tolist(),
            "vector": self.search.vector.tolist(),
            "steps": self.steps,
            "guidance": self.guidance,
            "val_score": self.search.val_score,
            "baseline_val_score": self.search.baseline_val_score,
            "best_generation": self.search.best_generation,
            "generations": self.search.n_generations,
            "popsize": self.search.popsize,
            "stop_reason": self.search.stop_reason,
        }


def calibrate(
    backbone: "Backbone",
    space: "CalibrationSpace",
    train_prompts: Sequence["Prompt"],
    val_prompts: Sequence["Prompt"],
    rewards: "Reward | Sequence[Reward]",
    *,
    reward_weights: Mapping[str, float] | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    n_models: int = 1,
    warm_start: "Sequence[float] | np.ndarray | torch.Tensor | None" = None,
    config: SearchConfig | None = None,
    val_seeds: Sequence[int] | None = None,
    store: StateStore | None = None,
    run_name: str = "calibration",
    resume: bool = True,
    on_generation: GenerationCallback | None = None,
    max_batch: int | None = None,
    memory_budget_mb: float | None = None,
    evaluator: Any = None,
) -> CalibrationResult:
    """Calibrate ``backbone`` with CMA-ES and return the best coefficients by validation.

    ``rewards`` are all scored and recorded; the fitness is ``sum(weight * reward)`` over
    ``reward_weights`` (default: weight 1 for a single reward; rewards with
    ``higher_is_better=False`` count negatively). ``warm_start`` is a full search vector
    (``space.search_size(n_models)``) or one model's ``space.size`` coefficients (then the ensemble
    part starts from the layout's x0). ``steps``/``guidance`` default to the backbone's.
    ``evaluator`` scores populations elsewhere (e.g. a ``RayPopulationEvaluator``; default in-process).
    """

    config = config if config is not None else SearchConfig()
    steps = steps if steps is not None else backbone.default_steps
    if guidance is None:
        guidance = backbone.default_guidance
    layout = EnsembleLayout(space.size, n_models, cfg=bool(backbone.uses_cfg))
    if layout.search_size != space.search_size(n_models):
        raise ValueError(f"layout search size {layout.search_size} != space.search_size({n_models}) = {space.search_size(n_models)}")
    x0 = layout.initial(guidance if layout.mode == "cfg" else None).numpy().astype(np.float64)
    if warm_start is not None:
        warm = np.asarray(warm_start.detach().cpu().numpy() if isinstance(warm_start, torch.Tensor) else warm_start, dtype=np.float64).reshape(-1)
        if warm.size == layout.search_size:
            x0 = warm
        elif warm.size == space.size:
            x0[: n_models * space.size] = np.tile(warm, n_models)
        else:
            raise ValueError(
                f"warm_start must have {layout.search_size} entries (a full search vector for n_models={n_models}) "
                f"or {space.size} (one model's coefficients), got {warm.size}"
            )
    lower, upper = layout.bounds(config.coefficient_bounds, config.weight_bounds)
    objective = RewardObjective(
        backbone,
        space,
        train_prompts,
        val_prompts,
        rewards,
        reward_weights=reward_weights,
        steps=steps,
        guidance=guidance,
        n_models=n_models,
        val_seeds=val_seeds if val_seeds is not None else validation_seeds(config.seed, len(val_prompts)),
        max_batch=max_batch,
        memory_budget_mb=memory_budget_mb,
        evaluator=evaluator,
    )
    run = CalibrationRun(
        objective,
        x0,
        lower,
        upper,
        config,
        store=store,
        run_name=run_name,
        on_generation=on_generation,
        resume=resume,
        names=layout.names(space.names),
    )
    search = run.run()
    return CalibrationResult(
        search=search,
        layout=layout,
        coefficient_names=list(space.names),
        granularity=space.granularity,
        steps=steps,
        guidance=guidance,
    )



__all__ = ["CalibrationResult", "RewardObjective", "calibrate"]
