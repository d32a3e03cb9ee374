"""The paper's evaluation tables (Tables 2, 6 and 7) built from the catalog, free of Dagster.

Used by the ``paper_tables`` asset and by ``calibri tables``.
"""

from __future__ import annotations

import polars as pl

from calibri_pipeline.rewards.names import REAL_REWARD_NAMES, WORLD_REWARD_NAMES


def paper_tables_from_catalog(cat) -> dict:
    """Tables 2, 6 and 7 of the paper from the catalog (polars DataFrames, one row per setting).

    - table2: per model and optimised reward, the baseline at its default NFE and the calibrated model
      at its calibration NFE, one column per evaluation reward;
    - table6: table2 plus mean per-prompt diversity;
    - table7: per model, which reward was optimised (``-`` = baseline) against every evaluation reward.
    """
    runs = cat.query(
        "SELECT model, reward AS optimised, run_id, config FROM calibration_runs WHERE status = 'finished'"
    )
    if runs.height == 0:
        return {}
    steps = runs.with_columns(
        pl.col("config").str.json_path_match("$.preset.default_steps").cast(pl.Int64).alias("default_nfe"),
        pl.col("config").str.json_path_match("$.preset.calibration_steps").cast(pl.Int64).alias("low_nfe"),
    ).drop("config")
    evals = cat.query("SELECT run_key, model, reward, calibrated, setting, nfe, mean FROM evaluations").with_columns(
        pl.col("run_key").str.split("|").list.get(1).alias("optimised")
    )
    joined = evals.join(steps, on=["model", "optimised"])
    # the paper's rows: the unmodified model at its default NFE, Calibri at the calibration NFE
    # (the tuned alternatives are evaluations too, shown by `calibri tables headline`)
    baseline = (pl.col("setting") == "baseline") & ~pl.col("calibrated") & (pl.col("nfe") == pl.col("default_nfe"))
    picked = joined.filter(baseline | (pl.col("calibrated") & (pl.col("nfe") == pl.col("low_nfe"))))
    wide = picked.pivot(on="reward", index=["model", "optimised", "calibrated", "nfe"], values="mean").sort(
        "model", "optimised", "calibrated"
    )
    table2 = wide.with_columns(
        pl.when(pl.col("calibrated")).then(pl.lit("yes")).otherwise(pl.lit("no")).alias("calibri")
    )
    div = (
        cat.query("SELECT run_key, calibrated, nfe, avg(diversity) AS diversity FROM diversity GROUP BY ALL")
        .with_columns(
            pl.col("run_key").str.split("|").list.get(0).alias("model"),
            pl.col("run_key").str.split("|").list.get(1).alias("optimised"),
        )
        .drop("run_key")
    )
    table6 = table2.join(div, on=["model", "optimised", "calibrated", "nfe"], how="left")
    baseline = (
        table2.filter(~pl.col("calibrated"))
        .unique(subset=["model"], keep="first")
        .with_columns(pl.lit("-").alias("optimised"))
    )
    table7 = pl.concat([baseline, table2.filter(pl.col("calibrated"))], how="diagonal_relaxed").sort(
        "model", "calibrated"
    )
    return {"table2": _ordered(table2), "table6": _ordered(table6), "table7": _ordered(table7)}


def _ordered(table: pl.DataFrame) -> pl.DataFrame:
    known = [c for c in (*WORLD_REWARD_NAMES, *REAL_REWARD_NAMES) if c in table.columns]
    rewards = known + sorted(c for c in table.columns if c.startswith("world") and c not in known)
    extra = [c for c in ("diversity",) if c in table.columns]
    return table.select(["model", "calibri", "optimised", *rewards, *extra, "nfe"])
