"""``calibri export``: a finished calibration out of the catalog, as a file anyone can use.

    calibri export --run-id 'toy|world_score|block|n2|s0.9' --out cal.json                   # a Calibration file
    calibri export --run-id 'toy|world_score|block|n2' --format diffusers --out ckpt/        # baked checkpoints
    calibri export --run-id 'toy|world_score|block|n1' --format official --out cmaes_step_0010.json

``--format calibration`` (default) writes one JSON file that ``Calibration.load`` reads and
``apply_calibration(pipe, calibration)`` runs inside a stock diffusers pipeline. ``--format diffusers``
bakes a constant calibration into ``save_pretrained`` folders (a time-dependent one cannot be baked:
its ``calibri_schedule.json`` is written instead). ``--format official`` writes the paper's code
release's ``cmaes_step_*.json`` (FLUX block / layer / gate, SD-3 and Qwen-Image gate; constant only). The catalog and the models are the demo's
(``$CALIBRI_HOME``) unless ``--catalog`` / ``$CALIBRI_CATALOG`` and ``$CALIBRI_OBJECT_STORE`` say otherwise.
Nothing is overwritten: an existing ``--out`` is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

FORMATS = ("calibration", "diffusers", "official")


def export(run_id: str, out: str | Path, fmt: str = "calibration", catalog_path: str | Path | None = None) -> str:
    """Write run ``run_id`` of the catalog to ``out`` in ``fmt``; returns what was written."""
    from calibri_pipeline.atomic_io import write_json_atomic
    from calibri_pipeline.method.calibration import Calibration
    from calibri_pipeline.storage.catalog import Catalog
    from calibri_pipeline.storage.paths import default_catalog_path

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: export writes a new file or folder, choose another --out")
    catalog = Catalog(catalog_path or default_catalog_path(), create=False)
    calibration = Calibration.from_catalog(catalog, run_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "calibration":
        write_json_atomic(out, calibration.to_dict())  # whole or not at all
        return str(out)
    from calibri_pipeline.method.export import export_calibrated
    from calibri_pipeline.models import load_model
    from calibri_pipeline.storage.object_store import ObjectStore
    from calibri_pipeline.storage.paths import default_object_store_url

    backbone = load_model(calibration.source["model"], ObjectStore(default_object_store_url()))
    if fmt == "official":
        write_json_atomic(out, calibration.official_record(backbone.transformer))
        return str(out)
    calibration.search_space(backbone.transformer, cfg=bool(backbone.uses_cfg))  # the model it was made for
    partial = out.with_name(out.name + ".partial")
    manifest = export_calibrated(
        backbone,
        calibration.granularity,
        list(calibration.vector),
        calibration.n_models,
        ObjectStore(out.parent),
        partial.name,
        extra={"run_id": run_id, "reward": calibration.source.get("reward"), "model": calibration.source["model"]},
        segments=calibration.segments,
    )
    partial.replace(out)
    return f"{out} ({manifest['mode']}: {', '.join(manifest['members']) or 'calibri_schedule.json'})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="calibri export", description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True, help="a run_id of the catalog's calibration_runs")
    parser.add_argument("--out", required=True, help="the file (calibration) or folder (diffusers) to write")
    parser.add_argument("--format", default="calibration", choices=FORMATS)
    parser.add_argument("--catalog", default=None, help="catalog file (default: $CALIBRI_CATALOG or the demo's)")
    args = parser.parse_args(argv)
    try:
        written = export(args.run_id, args.out, args.format, args.catalog)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"calibri export: error: {error}", file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
