"""The headline table: Calibri beside the alternatives at the calibration NFE, with paired CIs.

Built from the catalog's ``evaluations`` and ``comparisons`` rows (polars frames), so the demo, the
``evaluation`` asset's metadata and ``calibri tables`` print the same thing.
"""

from __future__ import annotations

import polars as pl

from calibri_pipeline.method.labels import setting_label


def _fmt(mean: float | None, low: float | None, high: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" if low is not None else f"{mean:+.3f}"


#: what the `calibration` column of images/evaluations rows holds for each setting (Calibri: its run id)
SETTING_TAGS = {
    "baseline": "baseline",
    "guidance-tuned": "guidance-tuned",
    "slg-tuned": "slg-tuned",
    "shift-tuned": "shift-tuned",
    "schedule-tuned": "schedule-tuned",
}


def evaluation_frames(
    result, calibri_tag: str, calibri_guidance: float | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``evaluate_settings`` output (labels ``name@steps``) as the catalog's ``evaluations`` and
    ``comparisons`` rows (without their partition columns). ``calibri_guidance``: the guidance the
    calibrated vector itself carries (the CFG ensemble's weights), shown instead of the sampler's."""
    table = result.table
    names = table["label"].str.split("@").list.get(0)
    tag = pl.when(names == "calibri").then(pl.lit(calibri_tag)).otherwise(names.replace(SETTING_TAGS))
    guidance = pl.col("guidance").cast(pl.Float64)
    if calibri_guidance is not None:
        guidance = pl.when(names == "calibri").then(pl.lit(float(calibri_guidance))).otherwise(guidance)
    evals = table.select(
        pl.col("reward"),
        (names == "calibri").alias("calibrated"),
        tag.alias("calibration"),
        names.alias("setting"),
        guidance.alias("guidance"),
        pl.col("steps").cast(pl.Int32).alias("nfe"),
        "mean",
        "ci_low",
        "ci_high",
        pl.col("n_cells").cast(pl.Int32).alias("n"),
    )
    comparisons = pl.DataFrame(result.meta["comparisons"]).with_columns(
        pl.col("setting").str.split("@").list.get(1).cast(pl.Int32).alias("nfe"), pl.col("n").cast(pl.Int32)
    )
    return evals, comparisons


def headline_table(
    evaluations: pl.DataFrame, comparisons: pl.DataFrame, reward: str, low: int, default: int
) -> pl.DataFrame:
    """One row per setting (baseline at L, 2L and the default NFE, the tuned alternatives, Calibri at L):
    its mean ``reward`` with CI, and its paired difference to the baseline at L, the guidance-tuned
    baseline at L and the baseline at 2L (each ``mean [low, high]``)."""
    ev = evaluations.filter(pl.col("reward") == reward)
    order = [
        setting_label("baseline", low),
        setting_label("baseline", 2 * low),
        setting_label("baseline", default),
        setting_label("guidance-tuned", low),
        setting_label("slg-tuned", low),
        setting_label("shift-tuned", low),
        setting_label("schedule-tuned", low),
        setting_label("calibri", low),
    ]
    references = [
        (setting_label("baseline", low), "vs baseline (same NFE)"),
        (setting_label("guidance-tuned", low), "vs guidance-tuned"),
        (setting_label("shift-tuned", low), "vs shift-tuned"),
        (setting_label("schedule-tuned", low), "vs schedule-tuned"),
        (setting_label("baseline", 2 * low), "vs baseline at 2x NFE"),
    ]
    # the shift and schedule columns only where those were tuned (older runs and other presets keep their table)
    present = set(comparisons["reference"].to_list()) if comparisons.height else set()
    optional = {setting_label("shift-tuned", low), setting_label("schedule-tuned", low)}
    references = [r for r in references if r[0] not in optional or r[0] in present]
    rows = []
    for label in dict.fromkeys(order):
        name, steps = label.rsplit("@", 1)
        row = ev.filter((pl.col("setting") == name) & (pl.col("nfe") == int(steps)))
        if row.height == 0:
            continue
        r = row.row(0, named=True)
        ci = f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r.get("ci_low") is not None else ""
        out = {"setting": label, "guidance": r.get("guidance"), reward: f"{r['mean']:.3f}{ci}"}
        for ref, title in references:
            c = comparisons.filter(
                (pl.col("reward") == reward) & (pl.col("setting") == label) & (pl.col("reference") == ref)
            )
            out[title] = (
                _fmt(*c.select("delta", "ci_low", "ci_high").row(0)) if c.height else ("-" if label == ref else "")
            )
        rows.append(out)
    return pl.DataFrame(rows)


def setting_means(evaluations: pl.DataFrame, low: int, rewards: list[str]) -> pl.DataFrame:
    """Every reward's mean for each setting at the calibration NFE (a wide table)."""
    ev = evaluations.filter(pl.col("nfe") == low).with_columns(
        (pl.col("setting") + "@" + pl.col("nfe").cast(pl.String)).alias("label")
    )
    wide = ev.pivot(on="reward", index="label", values="mean")
    return wide.select(["label", *[r for r in rewards if r in wide.columns]])


def verdict_line(comparisons: pl.DataFrame, tunings: pl.DataFrame, reward: str, low: int) -> str | None:
    """One sentence: what Calibri@L adds over the best cheap alternative, the one with the highest
    *validation* mean (the test split only reports), as a paired difference with its 95% CI."""
    if tunings.height == 0:
        return None
    rows = tunings.sort(["val_mean", "name"], descending=[True, False]).iter_rows(named=True)
    for best in rows:  # the best alternative the evaluation compared Calibri with
        ref = setting_label(best["name"], low)
        c = comparisons.filter(
            (pl.col("reward") == reward)
            & (pl.col("setting") == setting_label("calibri", low))
            & (pl.col("reference") == ref)
        )
        if c.height:
            break
    else:
        return None
    delta, lo, hi, n = c.select("delta", "ci_low", "ci_high", "n").row(0)
    verdict = "better" if lo > 0 else ("worse" if hi < 0 else "not shown different")
    return (
        f"Calibri@{low} vs the best cheap alternative on validation, {ref} ({best['label']}): "
        f"{delta:+.3f} [{lo:+.3f}, {hi:+.3f}] {reward} on {n} held-out images: {verdict}"
    )


__all__ = ["headline_table", "setting_means", "evaluation_frames", "verdict_line", "SETTING_TAGS"]
