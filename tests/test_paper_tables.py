"""Tables 2, 6 and 7 built from a hand-filled catalog, and `calibri tables` over it."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from calibri_pipeline.storage.catalog import Catalog
from calibri_pipeline.storage.paper_tables import paper_tables_from_catalog
from calibri_pipeline.tables_cli import main, render_tables


def _run(reward: str) -> pl.DataFrame:
    config = {"preset": {"default_steps": 30, "calibration_steps": 4}}
    return pl.DataFrame(
        {
            "run_id": f"toy-{reward}",
            "model": "toy",
            "reward": reward,
            "granularity": "block",
            "n_models": 1,
            "status": "finished",
            "config": json.dumps(config),
        }
    )


def _evals(optimised: str, calibrated_score: float, calibrated_quality: float) -> pl.DataFrame:
    # baseline at 4 and 30 steps, calibrated at 4, a tuned alternative at 30: only baseline@30 and
    # calibrated@4 belong in Table 2
    return pl.DataFrame(
        {
            "model": "toy",
            "reward": ["world_score", "world_quality"] * 4,
            "calibrated": [False, False, False, False, True, True, False, False],
            "calibration": ["baseline"] * 4 + [f"toy-{optimised}"] * 2 + ["guidance-tuned"] * 2,
            "setting": ["baseline"] * 4 + ["calibri"] * 2 + ["guidance-tuned"] * 2,
            "nfe": [4, 4, 30, 30, 4, 4, 30, 30],
            "mean": [0.40, 0.30, 0.60, 0.50, calibrated_score, calibrated_quality, 0.99, 0.99],
            "n": 8,
        }
    )


def _diversity(optimised: str, value: float) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "model": "toy",
            "calibrated": [False, False, True, True],
            "calibration": ["baseline", "baseline", f"toy-{optimised}", f"toy-{optimised}"],
            "nfe": [30, 30, 4, 4],
            "prompt_id": ["a", "b", "a", "b"],
            "diversity": [0.2, 0.4, value, value],
        }
    )


@pytest.fixture
def catalog_path(tmp_path: Path) -> Path:
    catalog = Catalog(tmp_path / "catalog.duckdb")
    for reward, score, quality, div in (("world_score", 0.62, 0.45, 0.1), ("world_quality", 0.35, 0.70, 0.5)):
        key = f"toy|{reward}"
        catalog.replace("calibration_runs", _run(reward), {"run_id": f"toy-{reward}"})
        catalog.replace("evaluations", _evals(reward, score, quality), {"run_key": key})
        catalog.replace("diversity", _diversity(reward, div), {"run_key": key})
    catalog.replace(
        "calibration_runs",
        _run("world_alignment").with_columns(status=pl.lit("running")),
        {"run_id": "toy-world_alignment"},
    )  # unfinished runs stay out
    return catalog.path


def test_tables_pick_baseline_at_default_and_calibrated_at_low_nfe(catalog_path: Path) -> None:
    tables = paper_tables_from_catalog(Catalog(catalog_path, create=False))
    t2 = tables["table2"]
    assert t2.columns == ["model", "calibri", "optimised", "world_score", "world_quality", "nfe"]
    rows = {(r["optimised"], r["calibri"]): r for r in t2.to_dicts()}
    assert set(rows) == {
        ("world_score", "no"),
        ("world_score", "yes"),
        ("world_quality", "no"),
        ("world_quality", "yes"),
    }
    assert (
        rows[("world_score", "no")]["world_score"] == pytest.approx(0.60) and rows[("world_score", "no")]["nfe"] == 30
    )
    assert (
        rows[("world_score", "yes")]["world_score"] == pytest.approx(0.62) and rows[("world_score", "yes")]["nfe"] == 4
    )
    assert rows[("world_quality", "yes")]["world_quality"] == pytest.approx(0.70)

    t6 = {(r["optimised"], r["calibri"]): r["diversity"] for r in tables["table6"].to_dicts()}
    assert t6[("world_score", "no")] == pytest.approx(0.3)  # mean over the baseline's prompts
    assert t6[("world_quality", "yes")] == pytest.approx(0.5)

    # Table 7: one baseline row, then one row per optimised reward, every evaluation reward beside it
    t7 = tables["table7"]
    assert t7["optimised"].to_list() == ["-", "world_quality", "world_score"]
    assert t7.filter(pl.col("optimised") == "world_quality")["world_score"].item() == pytest.approx(0.35)


def test_empty_catalog_has_no_tables(tmp_path: Path) -> None:
    assert paper_tables_from_catalog(Catalog(tmp_path / "c.duckdb")) == {}


def test_cli_prints_tables_and_refuses_unknown_names(catalog_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["table7", "--catalog", str(catalog_path), "-f", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "## table7"
    assert out[1] == "model,calibri,optimised,world_score,world_quality,nfe"
    assert out[2].startswith("toy,no,-,0.6,0.5,30")
    assert "## table2" in render_tables(catalog_path)
    with pytest.raises(SystemExit):
        main(["table9", "--catalog", str(catalog_path)])
    assert main(["--catalog", str(catalog_path.parent / "missing.duckdb")]) == 1
    assert "no catalog" in capsys.readouterr().err


def test_headline_shows_calibri_beside_the_alternatives(catalog_path: Path) -> None:
    from calibri_pipeline.tables_cli import headline_tables

    catalog = Catalog(catalog_path)
    comps = pl.DataFrame(
        {
            "model": "toy",
            "reward": "world_score",
            "nfe": 4,
            "setting": "calibri@4",
            "reference": "baseline@4",
            "delta": 0.22,
            "ci_low": 0.2,
            "ci_high": 0.24,
            "n": 8,
        }
    )
    catalog.replace("comparisons", comps, {"run_key": "toy|world_score"})
    table = headline_tables(catalog)
    mine = table.filter(pl.col("reward") == "world_score")
    assert mine["setting"].to_list() == ["baseline@4", "baseline@30", "calibri@4"]
    assert mine.filter(pl.col("setting") == "calibri@4")["vs baseline (same NFE)"].item() == "+0.220 [+0.200, +0.240]"
    assert "## headline" in render_tables(catalog_path, ["headline"])
