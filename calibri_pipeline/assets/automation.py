"""Jobs, the recalibration sensor and the re-evaluation schedule."""

from __future__ import annotations

import json
import os
from typing import Any

import dagster as dg

from calibri_pipeline.assets.common import MODEL_PARTITIONS, REWARD_PARTITIONS, check_reward_key
from calibri_pipeline.assets.evaluation import diversity, evaluation
from calibri_pipeline.assets.export import calibrated_checkpoint, paper_tables
from calibri_pipeline.presets import PRESETS
from calibri_pipeline.resources import CatalogResource, ObjectStoreResource


def _partitioned():
    from calibri_pipeline.assets import PARTITIONED_ASSETS

    return PARTITIONED_ASSETS


PARTITIONED_ASSETS = _partitioned()
CONFIGURABLE = [a for a in PARTITIONED_ASSETS if a is not calibrated_checkpoint]
#: a new checkpoint runs the whole chain: every stage feeds the calibration (the sweep scales it, the
#: alternatives may start it), and the image cache keeps what did not change
RECALIBRATE = PARTITIONED_ASSETS
DEFAULT_RECALIBRATION_REWARD = os.environ.get("CALIBRI_SENSOR_REWARD", "world_score")


def _asset_config(assets, **fields: Any) -> dict:
    return {"ops": {a.key.to_python_identifier(): {"config": dict(fields)} for a in assets if a in CONFIGURABLE}}


recalibrate_job = dg.define_asset_job(
    "recalibrate",
    selection=RECALIBRATE,
    description="prompts -> baselines -> CMA-ES -> evaluation -> export, one partition",
)
evaluate_job = dg.define_asset_job(
    "evaluate", selection=[evaluation, diversity], description="re-evaluate the latest calibration of a partition"
)

#: one job per ready-made configuration, selectable in the UI; the preset pre-fills every asset's config.
#: Selecting the assets selects their asset checks too (they run in the same run, after their asset).
PRESET_JOBS = [
    dg.define_asset_job(
        f"preset__{name.replace('-', '_')}",
        selection=PARTITIONED_ASSETS,
        config=_asset_config(PARTITIONED_ASSETS, preset=name),
        description=f"{name}: {preset.notes} (model key '{preset.model}', reward '{preset.reward}')",
    )
    for name, preset in PRESETS.items()
]


def checkpoint_dir() -> str:
    from calibri_pipeline.storage.paths import calibri_home

    return os.environ.get("CALIBRI_CHECKPOINT_DIR") or str(calibri_home() / "incoming-checkpoints")


def detect_kind(config: dict) -> str | None:
    """Backbone kind of a checkpoint folder from its config.json (toy format or a diffusers transformer)."""
    if isinstance(config.get("model"), dict):
        return "toy"
    cls = config.get("_class_name", "")
    return {
        "FluxTransformer2DModel": "flux",
        "SD3Transformer2DModel": "sd3",
        "QwenImageTransformer2DModel": "qwen-image",
    }.get(cls)


def scan_checkpoints(url: str) -> list[dict[str, str]]:
    """Checkpoint folders (``<name>/config.json`` + a ``*.safetensors``) under ``url``, oldest name first."""
    from calibri_pipeline.storage.object_store import ObjectStore

    store = ObjectStore(url)
    found = []
    for key in store.list(""):
        parts = key.split("/")
        if len(parts) != 2 or parts[1] != "config.json":
            continue
        name = parts[0]
        siblings = [k for k in store.list(name) if k.startswith(name + "/")]
        if not any(k.endswith(".safetensors") for k in siblings):
            continue
        try:
            config = json.loads(store.get_bytes(key))
        except (ValueError, OSError):
            continue  # half-copied or corrupt: picked up once it is whole
        kind = detect_kind(config) if isinstance(config, dict) else None
        if kind is not None:
            found.append({"name": name, "kind": kind, "path": store.uri(name)})
    return sorted(found, key=lambda c: c["name"])


@dg.sensor(
    job=recalibrate_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="new checkpoint folder -> model partition + recalibration warm-started from the previous one",
)
def checkpoint_sensor(context: dg.SensorEvaluationContext, object_store: ObjectStoreResource) -> dg.SensorResult:
    from calibri_pipeline.models import checkpoint_key, register_model

    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    reward = check_reward_key(DEFAULT_RECALIBRATION_REWARD)  # a bad CALIBRI_SENSOR_REWARD fails the tick, adds nothing
    existing = set(context.instance.get_dynamic_partitions(MODEL_PARTITIONS.name))
    new_partitions = [] if "toy" in existing else ["toy"]  # the embedded default is always there
    run_requests = []
    url = checkpoint_dir()
    for ckpt in scan_checkpoints(url) if _exists(url) else []:
        if ckpt["name"] in seen:
            continue
        key = checkpoint_key(ckpt["kind"], ckpt["name"])
        parent = seen.get(f"latest:{ckpt['kind']}") or ckpt["kind"]
        register_model(object_store.store, key, ckpt["kind"], ckpt["path"], parent=parent)
        new_partitions.append(key)
        seen[ckpt["name"]] = key
        seen[f"latest:{ckpt['kind']}"] = key
        partition_key = dg.MultiPartitionKey({"model": key, "reward": reward})
        run_requests.append(
            dg.RunRequest(
                run_key=f"recalibrate:{key}",
                partition_key=partition_key,
                run_config=_asset_config(RECALIBRATE, warm_start_from=parent),
                tags={"calibri/checkpoint": ckpt["path"], "calibri/warm_start_from": parent},
            )
        )
        context.log.info(f"new checkpoint {ckpt['name']} ({ckpt['kind']}) -> partition {key}, warm start from {parent}")
    partition_requests = [MODEL_PARTITIONS.build_add_request(new_partitions)] if new_partitions else []
    if run_requests and reward not in context.instance.get_dynamic_partitions(REWARD_PARTITIONS.name):
        partition_requests.append(REWARD_PARTITIONS.build_add_request([reward]))  # added before the runs start
    return dg.SensorResult(
        run_requests=run_requests, dynamic_partitions_requests=partition_requests, cursor=json.dumps(seen)
    )


def _exists(url: str) -> bool:
    if "://" in url and not url.startswith("file://"):
        return True  # object stores have no empty folders; listing an absent prefix gives nothing
    return os.path.isdir(url.removeprefix("file://"))


@dg.schedule(
    job=evaluate_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="nightly: re-evaluate every partition's latest finished calibration",
)
def reevaluate_schedule(context: dg.ScheduleEvaluationContext, catalog: CatalogResource):
    df = catalog.catalog.query(
        "SELECT DISTINCT model, reward FROM calibration_runs WHERE status = 'finished' ORDER BY model, reward"
    )
    models = set(context.instance.get_dynamic_partitions(MODEL_PARTITIONS.name))
    rewards = set(context.instance.get_dynamic_partitions(REWARD_PARTITIONS.name))
    requests = [
        dg.RunRequest(
            run_key=f"reevaluate:{m}|{r}:{context.scheduled_execution_time:%Y%m%d}",
            partition_key=dg.MultiPartitionKey({"model": m, "reward": r}),
        )
        for m, r in df.iter_rows()
        if m in models and r in rewards
    ]
    return requests or dg.SkipReason("no finished calibration to re-evaluate")


paper_tables_job = dg.define_asset_job(
    "build_paper_tables", selection=[paper_tables], description="Tables 2, 6, 7 over every calibrated partition"
)
ALL_JOBS = [recalibrate_job, evaluate_job, paper_tables_job, *PRESET_JOBS]
ALL_SENSORS = [checkpoint_sensor]
ALL_SCHEDULES = [reevaluate_schedule]
