"""The asset checks read the partition's own held-out comparison and can fail."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl

from calibri_pipeline.assets.evaluation import _comparison, beats_baseline_result, not_worse_result
from calibri_pipeline.storage.catalog import Catalog


def _catalog(tmp_path: Path, deltas: dict[str, tuple[float, float, float]]) -> Catalog:
    cat = Catalog(tmp_path / "catalog.duckdb")
    config = json.dumps({"preset": {"calibration_steps": 4, "default_steps": 30}})
    cat.replace(
        "calibration_runs",
        pl.DataFrame(
            [
                dict(
                    run_id="toy|world_score|block|n2",
                    model="toy",
                    reward="world_score",
                    granularity="block",
                    n_models=2,
                    status="finished",
                    config=config,
                )
            ]
        ),
        {"run_id": "toy|world_score|block|n2"},
    )
    rows = [
        dict(
            model="toy",
            reward="world_score",
            nfe=4,
            setting="calibri@4",
            reference=f"{ref}@4",
            delta=d,
            ci_low=lo,
            ci_high=hi,
            n=128,
        )
        for ref, (d, lo, hi) in deltas.items()
    ]
    rows.append(
        dict(
            model="toy",
            reward="world_quality",
            nfe=4,
            setting="calibri@4",
            reference="baseline@4",
            delta=0.5,
            ci_low=0.4,
            ci_high=0.6,
            n=128,
        )
    )  # another reward: not the one optimised
    cat.replace("comparisons", pl.DataFrame(rows), {"run_key": "toy|world_score"})
    return cat


def test_a_calibration_worse_than_the_baseline_fails_with_an_error(tmp_path: Path) -> None:
    cat = _catalog(tmp_path, {"baseline": (-0.05, -0.08, -0.02), "guidance-tuned": (-0.09, -0.12, -0.06)})
    row = _comparison(cat, "toy|world_score", "baseline")
    assert row["delta"] == -0.05  # the optimised reward's row, not world_quality's
    result = beats_baseline_result(row)
    assert not result.passed and result.severity == dg.AssetCheckSeverity.ERROR
    worse = not_worse_result(_comparison(cat, "toy|world_score", "guidance-tuned"))
    assert not worse.passed and worse.severity == dg.AssetCheckSeverity.WARN


def test_not_shown_better_is_a_warning_and_a_real_gain_passes(tmp_path: Path) -> None:
    unclear = beats_baseline_result(
        _comparison(_catalog(tmp_path / "a", {"baseline": (0.01, -0.01, 0.03)}), "toy|world_score", "baseline")
    )
    assert not unclear.passed and unclear.severity == dg.AssetCheckSeverity.WARN
    cat = _catalog(tmp_path / "b", {"baseline": (0.04, 0.02, 0.06), "guidance-tuned": (0.0, -0.01, 0.01)})
    assert beats_baseline_result(_comparison(cat, "toy|world_score", "baseline")).passed
    assert not_worse_result(_comparison(cat, "toy|world_score", "guidance-tuned")).passed
    assert not beats_baseline_result(
        _comparison(cat, "toy|world_quality", "baseline")
    ).passed  # no run for that partition
