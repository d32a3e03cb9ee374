"""Stage 3: the paper's Fig. 3 on the model at hand: each block scaled (the sweep) and bypassed (the ablation).

The ablation runs after the sweep: its images (one block at 0) are the sweep's alpha = 0 images, read
back from the image cache when the sweep's grid has alpha = 0 and both use the same cells.
"""

import dagster as dg

from calibri_pipeline.assets.common import Stage, png_markdown, stage_asset, table_md
from calibri_pipeline.assets.prompts import prompt_embeddings


def _analysis_inputs(stage: Stage):
    """The unmodified model's evaluator (the analysis stage sets blocks and NFE) and the validation prompts."""
    return stage.evaluator(None, stage.rewards([stage.reward])), stage.prompts("val")


@stage_asset(deps=[prompt_embeddings], kinds={"pytorch"}, gpu=True)
def scale_sweep(stage: Stage) -> dg.MaterializeResult:
    """Each block's output scaled by every alpha of a grid (Fig. 3b heatmap); also what scales the search."""
    import polars as pl

    from calibri_pipeline import stages

    evaluator, prompts = _analysis_inputs(stage)
    result = stages.scale_sweep(stage.preset, evaluator, prompts)
    df = result.table.select(
        pl.lit(stage.model).alias("model"),
        pl.lit(stage.reward).alias("reward"),
        pl.col("index").cast(pl.Int32).alias("block_index"),
        pl.col("name").alias("block"),
        "alpha",
        "mean",
        "delta",
        pl.col("delta_low").alias("ci_low"),
        pl.col("delta_high").alias("ci_high"),
        pl.col("n_cells").cast(pl.Int32).alias("n"),
    ).with_columns(pl.lit(stage.preset.calibration_steps).alias("steps"))
    stage.catalog.replace("sweeps", df, {"model": stage.model, "reward": stage.reward})
    stage.summary(f"scale_sweep: {df.height} cells of the grid", evaluator)
    best = df.sort("mean", descending=True).head(10)
    return dg.MaterializeResult(
        metadata={
            "rows": df.height,
            "best_cells": table_md(best),
            "heatmap": png_markdown(result.plot(), "scale sweep"),
        }
    )


@stage_asset(deps=[scale_sweep], kinds={"pytorch"}, gpu=True)
def block_ablation(stage: Stage) -> dg.MaterializeResult:
    """Each block bypassed in turn: reward change vs the unmodified model, bootstrap CIs (Fig. 3a)."""
    import polars as pl

    from calibri_pipeline import stages

    evaluator, prompts = _analysis_inputs(stage)
    result = stages.block_ablation(stage.preset, evaluator, prompts)
    df = result.table.select(
        pl.lit(stage.model).alias("model"),
        pl.lit(stage.reward).alias("reward"),
        pl.col("index").cast(pl.Int32).alias("block_index"),
        pl.col("name").alias("block"),
        pl.col("baseline_mean").alias("baseline"),
        pl.col("ablated_mean").alias("mean"),
        "delta",
        pl.col("delta_low").alias("ci_low"),
        pl.col("delta_high").alias("ci_high"),
        pl.col("n_cells").cast(pl.Int32).alias("n"),
    ).with_columns(pl.lit(stage.preset.calibration_steps).alias("steps"))
    stage.catalog.replace("ablations", df, {"model": stage.model, "reward": stage.reward})
    stage.summary(f"block_ablation: {df.height} blocks", evaluator)
    return dg.MaterializeResult(
        metadata={
            "rows": df.height,
            "table": table_md(df),
            "images_from_cache": evaluator.stats.cached,
            "plot": png_markdown(result.plot(), "ablation"),
        }
    )
