"""From a preset to the core's arguments: what the Dagster assets and ``calibri calibrate`` share.

A :class:`~calibri_pipeline.presets.Preset` names choices (``scaling="sweep"``, ``weights="guidance"``,
``start="guidance-tuned"`` ...); these functions turn them, with what earlier stages measured (the
scale sweep, the tuned guidance), into the search configuration and the keyword arguments of
:func:`calibri_pipeline.method.calibrate.calibrate`. Framework-free: no Dagster, no storage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

    from calibri_pipeline.backbones.base import Backbone
    from calibri_pipeline.method.search import SearchConfig
    from calibri_pipeline.method.space import CalibrationSpace
    from calibri_pipeline.presets import Preset


def search_config(preset: Preset, seed: int = 0) -> SearchConfig:
    """The CMA-ES settings of a preset."""
    from calibri_pipeline.method.search import SearchConfig

    return SearchConfig(
        sigma0=preset.effective_sigma0,
        max_generations=preset.generations,
        popsize=preset.popsize,
        bucket_size=preset.bucket_size,
        val_every=preset.val_every,
        patience=preset.patience,
        separable=preset.separable,
        probe_buckets=preset.probe_buckets,
        target_gain=preset.target_gain,
        max_val_seeds=preset.max_val_seeds,
        max_bucket_seeds=preset.max_bucket_seeds,
        confirm_top=preset.confirm_top,
        seed=seed,
    )


def calibration_arguments(
    preset: Preset,
    backbone: Backbone,
    space: CalibrationSpace,
    *,
    sweep: pl.DataFrame | None = None,
    tuned_guidance: float | None = None,
    warm_start: Any = None,
) -> dict[str, Any]:
    """Keyword arguments of ``calibrate`` for the preset (besides prompts, rewards and storage).

    ``sweep``: the scale-sweep table (``scaling="sweep"``); ``tuned_guidance``: the guidance-tuned
    baseline's scale (``start="guidance-tuned"``); ``warm_start``: a previous checkpoint's vector
    (the sensor), which wins over the tuned start.
    """
    from calibri_pipeline.method.ensemble import SearchSpace
    from calibri_pipeline.method.scaling import initial_stds, sweep_curvatures

    search = SearchSpace.for_model(space, preset.n_models, uses_cfg=bool(backbone.uses_cfg), segments=preset.segments)
    guidance = backbone.default_guidance
    guidance_coordinates = preset.weights == "guidance"
    if guidance_coordinates and search.layout.mode != "cfg":
        raise ValueError(
            f"preset {preset.name!r}: weights='guidance' needs the CFG ensemble (n_models >= 2 on a model with "
            f"classifier-free guidance), got mode {search.layout.mode!r}"
        )
    args: dict[str, Any] = {
        "steps": preset.calibration_steps,
        "n_models": preset.n_models,
        "guidance_coordinates": guidance_coordinates,
        "max_batch": preset.max_batch,
        "segments": tuple(preset.segments),
    }
    if preset.start == "guidance-tuned" and warm_start is None:
        if tuned_guidance is None:
            raise ValueError(f"preset {preset.name!r} starts from the guidance-tuned model: tune the guidance first")
        if search.layout.mode == "cfg":  # the weights carry the guidance: start them at the tuned one
            warm_start = search.x0(float(tuned_guidance)).numpy()  # every part of the schedule alike
        else:  # one guided model: sample it at the tuned guidance
            guidance = float(tuned_guidance)
    args["guidance"] = guidance
    args["warm_start"] = warm_start
    if preset.scaling == "sweep":
        if sweep is None or sweep.height == 0:
            raise ValueError(f"preset {preset.name!r} scales the search from the scale sweep: run the sweep first")
        start_guidance = float(tuned_guidance) if (preset.start == "guidance-tuned" and tuned_guidance) else guidance
        args["initial_stds"] = initial_stds(
            search,
            sweep_curvatures(sweep),
            target_drop=preset.target_drop,
            guidance_coordinates=guidance_coordinates,
            guidance=start_guidance,
        )
    return args


__all__ = ["search_config", "calibration_arguments"]


def setting_label(name: str, steps: int) -> str:
    """How a sampled setting is named in evaluations and comparisons: ``calibri@4``, ``baseline@8``."""
    return f"{name}@{steps}"


def comparison_settings(
    preset: Preset,
    *,
    calibri: tuple[Any, Any, float | None] | None,
    tunings: dict[str, dict[str, Any]],
    slg_space: CalibrationSpace | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings the evaluation scores on the test prompts, and the references they are compared with.

    ``calibri``: ``(search space, vector, guidance)`` of the calibration (None: no calibration yet);
    ``tunings``: the tuned alternatives by name (``guidance-tuned``: its ``guidance``; ``slg-tuned``: its
    ``vector`` in the 3-member CFG layout of ``slg_space``). At the calibration NFE ``L``: the baseline,
    the baseline at ``2 L`` and at the default NFE, every tuned alternative and Calibri; across the
    preset's NFE list: the baseline, the guidance-tuned model and Calibri (the NFE study). Every setting
    is compared with ``baseline@L``, ``guidance-tuned@L`` (when tuned) and ``baseline@2L``.
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
    if calibri is not None:
        search, vector, guidance = calibri
        for steps in sorted({low, *preset.nfe_list}):
            settings[setting_label("calibri", steps)] = Setting(vector, steps=steps, guidance=guidance, search=search)
    references = {"baseline": setting_label("baseline", low), "twice the NFE": setting_label("baseline", 2 * low)}
    if guided is not None:
        references["guidance-tuned"] = setting_label("guidance-tuned", low)
    return settings, references
