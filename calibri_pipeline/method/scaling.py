"""A search scaled to the model: per-coordinate initial step sizes from what the pipeline measured.

The paper starts CMA-ES with one step size (σ0 = 0.25) on every coordinate. That was set for 57-482
coordinates of 12B-parameter models; on a small model one block at α = 0.5 can already cost a tenth
of the reward, and a first population drawn that wide lands far outside the useful region. Here each
coordinate gets its own initial standard deviation (pycma's ``CMA_stds``):

- a coefficient's from the scale sweep (paper Fig. 3b): the reward change of its block scaled to α,
  fitted near α = 1 as ``Δ(α) ≈ -k (α - 1)²``; the step is the α change that costs an equal share of
  ``target_drop`` when every coordinate moves at once (``σ_j = sqrt(target_drop / (D k_j))``), so
  the first population spreads by about the gain being sought, not by ten times it. Finer
  granularities (layer, gate) inherit their block's curvature. In an ensemble a member's
  coefficients act through its weight (the CFG pair's are ``g`` and ``1 - g``), so their steps are
  divided by that weight's magnitude (when above 1).
- an ensemble weight's relative to its own magnitude; with :class:`GuidanceCoordinates` (the CFG pair
  as guidance x scale) the guidance moves by ``guidance_rel`` of itself and the overall scale by
  ``scale_std``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    import polars as pl

    from calibri_pipeline.method.space import SearchSpace

#: no coefficient starts wider than this (the sweep's grid ends at alpha 0 and 2) or narrower
STD_RANGE = (0.01, 0.5)


def sweep_curvatures(sweep: pl.DataFrame, max_distance: float = 0.5) -> dict[str, float]:
    """Per block: ``k`` in ``Δ(α) ≈ -k (α - 1)²``, least squares over the sweep's α within ``max_distance`` of 1.

    Only the α near 1 count (when the grid has any there): the search starts near x0, and bypassing a
    block (α = 0) is a different, often catastrophic regime.

    ``sweep`` has the scale-sweep table's columns ``name`` (or ``block``), ``alpha`` and ``delta``.
    A block whose reward rises away from α = 1 gets the smallest curvature seen (it is flat or better
    there: a wide step is right), never a negative one.
    """
    name_col = "name" if "name" in sweep.columns else "block"
    out: dict[str, float] = {}
    for name in dict.fromkeys(sweep[name_col].to_list()):
        mine = sweep.filter((sweep[name_col] == name) & (sweep["alpha"] != 1.0))
        rows = mine.filter((mine["alpha"] - 1.0).abs() <= max_distance)
        if rows.height == 0:  # a coarse grid: use every alpha it has
            rows = mine
        if rows.height == 0:
            continue
        u = (rows["alpha"].to_numpy() - 1.0) ** 2
        drop = -rows["delta"].to_numpy()
        out[name] = float(np.dot(u, drop) / np.dot(u, u))
    positive = [k for k in out.values() if k > 0]
    floor = min(positive) if positive else 1e-3
    return {name: (k if k > 0 else floor) for name, k in out.items()}


def _block_of(name: str, blocks: Sequence[str]) -> str | None:
    """The block a coefficient name belongs to (``transformer_blocks.3.attn.image`` -> ``transformer_blocks.3``)."""
    for block in sorted(blocks, key=len, reverse=True):
        if name == block or name.startswith(block + "."):
            return block
    return None


def initial_stds(
    search: SearchSpace,
    curvatures: Mapping[str, float] | None,
    *,
    target_drop: float = 0.03,
    guidance_coordinates: bool = False,
    guidance: float | None = None,
    guidance_rel: float = 0.25,
    scale_std: float = 0.05,
    weight_rel: float = 0.25,
    default_std: float = 0.1,
) -> list[float]:
    """Initial standard deviation of every search coordinate, in the search's coordinates.

    Coefficients: from ``curvatures`` (:func:`sweep_curvatures`; ``None`` or a missing block:
    ``default_std``). Weights: ``guidance_coordinates`` (the CFG pair as guidance x scale, see
    :class:`~calibri_pipeline.method.ensemble.GuidanceCoordinates`) gives ``guidance_rel * guidance``
    and ``scale_std``; one model's single weight (an overall scale) ``scale_std``; otherwise each
    weight moves by ``weight_rel`` of its x0 magnitude, and an extra member whose weight starts at
    0 by ``weight_rel``.
    """
    if not (target_drop > 0):
        raise ValueError(f"target_drop must be > 0, got {target_drop!r}")
    layout = search.layout
    names = search.space.names
    n_coef = layout.n_models * layout.size
    blocks = list(curvatures or {})
    per_coefficient = []
    for name in names:
        block = _block_of(name, blocks) if curvatures else None
        k = curvatures[block] if block is not None else None
        std = default_std if k is None else math.sqrt(target_drop / (n_coef * k))
        per_coefficient.append(float(min(max(std, STD_RANGE[0]), STD_RANGE[1])))
    x0_weights = layout.initial_weights(guidance if layout.mode == "cfg" else None)
    # a member's coefficient moves the velocity through its weight: under CFG at g = 3.5 the
    # unconditional pass enters with 1 - g = -2.5, so its coefficients are 2.5x as sensitive as the
    # shared coefficient the sweep measured; each member's steps shrink by its weight's magnitude
    stds = []
    for w in x0_weights if layout.n_models > 1 else [1.0]:
        factor = 1.0 / max(abs(w), 1.0) if w != 0 else 1.0
        stds += [float(min(max(std * factor, STD_RANGE[0]), STD_RANGE[1])) for std in per_coefficient]
    relative = [weight_rel * abs(w) if w != 0 else weight_rel for w in x0_weights]
    if layout.mode == "single":
        weights = [scale_std]  # the one weight scales the whole velocity
    elif guidance_coordinates:
        if layout.mode != "cfg" or guidance is None:
            raise ValueError("guidance coordinates need the CFG ensemble and its guidance scale")
        weights = [guidance_rel * abs(float(guidance)), scale_std] + relative[2:]
    else:
        weights = relative
    return (stds + weights) * search.n_segments  # every part of the schedule starts alike


__all__ = ["sweep_curvatures", "initial_stds", "STD_RANGE"]
