"""The catalog: one DuckDB file with every prompt, image, score, analysis and CMA-ES step.

``Catalog(path)`` opens (and by default creates) the file. Tables move in and out as Polars
DataFrames through Arrow, never row by row:

- ``replace(table, df, where)`` deletes the rows matching ``where`` (the partition's keys, e.g.
  ``{"model": "toy", "reward": "world"}``) and inserts ``df`` in ONE transaction. Re-materializing a
  partition therefore never duplicates rows, and an error or a killed process part-way leaves the
  old rows in place. ``where={}`` replaces the whole table.
- ``query(sql, params)`` runs one read-only statement (SELECT / WITH / FROM / DESCRIBE / SHOW /
  SUMMARIZE / EXPLAIN) on a ``read_only`` connection with file access disabled, and returns a
  Polars DataFrame.

Concurrency: DuckDB lets one process at a time open a file for writing, and a writer excludes
readers in other processes. Every operation therefore opens its own short-lived connection under an
OS file lock on ``<path>.lock`` (``fcntl.flock``: shared for queries, exclusive for writes, waiting
up to ``lock_timeout`` seconds). Dagster steps running in separate processes can then write at
once and nothing is lost; the lock dies with its process, so a killed writer never leaves a stale
lock. A connection held by a foreign program (say an open ``duckdb`` shell) is retried until the
same deadline, then reported.

Files: ``<path>`` (the database), ``<path>.wal`` (DuckDB's write-ahead log, transient),
``<path>.lock`` and ``<path>.lock-queue`` (empty; they carry the OS locks, the second one keeps a
stream of readers from starving a writer).

The schema follows (generated from :data:`TABLES`; docs/catalog.md includes :data:`SCHEMA_DOC`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import duckdb
import polars as pl

SCHEMA_VERSION = 3


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    doc: str
    not_null: bool = False
    default: str | None = None

    def ddl(self) -> str:
        parts = [f'"{self.name}"', self.sql_type]
        if self.not_null:
            parts.append("NOT NULL")
        if self.default is not None:
            parts.append(f"DEFAULT {self.default}")
        return " ".join(parts)


@dataclass(frozen=True)
class Table:
    name: str
    doc: str
    columns: tuple[Column, ...]
    replace_key: tuple[str, ...]  # the ``where`` keys the pipeline replaces this table by

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def ddl(self) -> str:
        cols = ",\n  ".join(c.ddl() for c in self.columns)
        return f'CREATE TABLE IF NOT EXISTS "{self.name}" (\n  {cols}\n)'


def _created_at() -> Column:
    return Column("created_at", "TIMESTAMPTZ", "when the row was written", not_null=True, default="current_timestamp")


_RUN_KEY = "the asset partition that wrote the row (e.g. `toy|world_score`); re-materializing it replaces these rows"

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "prompts",
            "Every prompt of every prompt set, with the structured spec it came from.",
            (
                Column(
                    "prompt_set",
                    "VARCHAR",
                    "name of the set (`world`, `hpdv3`, `t2i-compbench` ...)",
                    True,
                    "'default'",
                ),
                Column(
                    "prompt_id", "VARCHAR", "`Prompt.prompt_id`: hash of text and spec, stable across machines", True
                ),
                Column("text", "VARCHAR", "the prompt text", True),
                Column("spec", "JSON", "structured spec (the embedded world's scene), NULL for free text"),
                Column("category", "VARCHAR", "category (e.g. T2I-CompBench++ `color`, `spatial`)"),
                Column("source", "VARCHAR", "where it came from (`world-grammar`, `llm:<model>`, `hpdv3` ...)", True),
                Column("split", "VARCHAR", "`train` / `val` / `test`, or NULL"),
                Column("meta", "JSON", "anything else (`Prompt.meta`)"),
                _created_at(),
            ),
            ("prompt_set",),
        ),
        Table(
            "images",
            "Every generated image; `uri` points into the object store.",
            (
                Column("image_id", "VARCHAR", "stable id of the image", True),
                Column("run_key", "VARCHAR", _RUN_KEY, True),
                Column("model", "VARCHAR", "model / checkpoint name", True),
                Column("prompt_id", "VARCHAR", "-> `prompts.prompt_id`", True),
                Column("seed", "BIGINT", "initial-noise seed", True),
                Column("steps", "INTEGER", "sampling steps (NFE per image without CFG)", True),
                Column("guidance", "DOUBLE", "guidance scale (NULL for guidance-free models)"),
                Column(
                    "calibration", "VARCHAR", "`baseline`, or the `calibration_runs.run_id` applied", True, "'baseline'"
                ),
                Column("uri", "VARCHAR", "object-store URI of the PNG (`file://...` or `s3://...`)", True),
                Column("width", "INTEGER", "pixels"),
                Column("height", "INTEGER", "pixels"),
                _created_at(),
            ),
            ("run_key", "calibration"),
        ),
        Table(
            "image_cache",
            "Every image the pipeline sampled once, keyed by what determines it; assets reuse these.",
            (
                Column(
                    "image_key",
                    "VARCHAR",
                    "hash of backbone identity, prompt text, seed, steps, guidance and vector",
                    True,
                ),
                Column("model", "VARCHAR", "model key", True),
                Column(
                    "identity",
                    "VARCHAR",
                    "digest of the backbone's identity (checkpoint, dtype, device kind, sampler)",
                    True,
                ),
                Column("prompt_id", "VARCHAR", "-> `prompts.prompt_id`", True),
                Column("text", "VARCHAR", "the prompt text the image was sampled for", True),
                Column("seed", "BIGINT", "initial-noise seed", True),
                Column("steps", "INTEGER", "sampling steps", True),
                Column("guidance", "DOUBLE", "guidance scale (NULL for guidance-free models)"),
                Column(
                    "vector_id", "VARCHAR", "`baseline` (the unmodified model) or the Calibri vector's digest", True
                ),
                Column("vector", "DOUBLE[]", "the Calibri vector, NULL for the unmodified model"),
                Column("uri", "VARCHAR", "object-store URI of the PNG", True),
                Column("width", "INTEGER", "pixels"),
                Column("height", "INTEGER", "pixels"),
                _created_at(),
            ),
            ("model",),
        ),
        Table(
            "scores",
            "One reward score per image and reward.",
            (
                Column("run_key", "VARCHAR", _RUN_KEY, True),
                Column("image_id", "VARCHAR", "-> `images.image_id`", True),
                Column(
                    "calibration",
                    "VARCHAR",
                    "`baseline` or the `calibration_runs.run_id` (as on the image)",
                    True,
                    "'baseline'",
                ),
                Column("reward", "VARCHAR", "reward name", True),
                Column("score", "DOUBLE", "reward value (higher is better unless the reward says otherwise)", True),
                _created_at(),
            ),
            ("run_key", "calibration"),
        ),
        Table(
            "ablations",
            "Block ablation (paper Fig. 3a): the reward change when one block is bypassed.",
            (
                Column("model", "VARCHAR", "model name", True),
                Column("reward", "VARCHAR", "reward name", True),
                Column("block_index", "INTEGER", "block position in forward order", True),
                Column("block", "VARCHAR", "block name (`CalibrationSpace.names` at block granularity)", True),
                Column("steps", "INTEGER", "sampling steps used"),
                Column("baseline", "DOUBLE", "mean reward of the unmodified model"),
                Column("mean", "DOUBLE", "mean reward with the block bypassed"),
                Column("delta", "DOUBLE", "`mean - baseline` (paired over prompts and seeds)", True),
                Column("ci_low", "DOUBLE", "95% confidence interval of `delta`, low"),
                Column("ci_high", "DOUBLE", "95% confidence interval of `delta`, high"),
                Column("n", "INTEGER", "images per arm", True),
                _created_at(),
            ),
            ("model", "reward"),
        ),
        Table(
            "sweeps",
            "Scale sweep (paper Fig. 3b): the reward when one block's output is scaled by `alpha`.",
            (
                Column("model", "VARCHAR", "model name", True),
                Column("reward", "VARCHAR", "reward name", True),
                Column("block_index", "INTEGER", "block position in forward order", True),
                Column("block", "VARCHAR", "block name", True),
                Column("alpha", "DOUBLE", "the block's coefficient", True),
                Column("steps", "INTEGER", "sampling steps used"),
                Column("mean", "DOUBLE", "mean reward", True),
                Column("delta", "DOUBLE", "`mean` minus the unmodified model's mean (paired over prompts and seeds)"),
                Column("ci_low", "DOUBLE", "95% confidence interval of `delta`, low"),
                Column("ci_high", "DOUBLE", "95% confidence interval of `delta`, high"),
                Column("n", "INTEGER", "images", True),
                _created_at(),
            ),
            ("model", "reward"),
        ),
        Table(
            "calibration_runs",
            "One row per CMA-ES calibration (updated as it runs; `status` says where it stands).",
            (
                Column("run_id", "VARCHAR", "calibration id (also the `calibration` tag of its images)", True),
                Column("model", "VARCHAR", "model / checkpoint name", True),
                Column("reward", "VARCHAR", "reward optimised", True),
                Column("granularity", "VARCHAR", "`block` / `layer` / `gate`", True),
                Column("n_models", "INTEGER", "ensemble size (2 = the CFG case)", True, "1"),
                Column(
                    "segments",
                    "DOUBLE[]",
                    "noise levels cutting the schedule into parts with their own coefficients (empty: one part)",
                ),
                Column("checkpoint", "VARCHAR", "checkpoint partition or path, when the run came from the sensor"),
                Column("warm_start_from", "VARCHAR", "`run_id` whose coefficients seeded this run, or NULL"),
                Column("status", "VARCHAR", "`running` / `finished` / `failed`", True),
                Column("generations", "INTEGER", "generations completed"),
                Column("baseline_val", "DOUBLE", "validation reward of the unmodified model"),
                Column("best_val", "DOUBLE", "validation reward of the selected coefficients"),
                Column(
                    "vector",
                    "DOUBLE[]",
                    "selected search vector: `n_models` blocks of `size` coefficients, then `n_models` ensemble weights",
                ),
                Column("noise", "JSON", "the run's measured fitness noise and how it sized buckets and validation"),
                Column("names", "VARCHAR[]", "`CalibrationSpace.names` (one model copy)"),
                Column("config", "JSON", "the full run configuration (steps, population, sigma, seeds ...)"),
                Column("state_uri", "VARCHAR", "object-store URI of the resumable CMA-ES state"),
                Column("started_at", "TIMESTAMPTZ", "start time"),
                Column("ended_at", "TIMESTAMPTZ", "end time (NULL while running)"),
                _created_at(),
            ),
            ("run_id",),
        ),
        Table(
            "cmaes_generations",
            "One row per CMA-ES generation.",
            (
                Column("run_id", "VARCHAR", "-> `calibration_runs.run_id`", True),
                Column("generation", "INTEGER", "0-based generation", True),
                Column("sigma", "DOUBLE", "CMA-ES step size after the generation", True),
                Column(
                    "best_fitness", "DOUBLE", "best candidate fitness (mean reward on its bucket; higher is better)"
                ),
                Column("mean_fitness", "DOUBLE", "mean fitness over the population"),
                Column("worst_fitness", "DOUBLE", "worst candidate fitness"),
                Column("val_score", "DOUBLE", "validation reward of the generation's best, NULL when not validated"),
                Column("evaluations", "INTEGER", "candidate evaluations so far (cumulative)"),
                Column("seconds", "DOUBLE", "wall time of the generation"),
                _created_at(),
            ),
            ("run_id",),
        ),
        Table(
            "cmaes_candidates",
            "Every candidate CMA-ES evaluated.",
            (
                Column("run_id", "VARCHAR", "-> `calibration_runs.run_id`", True),
                Column("generation", "INTEGER", "0-based generation", True),
                Column("candidate", "INTEGER", "index in the population", True),
                Column("fitness", "DOUBLE", "mean reward on the generation's bucket (higher is better)"),
                Column("vector", "DOUBLE[]", "the search vector (coefficients then ensemble weights)", True),
                _created_at(),
            ),
            ("run_id",),
        ),
        Table(
            "evaluations",
            "Held-out evaluation: mean reward per model, reward, calibration and NFE.",
            (
                Column("run_key", "VARCHAR", _RUN_KEY, True),
                Column("model", "VARCHAR", "model name", True),
                Column("reward", "VARCHAR", "reward measured", True),
                Column("calibrated", "BOOLEAN", "whether Calibri coefficients were applied", True),
                Column("calibration", "VARCHAR", "`baseline` or the `calibration_runs.run_id`", True, "'baseline'"),
                Column(
                    "setting",
                    "VARCHAR",
                    "what was sampled: `baseline`, `calibri`, or an alternative (`guidance-tuned`, `slg-tuned` ...)",
                    True,
                    "'baseline'",
                ),
                Column("guidance", "DOUBLE", "guidance scale used (NULL: the model's default or none)"),
                Column("prompt_set", "VARCHAR", "prompts evaluated on (`world:test`, `hpdv3` ...)"),
                Column("nfe", "INTEGER", "sampling steps", True),
                Column("mean", "DOUBLE", "mean reward", True),
                Column("ci_low", "DOUBLE", "95% confidence interval, low"),
                Column("ci_high", "DOUBLE", "95% confidence interval, high"),
                Column("n", "INTEGER", "images", True),
                _created_at(),
            ),
            ("run_key",),
        ),
        Table(
            "tunings",
            "The alternatives a user tries before Calibri, tuned on the validation prompts (the grid's best).",
            (
                Column("run_key", "VARCHAR", _RUN_KEY, True),
                Column("model", "VARCHAR", "model name", True),
                Column("reward", "VARCHAR", "reward the grid was judged by", True),
                Column("name", "VARCHAR", "`guidance-tuned` or `slg-tuned`", True),
                Column("label", "VARCHAR", "the chosen grid point", True),
                Column("steps", "INTEGER", "sampling steps it was tuned at", True),
                Column("guidance", "DOUBLE", "guidance scale of the chosen setting"),
                Column(
                    "vector",
                    "DOUBLE[]",
                    "its Calibri vector (skip-layer guidance as a 3-member ensemble), NULL for the unmodified model",
                ),
                Column("params", "JSON", "what was chosen (guidance; blocks skipped and scale)"),
                Column("val_mean", "DOUBLE", "validation mean reward of the chosen setting", True),
                Column("grid", "JSON", "every grid point: label, mean, CI, paired delta to the untuned model"),
                _created_at(),
            ),
            ("run_key",),
        ),
        Table(
            "comparisons",
            "Paired differences on the same test prompts and noise: each setting against a reference setting.",
            (
                Column("run_key", "VARCHAR", _RUN_KEY, True),
                Column("model", "VARCHAR", "model name", True),
                Column("reward", "VARCHAR", "reward measured", True),
                Column("nfe", "INTEGER", "sampling steps of the setting", True),
                Column("setting", "VARCHAR", "the setting compared (`calibri`, `guidance-tuned` ...)", True),
                Column("reference", "VARCHAR", "what it is compared with (`baseline@4`, `guidance-tuned@4` ...)", True),
                Column("delta", "DOUBLE", "mean per-image difference, setting minus reference", True),
                Column("ci_low", "DOUBLE", "95% paired bootstrap interval of `delta`, low"),
                Column("ci_high", "DOUBLE", "95% paired bootstrap interval of `delta`, high"),
                Column("n", "INTEGER", "paired images", True),
                _created_at(),
            ),
            ("run_key",),
        ),
        Table(
            "diversity",
            "Per-prompt diversity over seeds (mean pairwise feature distance).",
            (
                Column("run_key", "VARCHAR", _RUN_KEY, True),
                Column("model", "VARCHAR", "model name", True),
                Column("calibrated", "BOOLEAN", "whether Calibri coefficients were applied", True),
                Column("calibration", "VARCHAR", "`baseline` or the `calibration_runs.run_id`", True, "'baseline'"),
                Column("nfe", "INTEGER", "sampling steps", True),
                Column("prompt_id", "VARCHAR", "-> `prompts.prompt_id`", True),
                Column("diversity", "DOUBLE", "mean pairwise distance of the images' features", True),
                Column("n_seeds", "INTEGER", "images (seeds) for the prompt"),
                _created_at(),
            ),
            ("run_key",),
        ),
        Table(
            "catalog_meta",
            "Bookkeeping: `schema_version`.",
            (
                Column("key", "VARCHAR", "setting", True),
                Column("value", "VARCHAR", "its value", True),
            ),
            ("key",),
        ),
    )
}


def _schema_doc() -> str:
    lines = [
        "## Catalog schema",
        "",
        f"One DuckDB file (schema version {SCHEMA_VERSION}). Rows are replaced by partition: re-materializing",
        "an asset partition deletes the rows with its replace key and inserts the new ones in one",
        'transaction. Query it with `calibri sql "SELECT ..."` (read-only).',
        "",
    ]
    for table in TABLES.values():
        keys = ", ".join(f"`{k}`" for k in table.replace_key)
        lines += [
            f"### `{table.name}`",
            "",
            f"{table.doc} Replaced by: {keys}.",
            "",
            "| column | type | meaning |",
            "|---|---|---|",
        ]
        for col in table.columns:
            sql_type = col.sql_type + (" NOT NULL" if col.not_null else "")
            lines.append(f"| `{col.name}` | {sql_type} | {col.doc} |")
        lines.append("")
    return "\n".join(lines)


SCHEMA_DOC: str = _schema_doc()
__doc__ = (__doc__ or "") + "\n" + SCHEMA_DOC


class CatalogError(RuntimeError):
    """The catalog could not do what was asked (locked, wrong schema version, failed write)."""


# -- read-only statement check ----------------------------------------------------------------
_READ_STATEMENTS = {"SELECT", "EXPLAIN"}


def check_read_only_sql(sql: str) -> None:
    """Raise ValueError unless ``sql`` is exactly one reading statement.

    DuckDB's own parser classifies the statement (DESCRIBE, SHOW, SUMMARIZE, WITH and FROM-first
    queries parse as SELECT); the read-only connection is the second line of defence.
    """
    if not isinstance(sql, str) or not sql.strip():
        raise ValueError("the SQL statement is empty")
    try:
        # A private in-memory connection: the module-level default one is shared by all threads.
        with duckdb.connect(":memory:") as parser:
            statements = parser.extract_statements(sql)
    except duckdb.Error as e:
        raise ValueError(f"SQL could not be parsed: {e}") from None
    if len(statements) != 1:
        raise ValueError(f"give exactly one SQL statement, got {len(statements)}")
    kind = statements[0].type.name
    if kind not in _READ_STATEMENTS:
        raise ValueError(
            f"the catalog is read-only here: {kind} statements are refused; only queries are allowed "
            "(SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN)"
        )


# -- the OS lock ------------------------------------------------------------------------------
class _FileLock:
    """Shared (readers) / exclusive (writers) lock on ``<catalog>.lock``, waiting up to a timeout.

    ``fcntl.flock`` locks belong to the open file, so two connections in one process exclude each
    other just like two processes do, and the OS drops a lock when its holder dies.

    flock has no fairness, so a steady stream of readers could starve a writer. A second file,
    ``<catalog>.lock-queue``, fixes that: a writer takes it exclusively before the main lock and
    keeps it while writing; a reader passes through it (shared, released at once) before taking the
    main lock shared. New readers thus wait behind a waiting writer, while readers still share.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.queue_path = path.with_name(path.name + "-queue")
        self.timeout = timeout

    @contextlib.contextmanager
    def hold(self, *, exclusive: bool) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; serialise readers and writers alike.
            import filelock

            try:
                with filelock.FileLock(str(self.path), timeout=self.timeout):
                    yield
            except filelock.Timeout:
                raise self._timeout_error(exclusive) from None
            return

        try:
            queue_fd = os.open(self.queue_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            if exclusive:
                raise
            # A reader on a read-only file system: nobody can be writing there either.
            yield
            return
        main_fd = -1
        try:
            main_fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            deadline = time.monotonic() + self.timeout
            if exclusive:
                self._wait(fcntl, queue_fd, fcntl.LOCK_EX, deadline, exclusive)
                self._wait(fcntl, main_fd, fcntl.LOCK_EX, deadline, exclusive)
            else:
                self._wait(fcntl, queue_fd, fcntl.LOCK_SH, deadline, exclusive)
                self._wait(fcntl, main_fd, fcntl.LOCK_SH, deadline, exclusive)
                fcntl.flock(queue_fd, fcntl.LOCK_UN)
            yield
        finally:
            # Closing a descriptor releases its lock.
            if main_fd >= 0:
                os.close(main_fd)
            os.close(queue_fd)

    def _wait(self, fcntl: Any, fd: int, mode: int, deadline: float, exclusive: bool) -> None:
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise self._timeout_error(exclusive) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _timeout_error(self, exclusive: bool) -> TimeoutError:
        what = "write" if exclusive else "read"
        return TimeoutError(
            f"catalog busy: could not get the {what} lock {self.path} within {self.timeout:g} s "
            "(another process is writing or reading it; raise lock_timeout if writes are long)"
        )


def _is_lock_conflict(error: duckdb.Error) -> bool:
    return "lock" in str(error).lower()


# -- the catalog ------------------------------------------------------------------------------
#: version 3: a run's time segments as a column (they were only inside its `config` JSON)
_SEGMENTS_COLUMN = (
    "ALTER TABLE calibration_runs ADD COLUMN segments DOUBLE[]",
    "UPDATE calibration_runs SET segments = "
    "coalesce(CAST(json_extract(config, '$.preset.segments') AS DOUBLE[]), CAST([] AS DOUBLE[]))",
)
#: schema version -> statements that bring a catalog of that version to SCHEMA_VERSION (new tables
#: come from their CREATE TABLE IF NOT EXISTS, which runs first)
_UPGRADES: dict[str, tuple[str, ...]] = {
    "1": (
        'ALTER TABLE calibration_runs RENAME COLUMN coefficients TO "vector"',
        "ALTER TABLE calibration_runs ADD COLUMN noise JSON",
        "ALTER TABLE evaluations ADD COLUMN setting VARCHAR DEFAULT 'baseline'",
        "UPDATE evaluations SET setting = CASE WHEN calibrated THEN 'calibri' ELSE 'baseline' END",
        "ALTER TABLE evaluations ADD COLUMN guidance DOUBLE",
        *_SEGMENTS_COLUMN,
    ),
    "2": _SEGMENTS_COLUMN,
}


@dataclass(frozen=True)
class ReplaceResult:
    deleted: int
    inserted: int


_WHERE_TYPES = (str, int, float, bool, type(None))


class Catalog:
    """A DuckDB catalog file (see the module docstring for the schema and the locking)."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, lock_timeout: float = 60.0) -> None:
        self.path = Path(path).expanduser().resolve()
        if lock_timeout <= 0:
            raise ValueError(f"lock_timeout must be positive seconds, got {lock_timeout}")
        self.lock_timeout = float(lock_timeout)
        self._lock = _FileLock(self.path.with_name(self.path.name + ".lock"), self.lock_timeout)
        if self.path.exists() and not self.path.is_file():
            raise ValueError(f"catalog path {self.path} exists and is not a file")
        if create:
            self._create_schema()
        elif not self.path.exists():
            raise FileNotFoundError(
                f"no catalog at {self.path} (materialize the pipeline first, or point --catalog / "
                "CALIBRI_CATALOG at an existing catalog.duckdb)"
            )

    def __repr__(self) -> str:
        return f"Catalog({str(self.path)!r})"

    # -- connections ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self, *, write: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock.hold(exclusive=write):
            if not write and not self.path.exists():
                raise FileNotFoundError(f"no catalog at {self.path}")
            config = {} if write else {"enable_external_access": False, "lock_configuration": True}
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    con = duckdb.connect(str(self.path), read_only=not write, config=config)
                    break
                except duckdb.IOException as e:
                    # A program outside our lock (an open duckdb shell) holds the file.
                    if not _is_lock_conflict(e) or time.monotonic() >= deadline:
                        raise CatalogError(f"cannot open catalog {self.path}: {e}") from e
                    time.sleep(0.05)
            try:
                yield con
            finally:
                con.close()

    def _create_schema(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                for table in TABLES.values():
                    con.execute(table.ddl())
                row = con.execute("SELECT value FROM catalog_meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    con.execute("INSERT INTO catalog_meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
                elif row[0] in _UPGRADES:
                    for statement in _UPGRADES[row[0]]:
                        con.execute(statement)
                    con.execute("UPDATE catalog_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
                    row = (str(SCHEMA_VERSION),)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        if row is not None and row[0] != str(SCHEMA_VERSION):
            raise CatalogError(
                f"catalog {self.path} has schema version {row[0]}, this code expects {SCHEMA_VERSION}; "
                "export what you need and start a new catalog"
            )

    # -- writing --------------------------------------------------------------------------------
    def replace(self, table: str, df: pl.DataFrame, where: Mapping[str, Any]) -> ReplaceResult:
        """Delete the rows of ``table`` matching ``where``, then insert ``df``, atomically.

        ``where`` maps column -> value (``None`` matches NULL); ``{}`` replaces the whole table.
        Columns of ``where`` missing from ``df`` are filled with the partition's value; present
        ones must equal it on every row (so a partition never writes rows it would not delete).
        Columns of the table missing from ``df`` get their default (or NULL).
        """
        spec = self._table(table)
        conditions, params = self._where_sql(spec, where)
        df = self._conform(spec, df, where)
        arrow = df.to_arrow()
        with self._connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                (deleted,) = con.execute(f'DELETE FROM "{spec.name}" WHERE {conditions}', params).fetchone()
                inserted = self._insert_arrow(con, spec, arrow)
                con.execute("COMMIT")
            except BaseException as e:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                if isinstance(e, duckdb.Error):
                    raise CatalogError(
                        f"replace into {spec.name} where {dict(where)} failed; nothing changed: {e}"
                    ) from e
                raise
        return ReplaceResult(deleted=int(deleted), inserted=int(inserted))

    def insert_new(self, table: str, df: pl.DataFrame, key: str) -> int:
        """Insert the rows of ``df`` whose ``key`` is not in ``table`` yet, in one transaction; return how many.

        For tables that only ever grow (the image cache): a row another process wrote first stays.
        """
        spec = self._table(table)
        if key not in spec.column_names or key not in df.columns:
            raise ValueError(f"insert_new key {key!r} must be a column of {spec.name} and of the DataFrame")
        df = self._conform(spec, df.unique(subset=[key], keep="first", maintain_order=True), {})
        arrow = df.to_arrow()
        with self._connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                con.register("calibri_incoming", arrow)
                columns = ", ".join(f'"{c}"' for c in arrow.column_names)
                (count,) = con.execute(
                    f'INSERT INTO "{spec.name}" ({columns}) SELECT {columns} FROM calibri_incoming '
                    f'WHERE "{key}" NOT IN (SELECT "{key}" FROM "{spec.name}")'
                ).fetchone()
                con.execute("COMMIT")
            except BaseException as e:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                if isinstance(e, duckdb.Error):
                    raise CatalogError(f"insert into {spec.name} failed; nothing changed: {e}") from e
                raise
        return int(count)

    @staticmethod
    def _insert_arrow(con: duckdb.DuckDBPyConnection, spec: Table, arrow: Any) -> int:
        if arrow.num_rows == 0:
            return 0
        # The view lives as long as this short-lived connection; no unregister needed (and after a
        # failed INSERT the aborted transaction would turn unregister into a second error).
        con.register("calibri_incoming", arrow)
        columns = ", ".join(f'"{c}"' for c in arrow.column_names)
        (count,) = con.execute(
            f'INSERT INTO "{spec.name}" ({columns}) SELECT {columns} FROM calibri_incoming'
        ).fetchone()
        return int(count)

    @staticmethod
    def _table(table: str) -> Table:
        if table not in TABLES:
            raise ValueError(f"unknown catalog table {table!r}; tables are {sorted(TABLES)}")
        return TABLES[table]

    @staticmethod
    def _where_sql(spec: Table, where: Mapping[str, Any]) -> tuple[str, list[Any]]:
        if not isinstance(where, Mapping):
            raise TypeError(f"where must be a dict of column -> value, got {type(where).__name__}")
        conditions, params = [], []
        for column, value in where.items():
            if column not in spec.column_names:
                raise ValueError(
                    f"where column {column!r} is not in table {spec.name}; columns are {spec.column_names}"
                )
            if not isinstance(value, _WHERE_TYPES):
                raise TypeError(
                    f"where value for {column!r} must be str, int, float, bool or None, got {type(value).__name__}"
                )
            if value is None:
                conditions.append(f'"{column}" IS NULL')
            else:
                conditions.append(f'"{column}" = ?')
                params.append(value)
        return (" AND ".join(conditions) or "TRUE"), params

    @staticmethod
    def _conform(spec: Table, df: pl.DataFrame, where: Mapping[str, Any]) -> pl.DataFrame:
        if not isinstance(df, pl.DataFrame):
            raise TypeError(f"replace({spec.name!r}) needs a polars.DataFrame, got {type(df).__name__}")
        unknown = [c for c in df.columns if c not in spec.column_names]
        if unknown:
            raise ValueError(f"columns {unknown} are not in table {spec.name}; columns are {spec.column_names}")
        for column, value in where.items():
            if column not in df.columns:
                df = df.with_columns(pl.lit(value).alias(column))
                continue
            outside = (
                pl.col(column).is_not_null()
                if value is None
                else (pl.col(column).is_null() | (pl.col(column) != value))
            )
            try:
                n_outside = df.select(outside.sum()).item()
            except pl.exceptions.PolarsError as e:
                raise TypeError(
                    f"column {column!r} ({df.schema[column]}) cannot be compared with where value {value!r}: {e}"
                ) from e
            if n_outside:
                raise ValueError(
                    f"{n_outside} rows of the DataFrame have {column} != {value!r}; rows written for a "
                    f"partition must belong to it (where={dict(where)})"
                )
        return df

    # -- reading --------------------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pl.DataFrame:
        """Run one read-only statement and return its result as a Polars DataFrame."""
        check_read_only_sql(sql)
        with self._connect(write=False) as con:
            try:
                relation = con.sql(sql, params=params)
                if relation is None:  # unreachable after check_read_only_sql; kept as a guard
                    raise ValueError("the statement returned no result")
                return relation.pl()
            except duckdb.Error as e:
                raise ValueError(f"query failed: {e}") from e

    def count(self, table: str, where: Mapping[str, Any] | None = None) -> int:
        """Rows of ``table`` matching ``where`` (all rows when None)."""
        spec = self._table(table)
        conditions, params = self._where_sql(spec, where or {})
        return int(self.query(f'SELECT count(*) AS n FROM "{spec.name}" WHERE {conditions}', params).item())

    @staticmethod
    def tables() -> list[str]:
        return list(TABLES)
