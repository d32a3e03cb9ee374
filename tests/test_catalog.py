"""Catalog: schema, idempotent partition replace, crash safety, concurrent writer processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest

from calibri_pipeline.storage.catalog import (
    SCHEMA_DOC,
    SCHEMA_VERSION,
    TABLES,
    Catalog,
    CatalogError,
    check_read_only_sql,
)


def _images(run_key: str, n: int, *, model: str = "toy", offset: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "image_id": [f"{run_key}-{i}" for i in range(offset, offset + n)],
            "run_key": run_key,
            "model": model,
            "prompt_id": [f"p{i % 3}" for i in range(n)],
            "seed": list(range(offset, offset + n)),
            "steps": 4,
            "guidance": 3.5,
            "uri": [f"file:///objects/{run_key}/{i}.png" for i in range(offset, offset + n)],
        }
    )


def test_schema_matches_the_documented_tables(tmp_catalog: Catalog) -> None:
    described = tmp_catalog.query(
        "SELECT table_name, column_name, data_type FROM information_schema.columns ORDER BY table_name, ordinal_position"
    )
    assert sorted(described["table_name"].unique().to_list()) == sorted(TABLES)
    for table in TABLES.values():
        rows = described.filter(pl.col("table_name") == table.name)
        assert rows["column_name"].to_list() == table.column_names
        spelled = [c.sql_type.replace("TIMESTAMPTZ", "TIMESTAMP WITH TIME ZONE") for c in table.columns]
        assert rows["data_type"].to_list() == spelled
        assert f"### `{table.name}`" in SCHEMA_DOC
        for column in table.columns:
            assert f"| `{column.name}` |" in SCHEMA_DOC
    assert tmp_catalog.query("SELECT value FROM catalog_meta WHERE key = 'schema_version'").item() == str(
        SCHEMA_VERSION
    )
    import calibri_pipeline.storage.catalog as catalog_module

    assert SCHEMA_DOC in (catalog_module.__doc__ or "")  # the module docstring documents the schema


def test_reopening_keeps_data_and_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.duckdb"
    Catalog(path).replace("images", _images("a", 2), {"run_key": "a"})
    assert Catalog(path).count("images") == 2  # creating again is a no-op on an existing file
    import duckdb

    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE catalog_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(CatalogError, match=f"schema version 99, this code expects {SCHEMA_VERSION}"):
        Catalog(path)


def test_a_version_1_catalog_is_upgraded_in_place(tmp_path: Path) -> None:
    """Version 1 named the selected search vector `coefficients` and had no image cache, no
    comparisons, no `setting` / `guidance` on evaluations and no run noise; its rows survive."""
    import duckdb

    path = tmp_path / "old.duckdb"
    Catalog(path)
    with duckdb.connect(str(path)) as con:  # turn the fresh file into what version 1 wrote
        for table in ("image_cache", "comparisons", "tunings"):
            con.execute(f"DROP TABLE {table}")
        con.execute('ALTER TABLE calibration_runs RENAME COLUMN "vector" TO coefficients')
        con.execute("ALTER TABLE calibration_runs DROP COLUMN noise")
        con.execute("ALTER TABLE calibration_runs DROP COLUMN segments")
        con.execute("ALTER TABLE evaluations DROP COLUMN setting")
        con.execute("ALTER TABLE evaluations DROP COLUMN guidance")
        con.execute("UPDATE catalog_meta SET value = '1' WHERE key = 'schema_version'")
        con.execute(
            "INSERT INTO calibration_runs (run_id, model, reward, granularity, status, coefficients) "
            "VALUES ('r', 'toy', 'world_score', 'block', 'finished', [1.0, 0.5])"
        )
        con.execute(
            "INSERT INTO evaluations (run_key, model, reward, calibrated, calibration, nfe, mean, n) VALUES "
            "('toy|world_score', 'toy', 'world_score', true, 'r', 4, 0.7, 8), "
            "('toy|world_score', 'toy', 'world_score', false, 'baseline', 4, 0.6, 8)"
        )
    upgraded = Catalog(path)
    assert upgraded.query("SELECT value FROM catalog_meta WHERE key = 'schema_version'").item() == str(SCHEMA_VERSION)
    assert upgraded.query("SELECT vector FROM calibration_runs").item().to_list() == [1.0, 0.5]
    settings = upgraded.query("SELECT setting FROM evaluations ORDER BY calibrated")["setting"].to_list()
    assert settings == ["baseline", "calibri"]
    assert upgraded.count("image_cache") == upgraded.count("comparisons") == upgraded.count("tunings") == 0
    for table in TABLES.values():  # every documented column exists after the upgrade
        cols = upgraded.query(f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table.name}'")
        assert set(table.column_names) <= set(cols["column_name"].to_list()), table.name


def test_a_version_2_catalog_gets_each_runs_segments_from_its_config(tmp_path: Path) -> None:
    """Version 2 kept a run's time segments only inside its `config` JSON; version 3 has a column."""
    import duckdb

    path = tmp_path / "v2.duckdb"
    Catalog(path)
    with duckdb.connect(str(path)) as con:
        con.execute("ALTER TABLE calibration_runs DROP COLUMN segments")
        con.execute("UPDATE catalog_meta SET value = '2' WHERE key = 'schema_version'")
        con.execute(
            "INSERT INTO calibration_runs (run_id, model, reward, granularity, status, config) VALUES "
            """('timed', 'toy', 'world_score', 'block', 'finished', '{"preset": {"segments": [0.9, 0.5]}}'), """
            """('plain', 'toy', 'world_score', 'block', 'finished', '{"preset": {"segments": []}}'), """
            "('bare', 'toy', 'world_score', 'block', 'finished', NULL)"
        )
    upgraded = Catalog(path)
    rows = upgraded.query("SELECT run_id, segments FROM calibration_runs ORDER BY run_id").rows()
    assert [(run_id, list(seg)) for run_id, seg in rows] == [("bare", []), ("plain", []), ("timed", [0.9, 0.5])]


def test_insert_new_keeps_the_first_row_of_a_key(tmp_catalog: Catalog) -> None:
    row = dict(
        image_key="k1",
        model="toy",
        identity="i",
        prompt_id="p",
        text="a red circle",
        seed=1,
        steps=4,
        guidance=3.5,
        vector_id="baseline",
        vector=None,
        uri="file:///x/1.png",
    )
    df = pl.DataFrame([row, dict(row, image_key="k2")], schema_overrides={"vector": pl.List(pl.Float64)})
    assert tmp_catalog.insert_new("image_cache", df, key="image_key") == 2
    again = pl.DataFrame(
        [dict(row, uri="file:///other.png"), dict(row, image_key="k3")],
        schema_overrides={"vector": pl.List(pl.Float64)},
    )
    assert tmp_catalog.insert_new("image_cache", again, key="image_key") == 1
    uris = tmp_catalog.query("SELECT image_key, uri FROM image_cache ORDER BY image_key").rows()
    assert uris == [("k1", "file:///x/1.png"), ("k2", "file:///x/1.png"), ("k3", "file:///x/1.png")]
    with pytest.raises(ValueError, match="key 'nope'"):
        tmp_catalog.insert_new("image_cache", df, key="nope")


def test_rematerializing_a_partition_replaces_its_rows(tmp_catalog: Catalog) -> None:
    first = tmp_catalog.replace("images", _images("baseline/toy", 6), {"run_key": "baseline/toy"})
    assert (first.deleted, first.inserted) == (0, 6)
    tmp_catalog.replace("images", _images("baseline/other", 4, model="other"), {"run_key": "baseline/other"})
    again = tmp_catalog.replace("images", _images("baseline/toy", 6), {"run_key": "baseline/toy"})
    assert (again.deleted, again.inserted) == (6, 6)
    smaller = tmp_catalog.replace("images", _images("baseline/toy", 3, offset=10), {"run_key": "baseline/toy"})
    assert (smaller.deleted, smaller.inserted) == (6, 3)
    counts = tmp_catalog.query(
        "SELECT run_key, count(*) AS n, count(DISTINCT image_id) AS ids FROM images GROUP BY 1 ORDER BY 1"
    )
    assert counts.rows() == [("baseline/other", 4, 4), ("baseline/toy", 3, 3)]
    seeds = tmp_catalog.query("SELECT seed FROM images WHERE run_key = 'baseline/toy' ORDER BY seed")["seed"].to_list()
    assert seeds == [10, 11, 12]
    # Defaults fill what the DataFrame leaves out.
    defaults = tmp_catalog.query("SELECT DISTINCT calibration, created_at IS NOT NULL AS stamped FROM images")
    assert defaults.rows() == [("baseline", True)]


def test_partition_keys_fill_in_and_foreign_rows_are_refused(tmp_catalog: Catalog) -> None:
    scores = pl.DataFrame({"image_id": ["a", "b"], "score": [0.5, 0.25]})
    tmp_catalog.replace("scores", scores, {"run_key": "baseline/toy", "reward": "world"})
    tmp_catalog.replace(
        "scores", scores.with_columns(score=pl.col("score") * 2), {"run_key": "baseline/toy", "reward": "quality"}
    )
    tmp_catalog.replace("scores", scores, {"run_key": "baseline/toy", "reward": "world"})
    assert tmp_catalog.query("SELECT reward, sum(score) AS s FROM scores GROUP BY 1 ORDER BY 1").rows() == [
        ("quality", 1.5),
        ("world", 0.75),
    ]
    foreign = _images("baseline/toy", 2).with_columns(run_key=pl.Series(["baseline/toy", "baseline/other"]))
    with pytest.raises(ValueError, match="1 rows of the DataFrame have run_key != 'baseline/toy'"):
        tmp_catalog.replace("images", foreign, {"run_key": "baseline/toy"})
    assert tmp_catalog.count("images") == 0


def test_where_none_matches_null_and_empty_where_replaces_the_table(tmp_catalog: Catalog) -> None:
    prompts = pl.DataFrame(
        {"prompt_id": ["p1", "p2"], "text": ["a red cube", "a blue ball"], "source": "world-grammar"}
    )
    tmp_catalog.replace("prompts", prompts.with_columns(split=pl.lit(None, pl.String)), {"split": None})
    tmp_catalog.replace("prompts", prompts.with_columns(split=pl.lit("val")), {"split": "val"})
    tmp_catalog.replace("prompts", prompts.head(1), {"split": None})
    assert tmp_catalog.count("prompts", {"split": None}) == 1
    assert tmp_catalog.count("prompts", {"split": "val"}) == 2
    tmp_catalog.replace("prompts", prompts.head(1), {})
    assert tmp_catalog.count("prompts") == 1


@pytest.mark.parametrize(
    ("table", "df", "where", "error", "message"),
    [
        ("nope", pl.DataFrame({"a": [1]}), {}, ValueError, "unknown catalog table 'nope'"),
        ("images", pl.DataFrame({"colour": ["red"]}), {}, ValueError, r"columns \['colour'\] are not in table images"),
        ("images", pl.DataFrame(), {"colour": "red"}, ValueError, "where column 'colour' is not in table images"),
        ("images", pl.DataFrame(), {"run_key": ["a"]}, TypeError, "must be str, int, float, bool or None"),
        ("images", [{"run_key": "a"}], {}, TypeError, "needs a polars.DataFrame"),
        ("images", pl.DataFrame({"seed": ["x"]}), {"seed": 3}, TypeError, "cannot be compared"),
    ],
)
def test_bad_replace_calls_are_refused(tmp_catalog: Catalog, table, df, where, error, message) -> None:
    with pytest.raises(error, match=message):
        tmp_catalog.replace(table, df, where)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            pl.DataFrame(
                {"image_id": ["x"], "seed": ["not a number"], "model": "toy", "prompt_id": "p", "steps": 4, "uri": "u"}
            ),
            "Could not convert",
        ),
        (pl.DataFrame({"image_id": ["x"], "seed": [1], "model": "toy", "prompt_id": "p", "steps": 4}), "NOT NULL"),
    ],
)
def test_a_failed_insert_leaves_the_old_rows(tmp_catalog: Catalog, bad: pl.DataFrame, message: str) -> None:
    tmp_catalog.replace("images", _images("run", 5), {"run_key": "run"})
    with pytest.raises(CatalogError, match=f"nothing changed.*{message}"):
        tmp_catalog.replace("images", bad, {"run_key": "run"})  # the DELETE ran, then the INSERT failed
    assert tmp_catalog.count("images", {"run_key": "run"}) == 5
    assert tmp_catalog.replace("images", _images("run", 2), {"run_key": "run"}).deleted == 5  # still writable


def test_a_writer_killed_between_delete_and_insert_leaves_the_old_rows(tmp_catalog: Catalog) -> None:
    tmp_catalog.replace("images", _images("run", 5), {"run_key": "run"})
    child = textwrap.dedent(
        f"""
        import os, polars as pl
        from calibri_pipeline.storage.catalog import Catalog
        catalog = Catalog({str(tmp_catalog.path)!r})
        # The DELETE has run inside the transaction when the insert starts: die right there.
        Catalog._insert_arrow = staticmethod(lambda con, spec, arrow: os._exit(9))
        catalog.replace("images", pl.DataFrame({{"image_id": ["new"], "model": "toy", "prompt_id": "p",
                        "seed": [1], "steps": 4, "uri": "u"}}), {{"run_key": "run"}})
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert result.returncode == 9, result.stderr.decode()
    assert sorted(tmp_catalog.query("SELECT image_id FROM images")["image_id"]) == [f"run-{i}" for i in range(5)]
    assert tmp_catalog.replace("images", _images("run", 1), {"run_key": "run"}).deleted == 5  # lock died with it


def test_lists_and_json_round_trip_through_arrow(tmp_catalog: Catalog) -> None:
    run = pl.DataFrame(
        {
            "run_id": ["toy-world-block"],
            "model": "toy",
            "reward": "world",
            "granularity": "block",
            "n_models": 1,
            "status": "finished",
            "vector": [[1.0, 0.75, 1.25, 1.0]],
            "names": [["blocks.0", "blocks.1", "blocks.2"]],
            "config": [json.dumps({"steps": 4, "popsize": 8})],
        }
    )
    tmp_catalog.replace("calibration_runs", run, {"run_id": "toy-world-block"})
    candidates = pl.DataFrame(
        {
            "generation": [0, 0, 1],
            "candidate": [0, 1, 0],
            "fitness": [0.1, 0.2, 0.3],
            "vector": [[1.0, 1.0], [0.9, 1.1], [0.8, 1.2]],
        }
    )
    tmp_catalog.replace("cmaes_candidates", candidates, {"run_id": "toy-world-block"})
    back = tmp_catalog.query(
        "SELECT vector, names, config->>'$.popsize' AS popsize, list_sum(vector) AS total FROM calibration_runs"
    )
    assert back.row(0) == ([1.0, 0.75, 1.25, 1.0], ["blocks.0", "blocks.1", "blocks.2"], "8", 4.0)
    best = tmp_catalog.query("SELECT vector FROM cmaes_candidates ORDER BY fitness DESC LIMIT 1").item()
    assert best.to_list() == [0.8, 1.2]
    with pytest.raises(CatalogError, match="nothing changed"):
        tmp_catalog.replace(
            "calibration_runs", run.with_columns(config=pl.lit("{not json")), {"run_id": "toy-world-block"}
        )
    assert tmp_catalog.count("calibration_runs") == 1


def test_query_is_read_only_and_a_missing_catalog_is_not_created(tmp_catalog: Catalog, tmp_path: Path) -> None:
    tmp_catalog.replace("images", _images("r", 1), {"run_key": "r"})
    for statement in ("DELETE FROM images", "DROP TABLE images", "INSERT INTO catalog_meta VALUES ('a', 'b')"):
        with pytest.raises(ValueError, match="statements are refused"):
            tmp_catalog.query(statement)
    with pytest.raises(ValueError, match="Permission Error"):  # file access is off even for SELECT
        tmp_catalog.query(f"SELECT * FROM read_csv('{tmp_path}/x.csv')")
    assert tmp_catalog.count("images") == 1
    missing = tmp_path / "nothing" / "catalog.duckdb"
    with pytest.raises(FileNotFoundError, match="no catalog at"):
        Catalog(missing, create=False)
    assert not missing.parent.exists()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "WITH x AS (SELECT 1 AS a) SELECT * FROM x",
        "FROM images",
        "DESCRIBE images",
        "SHOW TABLES",
        "SUMMARIZE images",
        "EXPLAIN SELECT 1",
    ],
)
def test_read_statements_pass_the_check(sql: str) -> None:
    check_read_only_sql(sql)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("", "empty"),
        ("SELEC 1", "could not be parsed"),
        ("SELECT 1; SELECT 2", "exactly one"),
        ("SELECT 1; DROP TABLE images", "exactly one"),
        ("UPDATE images SET seed = 0", "UPDATE statements are refused"),
        ("CREATE TABLE t (a INT)", "CREATE statements are refused"),
        ("ATTACH 'other.duckdb'", "ATTACH statements are refused"),
        ("COPY images TO 'out.csv'", "COPY statements are refused"),
        ("INSTALL httpfs", "LOAD statements are refused"),
        ("SET threads = 1", "SET statements are refused"),
        ("PRAGMA enable_profiling", "PRAGMA statements are refused"),
        ("CHECKPOINT", "CALL statements are refused"),
        ("EXPORT DATABASE 'dump'", "EXPORT statements are refused"),
    ],
)
def test_writing_or_odd_statements_fail_the_check(sql: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_read_only_sql(sql)


def test_a_held_write_lock_times_out_with_a_clear_error(tmp_catalog: Catalog) -> None:
    impatient = Catalog(tmp_catalog.path, lock_timeout=0.3)
    with tmp_catalog._lock.hold(exclusive=True):
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="catalog busy: could not get the write lock"):
            impatient.replace("images", _images("x", 1), {"run_key": "x"})
        with pytest.raises(TimeoutError, match="read lock"):
            impatient.count("images")
        assert 0.25 < time.monotonic() - start < 5
    assert impatient.count("images") == 0


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import polars as pl
    from calibri_pipeline.storage.catalog import Catalog

    path, name, go, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    catalog = Catalog(path, lock_timeout=60)
    while not go.exists():  # start both writers at the same moment
        time.sleep(0.005)
    for g in range(n):
        # One generation of a CMA-ES run: candidates and the generation row, like the engine writes.
        candidates = pl.DataFrame({"generation": g, "candidate": list(range(8)),
                                   "fitness": [float(g + c) for c in range(8)], "vector": [[1.0, 0.5]] * 8})
        catalog.replace("cmaes_candidates", candidates, {"run_id": name, "generation": g})
        catalog.replace("cmaes_generations", pl.DataFrame({"generation": [g], "sigma": [0.1]}), {"run_id": name, "generation": g})
    """
)


def test_two_writer_processes_at_once_lose_nothing(tmp_catalog: Catalog, tmp_path: Path) -> None:
    go = tmp_path / "go"
    generations = 10
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_catalog.path), name, str(go), str(generations)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name in ("run-a", "run-b")
    ]
    time.sleep(1.0)  # let both import and open the catalog
    go.touch()
    started = time.monotonic()
    reads = 0
    while any(w.poll() is None for w in writers):
        # A reader alongside the writers (like `calibri sql` during a run) always gets a consistent answer.
        n = tmp_catalog.count("cmaes_candidates")
        assert n % 8 == 0
        reads += 1
    elapsed = time.monotonic() - started
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err.decode()
    # The tight reader loop above must not starve the writers (it did, ~70 s, before readers queued
    # behind waiting writers); about 5 s here on 2 busy cores.
    assert elapsed < 40, f"writers took {elapsed:.1f} s next to a busy reader"
    counts = tmp_catalog.query(
        "SELECT run_id, count(*) AS candidates, count(DISTINCT generation) AS generations FROM cmaes_candidates GROUP BY 1 ORDER BY 1"
    )
    assert counts.rows() == [("run-a", 8 * generations, generations), ("run-b", 8 * generations, generations)]
    assert tmp_catalog.query("SELECT run_id, count(*) FROM cmaes_generations GROUP BY 1 ORDER BY 1").rows() == [
        ("run-a", generations),
        ("run-b", generations),
    ]
    assert reads > 0


def test_the_docs_document_this_schema() -> None:
    """docs/catalog.md is the generated schema doc, table by table and column by column."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "catalog.md").read_text()
    body = SCHEMA_DOC.split("\n", 2)[2].strip().replace("\n### `", "\n#### `")
    assert body in page
