"""Exact rewards of the embedded world: the scorer of :mod:`calibri_pipeline.world` as Reward objects.

All four score a whole batch with one parse (numpy, CPU). They need prompts that carry a world spec
(``Prompt.spec``, as made by :func:`calibri_pipeline.world.sample_prompt` / ``make_splits``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.rewards.base import check_images, check_scores


def world_specs(prompts: Sequence[Prompt], n_images: int, reward_name: str) -> list[dict[str, Any]]:
    """The specs of ``prompts``; a clear ``ValueError`` if the count is off or a prompt has no spec."""
    if len(prompts) != n_images:
        raise ValueError(f"reward {reward_name!r} got {n_images} images but {len(prompts)} prompts")
    specs = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, Prompt):
            raise TypeError(f"reward {reward_name!r}: prompts[{i}] is a {type(prompt).__name__}, not a Prompt")
        if prompt.spec is None:
            raise ValueError(
                f"reward {reward_name!r} scores embedded-world prompts only, but prompts[{i}] "
                f"({prompt.text!r}, source {prompt.source!r}) has no spec; use world prompts "
                "(calibri_pipeline.world.sample_prompt / make_splits) or a text-based reward"
            )
        specs.append(prompt.spec)
    return specs


def score_world_batch(images: torch.Tensor, prompts: Sequence[Prompt], reward_name: str = "world") -> list[dict]:
    """Full score dicts (see :func:`calibri_pipeline.world.score_images`) for a reward-style batch."""
    from calibri_pipeline.world.scorer import score_images

    images = check_images(images)
    specs = world_specs(prompts, images.shape[0], reward_name)
    return score_images(images.detach().float().cpu().numpy(), specs)


class _WorldReward:
    name = "world"
    higher_is_better = True
    scale: tuple[float, float] | None = (0.0, 1.0)

    def _value(self, result: dict[str, Any]) -> float:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        results = score_world_batch(images, prompts, self.name)
        scores = torch.tensor([self._value(r) for r in results], dtype=torch.float32)
        return check_scores(self.name, scores, len(results))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WorldAlignment(_WorldReward):
    """Continuous prompt alignment with partial credit (attributes, counts, relation margin)."""

    name = "world_alignment"

    def _value(self, result: dict[str, Any]) -> float:
        return result["alignment"]


class WorldAccuracy(_WorldReward):
    """1 when everything the prompt asks for is right (and nothing extra is drawn), else 0."""

    name = "world_accuracy"

    def _value(self, result: dict[str, Any]) -> float:
        return float(result["correct"])


class WorldQuality(_WorldReward):
    """Image quality regardless of the prompt: crisp palette colours, clean background, clean shapes."""

    name = "world_quality"

    def _value(self, result: dict[str, Any]) -> float:
        return result["quality"]


class WorldScore(_WorldReward):
    """The default calibration target: ``alignment_weight * alignment + quality_weight * quality``."""

    name = "world_score"

    def __init__(self, alignment_weight: float = 0.7, quality_weight: float = 0.3) -> None:
        for label, weight in (("alignment_weight", alignment_weight), ("quality_weight", quality_weight)):
            if not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"{label} must be a non-negative number, got {weight!r}")
        total = alignment_weight + quality_weight
        if total <= 0:
            raise ValueError("alignment_weight + quality_weight must be positive")
        # Normalised so the score stays in [0, 1] whatever the weights.
        self.alignment_weight = alignment_weight / total
        self.quality_weight = quality_weight / total

    def _value(self, result: dict[str, Any]) -> float:
        return self.alignment_weight * result["alignment"] + self.quality_weight * result["quality"]

    def __repr__(self) -> str:
        return f"WorldScore(alignment_weight={self.alignment_weight:g}, quality_weight={self.quality_weight:g})"


WORLD_REWARD_CLASSES = {cls.name: cls for cls in (WorldAlignment, WorldAccuracy, WorldQuality, WorldScore)}
