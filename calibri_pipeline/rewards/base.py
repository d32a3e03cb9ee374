"""The reward protocol: images + prompts -> one score per image.

Images are always a float tensor ``[N, 3, H, W]`` in ``[0, 1]`` on any device; adapters that need
PIL images or a particular resolution convert internally. Prompts are :class:`Prompt` records, so
rewards that need the structured spec (the embedded world's exact scorer) get it, and text-only
rewards read ``prompt.text``.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from calibri_pipeline.prompts.base import Prompt


class RewardError(RuntimeError):
    """A reward could not produce a valid score (bad answer, NaN, server down...)."""


@runtime_checkable
class Reward(Protocol):
    name: str
    higher_is_better: bool
    #: the range scores live in, for plots and sanity checks (None when unbounded)
    scale: tuple[float, float] | None

    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Return a float32 CPU tensor ``[N]``: one score per image."""
        ...


def check_scores(reward_name: str, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Validate a reward's output: right length, finite. Raises :class:`RewardError` otherwise."""
    scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)
    if scores.numel() != n:
        raise RewardError(f"reward {reward_name!r} returned {scores.numel()} scores for {n} images")
    bad = ~torch.isfinite(scores)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()[:10]
        raise RewardError(f"reward {reward_name!r} returned non-finite scores at images {idx}")
    return scores


def check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [N, 3, H, W] in [0, 1], got {shape}")
    return images
