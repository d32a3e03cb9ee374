"""Stage 2: the unmodified model's test images and their scores."""

import dagster as dg

from calibri_pipeline.assets.common import (
    Stage,
    cells,
    check_run_key,
    grid_of,
    image_rows,
    png_markdown,
    stage_asset,
    table_md,
)
from calibri_pipeline.assets.prompts import prompt_embeddings
from calibri_pipeline.resources import CatalogResource


@stage_asset(deps=[prompt_embeddings], kinds={"pytorch", "s3"}, gpu=True)
def baseline_images(stage: Stage) -> dg.MaterializeResult:
    """Unmodified model on the test prompts at the default NFE and at the calibration NFE (into the image cache)."""
    import polars as pl

    preset = stage.preset
    test = stage.prompts("test")
    cell_prompts, cell_seeds = cells(test, preset.seeds)
    frames, meta = [], {}
    made = None
    for steps in sorted({preset.default_steps, preset.calibration_steps}):
        made = stage.evaluator(None, [], steps=steps)
        result = made(None, cell_prompts, cell_seeds, keep_images=True, label=f"baseline images, {steps} steps")
        frames.append(
            image_rows(
                stage,
                cell_prompts,
                cell_seeds,
                result.keys[0],
                steps=steps,
                guidance=made.sampling.guidance,
                calibration="baseline",
            )
        )
        meta[f"grid_nfe{steps}"] = png_markdown(
            grid_of(result.images, test, stride=len(preset.seeds)), f"baseline {steps} steps"
        )
        stage.log(
            f"baseline at {steps} steps: {len(cell_prompts)} images ({result.generated} sampled, "
            f"{result.cached} from the image cache) in {result.seconds:.1f} s"
        )
    rows = pl.concat(frames)
    stage.catalog.replace("images", rows, {"run_key": stage.run_key, "calibration": "baseline"})
    stage.summary(f"baseline_images: {rows.height} images")
    return dg.MaterializeResult(
        metadata={"rows": rows.height, "steps": sorted({preset.default_steps, preset.calibration_steps}), **meta}
    )


@stage_asset(deps=[baseline_images], kinds={"duckdb"})
def baseline_scores(stage: Stage) -> dg.MaterializeResult:
    """Every evaluation reward on every baseline image (the stored PNGs, read back through the image cache)."""
    import polars as pl

    preset = stage.preset
    test = stage.prompts("test")
    cell_prompts, cell_seeds = cells(test, preset.seeds)
    rewards = stage.rewards(stage.eval_reward_names)
    frames, summary = [], []
    for steps in sorted({preset.default_steps, preset.calibration_steps}):
        evaluator = stage.evaluator(None, rewards, steps=steps)
        result = evaluator(None, cell_prompts, cell_seeds, label=f"baseline scores, {steps} steps")
        keys = result.keys[0]
        for name, values in result.scores.items():
            frames.append(pl.DataFrame({"image_id": keys, "reward": [name] * len(keys), "score": values[0]}))
            summary.append({"reward": name, "steps": steps, "mean": float(values[0].mean()), "n": len(keys)})
    scores = pl.concat(frames).unique(subset=["image_id", "reward"], keep="first", maintain_order=True)
    stage.catalog.replace("scores", scores, {"run_key": stage.run_key, "calibration": "baseline"})
    stage.summary(f"baseline_scores: {scores.height} scores")
    return dg.MaterializeResult(
        metadata={
            "rows": scores.height,
            "summary": table_md(pl.DataFrame(summary)),
            "nan_scores": int(scores["score"].is_nan().sum()),
        }
    )


@dg.asset_check(asset=baseline_scores, description="no NaN or infinite reward in this partition's baseline scores")
def baseline_scores_are_finite(context: dg.AssetCheckExecutionContext, catalog: CatalogResource) -> dg.AssetCheckResult:
    run_key = check_run_key(context)
    df = catalog.catalog.query(
        "SELECT count(*) FILTER (WHERE NOT isfinite(score)) AS bad, count(*) AS n FROM scores "
        "WHERE run_key = ? AND calibration = 'baseline'",
        [run_key],
    )
    bad, n = df.row(0)
    return dg.AssetCheckResult(passed=bool(bad == 0 and n > 0), metadata={"non_finite": int(bad), "rows": int(n)})
