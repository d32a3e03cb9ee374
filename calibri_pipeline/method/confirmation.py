"""The last word of a search: re-score its pick against x0 on fresh seeds and keep x0 unless the gain is real.

The validation that chose the pick was also the one that ranked it, so its score is biased upward;
:func:`confirm` re-scores x0, the best validated vectors and nothing else on seeds no step of the
search has seen (:func:`~calibri_pipeline.method.seeds.confirmation_seeds`), and
:func:`confirm_choice` keeps a vector only if its paired gain has a lower confidence bound above 0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from calibri_pipeline.method.objective import ConfirmingObjective


def confirm_choice(cells: np.ndarray, labels: Sequence[str], level: float) -> dict[str, Any]:
    """Pick among re-scored candidates (row 0 is x0): the best whose paired gain over x0 is real.

    A candidate qualifies when ``mean(d) - z * se(d) > 0`` for its per-image differences ``d`` to x0,
    with ``z`` the one-sided normal quantile at ``level``, Bonferroni-corrected over the candidates;
    among those the largest mean gain wins; none: x0.
    """
    from statistics import NormalDist

    cells = np.asarray(cells, dtype=np.float64)
    k = cells.shape[0] - 1
    z = NormalDist().inv_cdf(1.0 - (1.0 - level) / max(1, k)) if k else 0.0
    rows = []
    for i, label in enumerate(labels):
        d = cells[i] - cells[0]
        se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
        gain = float(d.mean())
        rows.append(
            {
                "label": label,
                "mean": float(cells[i].mean()),
                "gain": gain,
                "se": se,
                "lower": gain - z * se,
                "qualifies": bool(i > 0 and gain - z * se > 0),
            }
        )
    winners = [i for i, r in enumerate(rows) if r["qualifies"]]
    chosen = max(winners, key=lambda i: rows[i]["gain"]) if winners else 0
    return {"rows": rows, "chosen": chosen, "z": z, "level": level, "images": int(cells.shape[1])}


def confirm(
    objective: ConfirmingObjective, validations: Sequence[dict[str, Any]], top: int, level: float
) -> dict[str, Any]:
    """Re-score x0 (``validations[0]``) and the ``top`` best distinct validated vectors on fresh seeds.

    Returns :func:`confirm_choice`'s record with the re-scored ``candidates`` (row 0: x0).
    """
    x0 = validations[0]
    others = sorted((v for v in validations[1:]), key=lambda v: -v["score"])
    picked: list[dict[str, Any]] = []
    for v in others:
        if len(picked) == top:
            break
        if not any(np.array_equal(v["vector"], p["vector"]) for p in [x0, *picked]):
            picked.append(v)
    candidates = [x0, *picked]
    scores = objective.confirm(np.array([c["vector"] for c in candidates], dtype=np.float64))
    if scores.cells is None:
        raise ValueError("objective.confirm must return per-image scores (PopulationScores.cells)")
    labels = ["x0"] + [f"generation {c['generation']} ({c['source']})" for c in picked]
    choice = confirm_choice(scores.cells, labels, level)
    choice["candidates"] = candidates
    return choice


__all__ = ["confirm", "confirm_choice"]
