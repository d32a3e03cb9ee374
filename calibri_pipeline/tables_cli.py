"""``calibri tables``: the paper's Tables 2, 6 and 7 and the headline comparison, from the catalog, read-only.

Table 2: baseline at its default NFE and calibrated at its calibration NFE, one column per
evaluation reward; Table 6: the same with per-prompt diversity; Table 7: which reward was optimised
(``-`` = the baseline) against every evaluation reward, the reward-hacking view. Run the demo with
several ``--reward`` values into one home to get more than one optimised row. ``headline``: per
calibrated partition, Calibri beside the baseline (same and twice the NFE, the default NFE) and
the tuned alternatives (guidance, skip-layer guidance) at the calibration NFE, with paired CIs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from calibri_pipeline.sql_cli import FORMATS, _to_csv, _to_json, _to_table
from calibri_pipeline.storage.catalog import Catalog, CatalogError
from calibri_pipeline.storage.paper_tables import paper_tables_from_catalog
from calibri_pipeline.storage.paths import default_catalog_path

TABLES = ("headline", "table2", "table6", "table7")
RENDER = {"table": _to_table, "csv": _to_csv, "json": _to_json}


def render_tables(catalog_path, names: Sequence[str] = TABLES, fmt: str = "table") -> str:
    """The requested tables rendered as ``fmt``, each under a ``## name`` heading."""
    catalog = Catalog(catalog_path or default_catalog_path(), create=False)
    tables = paper_tables_from_catalog(catalog)
    if not tables:
        raise ValueError("the catalog has no finished calibration with an evaluation yet (run `calibri demo` first)")
    tables["headline"] = headline_tables(catalog)
    return "\n".join(f"## {name}\n{RENDER[fmt](tables[name])}" for name in names)


def headline_tables(catalog: Catalog):
    """:func:`calibri_pipeline.report.headline_table` of every finished calibration, one block of rows each."""
    import json

    import polars as pl

    from calibri_pipeline.report import headline_table

    runs = catalog.query(
        "SELECT model, reward, config FROM calibration_runs WHERE status = 'finished' ORDER BY model, reward"
    )
    parts = []
    for model, reward, config in runs.iter_rows():
        preset = json.loads(config).get("preset", {})
        key = f"{model}|{reward}"
        evals = catalog.query("SELECT * FROM evaluations WHERE run_key = ?", [key])
        comps = catalog.query("SELECT * FROM comparisons WHERE run_key = ?", [key])
        if evals.height == 0 or "calibration_steps" not in preset:
            continue
        table = headline_table(evals, comps, reward, preset["calibration_steps"], preset["default_steps"])
        parts.append(
            table.rename({reward: "mean"}).with_columns(pl.lit(model).alias("model"), pl.lit(reward).alias("reward"))
        )
    if not parts:
        return pl.DataFrame({"model": [], "reward": []})
    return pl.concat(parts, how="diagonal_relaxed").select(
        ["model", "reward", *[c for c in parts[0].columns if c not in ("model", "reward")]]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="calibri tables", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="TABLE", help=f"which tables ({', '.join(TABLES)}; default: all)")
    parser.add_argument("--format", "-f", choices=FORMATS, default="table")
    parser.add_argument(
        "--catalog",
        metavar="PATH",
        default=None,
        help="catalog file (default: $CALIBRI_CATALOG or <CALIBRI_HOME>/catalog.duckdb)",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in TABLES]
    if unknown:
        parser.error(f"unknown table {unknown[0]!r}; choose from {', '.join(TABLES)}")
    try:
        sys.stdout.write(render_tables(args.catalog, args.names or TABLES, args.format))
    except (ValueError, FileNotFoundError, TimeoutError, CatalogError) as e:
        print(f"calibri tables: error: {e}", file=sys.stderr)
        return 1
    return 0
