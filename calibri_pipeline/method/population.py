"""Scoring Calibri vectors: a whole CMA-ES population (or a sweep) as one batch, through one evaluator.

A :class:`PopulationEvaluator` is built once from a backbone, a :class:`SearchSpace` (``None`` for
the unmodified model only), the rewards and a :class:`SamplingSettings` value; calling it with
``vectors [P, D]`` (or ``None``: the unmodified model), prompts and seeds returns every reward's
``[P, B]`` scores. Every image of every candidate goes through the backbone's one sampling loop in a
single call with per-image vectors (micro-batched to ``max_batch`` images per transformer forward),
because a generation's cost is mostly per-forward overhead at small batch sizes, not arithmetic.

Where the missing images are made is the one thing implementations differ in:
:class:`LocalEvaluator` samples them in this process, ``RayPopulationEvaluator``
(:mod:`calibri_pipeline.method.ray_eval`) on Ray actors. Both share the rest: the vectors are
checked once (:meth:`SearchSpace.check`), flattened into one job per image, looked up in an optional
:class:`ImageCache` (keyed by everything that determines an image: the model's identity, prompt
text, seed, steps, guidance and vector), and every image is quantised to 8 bits before it is
scored, so a reward sees exactly the PNG a user sees and a cached image scores like a fresh one.

Images with the same (prompt, seed, vector) are equal up to float rounding whatever else is in the
batch (kernels may round differently with batch shape) and bitwise equal when the same call is
replayed; with a cache, an image is computed once and every later use reads that one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from calibri_pipeline.method.sampler import Backbone, SamplingSettings
from calibri_pipeline.method.space import SearchSpace
from calibri_pipeline.rewards.base import Reward, check_scores

if TYPE_CHECKING:
    from calibri_pipeline.method.space import CalibrationSpace
    from calibri_pipeline.prompts.base import Prompt

#: bump when the sampler's arithmetic changes, so cached images of the old sampler are not reused
SAMPLER_VERSION = 1

ProgressFn = Callable[[int], None]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def as_reward_list(rewards: Reward | Sequence[Reward] | Mapping[str, Reward]) -> list[Reward]:
    """One reward or several -> a list with unique names."""
    if isinstance(rewards, Mapping):
        items = list(rewards.values())
    elif isinstance(rewards, (list, tuple)):
        items = list(rewards)
    else:
        items = [rewards]
    if not items:
        raise ValueError("at least one reward is needed")
    for r in items:
        if not callable(r) or not hasattr(r, "name"):
            raise TypeError(f"a reward must be callable with a .name (the Reward protocol), got {type(r).__name__}")
    names = [r.name for r in items]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique, got {names}")
    return items


def check_prompts_seeds(prompts: Sequence[Prompt], seeds: Sequence[int]) -> list[int]:
    if len(prompts) == 0:
        raise ValueError("no prompts to evaluate")
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"need one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
    return seeds


# --------------------------------------------------------------------------------------------
# Memory budget -> images per transformer forward
# --------------------------------------------------------------------------------------------

# backbone -> {(search dimension, n_models): MiB per image}; weak so a dropped backbone frees its entry
_MEMORY_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[int, int], float]] = weakref.WeakKeyDictionary()
#: a forward holds its input, output and a few intermediates of the largest size at once
_ACTIVATION_SAFETY = 4.0


def estimate_image_memory_mb(
    backbone: Backbone,
    space: CalibrationSpace | SearchSpace | None,
    prompt: Prompt,
    *,
    n_models: int = 1,
    guidance: float | None = None,
) -> float:
    """Peak activation memory per image (MiB) of one denoising step, measured on a 1-image, 1-step run.

    On CUDA it is the allocator's peak above the starting allocation; elsewhere the largest module
    output seen by forward hooks times a safety factor (a forward keeps a few such tensors alive).
    Cached per (backbone, search space size, n_models).
    """
    search = _as_search(backbone, space, n_models)
    key = (search.dimension if search is not None else 0, search.n_models if search is not None else 1)
    cached = _MEMORY_CACHE.get(backbone, {})
    if key in cached:
        return cached[key]
    transformer = backbone.transformer
    device = next(transformer.parameters()).device
    settings = SamplingSettings(steps=1, guidance=guidance, max_batch=1).resolved(backbone)
    vectors = None if search is None else search.check(search.x0(settings.guidance))

    def one_step() -> None:
        backbone.sample([prompt.text if hasattr(prompt, "text") else prompt], [0], settings, search, vectors)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        one_step()
        torch.cuda.synchronize(device)
        per_image = (torch.cuda.max_memory_allocated(device) - start) / 2**20
    else:
        largest = [0]

        def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            tensors = output if isinstance(output, (tuple, list)) else (output,)
            size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            largest[0] = max(largest[0], size)

        handles = [m.register_forward_hook(record) for m in transformer.modules()]
        try:
            one_step()
        finally:
            for h in handles:
                h.remove()
        per_image = _ACTIVATION_SAFETY * largest[0] / 2**20
    per_image = max(per_image, 1e-3)
    _MEMORY_CACHE.setdefault(backbone, {})[key] = per_image
    return per_image


def max_batch_for_budget(memory_budget_mb: float, per_image_mb: float) -> int:
    """Images per transformer forward that fit in ``memory_budget_mb`` (at least 1)."""
    if not (memory_budget_mb > 0):
        raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb!r}")
    if not (per_image_mb > 0):
        raise ValueError(f"per_image_mb must be > 0, got {per_image_mb!r}")
    return max(1, int(math.floor(memory_budget_mb / per_image_mb)))


def resolve_max_batch(
    backbone: Backbone, search: SearchSpace | None, prompt: Prompt, settings: SamplingSettings
) -> int | None:
    """``max_batch`` when given, else derived from ``memory_budget_mb``, else None (the backbone's own)."""
    if settings.max_batch is not None:
        return settings.max_batch
    if settings.memory_budget_mb is None:
        return None
    per_image = estimate_image_memory_mb(backbone, search, prompt, guidance=settings.guidance)
    return max_batch_for_budget(settings.memory_budget_mb, per_image)


# --------------------------------------------------------------------------------------------
# Images: what determines one, the cache, 8-bit quantisation
# --------------------------------------------------------------------------------------------


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """What an image is once saved as PNG: ``round(255 x) / 255`` (float32, as a PNG reads back)."""
    return torch.round(images.float().clamp(0.0, 1.0) * 255.0) / 255.0


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def vector_digest(search: SearchSpace, vector: torch.Tensor) -> str:
    """Identity of one checked vector in its search space (layout and coefficient names included)."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [search.granularity, search.space.names, search.layout.n_models, search.layout.cfg]
            + ([list(search.segments)] if search.segments else [])
        ).encode()
    )
    h.update(vector.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def unmodified_guidance(search: SearchSpace, vector: torch.Tensor, guidance: float | None) -> float | None | bool:
    """The guidance at which ``vector`` makes *bitwise* the unmodified model's image, or False.

    That holds for x0 of one model (all-ones coefficients, weight 1: the hooks are skipped; at the
    sampling guidance) and for the CFG pair with all-ones coefficients and weights ``a, 1 - a`` (the
    sampler writes plain CFG at guidance ``a`` as that very sum), not for ensembles whose members sum
    to the base model only up to rounding. Such vectors share the unmodified model's cache entries.
    """
    layout = search.layout
    vec = vector.to(torch.float32)
    if search.n_segments > 1:  # time-dependent: the unmodified model only when every part is
        parts = [search.segment(vec, j) for j in range(search.n_segments)]
        if not all(torch.equal(p, parts[0]) for p in parts[1:]):
            return False
        vec = parts[0]
    n_coef = layout.n_models * layout.size
    if layout.mode not in ("single", "cfg") or not bool((vec[:n_coef] == 1).all()):
        return False
    weights = vec[n_coef:]
    if layout.mode == "single":
        return guidance if float(weights[0]) == 1.0 else False
    if layout.n_models != 2:
        return False
    a = float(weights[0])
    return a if float(weights[1]) == float(torch.tensor(1.0 - a, dtype=torch.float32)) else False


@dataclass(frozen=True)
class ImageJob:
    """One image to have: its prompt, noise seed and Calibri vector (None: the unmodified model)."""

    prompt: Prompt
    seed: int
    vector: torch.Tensor | None
    key: str
    vector_id: str  # "baseline" or the vector's digest
    guidance: float | None = None  # the unmodified model's guidance (None: the sampling settings')

    @property
    def text(self) -> str:
        return self.prompt.text if hasattr(self.prompt, "text") else str(self.prompt)


def image_key(
    identity: Mapping[str, Any], text: str, seed: int, steps: int, guidance: float | None, vector_id: str
) -> str:
    """The cache key of an image: everything that determines it, hashed."""
    return _digest([SAMPLER_VERSION, dict(identity), text, int(seed), int(steps), guidance, vector_id])[:40]


@dataclass
class CachedImage:
    """An image going into a cache, with what it is (for the catalog and for people browsing the store)."""

    key: str
    image: torch.Tensor  # [3, H, W] float32, already 8-bit exact
    model: str
    identity: str  # digest of the backbone's identity()
    prompt: Prompt
    seed: int
    steps: int
    guidance: float | None
    vector_id: str
    vector: list[float] | None


class ImageCache(Protocol):
    """Images by key. ``get`` returns the hits (``[3, H, W]`` float32, 8-bit exact); ``put`` keeps new ones."""

    def get(self, keys: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def put(self, images: Sequence[CachedImage]) -> None: ...


class MemoryImageCache:
    """An in-process :class:`ImageCache` (tests, one-off scripts); counts hits and misses."""

    def __init__(self) -> None:
        self._images: dict[str, torch.Tensor] = {}
        self.entries: dict[str, CachedImage] = {}
        self.hits = 0
        self.misses = 0

    def get(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        found = {k: self._images[k] for k in keys if k in self._images}
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def put(self, images: Sequence[CachedImage]) -> None:
        for item in images:
            self._images[item.key] = item.image
            self.entries[item.key] = item

    def __len__(self) -> int:
        return len(self._images)


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Scores of a population: ``scores[reward] [P, B]`` (float64) and the cache key of every image."""

    scores: dict[str, np.ndarray]
    keys: list[list[str]]
    images: torch.Tensor | None = None  # [P * B, 3, H, W] when asked for (keep_images=True)
    generated: int = 0
    cached: int = 0
    seconds: float = 0.0


@dataclass
class EvaluatorStats:
    """What an evaluator did so far (across calls)."""

    calls: int = 0
    images: int = 0
    generated: int = 0
    cached: int = 0
    seconds: float = 0.0


def score_images(rewards: Sequence[Reward], images: torch.Tensor, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
    """Every reward on a batch of 8-bit images: ``{name: [N]}`` (checked finite, one per image)."""
    return {r.name: check_scores(r.name, r(images, prompts), len(prompts)) for r in rewards}


class PopulationEvaluator:
    """Scores Calibri vectors on (prompt, seed) cells; subclasses say where missing images are made.

    ``model`` names the model in cache entries (the pipeline's model key); ``cache`` (optional)
    is read for every call and written when ``store=True`` is passed (the default for analyses and
    evaluations; CMA-ES training buckets, never seen twice, pass ``store=False``).
    """

    def __init__(
        self,
        backbone: Backbone,
        search: SearchSpace | None,
        rewards: Reward | Sequence[Reward] | Mapping[str, Reward],
        sampling: SamplingSettings | None = None,
        *,
        cache: ImageCache | None = None,
        model: str | None = None,
        progress: bool = False,
    ) -> None:
        self.backbone = backbone
        self.search = search
        # no rewards: the evaluator only makes (and caches) images
        self.rewards = [] if isinstance(rewards, (list, tuple)) and not rewards else as_reward_list(rewards)
        self.sampling = (sampling or SamplingSettings()).resolved(backbone)
        self.cache = cache
        self.model = model or getattr(backbone, "name", type(backbone).__name__)
        self.progress = progress
        self.stats = EvaluatorStats()
        self._identity: dict[str, Any] | None = None

    # -- configuration -----------------------------------------------------------------------

    def with_sampling(self, **changes: Any) -> PopulationEvaluator:
        """The same evaluator (backbone, rewards, cache, workers) at other sampling settings."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.sampling = self.sampling.with_(**changes).resolved(self.backbone)
        return other

    def with_search(self, search: SearchSpace | None) -> PopulationEvaluator:
        """The same evaluator for vectors of another search space (e.g. a wider ensemble)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.search = search
        return other

    @property
    def identity(self) -> dict[str, Any]:
        """The backbone's identity with the schedule's shift these settings sample at (an image key's part)."""
        if self._identity is None:
            ident = getattr(self.backbone, "identity", None)
            self._identity = dict(ident()) if callable(ident) else {"name": self.model}
        return {**self._identity, "shift": self.sampling.shift}

    # -- the call ----------------------------------------------------------------------------

    def __call__(
        self,
        vectors: Any,
        prompts: Sequence[Prompt],
        seeds: Sequence[int],
        *,
        store: bool = True,
        keep_images: bool = False,
        label: str | None = None,
    ) -> Evaluation:
        """Score every candidate of ``vectors [P, D]`` (None: the unmodified model) on every (prompt, seed)."""
        started = time.perf_counter()
        seeds = check_prompts_seeds(prompts, seeds)
        if vectors is None:
            rows: list[torch.Tensor | None] = [None]
        else:
            if self.search is None:
                raise ValueError("calibrated vectors need the search space they belong to (search=None given)")
            rows = list(self.search.check(vectors))
        jobs = [self._job(vector, p, s) for vector in rows for p, s in zip(prompts, seeds)]
        chunk = self.sampling.chunk_images or len(jobs)
        parts: dict[str, list[np.ndarray]] = {r.name: [] for r in self.rewards}
        kept: list[torch.Tensor] = []
        generated = cached = 0
        bar = self._bar(len(jobs), label)
        try:
            for start in range(0, len(jobs), chunk):
                part = jobs[start : start + chunk]
                scores, images, n_new = self._scored(part, store=store, keep_images=keep_images, bar=bar)
                generated += n_new
                cached += len(part) - n_new
                for name, values in scores.items():
                    parts[name].append(values)
                if keep_images:
                    kept.append(images)
        finally:
            if bar is not None:
                bar.close()
        n_cand, n_cells = len(rows), len(prompts)
        scores = {name: np.concatenate(v).reshape(n_cand, n_cells) for name, v in parts.items()}
        keys = [[jobs[i * n_cells + j].key for j in range(n_cells)] for i in range(n_cand)]
        seconds = time.perf_counter() - started
        self.stats.calls += 1
        self.stats.images += len(jobs)
        self.stats.generated += generated
        self.stats.cached += cached
        self.stats.seconds += seconds
        return Evaluation(scores, keys, torch.cat(kept) if keep_images else None, generated, cached, seconds)

    def _job(self, vector: torch.Tensor | None, prompt: Prompt, seed: int) -> ImageJob:
        guidance = self.sampling.guidance
        if vector is not None:
            at = unmodified_guidance(self.search, vector, guidance)
            if at is not False:  # the unmodified model's very image: one cache entry for both
                vector, guidance = None, at
        vector_id = "baseline" if vector is None else vector_digest(self.search, vector)
        text = prompt.text if hasattr(prompt, "text") else str(prompt)
        key = image_key(self.identity, text, seed, self.sampling.steps, guidance, vector_id)
        return ImageJob(prompt, int(seed), vector, key, vector_id, None if vector is not None else guidance)

    def _scored(
        self, jobs: Sequence[ImageJob], *, store: bool, keep_images: bool, bar: Any
    ) -> tuple[dict[str, np.ndarray], torch.Tensor | None, int]:
        """Scores ``{reward: [len(jobs)]}`` of ``jobs`` (cache hits read and scored here, the rest made
        and scored by :meth:`_make`), their 8-bit images when asked for, and how many were made."""
        found = self.cache.get([j.key for j in jobs]) if self.cache is not None else {}
        missing: dict[str, ImageJob] = {}
        for j in jobs:
            if j.key not in found and j.key not in missing:  # a job asked twice is made once
                missing[j.key] = j
        if bar is not None and found:
            bar.update(sum(1 for j in jobs if j.key in found))
        per_key: dict[str, dict[str, float]] = {}
        images: dict[str, torch.Tensor] = dict(found)
        if found:
            hit_jobs = [next(j for j in jobs if j.key == k) for k in found]
            hit_scores = score_images(
                self.rewards, torch.stack([found[j.key] for j in hit_jobs]), [j.prompt for j in hit_jobs]
            )
            for i, j in enumerate(hit_jobs):
                per_key[j.key] = {name: float(v[i]) for name, v in hit_scores.items()}
        if missing:
            todo = list(missing.values())
            want = keep_images or (self.cache is not None and store)
            made_scores, made_images = self._make(todo, want_images=want, bar=bar)
            for i, j in enumerate(todo):
                per_key[j.key] = {name: float(v[i]) for name, v in made_scores.items()}
            if want:
                images.update({j.key: img for j, img in zip(todo, made_images)})
            if self.cache is not None and store:
                ident = _digest(self.identity)[:12]
                self.cache.put(
                    [
                        CachedImage(
                            j.key,
                            images[j.key],
                            self.model,
                            ident,
                            j.prompt,
                            j.seed,
                            self.sampling.steps,
                            j.guidance if j.guidance is not None else self.sampling.guidance,
                            j.vector_id,
                            None if j.vector is None else [float(v) for v in j.vector],
                        )
                        for j in todo
                    ]
                )
        scores = {r.name: np.array([per_key[j.key][r.name] for j in jobs], dtype=np.float64) for r in self.rewards}
        kept = torch.stack([images[j.key] for j in jobs]) if keep_images else None
        return scores, kept, len(missing)

    def _make(
        self, jobs: Sequence[ImageJob], *, want_images: bool, bar: Any
    ) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
        """Sample and score jobs missing from the cache: ``({reward: [n]}, 8-bit images or None)``."""
        raise NotImplementedError

    def _bar(self, total: int, label: str | None):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=label or f"{self.model} {self.sampling.steps} steps", unit="img", leave=False)


def make_and_score(
    backbone: Backbone,
    search: SearchSpace | None,
    jobs: Sequence[ImageJob],
    settings: SamplingSettings,
    rewards: Sequence[Reward],
    progress: ProgressFn | None = None,
) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Sample ``jobs`` through the backbone's loop, quantise to 8 bits, score: the work every evaluator
    does for images it has not got (in this process, or inside a Ray worker)."""
    out: list[torch.Tensor | None] = [None] * len(jobs)
    # one sampler call per kind: the calibrated images, and the unmodified model's at each guidance
    groups: dict[Any, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault("calibrated" if j.vector is not None else ("baseline", j.guidance), []).append(i)
    for kind, index in groups.items():
        group = [jobs[i] for i in index]
        calibrated = kind == "calibrated"
        group_search = search if calibrated else None
        vectors = torch.stack([j.vector for j in group]) if calibrated else None
        group_settings = settings if calibrated or kind[1] is None else settings.with_(guidance=kind[1])
        batch = resolve_max_batch(backbone, group_search, group[0].prompt, group_settings)
        images = backbone.sample(
            [j.text for j in group],
            [j.seed for j in group],
            group_settings.with_(max_batch=batch),
            group_search,
            vectors,
            progress=progress,
        )
        for i, img in zip(index, images):
            out[i] = img
    images = quantize_8bit(torch.stack(out))
    scores = score_images(rewards, images, [j.prompt for j in jobs])
    return {name: v.to(torch.float64).numpy() for name, v in scores.items()}, images


class LocalEvaluator(PopulationEvaluator):
    """Makes the missing images in this process, through the backbone's sampling loop."""

    def _make(
        self, jobs: Sequence[ImageJob], *, want_images: bool, bar: Any
    ) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
        progress = (lambda k: bar.update(k)) if bar is not None else None
        scores, images = make_and_score(self.backbone, self.search, jobs, self.sampling, self.rewards, progress)
        return scores, images if want_images else None


def _as_search(backbone: Backbone, space: CalibrationSpace | SearchSpace | None, n_models: int) -> SearchSpace | None:
    if space is None or isinstance(space, SearchSpace):
        return space
    return SearchSpace.for_model(space, n_models, uses_cfg=bool(backbone.uses_cfg))


def evaluate_population(
    backbone: Backbone,
    space: CalibrationSpace | SearchSpace | None,
    vectors: Any,
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    reward: Reward | Sequence[Reward] | Mapping[str, Reward],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    n_models: int = 1,
    max_batch: int | None = None,
    memory_budget_mb: float | None = None,
    chunk_images: int | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """A one-off :class:`LocalEvaluator` call: ``[P, B]`` scores (``{name: [P, B]}`` for several rewards).

    ``vectors=None`` is the unmodified model (``P = 1``).
    """
    if vectors is not None and space is None:
        raise ValueError("calibrated vectors need the CalibrationSpace they belong to (space=None given)")
    settings = SamplingSettings(steps, guidance, max_batch, memory_budget_mb, chunk_images)
    evaluator = LocalEvaluator(backbone, _as_search(backbone, space, n_models), reward, settings)
    scores = evaluator(vectors, prompts, seeds).scores
    out = {name: torch.from_numpy(s).to(torch.float32) for name, s in scores.items()}
    if isinstance(reward, (list, tuple, Mapping)):
        return out
    return out[as_reward_list(reward)[0].name]


def evaluate_population_loop(
    backbone: Backbone,
    space: CalibrationSpace | None,
    vectors: Any,
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    reward: Reward | Sequence[Reward] | Mapping[str, Reward],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    n_models: int = 1,
    max_batch: int | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Reference implementation: one ``generate`` call per candidate. Same output as :func:`evaluate_population`."""
    rewards = as_reward_list(reward)
    seeds = check_prompts_seeds(prompts, seeds)
    rows: dict[str, list[torch.Tensor]] = {r.name: [] for r in rewards}
    candidates: list[torch.Tensor | None] = [None]
    if vectors is not None:
        if space is None:
            raise ValueError("calibrated vectors need the CalibrationSpace they belong to (space=None given)")
        candidates = list(_as_search(backbone, space, n_models).check(vectors))
    for vector in candidates:
        images = backbone.generate(
            list(prompts),
            seeds,
            steps=steps,
            guidance=guidance,
            space=space if vector is not None else None,
            vectors=vector,
            n_models=n_models,
            max_batch=max_batch,
        )
        for name, scores in score_images(rewards, quantize_8bit(images), prompts).items():
            rows[name].append(scores)
    out = {name: torch.stack(r) for name, r in rows.items()}
    if isinstance(reward, (list, tuple, Mapping)):
        return out
    return out[rewards[0].name]


__all__ = [
    "PopulationEvaluator",
    "LocalEvaluator",
    "Evaluation",
    "EvaluatorStats",
    "ImageCache",
    "MemoryImageCache",
    "CachedImage",
    "ImageJob",
    "SAMPLER_VERSION",
    "image_key",
    "vector_digest",
    "unmodified_guidance",
    "quantize_8bit",
    "score_images",
    "make_and_score",
    "evaluate_population",
    "evaluate_population_loop",
    "estimate_image_memory_mb",
    "max_batch_for_budget",
    "resolve_max_batch",
    "as_reward_list",
    "check_prompts_seeds",
]
