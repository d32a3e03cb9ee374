"""Stage 4: what a user tries before Calibri, tuned on the validation prompts like Calibri is.

The guidance scale of the unmodified model (a grid), skip-layer guidance (the blocks whose bypass
hurts least, times a few scales), the sampler's timestep shift with the guidance (a grid of both) and
a guidance per part of the noise schedule (around the best constant one) at the calibration NFE; the evaluation scores them beside Calibri on the test prompts, and a preset
can start CMA-ES from any of the guidance-, shift- or schedule-tuned models.
"""

import json

import dagster as dg

from calibri_pipeline.assets.analyses import block_ablation
from calibri_pipeline.assets.common import GROUP, PARTITIONS, CalibriConfig, Stage, cells, table_md
from calibri_pipeline.resources import GPU_POOL, CatalogResource, ComputeResource, ObjectStoreResource


def tuning_row(stage: Stage, tuned) -> dict:
    d = tuned.to_dict()
    grid = tuned.table.filter(tuned.table["reward"] == stage.reward).to_dicts()
    return dict(
        run_key=stage.run_key,
        model=stage.model,
        reward=stage.reward,
        name=tuned.name,
        label=tuned.label,
        steps=int(stage.preset.calibration_steps),
        guidance=d["guidance"],
        vector=d["vector"],
        params=json.dumps(d["params"]),
        val_mean=float(tuned.val_mean),
        grid=json.dumps(grid, default=float),
    )


@dg.asset(
    partitions_def=PARTITIONS, group_name=GROUP, deps=[block_ablation], pool=GPU_POOL, kinds={"pytorch", "duckdb"}
)
def alternatives(
    context: dg.AssetExecutionContext,
    config: CalibriConfig,
    catalog: CatalogResource,
    object_store: ObjectStoreResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """Guidance-tuned, skip-layer-guidance-tuned, shift-tuned and schedule-tuned baselines, chosen on the
    validation cells."""
    import polars as pl

    from calibri_pipeline.method.alternatives import (
        slg_layer_candidates,
        tune_guidance,
        tune_guidance_schedule,
        tune_shift,
        tune_slg,
    )
    from calibri_pipeline.method.ensemble import SearchSpace

    stage = Stage(context, config, catalog, object_store, compute)
    preset = stage.preset
    val_prompts, val_seeds = stage.prompts("val"), list(preset.val_seeds)
    rewards = stage.rewards([stage.reward])
    rows, meta, best = [], {}, {}
    if "guidance" in preset.alternatives:
        evaluator = stage.evaluator(None, rewards, steps=preset.calibration_steps)
        tuned = best["guidance"] = tune_guidance(evaluator, val_prompts, val_seeds, grid=preset.guidance_grid)
        rows.append(tuning_row(stage, tuned))
        meta["guidance_grid"] = table_md(
            tuned.table.select("label", "guidance", "mean", "ci_low", "ci_high", "delta", "delta_low", "delta_high")
        )
        stage.log(f"guidance-tuned: {tuned.label} (validation {tuned.val_mean:.4f})")
    if "shift" in preset.alternatives:
        evaluator = stage.evaluator(None, rewards, steps=preset.calibration_steps)
        tuned = best["shift"] = tune_shift(
            evaluator, val_prompts, val_seeds, shifts=preset.shift_grid, guidances=preset.guidance_grid
        )
        rows.append(tuning_row(stage, tuned))
        meta["shift_grid"] = table_md(
            tuned.table.select(
                "label", "shift", "guidance", "mean", "ci_low", "ci_high", "delta", "delta_low", "delta_high"
            )
        )
        stage.log(f"shift-tuned: {tuned.label} (validation {tuned.val_mean:.4f})")
    if "slg" in preset.alternatives and stage.backbone.uses_cfg:
        ablation = stage.catalog.query(
            "SELECT block_index AS index, delta FROM ablations WHERE model = ? AND reward = ?",
            [stage.model, stage.reward],
        )
        if ablation.height == 0:
            raise dg.Failure(
                "skip-layer guidance picks its blocks from the block ablation: materialize block_ablation first"
            )
        space = stage.space("block")
        evaluator = stage.evaluator(None, rewards, steps=preset.calibration_steps)
        tuned = tune_slg(
            evaluator,
            space,
            val_prompts,
            val_seeds,
            layer_sets=slg_layer_candidates(ablation, preset.slg_candidates),
            scales=preset.slg_scales,
        )
        rows.append(tuning_row(stage, tuned))
        meta["slg_grid"] = table_md(
            tuned.table.select("label", "mean", "ci_low", "ci_high", "delta", "delta_low", "delta_high")
        )
        stage.log(f"slg-tuned: {tuned.label} (validation {tuned.val_mean:.4f})")
    if "schedule" in preset.alternatives:
        # around the best constant guidance (at the tuned shift, when one was tuned)
        base = best.get("shift") or best.get("guidance")
        if base is None:
            raise dg.Failure("the guidance schedule is tuned around a tuned guidance: add 'guidance' or 'shift'")
        search = SearchSpace.for_model(stage.space("block"), 2, uses_cfg=True, segments=preset.segments)
        evaluator = stage.evaluator(None, rewards, steps=preset.calibration_steps)
        tuned = tune_guidance_schedule(
            evaluator,
            search,
            val_prompts,
            val_seeds,
            around=float(base.setting.guidance),
            offsets=preset.schedule_offsets,
            shift=base.setting.shift,
        )
        rows.append(tuning_row(stage, tuned))
        meta["schedule_grid"] = table_md(
            tuned.table.select("label", "shift", "mean", "ci_low", "ci_high", "delta", "delta_low", "delta_high")
        )
        stage.log(f"schedule-tuned: {tuned.label} (validation {tuned.val_mean:.4f})")
    df = pl.DataFrame(rows, schema_overrides={"vector": pl.List(pl.Float64), "guidance": pl.Float64})
    stage.catalog.replace("tunings", df, {"run_key": stage.run_key})
    n_cells = len(cells(val_prompts, val_seeds)[0])
    stage.summary(
        f"alternatives: {', '.join(r['name'] + ' = ' + r['label'] for r in rows) or 'none'} on {n_cells} validation images"
    )
    return dg.MaterializeResult(
        metadata={
            "chosen": table_md(df.select("name", "label", "guidance", "val_mean")),
            "validation_images": n_cells,
            **meta,
        }
    )


def load_tunings(stage: Stage) -> dict[str, dict]:
    """This partition's tuned alternatives by name (``guidance-tuned``, ``slg-tuned``, ``shift-tuned``,
    ``schedule-tuned``)."""
    df = stage.catalog.query("SELECT * FROM tunings WHERE run_key = ?", [stage.run_key])
    return {row["name"]: row for row in df.iter_rows(named=True)}
