"""The pipeline's stages, framework-free: what the Dagster assets and ``calibri calibrate`` both call.

Analyse (the scale sweep and the block ablation), tune the alternatives, plan and run the
calibration, evaluate on the test prompts and compare. Each stage takes a
:class:`~calibri_pipeline.presets.Preset` (the choices), what earlier stages measured (the sweep, the
tuned alternatives), an evaluator of the unmodified model (which sets its own search space and
sampling) and prompts; it returns the core's results. Where they are written -- the catalog and
the object store, or a folder of JSON -- is the caller's business: an asset reads its inputs, calls
its stage and writes the catalog. No Dagster, no storage here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

from calibri_pipeline.method.labels import setting_label

if TYPE_CHECKING:
    import polars as pl

    from calibri_pipeline.method.alternatives import Tuned
    from calibri_pipeline.method.analysis import AnalysisResult
    from calibri_pipeline.method.calibrate import CalibrationOptions
    from calibri_pipeline.method.population import PopulationEvaluator
    from calibri_pipeline.method.sampler import Backbone, SamplingSettings
    from calibri_pipeline.method.search_config import SearchConfig
    from calibri_pipeline.method.space import CalibrationSpace, SearchSpace
    from calibri_pipeline.presets import Preset
    from calibri_pipeline.prompts.base import Prompt


def search_config(preset: Preset, seed: int = 0) -> SearchConfig:
    """The preset's CMA-ES settings for a run with ``seed``, sigma0 resolved (1.0: the sweep's stds are absolute)."""
    from dataclasses import replace

    return replace(preset.search, seed=seed).resolved(has_initial_stds=preset.scaling == "sweep")


def calibration_arguments(
    preset: Preset,
    backbone: Backbone,
    space: CalibrationSpace,
    *,
    sweep: pl.DataFrame | None = None,
    tuned_guidance: float | None = None,
    tuned_shift: float | None = None,
    tuned_schedule: Sequence[float] | None = None,
    warm_start: Any = None,
) -> dict[str, Any]:
    """The pieces of a preset's calibration (:func:`calibration_plan` assembles them): its ``search``, sampling
    (``steps``, ``guidance``, ``shift``, ``max_batch``), ``warm_start``, ``initial_stds``, ``guidance_coordinates``.

    ``sweep``: the scale-sweep table (``scaling="sweep"``); ``tuned_guidance``: the tuned alternative's
    guidance scale (``start="guidance-tuned"``: the guidance-tuned baseline's; ``start="shift-tuned"``:
    the shift-tuned one's, with its ``tuned_shift``, which the whole search then samples at;
    ``start="schedule-tuned"``: ``tuned_schedule``, one guidance per part of the schedule, at
    ``tuned_shift`` when a shift was tuned); ``warm_start``: a previous checkpoint's vector (the
    sensor), which wins over the tuned start.
    """
    from calibri_pipeline.method.scaling import initial_stds, sweep_curvatures
    from calibri_pipeline.method.space import SearchSpace

    search = SearchSpace.for_model(space, preset.n_models, uses_cfg=bool(backbone.uses_cfg), segments=preset.segments)
    guidance = backbone.default_guidance
    guidance_coordinates = preset.weights == "guidance"
    if guidance_coordinates and search.layout.mode != "cfg":
        raise ValueError(
            f"preset {preset.name!r}: weights='guidance' needs the CFG ensemble (n_models >= 2 on a model with "
            f"classifier-free guidance), got mode {search.layout.mode!r}"
        )
    args: dict[str, Any] = {
        "search": search,
        "steps": preset.calibration_steps,
        "guidance_coordinates": guidance_coordinates,
        "max_batch": preset.max_batch,
        "shift": None,
    }
    tuned_start = preset.start in ("guidance-tuned", "shift-tuned", "schedule-tuned")
    if preset.start == "shift-tuned":  # the sampler's shift is part of the model being calibrated
        if tuned_shift is None:
            raise ValueError(f"preset {preset.name!r} calibrates on top of the shift-tuned model: tune the shift first")
        args["shift"] = float(tuned_shift)
    if preset.start == "schedule-tuned":
        if tuned_schedule is None:
            raise ValueError(f"preset {preset.name!r} starts from the tuned guidance schedule: tune the schedule first")
        if search.layout.mode != "cfg" or len(tuned_schedule) != search.n_segments:
            raise ValueError(
                f"preset {preset.name!r}: a guidance schedule of {len(tuned_schedule)} parts cannot start a "
                f"{search.layout.mode!r} search with {search.n_segments} parts"
            )
        args["shift"] = None if tuned_shift is None else float(tuned_shift)
        if warm_start is None:
            import torch

            warm_start = torch.cat([search.layout.initial(float(g)) for g in tuned_schedule]).numpy()
        if tuned_guidance is None:  # the steps of the weights scale with the guidance: the schedule's mean
            tuned_guidance = sum(float(g) for g in tuned_schedule) / len(tuned_schedule)
    if tuned_start and warm_start is None:
        if tuned_guidance is None:
            knob = "guidance" if preset.start == "guidance-tuned" else "shift"
            raise ValueError(f"preset {preset.name!r} starts from the {preset.start} model: tune the {knob} first")
        if search.layout.mode == "cfg":  # the weights carry the guidance: start them at the tuned one
            warm_start = search.x0(float(tuned_guidance)).numpy()  # every part of the schedule alike
        else:  # one guided model: sample it at the tuned guidance
            guidance = float(tuned_guidance)
    args["guidance"] = guidance
    args["warm_start"] = warm_start
    if preset.scaling == "sweep":
        if sweep is None or sweep.height == 0:
            raise ValueError(f"preset {preset.name!r} scales the search from the scale sweep: run the sweep first")
        start_guidance = float(tuned_guidance) if (tuned_start and tuned_guidance) else guidance
        args["initial_stds"] = initial_stds(
            search,
            sweep_curvatures(sweep),
            target_drop=preset.target_drop,
            guidance_coordinates=guidance_coordinates,
            guidance=start_guidance,
        )
    return args


def start_tuning(preset: Preset) -> str | None:
    """The tuned alternative a preset's search starts from (its name in the tunings), or None."""
    return preset.start if preset.start in ("guidance-tuned", "shift-tuned", "schedule-tuned") else None


def start_arguments(preset: Preset, tunings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``tuned_guidance`` / ``tuned_shift`` / ``tuned_schedule`` of :func:`calibration_arguments` from the
    tuned alternatives (``Tuned.to_dict()`` records or catalog ``tunings`` rows) the preset starts from."""
    name = start_tuning(preset) or "guidance-tuned"
    tuned = tunings.get(name)
    if tuned is None:
        return {}
    params = tuning_params(tuned)
    out: dict[str, Any] = {"tuned_guidance": tuned.get("guidance")}
    if name in ("shift-tuned", "schedule-tuned") and params.get("shift") is not None:
        out["tuned_shift"] = float(params["shift"])
    if name == "schedule-tuned":
        out["tuned_schedule"] = [float(g) for g in params["guidances"]]
    return out


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------


def block_search(backbone: Backbone) -> SearchSpace:
    """One model's block coefficients: the space the analyses scale and bypass."""
    from calibri_pipeline.method.space import CalibrationSpace, SearchSpace

    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    return SearchSpace.for_model(space, 1, uses_cfg=bool(backbone.uses_cfg))


def _analysis(preset: Preset, evaluator: PopulationEvaluator, val_prompts: Sequence[Prompt]):
    evaluator = evaluator.with_search(block_search(evaluator.backbone)).with_sampling(steps=preset.calibration_steps)
    return evaluator, list(val_prompts)[: preset.ablation_prompts]


def scale_sweep(preset: Preset, evaluator: PopulationEvaluator, val_prompts: Sequence[Prompt]) -> AnalysisResult:
    """Each block's output scaled by every alpha of the preset's grid, at the calibration NFE (Fig. 3b)."""
    from calibri_pipeline.method.analysis import scale_sweep as sweep

    evaluator, prompts = _analysis(preset, evaluator, val_prompts)
    return sweep(evaluator, prompts, alphas=preset.sweep_alphas, seeds=preset.ablation_seeds)


def block_ablation(preset: Preset, evaluator: PopulationEvaluator, val_prompts: Sequence[Prompt]) -> AnalysisResult:
    """Each block bypassed in turn, at the calibration NFE (Fig. 3a); its images are the sweep's alpha = 0."""
    from calibri_pipeline.method.analysis import block_ablation as ablation

    evaluator, prompts = _analysis(preset, evaluator, val_prompts)
    return ablation(evaluator, prompts, seeds=preset.ablation_seeds)


@dataclass(frozen=True)
class CalibrationPlan:
    """What :func:`~calibri_pipeline.method.calibrate.calibrate` is called with for a preset: the search
    space, the sampling (``guidance`` / ``shift`` None: the model's) and the options; the caller adds
    where the run is kept (``options.with_(store=..., cache=..., on_generation=...)``)."""

    search: SearchSpace
    sampling: SamplingSettings
    options: CalibrationOptions

    def record(self) -> dict[str, Any]:
        """What a run's record keeps of its plan (the catalog's ``config``, ``result.json``)."""
        return {
            "search": self.options.config.to_dict(),
            "guidance": self.sampling.guidance,
            "shift": self.sampling.shift,
            "initial_stds": self.options.initial_stds,
        }


def calibration_plan(
    preset: Preset,
    backbone: Backbone,
    *,
    sweep: pl.DataFrame | None,
    tunings: dict[str, dict[str, Any]],
    warm_start: Any = None,
    seed: int = 0,
) -> CalibrationPlan:
    """The preset's calibration on ``backbone``: its search space, its start (the tuned alternative it
    names, or ``warm_start``), its search scaled by the sweep, its CMA-ES settings with ``seed``.
    A ValueError names what an earlier stage must provide first."""
    from calibri_pipeline.method.calibrate import CalibrationOptions
    from calibri_pipeline.method.sampler import SamplingSettings
    from calibri_pipeline.method.space import CalibrationSpace

    space = CalibrationSpace.from_transformer(backbone.transformer, preset.granularity)
    args = calibration_arguments(
        preset, backbone, space, sweep=sweep, warm_start=warm_start, **start_arguments(preset, tunings)
    )
    return CalibrationPlan(
        search=args["search"],
        sampling=SamplingSettings(
            steps=args["steps"], guidance=args["guidance"], shift=args["shift"], max_batch=args["max_batch"]
        ),
        options=CalibrationOptions(
            config=search_config(preset, seed),
            warm_start=args["warm_start"],
            initial_stds=args.get("initial_stds"),
            guidance_coordinates=args["guidance_coordinates"],
            val_seeds_per_prompt=list(preset.val_seeds),
        ),
    )


class Evaluated(NamedTuple):
    settings: dict[str, Any]  # label -> Setting
    result: AnalysisResult  # evaluate_settings' scores, per-cell keys and comparisons
    evaluations: pl.DataFrame
    comparisons: pl.DataFrame


def evaluation(
    preset: Preset,
    evaluator: PopulationEvaluator,
    *,
    calibri: tuple[SearchSpace, Any, float | None, float | None] | None,
    tunings: dict[str, dict[str, Any]],
    test_prompts: Sequence[Prompt],
    seeds: Sequence[int],
    calibri_tag: str = "calibri",
) -> Evaluated:
    """Every setting of :func:`comparison_settings` on the test cells, paired against the references.

    ``calibri``: ``(search space, vector, guidance, shift)`` of the calibration as sampled (None: none yet);
    ``evaluator``: the unmodified model's, with every evaluation reward. Returns the settings, their
    scores, and the catalog's ``evaluations`` and ``comparisons`` rows (the calibration tagged ``calibri_tag``).
    """
    from calibri_pipeline.method.analysis import evaluate_settings
    from calibri_pipeline.report import evaluation_frames

    settings, references = comparison_settings(
        preset,
        calibri=None if calibri is None else calibri[:3],
        tunings=tunings,
        slg_space=block_search(evaluator.backbone).space,
        calibri_shift=None if calibri is None else calibri[3],
    )
    evaluated = evaluate_settings(
        evaluator, settings, test_prompts, seeds=seeds, reference=references["baseline"], references=references
    )
    carried_guidance = None
    if calibri is not None:
        carried = calibri[0].effective_guidance(calibri[1])
        carried_guidance = carried[0] if carried else calibri[2]
    evals, comparisons = evaluation_frames(evaluated, calibri_tag, carried_guidance)
    return Evaluated(settings, evaluated, evals, comparisons)


__all__ = [
    "CalibrationPlan",
    "Evaluated",
    "block_ablation",
    "block_search",
    "calibration_plan",
    "evaluation",
    "scale_sweep",
    "search_config",
    "calibration_arguments",
    "start_tuning",
    "comparison_settings",
    "start_arguments",
    "tune_alternatives",
    "tuned_shift",
    "tuning_params",
]


def tune_alternatives(
    preset: Preset,
    evaluator: PopulationEvaluator,
    block_space: CalibrationSpace,
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    *,
    ablation: pl.DataFrame | None = None,
    on_tuned: Callable[[Tuned], None] | None = None,
) -> dict[str, Tuned]:
    """The preset's alternatives tuned on the validation cells, by name (``guidance-tuned``, ``slg-tuned``,
    ``shift-tuned``, ``schedule-tuned``), at the calibration NFE, with ``evaluator`` (the unmodified
    model's; each tuner sets its own search space and sampling). ``ablation``: the block ablation (index,
    delta) that SLG picks its blocks from; the guidance schedule is tuned around the best constant
    guidance, at the tuned shift when one was tuned. ``on_tuned`` hears of each as it is done."""
    from calibri_pipeline.method.alternatives import (
        slg_layer_candidates,
        tune_guidance,
        tune_guidance_schedule,
        tune_shift,
        tune_slg,
    )
    from calibri_pipeline.method.space import SearchSpace

    evaluator = evaluator.with_sampling(steps=preset.calibration_steps)
    wanted = preset.alternatives
    tuned: dict[str, Tuned] = {}

    def done(result: Tuned) -> None:
        tuned[result.name] = result
        if on_tuned is not None:
            on_tuned(result)

    if "guidance" in wanted:
        done(tune_guidance(evaluator, prompts, seeds, grid=preset.guidance_grid))
    if "slg" in wanted and evaluator.backbone.uses_cfg:
        if ablation is None or ablation.height == 0:
            raise ValueError(
                "skip-layer guidance picks its blocks from the block ablation: materialize block_ablation first"
            )
        layer_sets = slg_layer_candidates(ablation, preset.slg_candidates)
        done(tune_slg(evaluator, block_space, prompts, seeds, layer_sets=layer_sets, scales=preset.slg_scales))
    if "shift" in wanted:
        done(tune_shift(evaluator, prompts, seeds, shifts=preset.shift_grid, guidances=preset.guidance_grid))
    if "schedule" in wanted:
        base = tuned.get("shift-tuned") or tuned.get("guidance-tuned")
        if base is None:
            raise ValueError("the guidance schedule is tuned around a tuned guidance: add 'guidance' or 'shift'")
        search = SearchSpace.for_model(block_space, 2, uses_cfg=True, segments=preset.segments)
        done(
            tune_guidance_schedule(
                evaluator,
                search,
                prompts,
                seeds,
                around=float(base.setting.guidance),
                offsets=preset.schedule_offsets,
                shift=base.setting.shift,
            )
        )
    return tuned


def comparison_settings(
    preset: Preset,
    *,
    calibri: tuple[Any, Any, float | None] | None,
    tunings: dict[str, dict[str, Any]],
    slg_space: CalibrationSpace | None = None,
    calibri_shift: float | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings the evaluation scores on the test prompts, and the references they are compared with.

    ``calibri``: ``(search space, vector, guidance)`` of the calibration (None: no calibration yet);
    ``tunings``: the tuned alternatives by name (``guidance-tuned``: its ``guidance``; ``slg-tuned``: its
    ``vector`` in the 3-member CFG layout of ``slg_space``; ``shift-tuned``: its shift and guidance;
    ``schedule-tuned``: its ``vector`` in the time-dependent CFG layout of ``slg_space``, at its shift);
    ``calibri_shift``: the sampler shift the calibration ran at (None: the model's). At the calibration
    NFE ``L``: the baseline, the baseline at ``2 L`` and at the default NFE, every tuned alternative and
    Calibri; across the preset's NFE list: the baseline, the guidance-tuned model and Calibri (the NFE
    study). Every setting is compared with ``baseline@L``, ``baseline@2L`` and each tuned alternative
    at ``L`` (guidance-tuned, SLG-tuned, shift-tuned, schedule-tuned).
    """
    from calibri_pipeline.method.alternatives import slg_search
    from calibri_pipeline.method.analysis import Setting

    low, default = preset.calibration_steps, preset.default_steps
    steps_all = sorted({low, 2 * low, default, *preset.nfe_list})
    settings: dict[str, Any] = {}
    for steps in steps_all:
        settings[setting_label("baseline", steps)] = Setting(None, steps=steps)
    guided = tunings.get("guidance-tuned")
    if guided is not None:
        for steps in sorted({low, *preset.nfe_list}):
            settings[setting_label("guidance-tuned", steps)] = Setting(None, steps=steps, guidance=guided["guidance"])
    slg = tunings.get("slg-tuned")
    if slg is not None:
        vector = slg["vector"]
        settings[setting_label("slg-tuned", low)] = Setting(
            vector, steps=low, guidance=slg["guidance"], search=slg_search(slg_space) if vector is not None else None
        )
    shifted = tunings.get("shift-tuned")
    if shifted is not None:
        settings[setting_label("shift-tuned", low)] = Setting(
            None, steps=low, guidance=shifted["guidance"], shift=tuned_shift(shifted)
        )
    scheduled = tunings.get("schedule-tuned")
    if scheduled is not None:
        from calibri_pipeline.method.space import SearchSpace

        params = tuning_params(scheduled)
        settings[setting_label("schedule-tuned", low)] = Setting(
            scheduled["vector"],
            steps=low,
            guidance=scheduled["guidance"],
            search=SearchSpace.for_model(slg_space, 2, uses_cfg=True, segments=params["segments"]),
            shift=params.get("shift"),
        )
    if calibri is not None:
        search, vector, guidance = calibri
        for steps in sorted({low, *preset.nfe_list}):
            settings[setting_label("calibri", steps)] = Setting(
                vector, steps=steps, guidance=guidance, search=search, shift=calibri_shift
            )
    references = {"baseline": setting_label("baseline", low), "twice the NFE": setting_label("baseline", 2 * low)}
    if guided is not None:
        references["guidance-tuned"] = setting_label("guidance-tuned", low)
    if slg is not None:
        references["slg-tuned"] = setting_label("slg-tuned", low)
    if shifted is not None:
        references["shift-tuned"] = setting_label("shift-tuned", low)
    if scheduled is not None:
        references["schedule-tuned"] = setting_label("schedule-tuned", low)
    return settings, references


def tuning_params(tuning: dict[str, Any]) -> dict[str, Any]:
    """The ``params`` of a tuned alternative: a ``Tuned.to_dict()`` record or a catalog ``tunings`` row (JSON)."""
    params = tuning.get("params")
    return json.loads(params) if isinstance(params, str) else dict(params or {})


def tuned_shift(tuning: dict[str, Any]) -> float:
    """The shift of a shift-tuned alternative (a ``Tuned.to_dict()`` record or a catalog ``tunings`` row)."""
    if tuning.get("shift") is not None:
        return float(tuning["shift"])
    params = tuning_params(tuning)
    if params.get("shift") is None:
        raise ValueError(f"the tuning {tuning.get('name', '?')!r} holds no shift")
    return float(params["shift"])
