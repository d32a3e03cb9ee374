"""Stage 4: what a user tries before Calibri, tuned on the validation prompts like Calibri is.

The guidance scale of the unmodified model (a grid) and skip-layer guidance (the blocks whose bypass
hurts least, times a few scales) at the calibration NFE; the evaluation scores both beside Calibri on
the test prompts, and a preset can start CMA-ES from the guidance-tuned model.
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
    """Guidance-tuned and skip-layer-guidance-tuned baselines, chosen on the validation cells."""
    import polars as pl

    from calibri_pipeline.method.alternatives import slg_layer_candidates, tune_guidance, tune_slg

    stage = Stage(context, config, catalog, object_store, compute)
    preset = stage.preset
    val_prompts, val_seeds = stage.prompts("val"), list(preset.val_seeds)
    rewards = stage.rewards([stage.reward])
    rows, meta = [], {}
    if "guidance" in preset.alternatives:
        evaluator = stage.evaluator(None, rewards, steps=preset.calibration_steps)
        tuned = tune_guidance(evaluator, val_prompts, val_seeds, grid=preset.guidance_grid)
        rows.append(tuning_row(stage, tuned))
        meta["guidance_grid"] = table_md(
            tuned.table.select("label", "guidance", "mean", "ci_low", "ci_high", "delta", "delta_low", "delta_high")
        )
        stage.log(f"guidance-tuned: {tuned.label} (validation {tuned.val_mean:.4f})")
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
    """This partition's tuned alternatives by name (``guidance-tuned``, ``slg-tuned``)."""
    df = stage.catalog.query("SELECT * FROM tunings WHERE run_key = ?", [stage.run_key])
    return {row["name"]: row for row in df.iter_rows(named=True)}
