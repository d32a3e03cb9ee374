"""`calibri sql`: read-only queries printed as an aligned table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from calibri_pipeline.sql_cli import main, run_sql
from calibri_pipeline.storage.catalog import Catalog


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    catalog = Catalog(tmp_path / "home" / "catalog.duckdb")
    catalog.replace(
        "evaluations",
        pl.DataFrame(
            {
                "model": "toy",
                "reward": "world",
                "calibrated": [False, True, False, True],
                "nfe": [4, 4, 30, 30],
                "mean": [0.61, 0.6625, 0.7, float("nan")],
                "n": [64, 64, 64, 64],
            }
        ),
        {"run_key": "evaluation/toy|world"},
    )
    catalog.replace(
        "cmaes_candidates",
        pl.DataFrame(
            {"generation": [0, 0], "candidate": [0, 1], "fitness": [0.5, None], "vector": [[1.0, 0.25], [0.5, 2.0]]}
        ),
        {"run_id": "toy-world-block"},
    )
    return catalog.path


def test_table_output_is_aligned(filled: Path) -> None:
    out = run_sql(filled, "SELECT model, calibrated, nfe, mean FROM evaluations ORDER BY nfe, calibrated")
    lines = out.splitlines()
    assert lines[0].split() == ["model", "calibrated", "nfe", "mean"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["toy", "false", "4", "0.61"]
    assert lines[5].split() == ["toy", "true", "30", "nan"]
    assert lines[-1] == "(4 rows)"
    # Numbers are right-aligned under their header, text left-aligned.
    nfe_end = lines[0].index("nfe") + len("nfe")
    assert all(line[nfe_end - 1] != " " for line in lines[2:6])
    assert all(line.startswith("toy ") for line in lines[2:6])


def test_table_shows_nulls_and_lists(filled: Path) -> None:
    out = run_sql(filled, "SELECT candidate, fitness, vector FROM cmaes_candidates ORDER BY candidate")
    assert out.splitlines()[2].split(None, 2) == ["0", "0.5", "[1.0, 0.25]"]
    assert out.splitlines()[3].split(None, 2) == ["1", "NULL", "[0.5, 2.0]"]
    assert run_sql(filled, "SELECT 1 AS one").splitlines()[-1] == "(1 row)"
    empty = run_sql(filled, "SELECT * FROM images")
    assert empty.splitlines()[0].split()[:2] == ["image_id", "run_key"] and empty.splitlines()[-1] == "(0 rows)"


def test_csv_output_parses_back(filled: Path) -> None:
    out = run_sql(
        filled, "SELECT nfe, calibrated, mean, [nfe, 1] AS pair FROM evaluations ORDER BY nfe, calibrated", "csv"
    )
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["nfe", "calibrated", "mean", "pair"]
    assert rows[1] == ["4", "false", "0.61", "[4, 1]"]
    assert rows[2] == ["4", "true", "0.6625", "[4, 1]"]
    assert len(rows) == 5


def test_json_output_is_valid_json(filled: Path) -> None:
    out = run_sql(filled, "SELECT nfe, calibrated, mean, created_at FROM evaluations ORDER BY nfe, calibrated", "json")
    records = json.loads(out)
    assert [r["nfe"] for r in records] == [4, 4, 30, 30]
    assert records[1]["calibrated"] is True and records[1]["mean"] == 0.6625
    assert records[3]["mean"] is None  # NaN is not JSON: it becomes null
    assert records[0]["created_at"].startswith("20")  # ISO timestamp
    vectors = json.loads(run_sql(filled, "SELECT vector FROM cmaes_candidates ORDER BY candidate", "json"))
    assert vectors == [{"vector": [1.0, 0.25]}, {"vector": [0.5, 2.0]}]


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO evaluations (run_key, model, reward, calibrated, nfe, mean, n) VALUES ('x', 'm', 'r', true, 1, 0, 1)",
        "UPDATE evaluations SET mean = 1",
        "DELETE FROM evaluations",
        "CREATE TABLE hack (a INT)",
        "DROP TABLE evaluations",
        "ATTACH 'elsewhere.duckdb' AS other",
        "COPY evaluations TO 'leak.csv'",
        "SELECT 1; DELETE FROM evaluations",
    ],
)
def test_write_statements_are_refused(filled: Path, statement: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = filled.stat().st_mtime_ns
    with pytest.raises(ValueError, match="refused|exactly one"):
        run_sql(filled, statement)
    assert main([statement, "--catalog", str(filled)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("calibri sql: error: ") and ("read-only" in err or "exactly one" in err)
    assert filled.stat().st_mtime_ns == before
    assert run_sql(filled, "SELECT count(*) AS n FROM evaluations", "csv") == "n\n4\n"
    assert sorted(p.name for p in filled.parent.iterdir()) == [
        "catalog.duckdb",
        "catalog.duckdb.lock",
        "catalog.duckdb.lock-queue",
    ]


def test_missing_catalog_is_an_error_not_a_new_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "catalog.duckdb"
    with pytest.raises(FileNotFoundError, match="no catalog at"):
        run_sql(missing, "SELECT 1")
    assert main(["SELECT 1", "--catalog", str(missing)]) == 1
    assert "no catalog at" in capsys.readouterr().err
    assert not missing.parent.exists()


def test_bad_sql_and_bad_format_are_clear_errors(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="Table with name nope does not exist"):
        run_sql(filled, "SELECT * FROM nope")
    with pytest.raises(ValueError, match="unknown output format 'xml'"):
        run_sql(filled, "SELECT 1", "xml")
    with pytest.raises(SystemExit):
        main(["SELECT 1", "--format", "xml"])
    assert "invalid choice: 'xml'" in capsys.readouterr().err


def test_command_line_uses_calibri_home_by_default(filled: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CALIBRI_CATALOG",)}
    env["CALIBRI_HOME"] = str(filled.parent)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "calibri_pipeline.sql_cli",
            "SELECT nfe, count(*) AS n FROM evaluations GROUP BY nfe ORDER BY nfe",
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "nfe,n\n4,2\n30,2\n"
    env["CALIBRI_CATALOG"] = str(tmp_path / "other.duckdb")  # the explicit variable wins
    result = subprocess.run(
        [sys.executable, "-m", "calibri_pipeline.sql_cli", "SELECT 1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 1 and "no catalog at" in result.stderr and "other.duckdb" in result.stderr
