"""Scoring many Calibri vectors at once: a whole CMA-ES population (or a sweep) as one batch.

Every image of every candidate goes through :meth:`Backbone.generate` in a single call with
per-image vectors (the backbone micro-batches it, ``max_batch`` images per transformer forward),
because a generation's cost is mostly per-forward overhead at small batch sizes, not arithmetic.
:func:`evaluate_population_loop` is the plain one-candidate-at-a-time reference; both give the same
scores up to float rounding (the backbone contract: an image depends only on its prompt, seed and
vector; batch shape changes only the kernels' rounding), and the same call replayed gives identical scores.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any, Mapping, Sequence, overload

import numpy as np
import torch

from calibri_pipeline.rewards.base import Reward, check_scores

if TYPE_CHECKING:
    from calibri_pipeline.backbones.base import Backbone
    from calibri_pipeline.method.space import CalibrationSpace
    from calibri_pipeline.prompts.base import Prompt


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


def _as_vectors(vectors: Any, space: "CalibrationSpace", n_models: int) -> torch.Tensor:
    v = torch.as_tensor(np.asarray(vectors) if not isinstance(vectors, torch.Tensor) else vectors)
    if v.ndim == 1:
        v = v.unsqueeze(0)
    expected = space.search_size(n_models)
    if v.ndim != 2 or v.shape[1] != expected or v.shape[0] < 1:
        raise ValueError(
            f"vectors must have shape [P, {expected}] (space.search_size(n_models={n_models})), got {tuple(v.shape)}"
        )
    v = v.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(v).all():
        raise ValueError("vectors contain NaN or infinite values")
    return v


def _check_prompts_seeds(prompts: Sequence["Prompt"], seeds: Sequence[int]) -> list[int]:
    if len(prompts) == 0:
        raise ValueError("no prompts to evaluate")
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"need one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
    return seeds


# --------------------------------------------------------------------------------------------
# Memory budget -> images per transformer forward
# --------------------------------------------------------------------------------------------

# backbone -> {(space size, n_models): MiB per image}; weak so a dropped backbone frees its entry
_MEMORY_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple[int, int], float]]" = weakref.WeakKeyDictionary()
#: a forward holds its input, output and a few intermediates of the largest size at once
_ACTIVATION_SAFETY = 4.0


def estimate_image_memory_mb(
    backbone: "Backbone",
    space: "CalibrationSpace | None",
    prompt: "Prompt",
    *,
    n_models: int = 1,
    guidance: float | None = None,
) -> float:
    """Peak activation memory per image (MiB) of one denoising step, measured on a 1-image, 1-step run.

    On CUDA it is the allocator's peak above the starting allocation; elsewhere the largest module
    output seen by forward hooks times a safety factor (a forward keeps a few such tensors alive).
    Cached per (backbone, space size, n_models).
    """
    key = (space.size if space is not None else 0, n_models)
    cached = _MEMORY_CACHE.get(backbone, {})
    if key in cached:
        return cached[key]
    transformer = backbone.transformer
    device = next(transformer.parameters()).device
    vectors = None
    if space is not None:
        from calibri_pipeline.method.ensemble import EnsembleLayout

        layout = EnsembleLayout(space.size, n_models, cfg=bool(backbone.uses_cfg))
        vectors = layout.initial(guidance if layout.mode == "cfg" else None).to(torch.float32)[None]
    kwargs = dict(steps=1, guidance=guidance, space=space, vectors=vectors, n_models=n_models, max_batch=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        backbone.generate([prompt], [0], **kwargs)
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
            backbone.generate([prompt], [0], **kwargs)
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
    backbone: "Backbone",
    space: "CalibrationSpace | None",
    prompt: "Prompt",
    *,
    n_models: int,
    guidance: float | None,
    max_batch: int | None,
    memory_budget_mb: float | None,
) -> int | None:
    """``max_batch`` when given, else derived from ``memory_budget_mb``, else None (the backbone's own)."""
    if max_batch is not None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        return max_batch
    if memory_budget_mb is None:
        return None
    per_image = estimate_image_memory_mb(backbone, space, prompt, n_models=n_models, guidance=guidance)
    return max_batch_for_budget(memory_budget_mb, per_image)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _score(rewards: list[Reward], images: torch.Tensor, prompts: Sequence["Prompt"]) -> dict[str, torch.Tensor]:
    return {r.name: check_scores(r.name, r(images, prompts), len(prompts)) for r in rewards}


@overload
def evaluate_population(
    backbone: "Backbone", space: "CalibrationSpace | None", vectors: Any, prompts: Sequence["Prompt"],
    seeds: Sequence[int], reward: Reward, **kwargs: Any,
) -> torch.Tensor: ...


@overload
def evaluate_population(
    backbone: "Backbone", space: "CalibrationSpace | None", vectors: Any, prompts: Sequence["Prompt"],
    seeds: Sequence[int], reward: Sequence[Reward] | Mapping[str, Reward], **kwargs: Any,
) -> dict[str, torch.Tensor]: ...


def evaluate_population(
    backbone: "Backbone",
    space: "CalibrationSpace | None",
    vectors: Any,
    prompts: Sequence["Prompt"],
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
    """Score every candidate ``vectors [P, D]`` on every (prompt, seed) pair: ``[P, B]`` scores.

    All ``P * B`` images go through one :meth:`Backbone.generate` call (per-image vectors),
    micro-batched to ``max_batch`` images per forward, or to what ``memory_budget_mb`` allows.
    ``vectors=None`` is the unmodified model (``P = 1``). ``chunk_images`` caps how many images are
    held in memory at once for very large sweeps (generate + score chunk by chunk). A single reward
    gives a tensor; a sequence/mapping of rewards gives ``{name: [P, B]}``.
    """
    rewards = as_reward_list(reward)
    seeds = _check_prompts_seeds(prompts, seeds)
    if vectors is None:
        flat_vectors, n_candidates = None, 1
    else:
        if space is None:
            raise ValueError("calibrated vectors need the CalibrationSpace they belong to (space=None given)")
        v = _as_vectors(vectors, space, n_models)
        n_candidates = v.shape[0]
        flat_vectors = v.repeat_interleave(len(prompts), dim=0)
    n_images = n_candidates * len(prompts)
    flat_prompts = [p for _ in range(n_candidates) for p in prompts]
    flat_seeds = [s for _ in range(n_candidates) for s in seeds]
    batch = resolve_max_batch(
        backbone, space if flat_vectors is not None else None, prompts[0], n_models=n_models, guidance=guidance,
        max_batch=max_batch, memory_budget_mb=memory_budget_mb,
    )
    if chunk_images is not None and (not isinstance(chunk_images, int) or chunk_images < 1):
        raise ValueError(f"chunk_images must be a positive int or None, got {chunk_images!r}")
    chunk = n_images if chunk_images is None else chunk_images
    parts: dict[str, list[torch.Tensor]] = {r.name: [] for r in rewards}
    for start in range(0, n_images, chunk):
        stop = min(start + chunk, n_images)
        images = backbone.generate(
            flat_prompts[start:stop],
            flat_seeds[start:stop],
            steps=steps,
            guidance=guidance,
            space=space if flat_vectors is not None else None,
            vectors=None if flat_vectors is None else flat_vectors[start:stop],
            n_models=n_models,
            max_batch=batch,
        )
        for name, scores in _score(rewards, images, flat_prompts[start:stop]).items():
            parts[name].append(scores)
        del images
    out = {name: torch.cat(chunks).reshape(n_candidates, len(prompts)) for name, chunks in parts.items()}
    if isinstance(reward, (list, tuple, Mapping)):
        return out
    return out[rewards[0].name]


def evaluate_population_loop(
    backbone: "Backbone",
    space: "CalibrationSpace | None",
    vectors: Any,
    prompts: Sequence["Prompt"],
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
    seeds = _check_prompts_seeds(prompts, seeds)
    rows: dict[str, list[torch.Tensor]] = {r.name: [] for r in rewards}
    candidates: list[torch.Tensor | None] = [None]
    if vectors is not None:
        if space is None:
            raise ValueError("calibrated vectors need the CalibrationSpace they belong to (space=None given)")
        candidates = list(_as_vectors(vectors, space, n_models))
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
        for name, scores in _score(rewards, images, prompts).items():
            rows[name].append(scores)
    out = {name: torch.stack(r) for name, r in rows.items()}
    if isinstance(reward, (list, tuple, Mapping)):
        return out
    return out[rewards[0].name]


__all__ = [
    "evaluate_population",
    "evaluate_population_loop",
    "estimate_image_memory_mb",
    "max_batch_for_budget",
    "resolve_max_batch",
    "as_reward_list",
]
