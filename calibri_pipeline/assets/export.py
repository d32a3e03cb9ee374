"""Stage 7: the calibration baked into stock diffusers checkpoints, and the paper's tables across partitions."""

import dagster as dg

from calibri_pipeline.assets.calibration import calibration, calibration_search, load_calibration
from calibri_pipeline.assets.common import GROUP, Stage, stage_asset, table_md
from calibri_pipeline.assets.evaluation import diversity, evaluation
from calibri_pipeline.resources import CatalogResource
from calibri_pipeline.storage.paper_tables import paper_tables_from_catalog


@stage_asset(deps=[calibration], kinds={"pytorch", "safetensors"}, config=False)
def calibrated_checkpoint(stage: Stage) -> dg.MaterializeResult:
    """The calibration baked into the transformer weights; stock diffusers ``from_pretrained`` loads it."""
    from calibri_pipeline.method.export import export_calibrated

    run = load_calibration(stage)
    prefix = f"checkpoints/{stage.model}/{stage.reward}"
    search = calibration_search(stage, run)
    manifest = export_calibrated(
        stage.backbone,
        search.granularity,
        run["vector"],
        search.n_models,
        stage.store,
        prefix,
        extra={"run_id": run["run_id"], "reward": stage.reward, "model": stage.model},
        segments=search.segments,
    )
    stage.summary(f"calibrated_checkpoint: {len(manifest['members'])} member(s) under {prefix}")
    return dg.MaterializeResult(
        metadata={
            "uri": stage.store.uri(prefix),
            "files": len(manifest["files"]),
            "members": dg.MetadataValue.json(manifest["members"]),
        }
    )


@dg.asset(group_name=GROUP, deps=[evaluation, diversity], kinds={"duckdb"})
def paper_tables(context: dg.AssetExecutionContext, catalog: CatalogResource) -> dg.MaterializeResult:
    """Tables 2, 6 and 7 in the paper's layout over every calibrated partition (a reward-hacking view:
    calibrating for one reward, read every other one, including the exact scorer)."""
    tables = paper_tables_from_catalog(catalog.catalog)
    if not tables:
        raise dg.Failure("no finished calibration with an evaluation in the catalog yet")
    return dg.MaterializeResult(metadata={name: table_md(t, max_rows=60) for name, t in tables.items()})
