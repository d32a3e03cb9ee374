"""``calibri sql "SELECT ..."``: query the catalog read-only and print a table, CSV or JSON.

The catalog is ``--catalog PATH``, else ``$CALIBRI_CATALOG``, else ``<CALIBRI_HOME>/catalog.duckdb``
(``CALIBRI_HOME`` defaults to ``./.calibri``). A missing file is an error (never a new empty
catalog); a writing statement is refused before it runs, and the connection is read-only with file
access disabled in any case.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import decimal
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from calibri_pipeline.storage.catalog import Catalog, CatalogError, check_read_only_sql
from calibri_pipeline.storage.paths import default_catalog_path

FORMATS = ("table", "csv", "json")


def run_sql(catalog_path: str | Path | None, query: str, fmt: str = "table") -> str:
    """Run one read-only ``query`` against the catalog and return it rendered as ``fmt``.

    Raises ValueError (bad format, write statement, SQL error), FileNotFoundError (no catalog),
    TimeoutError (catalog locked by a writer for too long).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_read_only_sql(query)  # before opening anything: a refused statement never touches the file
    catalog = Catalog(catalog_path or default_catalog_path(), create=False)
    df = catalog.query(query)
    if fmt == "csv":
        return _to_csv(df)
    if fmt == "json":
        return _to_json(df)
    return _to_table(df)


# -- rendering ----------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A JSON-safe version of a query value (NaN/inf become null, times become ISO strings)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _cell(value: Any, *, for_table: bool) -> str:
    if value is None:
        return "NULL" if for_table else ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return format(value, ".6g") if for_table else repr(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat(sep=" ") if isinstance(value, dt.datetime) else value.isoformat()
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_plain(value), ensure_ascii=False)
    return str(value)


def _to_table(df: pl.DataFrame) -> str:
    header = df.columns
    rows = [[_cell(v, for_table=True) for v in row] for row in df.rows()]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    numeric = [df.schema[c].is_numeric() for c in header]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out.append(f"({df.height} row{'s' if df.height != 1 else ''})")
    return "\n".join(out) + "\n"


def _to_csv(df: pl.DataFrame) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(df.columns)
    for row in df.rows():
        writer.writerow([_cell(v, for_table=False) for v in row])
    return buffer.getvalue()


def _to_json(df: pl.DataFrame) -> str:
    return json.dumps([_plain(r) for r in df.to_dicts()], ensure_ascii=False, allow_nan=False, indent=2) + "\n"


# -- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibri sql",
        description="Run one read-only SQL query against the Calibri catalog (DuckDB) and print the result.",
        epilog='example: calibri sql "SELECT model, reward, calibrated, nfe, mean FROM evaluations ORDER BY nfe"',
    )
    parser.add_argument("query", help="one SELECT / WITH / FROM / DESCRIBE / SHOW / SUMMARIZE query ('-' reads stdin)")
    parser.add_argument("--format", "-f", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument(
        "--catalog",
        metavar="PATH",
        default=None,
        help="catalog file (default: $CALIBRI_CATALOG or <CALIBRI_HOME>/catalog.duckdb, CALIBRI_HOME=./.calibri)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    query = sys.stdin.read() if args.query == "-" else args.query
    try:
        sys.stdout.write(run_sql(args.catalog, query, args.format))
    except (ValueError, FileNotFoundError, TimeoutError, CatalogError) as e:
        print(f"calibri sql: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
