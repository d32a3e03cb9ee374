"""The alternatives a user tries before Calibri, tuned on validation prompts like Calibri is.

- **guidance-tuned**: the unmodified model at the best classifier-free guidance scale of a grid
  (at the calibration NFE). Rewards that like strong guidance make this a strong baseline for any
  guidance-like method, and the CFG ensemble's weights *are* the guidance: Calibri must beat it.
- **skip-layer guidance (SLG)**, as diffusers' ``SkipLayerGuidance``: standard CFG plus
  ``s * (v_cond - v_cond_skip)``, where ``v_cond_skip`` is the conditional pass with some blocks
  skipped. The paper notes that a Calibri ensemble generalises it, and here it *is* one: the CFG
  layout with a third (conditional) member whose coefficients are 0 on the skipped blocks, weights
  ``g + s, 1 - g, -s`` (:func:`slg_vector`). Blocks and scale are chosen on validation.
- **shift-tuned**: the flow sampler's timestep shift (``flow_sigmas(steps, shift)``: ``shift > 1``
  spends more of the steps at high noise) jointly with the guidance scale, a grid of both. It is the
  first knob a FLUX / SD-3 user turns to cut steps; with shift 1 in its grid it is never worse on
  validation than guidance-tuned.
- **schedule-tuned**: one guidance scale per part of the noise schedule (the parts of a
  time-dependent calibration), at the tuned shift: a local grid around the tuned constant guidance.
  It is a point of the time-dependent CFG layout (every coefficient 1, weights ``g_j, 1 - g_j`` in
  part ``j``), so it separates what per-step guidance alone gives from what the block coefficients
  add, and Calibri can start from it.
- **more steps**: the baseline at a higher NFE needs no tuning (the NFE study).

Each tuner scores its grid with one evaluator on the same validation cells and returns the best
setting with its table; the choice is the highest mean (what a user comparing settings does). With
more than one seed the grid is *raced* (:func:`race`): every setting on the first seed's cells, then
only the leaders on all of them, so settings far behind after half the evidence cost no more images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from calibri_pipeline.method.analysis import Setting, evaluate_settings
from calibri_pipeline.method.space import SearchSpace

if TYPE_CHECKING:
    import polars as pl

    from calibri_pipeline.method.population import PopulationEvaluator
    from calibri_pipeline.method.space import CalibrationSpace
    from calibri_pipeline.prompts.base import Prompt

DEFAULT_GUIDANCE_GRID = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.5, 6.0)
DEFAULT_SLG_SCALES = (0.5, 1.0, 2.0)
DEFAULT_SHIFT_GRID = (1.0, 2.0, 3.0, 4.0)


@dataclass
class Tuned:
    """The best setting of a grid on validation, and the grid's table (one row per candidate)."""

    name: str
    label: str  # the chosen candidate's label in ``table``
    setting: Setting
    val_mean: float
    table: pl.DataFrame
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        vector = self.setting.vector
        return {
            "name": self.name,
            "label": self.label,
            "val_mean": self.val_mean,
            "params": self.params,
            "steps": self.setting.steps,
            "guidance": self.setting.guidance,
            "shift": self.setting.shift,
            "vector": None if vector is None else [float(v) for v in torch.as_tensor(vector).reshape(-1)],
        }


def _best(result, reward: str) -> tuple[str, float]:
    t = result.table.filter(result.table["reward"] == reward)
    n_full = t["n_cells"].max()  # a raced grid: only the settings scored on every cell compete
    t = t.filter(t["n_cells"] == n_full)
    row = t.sort(["mean", "label"], descending=[True, False]).row(0, named=True)
    return row["label"], float(row["mean"])


def race_survivors(n: int) -> int:
    """How many settings of a grid of ``n`` go on to the second round: a quarter, at least 3."""
    return max(3, -(-n // 4))


def race(
    evaluator: PopulationEvaluator,
    settings: dict[str, Setting],
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    *,
    reference: str,
    reward: str,
):
    """``evaluate_settings`` in two rounds (successive halving over the seeds): every setting on the
    first seed's cells, then the :func:`race_survivors` best by mean ``reward`` (and ``reference``) on
    every cell; their first-seed images come back from the evaluator's image cache. The table holds
    each survivor's row over all cells and each eliminated setting's first-round row (``n_cells`` says
    which). Grids too small to gain, a single seed, or an evaluator without an image cache: one round.
    """
    import polars as pl

    keep = race_survivors(len(settings))
    if len(seeds) < 2 or len(settings) <= keep + 1 or getattr(evaluator, "cache", None) is None:
        return evaluate_settings(evaluator, settings, prompts, seeds=seeds, reference=reference)
    first = evaluate_settings(evaluator, settings, prompts, seeds=list(seeds)[:1], reference=reference)
    ranked = first.table.filter(first.table["reward"] == reward).sort(["mean", "label"], descending=[True, False])
    leaders = ranked["label"].to_list()[:keep]
    survivors = {label: settings[label] for label in settings if label in leaders or label == reference}
    final = evaluate_settings(evaluator, survivors, prompts, seeds=seeds, reference=reference)
    dropped = first.table.filter(~first.table["label"].is_in(list(survivors)))
    final.table = pl.concat([final.table, dropped.select(final.table.columns)], how="vertical_relaxed")
    final.meta["raced"] = {"first_round_seeds": list(seeds)[:1], "survivors": list(survivors)}
    return final


def tune_guidance(
    evaluator: PopulationEvaluator,
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    *,
    grid: Sequence[float] = DEFAULT_GUIDANCE_GRID,
    steps: int | None = None,
    reward: str | None = None,
) -> Tuned:
    """The unmodified model at every guidance scale of ``grid`` (plus the default), best by mean ``reward``."""
    default = float(evaluator.sampling.guidance)
    values = sorted({float(g) for g in grid} | {default})
    settings = {f"guidance {g:g}": Setting(None, steps=steps, guidance=g) for g in values}
    reference = f"guidance {default:g}"
    reward = reward or evaluator.rewards[0].name
    result = race(evaluator, settings, prompts, seeds, reference=reference, reward=reward)
    label, mean = _best(result, reward)
    chosen = settings[label]
    return Tuned("guidance-tuned", label, chosen, mean, result.table, {"guidance": chosen.guidance, "default": default})


def tune_shift(
    evaluator: PopulationEvaluator,
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    *,
    shifts: Sequence[float] = DEFAULT_SHIFT_GRID,
    guidances: Sequence[float] = DEFAULT_GUIDANCE_GRID,
    steps: int | None = None,
    reward: str | None = None,
) -> Tuned:
    """The unmodified model over ``shifts`` x ``guidances`` (plus the default pair), best by mean ``reward``.

    Every setting is scored on the same cells; the reference of the table is the default
    (shift, guidance). Ties go to the first label in sort order, so a tie with shift 1 keeps it.
    """
    default_g, default_s = float(evaluator.sampling.guidance), float(evaluator.sampling.shift)
    if any(not float(s) > 0 for s in shifts):
        raise ValueError(f"shifts must be > 0, got {list(shifts)}")
    # the grid, and the model's own (shift, guidance) as the reference (not crossed with every shift)
    pairs = sorted({(float(s), float(g)) for s in shifts for g in guidances} | {(default_s, default_g)})
    settings = {f"shift {s:g} guidance {g:g}": Setting(None, steps=steps, guidance=g, shift=s) for s, g in pairs}
    reference = f"shift {default_s:g} guidance {default_g:g}"
    reward = reward or evaluator.rewards[0].name
    result = race(evaluator, settings, prompts, seeds, reference=reference, reward=reward)
    label, mean = _best(result, reward)
    chosen = settings[label]
    params = {"shift": chosen.shift, "guidance": chosen.guidance, "default_shift": default_s, "default": default_g}
    return Tuned("shift-tuned", label, chosen, mean, result.table, params)


def guidance_schedule_vector(search: SearchSpace, guidances: Sequence[float]) -> torch.Tensor:
    """The unmodified model with guidance ``guidances[j]`` in part ``j`` of the schedule, as a vector of the
    time-dependent CFG layout ``search`` (all-ones coefficients, the CFG pair ``[g_j, 1 - g_j]`` per part)."""
    if search.layout.mode != "cfg":
        raise ValueError(f"a guidance schedule needs the CFG ensemble layout, got mode {search.layout.mode!r}")
    if len(guidances) != search.n_segments:
        raise ValueError(f"got {len(guidances)} guidance scales for {search.n_segments} parts of the schedule")
    return torch.cat([search.layout.initial(float(g)) for g in guidances])


def tune_guidance_schedule(
    evaluator: PopulationEvaluator,
    search: SearchSpace,
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    *,
    around: float,
    offsets: Sequence[float] = (-0.5, 0.0, 0.5),
    steps: int | None = None,
    shift: float | None = None,
    reward: str | None = None,
) -> Tuned:
    """Every schedule ``around + offsets[i_j]`` (one offset per part; guidance kept >= 0.5) at ``shift``,
    best by mean ``reward``; the reference is the constant guidance ``around``, so the tuned schedule is
    never worse than it on these cells."""
    import itertools

    if search.n_segments < 2:
        raise ValueError("a guidance schedule needs a time-dependent search space (segments)")
    values = sorted({max(0.5, float(around) + float(o)) for o in offsets} | {float(around)})
    settings, params = {}, {}
    for combo in itertools.product(values, repeat=search.n_segments):
        label = "schedule " + " / ".join(f"{g:g}" for g in combo)
        vector = guidance_schedule_vector(search, combo)
        settings[label] = Setting(vector, steps=steps, guidance=float(around), search=search, shift=shift)
        params[label] = {"guidances": list(combo), "shift": shift, "segments": list(search.segments)}
    reference = "schedule " + " / ".join(f"{float(around):g}" for _ in range(search.n_segments))
    reward = reward or evaluator.rewards[0].name
    result = race(evaluator, settings, prompts, seeds, reference=reference, reward=reward)
    label, mean = _best(result, reward)
    return Tuned("schedule-tuned", label, settings[label], mean, result.table, params[label])


def slg_search(space: CalibrationSpace) -> SearchSpace:
    """The CFG layout with a third member: what skip-layer guidance is as a Calibri ensemble."""
    return SearchSpace.for_model(space, 3, uses_cfg=True)


def slg_vector(space: CalibrationSpace, skip: Sequence[int], guidance: float, scale: float) -> torch.Tensor:
    """Skip-layer guidance in the 3-member CFG layout: CFG at ``guidance`` + ``scale`` x (cond - cond with ``skip`` bypassed)."""
    if not skip:
        raise ValueError("skip-layer guidance needs at least one coefficient to skip")
    if any(not 0 <= int(i) < space.size for i in skip):
        raise ValueError(f"skip indices must be in [0, {space.size}), got {list(skip)}")
    search = slg_search(space)
    coefficients = torch.ones(3, space.size, dtype=torch.float64)
    coefficients[2, [int(i) for i in skip]] = 0.0
    g, s = float(guidance), float(scale)
    return search.layout.join(coefficients, torch.tensor([g + s, 1.0 - g, -s]))


def slg_layer_candidates(ablation: pl.DataFrame, count: int = 3) -> list[tuple[int, ...]]:
    """Blocks to try skipping: the ``count`` whose bypass hurts least (the block ablation, Fig. 3a),
    each alone (diffusers' SLG skips a few middle blocks of SD-3.5; this model's own ablation says
    which of its blocks the model leans on least)."""
    rows = ablation.sort("delta", descending=True)
    return [(int(i),) for i in rows["index"].to_list()[:count]]


def tune_slg(
    evaluator: PopulationEvaluator,
    space: CalibrationSpace,
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    *,
    layer_sets: Sequence[Sequence[int]],
    scales: Sequence[float] = DEFAULT_SLG_SCALES,
    guidance: float | None = None,
    steps: int | None = None,
    reward: str | None = None,
) -> Tuned:
    """Skip-layer guidance over ``layer_sets`` x ``scales`` (at the model's guidance), best by mean ``reward``."""
    if not evaluator.backbone.uses_cfg:
        raise ValueError("skip-layer guidance is defined for models with classifier-free guidance")
    if not layer_sets:
        raise ValueError("tune_slg needs at least one set of blocks to skip")
    g = float(evaluator.sampling.guidance if guidance is None else guidance)
    search = slg_search(space)
    settings = {"cfg (no SLG)": Setting(None, steps=steps, guidance=g)}
    params = {}
    for skip in layer_sets:
        for s in scales:
            label = f"skip {','.join(space.names[i] for i in skip)} x{s:g}"
            settings[label] = Setting(slg_vector(space, skip, g, s), steps=steps, guidance=g, search=search)
            params[label] = {
                "skip": [int(i) for i in skip],
                "skip_names": [space.names[i] for i in skip],
                "scale": float(s),
                "guidance": g,
            }
    reward = reward or evaluator.rewards[0].name
    result = race(evaluator, settings, prompts, seeds, reference="cfg (no SLG)", reward=reward)
    label, mean = _best(result, reward)
    return Tuned("slg-tuned", label, settings[label], mean, result.table, params.get(label, {"skip": [], "scale": 0.0}))


__all__ = [
    "Tuned",
    "tune_guidance",
    "tune_slg",
    "slg_vector",
    "slg_search",
    "slg_layer_candidates",
    "DEFAULT_GUIDANCE_GRID",
    "DEFAULT_SLG_SCALES",
]
