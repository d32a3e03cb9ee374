"""Stage 4: what a user tries before Calibri, tuned on the validation prompts like Calibri is.

The guidance scale of the unmodified model (a grid), skip-layer guidance (the blocks whose bypass
hurts least, times a few scales), the sampler's timestep shift with the guidance (a grid of both) and
a guidance per part of the noise schedule (around the best constant one) at the calibration NFE; the evaluation scores them beside Calibri on the test prompts, and a preset
can start CMA-ES from any of the guidance-, shift- or schedule-tuned models.
"""

import json

import dagster as dg

from calibri_pipeline.assets.analyses import block_ablation
from calibri_pipeline.assets.common import Stage, cells, stage_asset, table_md

#: the columns of a tuner's grid shown in the asset's metadata (those it has), less what says nothing there
GRID_COLUMNS = (
    "label",
    "shift",
    "guidance",
    "mean",
    "ci_low",
    "ci_high",
    "n_cells",
    "delta",
    "delta_low",
    "delta_high",
)
HIDDEN_COLUMNS = {
    "guidance-tuned": ("shift",),  # always the model's
    "slg-tuned": ("shift", "guidance"),  # both the model's
    "shift-tuned": (),
    "schedule-tuned": ("guidance",),  # the constant one the schedule is tuned around
}


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


@stage_asset(deps=[block_ablation], kinds={"pytorch", "duckdb"}, gpu=True)
def alternatives(stage: Stage) -> dg.MaterializeResult:
    """Guidance-tuned, skip-layer-guidance-tuned, shift-tuned and schedule-tuned baselines, chosen on the
    validation cells."""
    import polars as pl

    from calibri_pipeline.stages import tune_alternatives

    preset = stage.preset
    val_prompts, val_seeds = stage.prompts("val"), list(preset.val_seeds)
    ablation = None
    if "slg" in preset.alternatives:
        ablation = stage.catalog.query(
            "SELECT block_index AS index, delta FROM ablations WHERE model = ? AND reward = ?",
            [stage.model, stage.reward],
        )
    rows, meta = [], {}

    def record(tuned) -> None:
        rows.append(tuning_row(stage, tuned))
        columns = [c for c in GRID_COLUMNS if c in tuned.table.columns and c not in HIDDEN_COLUMNS[tuned.name]]
        meta[tuned.name.removesuffix("-tuned") + "_grid"] = table_md(tuned.table.select(columns))
        stage.log(f"{tuned.name}: {tuned.label} (validation {tuned.val_mean:.4f})")

    try:
        tune_alternatives(
            preset,
            stage.evaluator(None, stage.rewards([stage.reward])),
            stage.space("block"),
            val_prompts,
            val_seeds,
            ablation=ablation,
            on_tuned=record,
        )
    except ValueError as error:
        raise dg.Failure(str(error)) from error
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
