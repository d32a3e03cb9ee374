"""Stage 5: CMA-ES over the Calibri coefficients (resumable: state after every generation in the object store)."""

import json
import time
from datetime import UTC, datetime

import dagster as dg

from calibri_pipeline.assets.alternatives import alternatives, load_tunings
from calibri_pipeline.assets.analyses import scale_sweep
from calibri_pipeline.assets.common import (
    Stage,
    latest_calibration,
    png_markdown,
    stage_asset,
    table_md,
)
from calibri_pipeline.resources import RayResource


def run_id_for(model: str, reward: str, granularity: str, n_models: int, segments=()) -> str:
    """A calibration's id: partition and search space (two segmentations of one model are two runs)."""
    return f"{model}|{reward}|{granularity}|n{n_models}" + "".join(f"|s{float(t):g}" for t in segments)


def _now() -> datetime:
    return datetime.now(UTC)


def _warm_start(stage: Stage, source_model: str | None, space, n_models: int):
    """Coefficients of the source model's latest calibration, if its architecture matches."""
    if not source_model:
        return None, None
    previous = latest_calibration(stage.catalog, source_model, stage.reward)
    if previous is None:
        stage.log(f"warm start: {source_model} has no finished {stage.reward} calibration; starting from ones")
        return None, None
    if list(previous["names"] or []) != list(space.names):
        stage.context.log.warning(
            f"warm start: {previous['run_id']} has a different calibration space; starting from ones"
        )
        return None, None
    vector = list(previous["vector"])
    if previous["n_models"] != n_models:  # keep the first model's coefficients, re-derive the weights
        vector = vector[: space.size]
    stage.log(f"warm start from {previous['run_id']} (val {previous['best_val']:.4f})")
    return vector, previous["run_id"]


def _parent_model(model: str, store) -> str | None:
    from calibri_pipeline.models import model_spec

    try:
        return model_spec(model, store).get("parent")
    except ValueError:
        return None


@stage_asset(
    deps=[scale_sweep, alternatives],
    kinds={"pytorch"},
    gpu=True,
    resources=("catalog", "object_store", "compute", "ray"),
)
def calibration(stage: Stage, ray: RayResource) -> dg.MaterializeResult:
    """CMA-ES over the Calibri coefficients, scaled to the model by the sweep, its noise measured and its pick confirmed."""
    import polars as pl
    from tqdm.auto import tqdm

    from calibri_pipeline.method.analysis import plot_search_history
    from calibri_pipeline.method.calibrate import calibrate
    from calibri_pipeline.models import ModelFactory
    from calibri_pipeline.stages import calibration_plan, start_tuning

    preset, store, cat = stage.preset, stage.store, stage.catalog
    space = stage.space()
    train, val = stage.prompts("train"), stage.prompts("val")
    run_id = run_id_for(stage.model, stage.reward, preset.granularity, preset.n_models, preset.segments)
    warm, warm_from = _warm_start(
        stage, stage.config.warm_start_from or _parent_model(stage.model, store), space, preset.n_models
    )
    sweep = cat.query(
        "SELECT block AS name, alpha, delta FROM sweeps WHERE model = ? AND reward = ?", [stage.model, stage.reward]
    )
    tunings = load_tunings(stage)
    tuned = tunings.get(start_tuning(preset) or "guidance-tuned")
    try:
        plan = calibration_plan(preset, stage.backbone, sweep=sweep, tunings=tunings, warm_start=warm)
    except ValueError as error:
        raise dg.Failure(str(error)) from error
    cfg = plan.options.config
    # the run's own folder: its id without the partition, e.g. `block-n2` or `block-n2-s0.9`
    state_prefix = f"calibration-state/{stage.model}/{stage.reward}/" + "-".join(run_id.split("|")[2:])
    base_row = dict(
        run_id=run_id,
        model=stage.model,
        reward=stage.reward,
        granularity=preset.granularity,
        n_models=preset.n_models,
        segments=[float(t) for t in preset.segments],
        checkpoint=stage.model if "--" in stage.model else None,
        warm_start_from=warm_from
        or (f"{tuned['name']} ({tuned['label']})" if start_tuning(preset) and tuned else None),
        names=list(space.names),
        config=json.dumps({"preset": preset.to_dict(), **plan.record()}),
        state_uri=store.uri(state_prefix),
        started_at=_now(),
    )
    cat.replace("calibration_runs", pl.DataFrame([dict(base_row, status="running", generations=0)]), {"run_id": run_id})
    bar = tqdm(total=cfg.max_generations, desc=f"CMA-ES {stage.model}|{stage.reward}", unit="gen")

    def on_generation(record: dict) -> None:
        bar.update(1)
        val_txt = f" val={record['val_score']:.4f}" if record.get("val_score") is not None else ""
        stage.log(
            f"generation {record['generation']}: sigma={record['sigma']:.4f} best={record['train_best']:.4f} "
            f"mean={record['train_mean']:.4f}{val_txt} ({record['seconds']:.0f} s)"
        )

    t0 = time.perf_counter()
    try:
        # with a Ray address, images are made on Ray actors holding their own replicas
        with ray.worker_pool(ModelFactory(stage.model, store.url, stage.compute.device, stage.compute.dtype)) as pool:
            where = dict(store=store.state_store(state_prefix), run_name="cmaes", on_generation=on_generation)
            options = plan.options.with_(pool=pool, cache=stage.image_cache, model=stage.model, **where)
            result = calibrate(
                stage.backbone, plan.search, train, val, stage.rewards([stage.reward]), plan.sampling, options
            )
    except BaseException:
        cat.replace(
            "calibration_runs", pl.DataFrame([dict(base_row, status="failed", ended_at=_now())]), {"run_id": run_id}
        )
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    search = result.search
    candidates = search.candidates_frame()
    per_generation = (
        candidates.group_by("generation")
        .agg(pl.col("fitness").min().alias("worst_fitness"), pl.len().alias("n"))
        .sort("generation")
    )
    generations = (
        search.generations_frame()
        .select(
            "generation",
            "sigma",
            pl.col("train_best").alias("best_fitness"),
            pl.col("train_mean").alias("mean_fitness"),
            pl.col("val_score").cast(pl.Float64),
            "seconds",
        )
        .join(per_generation, on="generation")
        .with_columns(pl.col("n").cum_sum().cast(pl.Int32).alias("evaluations"))
        .drop("n")
    )
    cat.replace("cmaes_generations", generations, {"run_id": run_id})
    cat.replace(
        "cmaes_candidates",
        candidates.select("generation", pl.col("index").alias("candidate"), "fitness", "vector"),
        {"run_id": run_id},
    )
    vector = [float(v) for v in result.vector]
    noise = search.noise
    cat.replace(
        "calibration_runs",
        pl.DataFrame(
            [
                dict(
                    base_row,
                    status="finished",
                    generations=search.n_generations,
                    baseline_val=float(result.baseline_val_score),
                    best_val=float(result.val_score),
                    vector=vector,
                    noise=json.dumps(noise) if noise else None,
                    ended_at=_now(),
                )
            ],
            schema_overrides={"noise": pl.String},
        ),
        {"run_id": run_id},
    )
    store.put_json(
        f"calibrations/{stage.model}/{stage.reward}/result.json",
        dict(
            result.to_dict(),
            run_id=run_id,
            vector=vector,
            names=list(space.names),
            noise=noise,
            confirmation=search.confirmation,
        ),
    )
    # one name per number of the vector: with time segments, each part of the schedule has its own
    coef_table = pl.DataFrame({"name": result.space.names(), "value": vector})
    meta = {
        "run_id": run_id,
        "generations": search.n_generations,
        "popsize": search.popsize,
        "stop_reason": str(search.stop_reason),
        "baseline_val": float(result.baseline_val_score),
        "best_val": float(result.val_score),
        "val_gain": float(result.val_score - result.baseline_val_score),
        "seconds": round(seconds, 1),
        "coefficients": table_md(coef_table, max_rows=80),
        "curves": png_markdown(plot_search_history(search.generations, title=run_id), "CMA-ES curves"),
    }
    if noise:
        meta["noise"] = dg.MetadataValue.json(noise)
    if search.confirmation:
        meta["confirmation"] = table_md(pl.DataFrame(search.confirmation["rows"]))
    stage.summary(
        f"calibration: {search.n_generations} generations ({search.stop_reason}), validation "
        f"{result.baseline_val_score:.4f} -> {result.val_score:.4f}"
    )
    return dg.MaterializeResult(metadata=meta)


def load_calibration(stage: Stage) -> dict:
    """This partition's latest finished calibration (its catalog row)."""
    row = latest_calibration(stage.catalog, stage.model, stage.reward)
    if row is None:
        raise dg.Failure(f"no finished calibration for {stage.model} / {stage.reward}: materialize `calibration` first")
    return row


def calibration_search(stage: Stage, run: dict):
    """The search space a catalog run's vector lives in, rebuilt on this partition's model from the run record."""
    from calibri_pipeline.method.space import SearchSpace

    record = {k: run[k] for k in ("granularity", "names", "n_models", "segments")}
    record["cfg"] = bool(stage.backbone.uses_cfg)  # the layout follows the model's guidance kind
    try:
        return SearchSpace.from_dict(record, stage.space(run["granularity"]))
    except ValueError as error:
        raise dg.Failure(f"calibration {run['run_id']}: {error}") from error
