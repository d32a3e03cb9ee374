"""Per-prompt image diversity (paper, Appendix B).

For one prompt rendered with ``S`` seeds, embed every image with a feature extractor (DINO in the paper;
see :mod:`calibri_pipeline.features`) and take

    diversity = 1 - mean_{i < j} cos(f_i, f_j)

over the ``S * (S - 1) / 2`` distinct pairs. Identical images give 0; orthogonal features give 1; the value
can exceed 1 when features point in opposite directions (cosine < 0). Framework-free: torch only.
"""

from __future__ import annotations

from typing import Sequence

import torch


def diversity(features: torch.Tensor) -> float:
    """``1 - mean pairwise cosine similarity`` of ``features [S, D]`` (the S seeds of one prompt).

    Needs ``S >= 2`` (one image has no pairs). A zero feature vector has no direction, so it is an error
    rather than a silently arbitrary cosine.
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor [S, D], got {type(features).__name__}")
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D [S seeds, D dims], got shape {tuple(features.shape)}")
    n_seeds = features.shape[0]
    if n_seeds < 2:
        raise ValueError(f"diversity needs at least 2 images (seeds) of the prompt, got {n_seeds}")
    feats = features.detach().to(dtype=torch.float64, device="cpu")
    if not torch.isfinite(feats).all():
        raise ValueError("features contain NaN or infinite values")
    norms = feats.norm(dim=1)
    if (norms == 0).any():
        zero_rows = (norms == 0).nonzero().flatten().tolist()
        raise ValueError(f"feature vectors {zero_rows} are all zeros: cosine similarity is undefined")
    unit = feats / norms[:, None]
    cosine = unit @ unit.T
    upper = torch.triu_indices(n_seeds, n_seeds, offset=1)
    mean_cosine = cosine[upper[0], upper[1]].mean()
    return float(1.0 - mean_cosine)


def diversity_per_prompt(features: torch.Tensor, prompt_ids: Sequence[str]) -> dict[str, float]:
    """Diversity of each prompt's group of images.

    ``features [N, D]`` and ``prompt_ids`` (length N) line up row by row; rows sharing a prompt id are that
    prompt's seeds. Returns ``{prompt_id: diversity}`` in first-appearance order. Every prompt needs at least
    two images.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a tensor [N, D], got {shape}")
    ids = list(prompt_ids)
    if len(ids) != features.shape[0]:
        raise ValueError(f"got {features.shape[0]} feature rows but {len(ids)} prompt ids")
    rows: dict[str, list[int]] = {}
    for row, pid in enumerate(ids):
        rows.setdefault(pid, []).append(row)
    too_few = [pid for pid, r in rows.items() if len(r) < 2]
    if too_few:
        raise ValueError(
            f"{len(too_few)} prompt(s) have a single image, diversity needs >= 2 seeds per prompt "
            f"(first: {too_few[0]!r})"
        )
    return {pid: diversity(features[r]) for pid, r in rows.items()}
