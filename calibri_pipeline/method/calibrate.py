"""Calibrating a real backbone: the CMA-ES search bound to a backbone, a calibration space and rewards.

:class:`RewardObjective` is the :class:`~calibri_pipeline.method.search.PopulationObjective` of a
backbone (images from its sampler, scored by rewards); :func:`calibrate` builds it with the search
vector's layout (:class:`~calibri_pipeline.method.ensemble.EnsembleLayout`), runs
:class:`~calibri_pipeline.method.search.CalibrationRun` and returns a :class:`CalibrationResult`
that says what the selected vector means for the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from calibri_pipeline.method.ensemble import EnsembleLayout, GuidanceCoordinates
from calibri_pipeline.method.objective import PopulationScores
from calibri_pipeline.method.population import ImageCache, LocalEvaluator, PopulationEvaluator
from calibri_pipeline.method.sampler import SamplingSettings
from calibri_pipeline.method.search import CalibrationRun, GenerationCallback, SearchResult
from calibri_pipeline.method.search_config import SearchConfig
from calibri_pipeline.method.seeds import CONFIRM_SEED_BASE, Bucket, confirmation_seeds, validation_seeds
from calibri_pipeline.method.space import SearchSpace
from calibri_pipeline.method.state_store import StateStore

if TYPE_CHECKING:
    from calibri_pipeline.method.ray_eval import RayWorkerPool
    from calibri_pipeline.method.sampler import Backbone
    from calibri_pipeline.prompts.base import Prompt
    from calibri_pipeline.rewards.base import Reward


# --------------------------------------------------------------------------------------------
# The CMA-ES objective on a real backbone
# --------------------------------------------------------------------------------------------


class RewardObjective:
    """:class:`~calibri_pipeline.method.search.PopulationObjective` of a population evaluator's rewards.

    fitness = ``sum_r weight_r * sign_r * mean(scores_r)`` over the bucket (sign -1 for rewards with
    ``higher_is_better=False``); every reward is scored and reported as a component, including
    ones with weight 0 (tracked, not optimised). Validation cells are ``val_prompts`` x seeds:
    ``val_seeds`` holds one seed per validation prompt for each of ``k >= 1`` replicates (replicate
    after replicate). With ``seed`` (the search's), the search can resize validation to ``k`` seeds
    per prompt (:meth:`resize_validation`) and confirm its choice on fresh ones (:meth:`confirm`).
    Training buckets are never stored in the evaluator's image cache (no image there is seen twice);
    validation and confirmation images are.
    """

    def __init__(
        self,
        evaluator: PopulationEvaluator,
        train_prompts: Sequence[Prompt],
        val_prompts: Sequence[Prompt],
        *,
        reward_weights: Mapping[str, float] | None = None,
        val_seeds: Sequence[int] | None = None,
        seed: int | None = None,
        per_prompt_seeds: Sequence[int] | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.train_prompts = list(train_prompts)
        self.val_base = list(val_prompts)
        if not self.train_prompts:
            raise ValueError("calibration needs training prompts")
        if not self.val_base:
            raise ValueError("calibration needs validation prompts (the result is selected on them)")
        self.rewards = evaluator.rewards
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
        if val_seeds is not None and per_prompt_seeds is not None:
            raise ValueError("give val_seeds (one per cell) or per_prompt_seeds (the same for every prompt), not both")
        if val_seeds is None and per_prompt_seeds is None and seed is None:
            raise ValueError("give val_seeds (one per validation prompt and replicate) or the search seed")
        self.seed = seed
        self.per_prompt_seeds = None if per_prompt_seeds is None else [int(s) for s in per_prompt_seeds]
        if self.per_prompt_seeds is not None:
            if not self.per_prompt_seeds or len(set(self.per_prompt_seeds)) != len(self.per_prompt_seeds):
                raise ValueError(f"per_prompt_seeds must be distinct ints, got {per_prompt_seeds!r}")
            seeds = self._per_prompt(len(self.per_prompt_seeds))
        elif val_seeds is not None:
            seeds = [int(s) for s in val_seeds]
        else:
            seeds = validation_seeds(seed, len(self.val_base))
        if not seeds or len(seeds) % len(self.val_base):
            raise ValueError(
                f"need one validation seed per validation prompt (and replicate): {len(self.val_base)} prompts, "
                f"{len(seeds)} seeds"
            )
        self._set_validation(seeds)

    def _set_validation(self, seeds: list[int]) -> None:
        k = len(seeds) // len(self.val_base)
        self.val_prompts = [p for _ in range(k) for p in self.val_base]
        self.val_seeds = seeds

    @property
    def n_train_items(self) -> int:
        return len(self.train_prompts)

    @property
    def n_val_items(self) -> int:
        return len(self.val_base)

    def _per_prompt(self, k: int) -> list[int]:
        """Cell seeds (replicate after replicate) for ``k`` seeds per prompt: the given ones, then the next ints."""
        values = list(self.per_prompt_seeds)
        while len(values) < k:
            values.append(max(values) + 1)
        return [s for s in values[:k] for _ in self.val_base]

    def resize_validation(self, seeds_per_prompt: int) -> int:
        """Validate on ``seeds_per_prompt`` seeds per validation prompt from now on; returns the image count."""
        if self.per_prompt_seeds is not None:
            self._set_validation(self._per_prompt(seeds_per_prompt))
        elif self.seed is None:
            raise ValueError("resizing validation needs the search seed (RewardObjective(seed=...))")
        else:
            self._set_validation(validation_seeds(self.seed, len(self.val_base), seeds_per_prompt))
        return len(self.val_seeds)

    def _scores(
        self, vectors: np.ndarray, prompts: Sequence[Prompt], seeds: Sequence[int], *, store: bool
    ) -> PopulationScores:
        per_reward = self.evaluator(np.asarray(vectors, dtype=np.float64), prompts, seeds, store=store).scores
        cells = np.zeros((len(vectors), len(prompts)), dtype=np.float64)
        for r in self.rewards:
            sign = 1.0 if getattr(r, "higher_is_better", True) else -1.0
            cells += self.reward_weights[r.name] * sign * per_reward[r.name]
        components = {name: s.mean(axis=1) for name, s in per_reward.items()}
        return PopulationScores(cells.mean(axis=1), components, cells)

    def train(self, vectors: np.ndarray, bucket: Bucket) -> PopulationScores:
        prompts = [self.train_prompts[i] for i in bucket.item_indices]
        return self._scores(vectors, prompts, bucket.seeds, store=False)

    def validate(self, vectors: np.ndarray) -> PopulationScores:
        return self._scores(vectors, self.val_prompts, self.val_seeds, store=True)

    def confirm(self, vectors: np.ndarray) -> PopulationScores:
        """The validation prompts with fresh seeds (as many per prompt as validation uses now)."""
        if self.seed is None:
            raise ValueError("confirming needs the search seed (RewardObjective(seed=...))")
        k = len(self.val_seeds) // len(self.val_base)
        if self.per_prompt_seeds is not None:  # fresh per-prompt seeds far from any the pipeline uses elsewhere
            seeds = [CONFIRM_SEED_BASE + r for r in range(k) for _ in self.val_base]
        else:
            seeds = confirmation_seeds(self.seed, len(self.val_base), k)
        return self._scores(vectors, [p for _ in range(k) for p in self.val_base], seeds, store=True)

    def describe(self) -> dict[str, Any]:
        ev = self.evaluator
        search = ev.search
        return {
            "backbone": getattr(ev.backbone, "name", type(ev.backbone).__name__),
            "space": None if search is None else {"granularity": search.granularity, "names": list(search.space.names)},
            "train_prompts": [p.prompt_id for p in self.train_prompts],
            "val_prompts": [p.prompt_id for p in self.val_base],
            "val_seeds": self.val_seeds,
            "rewards": self.reward_weights,
            "steps": ev.sampling.steps,
            "guidance": ev.sampling.guidance,
            "shift": ev.sampling.shift,
            "n_models": 1 if search is None else search.n_models,
        }


# --------------------------------------------------------------------------------------------
# Calibrating a real backbone
# --------------------------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    """A finished calibration: the search result plus its meaning for the model."""

    search: SearchResult
    space: SearchSpace  # what the vector means (its run record: ``space.to_dict()``)
    steps: int
    guidance: float | None
    shift: float = 1.0  # the sampler's sigma shift the vector was calibrated at

    @property
    def vector(self) -> np.ndarray:
        return self.search.vector

    @property
    def layout(self) -> EnsembleLayout:
        return self.space.layout

    @property
    def segments(self) -> tuple[float, ...]:
        return self.space.segments

    @property
    def granularity(self) -> str:
        return self.space.granularity

    @property
    def coefficient_names(self) -> list[str]:
        return list(self.space.space.names)

    @property
    def n_models(self) -> int:
        return self.layout.n_models

    def _parts(self) -> np.ndarray:
        return self.search.vector.reshape(len(self.segments) + 1, self.layout.search_size)

    @property
    def coefficients(self) -> np.ndarray:
        """``[n_models, size]``: the coefficients of every ensemble member (``[parts, n_models, size]``
        with time segments)."""
        n, s = self.layout.n_models, self.layout.size
        out = self._parts()[:, : n * s].reshape(-1, n, s).copy()
        return out[0] if not self.segments else out

    @property
    def weights(self) -> np.ndarray:
        """``[n_models]`` ensemble weights (``[parts, n_models]`` with time segments)."""
        out = self._parts()[:, self.layout.n_models * self.layout.size :].copy()
        return out[0] if not self.segments else out

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
            "segments": list(self.segments),
            "names": list(self.coefficient_names),
            "coefficients": self.coefficients.tolist(),
            "weights": self.weights.tolist(),
            "vector": self.search.vector.tolist(),
            "steps": self.steps,
            "guidance": self.guidance,
            "shift": self.shift,
            "val_score": self.search.val_score,
            "baseline_val_score": self.search.baseline_val_score,
            "best_generation": self.search.best_generation,
            "generations": self.search.n_generations,
            "popsize": self.search.popsize,
            "stop_reason": self.search.stop_reason,
        }


@dataclass(frozen=True)
class CalibrationOptions:
    """How :func:`calibrate` searches and where it keeps what it finds (every field optional).

    - ``config``: the CMA-ES hyper-parameters; ``initial_stds``: per-coordinate initial deviations in
      the search's coordinates (:mod:`calibri_pipeline.method.scaling`); ``guidance_coordinates``:
      search the CFG ensemble's weight pair as guidance x scale (:class:`GuidanceCoordinates`; the
      result is in the paper's layout either way).
    - ``warm_start``: a full search vector, one part of the schedule's (then every part starts from
      it), or one model's coefficients (then the ensemble part starts from the layout's x0).
    - ``reward_weights``: the fitness is ``sum(weight * reward)`` (default: weight 1 for a single
      reward; rewards with ``higher_is_better=False`` count negatively).
    - validation cells: ``val_seeds`` (one per cell) or ``val_seeds_per_prompt`` (every validation
      prompt with each seed; the noise probe extends them with the next integers), else seeds drawn
      from the search seed.
    - ``store`` / ``run_name`` / ``resume``: where the run's journal is kept and whether it is resumed;
      ``on_generation`` hears every generation's row; ``pool`` makes the images on Ray workers
      (default: in-process); ``cache`` keeps validation images for later stages (under ``model``'s
      identity); ``progress`` shows bars.
    """

    config: SearchConfig = SearchConfig()
    warm_start: Sequence[float] | np.ndarray | torch.Tensor | None = None
    initial_stds: Sequence[float] | None = None
    guidance_coordinates: bool = False
    reward_weights: Mapping[str, float] | None = None
    val_seeds: Sequence[int] | None = None
    val_seeds_per_prompt: Sequence[int] | None = None
    store: StateStore | None = None
    run_name: str = "calibration"
    resume: bool = True
    on_generation: GenerationCallback | None = None
    pool: RayWorkerPool | None = None
    cache: ImageCache | None = None
    model: str | None = None
    progress: bool = False

    def with_(self, **changes: Any) -> CalibrationOptions:
        return replace(self, **changes)


def _start(search: SearchSpace, guidance: float | None, warm_start: Any) -> np.ndarray:
    """x0 of the search: the unmodified model, or the warm start in one of the lengths it may have."""
    layout, space = search.layout, search.space
    x0 = search.x0(guidance).numpy().astype(np.float64)
    if warm_start is not None:
        warm = np.asarray(
            warm_start.detach().cpu().numpy() if isinstance(warm_start, torch.Tensor) else warm_start, dtype=np.float64
        ).reshape(-1)
        one = x0[: layout.search_size].copy()
        if warm.size == search.dimension:
            x0 = warm
        elif warm.size == layout.search_size:
            x0 = np.tile(warm, search.n_segments)
        elif warm.size == space.size:
            one[: search.n_models * space.size] = np.tile(warm, search.n_models)
            x0 = np.tile(one, search.n_segments)
        else:
            sizes = f"{search.dimension}, {layout.search_size}" if search.n_segments > 1 else f"{layout.search_size}"
            raise ValueError(
                f"warm_start must have {sizes} entries (a full search vector for n_models={search.n_models}) "
                f"or {space.size} (one model's coefficients), got {warm.size}"
            )
    if not np.all(np.isfinite(x0)):
        raise ValueError("x0 contains NaN or infinite values")
    return x0


def calibrate(
    backbone: Backbone,
    search: SearchSpace,
    train_prompts: Sequence[Prompt],
    val_prompts: Sequence[Prompt],
    rewards: Reward | Sequence[Reward],
    sampling: SamplingSettings | None = None,
    options: CalibrationOptions | None = None,
) -> CalibrationResult:
    """Calibrate ``backbone`` with CMA-ES over ``search`` and return the best coefficients by validation.

    ``search`` says what a vector means (``SearchSpace.for_model(space, n_models, uses_cfg=...,
    segments=...)``: granularity, ensemble, time segments); ``sampling`` how the images are made
    (steps, guidance, the flow schedule's shift, e.g. a tuned one to calibrate on top of; None: the
    backbone's defaults); ``options`` how the search runs and where it keeps things
    (:class:`CalibrationOptions`). Every reward is scored and recorded.
    """
    options = options if options is not None else CalibrationOptions()
    if not isinstance(search, SearchSpace):
        raise TypeError(
            f"search must be a SearchSpace (SearchSpace.for_model(space, ...)), got {type(search).__name__}"
        )
    if search.layout.cfg != bool(backbone.uses_cfg):
        raise ValueError(
            f"the search space was laid out {'with' if search.layout.cfg else 'without'} classifier-free guidance, "
            f"but {backbone.name} {'uses' if backbone.uses_cfg else 'does not use'} it: build it with "
            "SearchSpace.for_model(space, n_models, uses_cfg=backbone.uses_cfg)"
        )
    config = options.config
    layout, space = search.layout, search.space
    sampling = (sampling if sampling is not None else SamplingSettings()).resolved(backbone)
    x0 = _start(search, sampling.guidance, options.warm_start)
    lower, upper = layout.bounds(config.coefficient_bounds, config.weight_bounds)
    lower, upper = lower * search.n_segments, upper * search.n_segments
    names = search.names()
    decode = None
    if options.guidance_coordinates:
        coords = GuidanceCoordinates(layout, search.n_segments)
        x0 = np.array(coords.encode(x0))
        lower, upper = coords.bounds(lower, upper)
        names = coords.names(space.names)
        decode = coords.decode
    kept = dict(cache=options.cache, model=options.model, progress=options.progress)
    evaluator = (
        LocalEvaluator(backbone, search, rewards, sampling, **kept)
        if options.pool is None
        else options.pool.evaluator(backbone, search, rewards, sampling, **kept)
    )
    objective = RewardObjective(
        evaluator,
        train_prompts,
        val_prompts,
        reward_weights=options.reward_weights,
        val_seeds=options.val_seeds,
        seed=config.seed,
        per_prompt_seeds=options.val_seeds_per_prompt,
    )
    run = CalibrationRun(
        objective,
        x0,
        lower,
        upper,
        config,
        store=options.store,
        run_name=options.run_name,
        on_generation=options.on_generation,
        resume=options.resume,
        names=names,
        initial_stds=options.initial_stds,
        decode=(lambda z: np.array(decode(z))) if decode is not None else None,
    )
    return CalibrationResult(
        search=run.run(), space=search, steps=sampling.steps, guidance=sampling.guidance, shift=float(sampling.shift)
    )


__all__ = ["CalibrationOptions", "CalibrationResult", "RewardObjective", "calibrate"]
