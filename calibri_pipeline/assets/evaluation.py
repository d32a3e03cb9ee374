"""Stage 6: held-out evaluation, Calibri beside the alternatives (Table 2, Fig. 6), and diversity (App. B).

Every image the evaluation needs that an earlier stage made (the baselines at the default and the
calibration NFE, a calibration that selected x0) is read back from the image cache, not sampled again.
"""

import dagster as dg

from calibri_pipeline.assets.alternatives import load_tunings
from calibri_pipeline.assets.baselines import baseline_scores
from calibri_pipeline.assets.calibration import calibration, calibration_search, load_calibration
from calibri_pipeline.assets.common import (
    Stage,
    check_run_key,
    grid_of,
    image_rows,
    latest_calibration,
    png_markdown,
    stage_asset,
    table_md,
)
from calibri_pipeline.report import SETTING_TAGS, setting_label
from calibri_pipeline.resources import CatalogResource


@stage_asset(deps=[calibration, baseline_scores], kinds={"pytorch", "duckdb"}, gpu=True)
def evaluation(stage: Stage) -> dg.MaterializeResult:
    """Test prompts: baseline, guidance-tuned, SLG-tuned, shift-tuned and Calibri at the calibration NFE, the baseline at
    twice that and at the default, the NFE study; every reward, paired CIs against the references."""
    import json

    import polars as pl
    import torch

    from calibri_pipeline import stages
    from calibri_pipeline.method.analysis import plot_nfe
    from calibri_pipeline.report import headline_table

    preset, cat = stage.preset, stage.catalog
    run = load_calibration(stage)
    run_config = json.loads(run["config"])
    calibri = (calibration_search(stage, run), list(run["vector"]), run_config.get("guidance"), run_config.get("shift"))
    test = stage.prompts("test")
    evaluator = stage.evaluator(None, stage.rewards(stage.eval_reward_names))  # every reward, loaded once
    settings, result, evals, comparisons = stages.evaluation(
        preset,
        evaluator,
        calibri=calibri,
        tunings=load_tunings(stage),
        test_prompts=test,
        seeds=preset.seeds,
        calibri_tag=run["run_id"],
    )
    evals = evals.with_columns(pl.lit(stage.model).alias("model"), pl.lit(f"{stage.run_key}:test").alias("prompt_set"))
    cat.replace("evaluations", evals, {"run_key": stage.run_key})
    comparisons = comparisons.with_columns(pl.lit(stage.model).alias("model"))
    cat.replace("comparisons", comparisons, {"run_key": stage.run_key})

    # the images of every setting at the calibration NFE (for people, and for the diversity asset)
    keys, cell_prompts, cell_seeds = result.meta["keys"], result.meta["cell_prompts"], result.meta["cell_seeds"]
    low = preset.calibration_steps
    score_matrix = result.scores
    labels = list(settings)
    for name in ("calibri", "guidance-tuned", "slg-tuned", "shift-tuned", "schedule-tuned"):
        label = setting_label(name, low)
        if label not in keys:
            continue
        calibration_tag = run["run_id"] if name == "calibri" else SETTING_TAGS[name]
        rows = image_rows(
            stage,
            cell_prompts,
            cell_seeds,
            keys[label],
            steps=low,
            guidance=settings[label].guidance,
            calibration=calibration_tag,
        )
        cat.replace("images", rows, {"run_key": stage.run_key, "calibration": calibration_tag})
        i = labels.index(label)
        scores = pl.concat(
            [
                pl.DataFrame({"image_id": keys[label], "reward": [r] * len(keys[label]), "score": m[i]})
                for r, m in score_matrix.items()
            ]
        ).unique(subset=["image_id", "reward"], keep="first", maintain_order=True)
        cat.replace("scores", scores, {"run_key": stage.run_key, "calibration": calibration_tag})
    headline = headline_table(evals, comparisons, stage.reward, low, preset.default_steps)
    nfe_table = result.table.with_columns(result.table["label"].str.split("@").list.get(0).alias("label"))
    grid_images = stage.image_cache.get(keys[setting_label("calibri", low)][:: len(preset.seeds)][:16])
    grid = grid_of(torch.stack(list(grid_images.values())), test) if grid_images else None
    stage.summary(f"evaluation: {len(settings)} settings on {len(cell_prompts)} test images each", evaluator)
    meta = {
        "rows": evals.height,
        "headline": table_md(headline),
        "nfe_plot": png_markdown(
            plot_nfe(nfe_table.select("label", "steps", "reward", "mean", "ci_low", "ci_high")), "reward vs NFE"
        ),
        "images_from_cache": evaluator.stats.cached,
        "images_sampled": evaluator.stats.generated,
    }
    if grid is not None:
        meta["calibrated_grid"] = png_markdown(grid, f"calibrated at {low} steps")
    return dg.MaterializeResult(metadata=meta)


def _comparison(catalog, run_key: str, reference_name: str) -> dict | None:
    """The optimised reward's paired difference calibri@L - <reference>@L of a partition (L: its calibration NFE)."""
    import json

    model, reward = run_key.split("|")
    run = latest_calibration(catalog, model, reward)
    if run is None:
        return None
    low = json.loads(run["config"])["preset"]["calibration_steps"]
    df = catalog.query(
        "SELECT delta, ci_low, ci_high, n FROM comparisons WHERE run_key = ? AND reward = ? AND setting = ? AND reference = ?",
        [run_key, reward, setting_label("calibri", low), setting_label(reference_name, low)],
    )
    return None if df.height == 0 else df.row(0, named=True)


def beats_baseline_result(row: dict | None) -> dg.AssetCheckResult:
    """The check on one held-out comparison row (Calibri minus the baseline at the calibration NFE)."""
    if row is None:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "no held-out comparison for this partition"})
    # worse than the baseline (the whole interval below 0) is an error; not shown better is a warning
    severity = dg.AssetCheckSeverity.ERROR if row["ci_high"] < 0 else dg.AssetCheckSeverity.WARN
    return dg.AssetCheckResult(passed=bool(row["ci_low"] > 0), severity=severity, metadata=_numbers(row))


def not_worse_result(row: dict | None) -> dg.AssetCheckResult:
    """The check on one held-out comparison row (Calibri minus the guidance-tuned baseline)."""
    if row is None:
        return dg.AssetCheckResult(passed=True, metadata={"reason": "no guidance-tuned alternative in this partition"})
    return dg.AssetCheckResult(
        passed=bool(row["ci_high"] >= 0), severity=dg.AssetCheckSeverity.WARN, metadata=_numbers(row)
    )


def _numbers(row: dict) -> dict:
    return {
        "delta": float(row["delta"]),
        "ci_low": float(row["ci_low"]),
        "ci_high": float(row["ci_high"]),
        "images": int(row["n"]),
    }


@dg.asset_check(
    asset=evaluation,
    description="Calibri beats the baseline at the calibration NFE on held-out prompts "
    "(paired 95% CI of the optimised reward above 0)",
)
def calibrated_beats_baseline(context: dg.AssetCheckExecutionContext, catalog: CatalogResource) -> dg.AssetCheckResult:
    return beats_baseline_result(_comparison(catalog.catalog, check_run_key(context), "baseline"))


@dg.asset_check(
    asset=evaluation,
    description="Calibri is not worse than the guidance-tuned baseline at the calibration NFE "
    "(the paired 95% CI reaches 0 or above)",
)
def calibrated_not_worse_than_guidance_tuning(
    context: dg.AssetCheckExecutionContext, catalog: CatalogResource
) -> dg.AssetCheckResult:
    return not_worse_result(_comparison(catalog.catalog, check_run_key(context), "guidance-tuned"))


@stage_asset(deps=[evaluation], kinds={"pytorch", "duckdb"}, resources=("catalog", "object_store"))
def diversity(stage: Stage) -> dg.MaterializeResult:
    """Per-prompt diversity over seeds (1 - mean pairwise cosine similarity of image features; paper App. B)."""
    import polars as pl
    import torch

    from calibri_pipeline.features import make_feature_extractor
    from calibri_pipeline.method.diversity import diversity_per_prompt
    from calibri_pipeline.storage.image_cache import read_png_tensor

    rows = stage.catalog.query(
        "SELECT image_id, prompt_id, seed, steps, calibration, uri FROM images WHERE run_key = ? "
        "ORDER BY calibration, steps, prompt_id, seed",
        [stage.run_key],
    )
    if rows.height == 0:
        raise dg.Failure(f"no images for {stage.run_key}")
    extractor = make_feature_extractor("efficientnet-lite0")
    out = []
    for (tag, steps), group in rows.group_by(["calibration", "steps"], maintain_order=True):
        images = torch.stack([read_png_tensor(stage.store, u) for u in group["uri"]])
        per_prompt = diversity_per_prompt(extractor(images), list(group["prompt_id"]))
        counts = dict(group.group_by("prompt_id").len().iter_rows())
        out += [
            dict(
                model=stage.model,
                calibrated=tag not in SETTING_TAGS.values(),
                calibration=tag,
                nfe=int(steps),
                prompt_id=pid,
                diversity=float(d),
                n_seeds=int(counts[pid]),
            )
            for pid, d in per_prompt.items()
        ]
    df = pl.DataFrame(out)
    stage.catalog.replace("diversity", df, {"run_key": stage.run_key})
    summary = (
        df.group_by("calibration", "nfe")
        .agg(pl.col("diversity").mean().alias("mean_diversity"), pl.len().alias("prompts"))
        .sort("calibration", "nfe")
    )
    stage.summary(f"diversity: {df.height} prompt x setting rows")
    return dg.MaterializeResult(
        metadata={"rows": df.height, "summary": table_md(summary), "features": "EfficientNet-Lite0 (ImageNet), pooled"}
    )


@dg.asset_check(
    asset=diversity, description="calibration did not collapse diversity (>= 50% of the baseline at the same NFE)"
)
def diversity_not_collapsed(context: dg.AssetCheckExecutionContext, catalog: CatalogResource) -> dg.AssetCheckResult:
    df = catalog.catalog.query(
        "SELECT c.nfe, avg(c.diversity) AS calibrated, "
        "(SELECT avg(b.diversity) FROM diversity b WHERE b.run_key = c.run_key AND b.nfe = c.nfe AND b.calibration = 'baseline') AS baseline "
        "FROM diversity c WHERE c.run_key = ? AND c.calibrated GROUP BY c.run_key, c.nfe",
        [check_run_key(context)],
    )
    if df.height == 0 or df["baseline"].is_null().all():
        return dg.AssetCheckResult(
            passed=False, metadata={"reason": "no calibrated and baseline diversity rows at one NFE"}
        )
    bad = df.filter(df["calibrated"] < 0.5 * df["baseline"])
    return dg.AssetCheckResult(
        passed=bad.height == 0, metadata={"nfe": df.height, "collapsed": bad.height, "table": table_md(df)}
    )
