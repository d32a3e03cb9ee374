"""The Calibri asset graph (DESIGN.md §2). Every asset is a thin call into the framework-free core.

Assets hand data to each other through the catalog (DuckDB) and the object store, never through
Dagster's pickling IO manager: what an asset writes is what a user can query, and the only files
we read back are JSON, PNG and safetensors. All assets share the ``model × reward`` partitions.
"""


import io
import json
import time
from datetime import datetime, timezone
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from calibri_pipeline.assets.common import (
    PARTITIONS,
    image_grid_png,
    latest_calibration,
    load_prompt_set,
    partition,
    png_markdown,
    resolve_preset,
    table_md,
)
from calibri_pipeline.storage.paper_tables import paper_tables_from_catalog
from calibri_pipeline.resources import GPU_POOL, CatalogResource, ComputeResource, ObjectStoreResource, RayResource

GROUP = "calibri"


class CalibriConfig(dg.Config):
    """Options shared by every asset; empty fields take the preset's value."""

    preset: Optional[str] = Field(default=None, description="preset name (default: by model kind, see calibri_pipeline/presets.py)")
    n_train: Optional[int] = None
    n_val: Optional[int] = None
    n_test: Optional[int] = None
    seeds: Optional[list[int]] = Field(default=None, description="noise seeds per test prompt")
    calibration_steps: Optional[int] = None
    default_steps: Optional[int] = None
    generations: Optional[int] = None
    popsize: Optional[int] = None
    bucket_size: Optional[int] = None
    val_every: Optional[int] = None
    granularity: Optional[str] = None
    n_models: Optional[int] = None
    nfe_list: Optional[list[int]] = None
    ablation_prompts: Optional[int] = None
    ablation_seeds: Optional[list[int]] = None
    sweep_alphas: Optional[list[float]] = None
    max_batch: Optional[int] = None
    llm_rewrite: bool = Field(default=False, description="rewrite world prompts with the LLM (checked against their specs)")
    warm_start_from: Optional[str] = Field(default=None, description="model key whose latest calibration seeds CMA-ES")


def _preset(config: CalibriConfig, model: str, store):
    fields = config.model_dump(exclude={"preset", "llm_rewrite", "warm_start_from"})
    return resolve_preset(model, config.preset, store, **fields)


def _backbone(model: str, compute: ComputeResource, store):
    from calibri_pipeline.models import load_model

    return load_model(model, store, device=str(compute.torch_device()), dtype=compute.dtype)


def _reward(name: str):
    from calibri_pipeline.rewards.registry import make_reward

    return make_reward(name)


def _now() -> datetime:
    return datetime.now(timezone.utc)


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------


@dg.asset(partitions_def=PARTITIONS, group_name=GROUP, kinds={"python", "duckdb"})
def prompts(context: dg.AssetExecutionContext, config: CalibriConfig, catalog: CatalogResource,
            object_store: ObjectStoreResource) -> dg.MaterializeResult:
    """Train / val / test prompts: the embedded world's grammar (optionally LLM-rewritten) or a prompt file."""
    import polars as pl

    model, reward, run_key = partition(context)
    preset = _preset(config, model, object_store.store)
    prompt_list = build_prompts(preset, llm_rewrite=config.llm_rewrite, log=context.log.info)
    # specs go in as JSON text: a polars struct column would unify keys across rows (adding nulls)
    rows = [dict(p.to_dict(), prompt_set=run_key, spec=json.dumps(p.spec), meta=json.dumps(p.meta)) for p in prompt_list]
    df = pl.DataFrame(rows, schema_overrides={"spec": pl.String, "meta": pl.String})
    catalog.catalog.replace("prompts", df, {"prompt_set": run_key})
    summary = df.group_by("split", "category").len().sort("split", "category")
    return dg.MaterializeResult(
        metadata={
            "rows": len(prompt_list),
            "preset": preset.name,
            "source": preset.prompt_source,
            "by_split_and_category": table_md(summary),
            "examples": dg.MetadataValue.md("\n".join(f"- {p.text}" for p in prompt_list[:8])),
        }
    )


def build_prompts(preset, llm_rewrite: bool = False, log=print):
    """The preset's prompt set, split train/val/test (seeded)."""
    from dataclasses import replace

    if preset.prompt_source == "world":
        from calibri_pipeline.world import make_splits

        splits = make_splits(0, preset.n_train, preset.n_val, preset.n_test)
        if llm_rewrite:
            from calibri_pipeline.prompts.llm import PromptLLM, rewrite_world_prompts

            llm = PromptLLM()
            for split in ("train", "val"):  # test prompts stay grammar-phrased: a fixed yardstick
                splits[split], report = rewrite_world_prompts(splits[split], llm, seed=0)
                log(f"LLM rewrite of {split}: acceptance {report.acceptance_rate:.1%}, coverage {report.coverage:.1%}")
        return [p for split in ("train", "val", "test") for p in splits[split]]
    from calibri_pipeline.prompts.loaders import load_prompts
    from calibri_pipeline.prompts.llm import split_prompts

    path = preset.prompt_source
    if path == "t2i-compbench":
        import os

        root = os.environ.get("CALIBRI_PROMPTS_DIR")
        if not root:
            raise dg.Failure("prompt_source 't2i-compbench' needs CALIBRI_PROMPTS_DIR (folder with the T2I-CompBench++ txt files)")
        from pathlib import Path

        from calibri_pipeline.presets import T2I_COMPBENCH_TRAIN, T2I_COMPBENCH_VAL

        train = load_prompts(Path(root) / T2I_COMPBENCH_TRAIN)[: preset.n_train]
        val = load_prompts(Path(root) / T2I_COMPBENCH_VAL)
        val, test = val[: preset.n_val], val[preset.n_val : preset.n_val + preset.n_test]
        return ([replace(p, split="train") for p in train] + [replace(p, split="val") for p in val]
                + [replace(p, split="test") for p in test])
    loaded = load_prompts(path)
    total = preset.n_train + preset.n_val + preset.n_test
    return split_prompts(loaded[:total], seed=0, fractions=(preset.n_train / total, preset.n_val / total, preset.n_test / total))


# ------------------------------------------------------------------------------------------------
# prompt embeddings
# ------------------------------------------------------------------------------------------------


def _text_encoder(backbone):
    return getattr(backbone, "text_encoder", None)


@dg.asset(partitions_def=PARTITIONS, group_name=GROUP, deps=[prompts], kinds={"pytorch", "safetensors"})
def prompt_embeddings(context: dg.AssetExecutionContext, config: CalibriConfig, catalog: CatalogResource,
                      object_store: ObjectStoreResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Text-encoder states of every prompt, computed once and cached in the object store (safetensors)."""
    model, reward, run_key = partition(context)
    backbone = _backbone(model, compute, object_store.store)
    prompt_list = load_prompt_set(catalog.catalog, run_key)
    texts = sorted({p.text for p in prompt_list} | {""})
    encoder = _text_encoder(backbone)
    t0 = time.perf_counter()
    if encoder is None or not hasattr(encoder, "export_cache"):
        context.log.info(f"{model}: its backbone encodes prompts itself (in-memory cache); nothing to persist")
        return dg.MaterializeResult(metadata={"prompts": len(texts), "persisted": False})
    encoder.precompute(texts, progress=False)
    tensors = encoder.export_cache(texts)
    key = f"embeddings/{model}/{reward}.safetensors"
    uri = object_store.store.put_safetensors(key, tensors, metadata={"texts": json.dumps(texts)})
    return dg.MaterializeResult(
        metadata={"prompts": len(texts), "uri": uri, "seconds": round(time.perf_counter() - t0, 2), "persisted": True}
    )


def warm_text_cache(backbone, store, model: str, reward: str) -> None:
    """Fill the backbone's text cache from the prompt_embeddings asset, when it was materialized."""
    encoder = _text_encoder(backbone)
    key = f"embeddings/{model}/{reward}.safetensors"
    if encoder is None or not hasattr(encoder, "import_cache") or not store.exists(key):
        return
    texts = json.loads(store.get_safetensors_metadata(key)["texts"])
    encoder.import_cache(texts, store.get_safetensors(key))


# ------------------------------------------------------------------------------------------------
# baseline images and scores
# ------------------------------------------------------------------------------------------------


def _generate_and_store(context, backbone, prompt_list, seeds, steps, store, catalog, model, run_key, tag,
                        space=None, vector=None, n_models=1, max_batch=None):
    """Generate prompt × seed images, write PNGs and `images` rows; return (images tensor, rows df)."""
    import hashlib

    import polars as pl
    import torch

    cells = [(p, s) for p in prompt_list for s in seeds]
    images = backbone.generate(
        [p for p, _ in cells], [s for _, s in cells], steps=steps, space=space,
        vectors=None if vector is None else torch.as_tensor(vector, dtype=torch.float32), n_models=n_models,
        max_batch=max_batch,
    )
    rows = []
    for (p, seed), img in zip(cells, images):
        image_id = hashlib.sha1(f"{run_key}|{tag}|{steps}|{p.prompt_id}|{seed}".encode()).hexdigest()[:20]
        folder = tag.replace("|", "__")  # run ids hold '|', object keys may not
        uri = store.put_png(f"images/{model}/{run_key.split('|')[1]}/{folder}/nfe{steps}/{p.prompt_id}_{seed}.png", img)
        rows.append(dict(image_id=image_id, run_key=run_key, model=model, prompt_id=p.prompt_id, seed=int(seed),
                         steps=int(steps), guidance=backbone.default_guidance, calibration=tag, uri=uri,
                         width=int(img.shape[-1]), height=int(img.shape[-2])))
    return images, pl.DataFrame(rows), cells


@dg.asset(partitions_def=PARTITIONS, group_name=GROUP, deps=[prompt_embeddings], pool=GPU_POOL,
          kinds={"pytorch", "s3"})
def baseline_images(context: dg.AssetExecutionContext, config: CalibriConfig, catalog: CatalogResource,
                    object_store: ObjectStoreResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Unmodified model on the test prompts at the default NFE and at the calibration NFE."""
    import polars as pl
    import torch

    model, reward, run_key = partition(context)
    store = object_store.store
    preset = _preset(config, model, store)
    backbone = _backbone(model, compute, store)
    warm_text_cache(backbone, store, model, reward)
    test = load_prompt_set(catalog.catalog, run_key, "test")
    frames, grids = [], {}
    for steps in sorted({preset.default_steps, preset.calibration_steps}):
        t0 = time.perf_counter()
        images, df, cells = _generate_and_store(context, backbone, test, preset.seeds, steps, store, catalog, model,
                                                 run_key, "baseline", max_batch=preset.max_batch)
        context.log.info(f"baseline at {steps} steps: {len(cells)} images in {time.perf_counter() - t0:.1f}s")
        frames.append(df)
        grids[steps] = image_grid_png(images[: 16 * len(preset.seeds)][:: len(preset.seeds)],
                                      [p.text for p, _ in cells[: 16 * len(preset.seeds)][:: len(preset.seeds)]])
        del images
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    all_rows = pl.concat(frames)
    catalog.catalog.replace("images", all_rows, {"run_key": run_key, "calibration": "baseline"})
    meta: dict[str, Any] = {"rows": all_rows.height, "steps": sorted(grids)}
    for steps, png in grids.items():
        meta[f"grid_nfe{steps}"] = png_markdown(png, f"baseline {steps} steps")
    return dg.MaterializeResult(metadata=meta)


def _score_images(catalog, store, image_rows, prompts_by_id, reward_names):
    """Score stored PNGs (what you see is what is scored) with every reward; a long DataFrame."""
    import numpy as np
    import polars as pl
    import torch

    images = torch.stack([
        torch.from_numpy(np.asarray(store.get_png(store.key_of(uri)).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        for uri in image_rows["uri"]
    ])
    prompt_list = [prompts_by_id[pid] for pid in image_rows["prompt_id"]]
    frames = []
    for name in reward_names:
        scores = _reward(name)(images, prompt_list)
        frames.append(pl.DataFrame({"image_id": image_rows["image_id"], "reward": [name] * len(scores),
                                    "score": scores.double().numpy()}))
    return pl.concat(frames)


@dg.asset(partitions_def=PARTITIONS, group_name=GROUP, deps=[baseline_images], kinds={"duckdb"})
def baseline_scores(context: dg.AssetExecutionContext, config: CalibriConfig, catalog: CatalogResource,
                    object_store: ObjectStoreResource) -> dg.MaterializeResult:
    """Every evaluation reward on every baseline image (reads the PNGs back from the object store)."""
    import polars as pl

    model, reward, run_key = partition(context)
    store = object_store.store
    preset = _preset(config, model, store)
    cat = catalog.catalog
    rows = cat.query("SELECT image_id, prompt_id, uri, steps FROM images WHERE run_key = ? AND calibration = 'baseline'",
                     [run_key])
    prompts_by_id = {p.prompt_id: p for p in load_prompt_set(cat, run_key, "test")}
    rewards = list(dict.fromkeys([reward, *preset.eval_rewards]))
    scores = _score_images(cat, store, rows, prompts_by_id, rewards)
    cat.replace("scores", scores, {"run_key": run_key, "calibration": "baseline"})
    summary = (scores.join(rows.select("image_id", "steps"), on="image_id")
               .group_by("reward", "steps").agg(pl.col("score").mean().alias("mean"), pl.len().alias("n"))
               .sort("reward", "steps"))
    return dg.MaterializeResult(metadata={"rows": scores.height, "summary": table_md(summary),
                                          "nan_scores": int(scores["score"].is_nan().sum())})


@dg.asset_check(asset=baseline_scores, description="no NaN or infinite reward in the baseline scores")
def baseline_scores_are_finite(context: dg.AssetCheckExecutionContext, catalog: CatalogResource) -> dg.AssetCheckResult:
    df = catalog.catalog.query("SELECT count(*) FILTER (WHERE NOT isfinite(score)) AS bad, count(*) AS n FROM scores")
    bad, n = df.row(0)
    return dg.AssetCheckResult(passed=bool(bad == 0 and n > 0), metadata={"non_finite": int(bad), "rows": int(n)})


# ------------------------------------------------------------------------------------------------
# analyses (paper Fig. 3)
# ------------------------------------------------------------------------------------------------


def _block_analysis_inputs(context, config, catalog, object_store, compute):
    """What both Fig. 3 analyses need: the model at block granularity and the val prompts to use."""
    from calibri_pipeline.method.space import CalibrationSpace

    model, reward, run_key = partition(context)
    store = object_store.store
    preset = _preset(config, model, store)
    backbone = _backbone(model, compute, store)
    warm_text_cache(backbone, store, model, reward)
    val = load_prompt_set(catalog.catalog, run_key, "val")[: preset.ablation_prompts]
    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    return model, reward, preset, backbone, space, val


@dg.asset(partitions_def=PARTITIONS, group_name=GROUP, deps=[prompt_embeddings], pool=GPU_POOL, kinds={"pytorch"})
def block_ablation(context: dg.AssetExecutionContext, config: CalibriConfig, catalog: CatalogResource,
                   object_store: ObjectStoreResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Each block bypassed in turn: reward change vs the unmodified model, bootstrap CIs (Fig. 3a)."""
    import polars as pl

    from calibri_pipeline.method.analysis import block_ablation as run_ablation

    model, reward, preset, backbone, space, val = _block_analysis_inputs(context, config, catalog, object_store, compute)
    result = run_ablation(backbone, space, val, _reward(reward), seeds=preset.ablation_seeds,
                          steps=preset.calibration_steps, max_batch=preset.max_batch)
    t = result.table
    df = t.select(
        pl.lit(model).alias("model"), pl.lit(reward).alias("reward"), pl.col("index").cast(pl.Int32).alias("block_index"),
        pl.col("name").alias("block"), pl.col("baseline_mean").alias("baseline"), pl.col("ablated_mean").alias("mean"),
        "delta", pl.col("delta_low").alias("ci_low"), pl.col("delta_high").alias("ci_high"),
        pl.col("n_cells").cast(pl.Int32).alias("n"),
    ).with_columns(pl.lit(preset.calibration_steps).alias("steps"))
    catalog.catalog.replace("ablations", df, {"model": model, "reward": reward})
    return dg.MaterializeResult(metadata={"rows": df.height, "table": table_md(df), "plot": png_markdown(result.plot(), "ablation")})


@dg.asset(partitions_def=PARTITIONS, group_name=GROUP, deps=[prompt_embeddings], pool=GPU_POOL, kinds={"pytorch"})
def scale_sweep(context: dg.AssetExecutionContext, config: CalibriConfig, catalog: CatalogResource,
                object_store: ObjectStoreResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Each block's output scaled by every alpha of a grid (Fig. 3b heatmap)."""
    import polars as pl

    from calibri_pipeline.method.analysis import scale_sweep as run_sweep

    model, reward, preset, backbone, space, val = _block_analysis_inputs(context, config, catalog, object_store, compute)
    result = run_sweep(backbone, space, val, _reward(reward), alphas=preset.sweep_alphas, seeds=preset.ablation_seeds,
                       steps=preset.calibration_steps, max_batch=preset.max_batch)
    t = result.table
    df = t.select(
        pl.lit(model).alias("model"), pl.lit(reward).alias("reward"), pl.col("index").cast(pl.Int32).alias("block_index"),
        pl.col("name").alias("block"), "alpha", "mean", "delta", pl.col("delta_low").alias("ci_low"),
        pl.col("delta_high").alias("ci_high"), pl.col("n_cells").cast(pl.Int32).alias("n"),
    ).with_columns(pl.lit(preset.calibration_steps).alias("steps"))
    catalog.catalog.replace("sweeps", df, {"model": model, "reward": reward})
    best = df.sort("mean", descending=True).head(10)
    return dg.MaterializeResult(metadata={"rows": df.height, "best_cells": table_md(best),
                                          "heatmap": png_markdown(result.plot(), "scale sweep")})


# ------------------------------------------------------------------------------------------------
# calibration (CMA-ES)
# ------------------------------------------------------------------------------------------------


def run_id_for(model: str, reward: str, granularity: str, n_models: int) -> str:
    return f"{model}|{reward}|{granularity}|n{n_models}"


def _warm_start(context, cat, source_model: str | None, reward: str, space, n_models: int):
    """Coefficients of the source model's latest calibration, if its architecture matches."""
    if not source_model:
        return None, None
    previous = latest_calibration(cat, source_model, reward)
    if previous is None:
        context.log.info(f"warm start: {source_model} has no finished {reward} calibration; starting from ones")
        return None, None
    if list(previous["names"] or []) != list(space.names):
        context.log.warning(f"warm start: {previous['run_id']} has a different calibration space; starting from ones")
        return None, None
    vector = list(previous["coefficients"])
    if previous["n_models"] != n_models:  # keep the first model's coefficients, re-derive the weights
        vector = vector[: space.size]
    context.log.info(f"warm start from {previous['run_id']} (val {previous['best_val']:.4f})")
    return vector, previous["run_id"]


def _calibration_plot(generations) -> bytes:
    from calibri_pipeline.method.analysis import _figure, _png

    fig = _figure(9, 3.2)
    ax1, ax2 = fig.subplots(1, 2)
    g = generations
    ax1.plot(g["generation"], g["best_fitness"], label="best (train bucket)")
    ax1.plot(g["generation"], g["mean_fitness"], label="mean (train bucket)")
    val = g.filter(g["val_score"].is_not_null())
    ax1.plot(val["generation"], val["val_score"], "o-", label="validation")
    ax1.set_xlabel("generation")
    ax1.set_ylabel("reward")
    ax1.legend(fontsize=7)
    ax2.plot(g["generation"], g["sigma"])
    ax2.set_xlabel("generation")
    ax2.set_ylabel("CMA-ES sigma")
    fig.tight_layout()
    return _png(fig)


@dg.asset(partitions_def=PARTITIONS, group_name=GROUP, deps=[prompt_embeddings], pool=GPU_POOL, kinds={"pytorch"})
def calibration(context: dg.AssetExecutionContext, config: CalibriConfig, catalog: CatalogResource,
                object_store: ObjectStoreResource, compute: ComputeResource, ray: RayResource) -> dg.MaterializeResult:
    """CMA-ES over the Calibri coefficients (resumable: state after every generation in the object store)."""
    import polars as pl

    from calibri_pipeline.method.calibrate import calibrate
    from calibri_pipeline.method.search import SearchConfig
    from calibri_pipeline.method.space import CalibrationSpace

    model, reward, run_key = partition(context)
    store, cat = object_store.store, catalog.catalog
    preset = _preset(config, model, store)
    backbone = _backbone(model, compute, store)
    warm_text_cache(backbone, store, model, reward)
    space = CalibrationSpace.from_transformer(backbone.transformer, preset.granularity)
    train = load_prompt_set(cat, run_key, "train")
    val = load_prompt_set(cat, run_key, "val")
    run_id = run_id_for(model, reward, preset.granularity, preset.n_models)
    warm_source = config.warm_start_from or _parent_model(model, store)
    warm, warm_from = _warm_start(context, cat, warm_source, reward, space, preset.n_models)
    search_config = SearchConfig(max_generations=preset.generations, popsize=preset.popsize,
                                 bucket_size=preset.bucket_size, val_every=preset.val_every, patience=preset.patience)
    state_prefix = f"calibration-state/{model}/{reward}/{preset.granularity}-n{preset.n_models}"
    started = _now()
    base_row = dict(run_id=run_id, model=model, reward=reward, granularity=preset.granularity,
                    n_models=preset.n_models, checkpoint=model if "--" in model else None, warm_start_from=warm_from,
                    names=list(space.names), config=json.dumps({"preset": preset.to_dict(), "search": search_config.to_dict()}),
                    state_uri=store.uri(state_prefix), started_at=started)
    cat.replace("calibration_runs", pl.DataFrame([dict(base_row, status="running", generations=0)]), {"run_id": run_id})

    def on_generation(record: dict) -> None:
        val_txt = f" val={record['val_score']:.4f}" if record.get("val_score") is not None else ""
        context.log.info(
            f"generation {record['generation']}: sigma={record['sigma']:.4f} best={record['train_best']:.4f} "
            f"mean={record['train_mean']:.4f}{val_txt}"
        )

    t0 = time.perf_counter()
    try:
        from calibri_pipeline.method.ray_eval import ModelFactory

        # with a Ray address, populations are scored on Ray actors holding their own replicas
        with ray.population_evaluator(ModelFactory(model, store.url, compute.device, compute.dtype)) as evaluator:
            result = calibrate(backbone, space, train, val, _reward(reward), steps=preset.calibration_steps,
                               n_models=preset.n_models, warm_start=warm, config=search_config,
                               store=store.state_store(state_prefix), run_name="cmaes", on_generation=on_generation,
                               max_batch=preset.max_batch, evaluator=evaluator)
    except BaseException:
        cat.replace("calibration_runs", pl.DataFrame([dict(base_row, status="failed", ended_at=_now())]), {"run_id": run_id})
        raise
    seconds = time.perf_counter() - t0
    search = result.search
    generations = search.generations_frame().select(
        "generation", "sigma", pl.col("train_best").alias("best_fitness"), pl.col("train_mean").alias("mean_fitness"),
        pl.col("val_score").cast(pl.Float64), "seconds",
    )
    cat.replace("cmaes_generations", generations, {"run_id": run_id})
    candidates = search.candidates_frame().select("generation", pl.col("index").alias("candidate"), "fitness", "vector")
    cat.replace("cmaes_candidates", candidates, {"run_id": run_id})
    vector = [float(v) for v in result.vector]
    cat.replace("calibration_runs", pl.DataFrame([dict(
        base_row, status="finished", generations=search.n_generations, baseline_val=float(result.baseline_val_score),
        best_val=float(result.val_score), coefficients=vector, ended_at=_now())]), {"run_id": run_id})
    store.put_json(f"calibrations/{model}/{reward}/result.json", dict(result.to_dict(), run_id=run_id, vector=vector,
                                                                     names=list(space.names)))
    from calibri_pipeline.method.ensemble import EnsembleLayout

    coef_names = EnsembleLayout(space.size, preset.n_models, cfg=bool(backbone.uses_cfg)).names(space.names)
    coef_table = pl.DataFrame({"name": coef_names, "value": vector})
    return dg.MaterializeResult(metadata={
        "run_id": run_id,
        "generations": search.n_generations,
        "popsize": search.popsize,
        "stop_reason": str(search.stop_reason),
        "baseline_val": float(result.baseline_val_score),
        "best_val": float(result.val_score),
        "val_gain": float(result.val_score - result.baseline_val_score),
        "seconds": round(seconds, 1),
        "coefficients": table_md(coef_table, max_rows=80),
        "curves": png_markdown(_calibration_plot(generations), "CMA-ES curves"),
    })


def _parent_model(model: str, store) -> str | None:
    from calibri_pipeline.models import model_spec

    try:
        return model_spec(model, store).get("parent")
    except ValueError:
        return None


@dg.asset_check(asset=calibration, description="the selected coefficients are at least as good as the baseline on validation")
def calibration_beats_baseline(context: dg.AssetCheckExecutionContext, catalog: CatalogResource) -> dg.AssetCheckResult:
    df = catalog.catalog.query("SELECT run_id, baseline_val, best_val FROM calibration_runs WHERE status = 'finished'")
    bad = df.filter(df["best_val"] < df["baseline_val"])
    return dg.AssetCheckResult(passed=df.height > 0 and bad.height == 0,
                               metadata={"runs": df.height, "worse_than_baseline": bad.height})


def _load_calibration(cat, store, model: str, reward: str) -> dict:
    row = latest_calibration(cat, model, reward)
    if row is None:
        raise dg.Failure(f"no finished calibration for {model} / {reward}: materialize `calibration` first")
    return row


# ------------------------------------------------------------------------------------------------
# evaluation, diversity, export
# ------------------------------------------------------------------------------------------------


@dg.asset(partitions_def=PARTITIONS, group_name=GROUP, deps=[calibration, baseline_scores], pool=GPU_POOL,
          kinds={"pytorch", "duckdb"})
def evaluation(context: dg.AssetExecutionContext, config: CalibriConfig, catalog: CatalogResource,
               object_store: ObjectStoreResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Held-out test prompts: baseline vs calibrated on every reward across NFE (Fig. 6, Table 2)."""
    import polars as pl

    from calibri_pipeline.method.analysis import nfe_study
    from calibri_pipeline.method.space import CalibrationSpace

    model, reward, run_key = partition(context)
    store, cat = object_store.store, catalog.catalog
    preset = _preset(config, model, store)
    backbone = _backbone(model, compute, store)
    warm_text_cache(backbone, store, model, reward)
    run = _load_calibration(cat, store, model, reward)
    space = CalibrationSpace.from_transformer(backbone.transformer, run["granularity"])
    test = load_prompt_set(cat, run_key, "test")
    rewards = [_reward(r) for r in dict.fromkeys([reward, *preset.eval_rewards])]
    steps_list = sorted(set(preset.nfe_list) | {preset.default_steps, preset.calibration_steps})
    result = nfe_study(backbone, {"baseline": None, "calibrated": run["coefficients"]}, steps_list, test, rewards,
                       space=space, seeds=preset.seeds, max_batch=preset.max_batch)
    t = result.table
    df = t.select(
        pl.col("reward"), (pl.col("label") == "calibrated").alias("calibrated"),
        pl.when(pl.col("label") == "calibrated").then(pl.lit(run["run_id"])).otherwise(pl.lit("baseline")).alias("calibration"),
        pl.col("steps").cast(pl.Int32).alias("nfe"), pl.col("mean"), pl.col("ci_low"), pl.col("ci_high"),
        pl.col("n_cells").cast(pl.Int32).alias("n"),
    ).with_columns(pl.lit(model).alias("model"), pl.lit(f"{run_key}:test").alias("prompt_set"))
    cat.replace("evaluations", df, {"run_key": run_key})
    # calibrated images at the calibration NFE: kept for inspection and the diversity asset
    images, rows, cells = _generate_and_store(context, backbone, test, preset.seeds, preset.calibration_steps, store, cat,
                                              model, run_key, run["run_id"], space=space, vector=run["coefficients"],
                                              n_models=run["n_models"], max_batch=preset.max_batch)
    cat.replace("images", rows, {"run_key": run_key, "calibration": run["run_id"]})
    scores = _score_images(cat, store, rows, {p.prompt_id: p for p in test}, [r.name for r in rewards])
    cat.replace("scores", scores, {"run_key": run_key, "calibration": run["run_id"]})
    stride = len(preset.seeds)
    grid = image_grid_png(images[: 16 * stride][::stride], [p.text for p, _ in cells[: 16 * stride][::stride]])
    headline = headline_table(df, reward, preset.default_steps, preset.calibration_steps)
    return dg.MaterializeResult(metadata={
        "rows": df.height,
        "headline": table_md(headline),
        "nfe_plot": png_markdown(result.plot(), "reward vs NFE"),
        "calibrated_grid": png_markdown(grid, f"calibrated at {preset.calibration_steps} steps"),
    })


def headline_table(evals, reward: str, default_steps: int, low_steps: int):
    """Baseline at the default NFE, baseline at the low NFE, calibrated at the low NFE, per reward."""
    import polars as pl

    pick = [
        ("baseline", default_steps, False),
        ("baseline", low_steps, False),
        ("calibrated", low_steps, True),
    ]
    parts = []
    for label, nfe, calibrated in pick:
        part = evals.filter((pl.col("nfe") == nfe) & (pl.col("calibrated") == calibrated))
        parts.append(part.select(pl.lit(f"{label} @ {nfe} steps").alias("setting"), "reward", "mean", "ci_low", "ci_high", "n"))
    return pl.concat(parts)


@dg.asset(partitions_def=PARTITIONS, group_name=GROUP, deps=[evaluation], kinds={"pytorch", "duckdb"})
def diversity(context: dg.AssetExecutionContext, config: CalibriConfig, catalog: CatalogResource,
              object_store: ObjectStoreResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Per-prompt diversity over seeds (1 - mean pairwise cosine similarity of image features; paper App. B)."""
    import numpy as np
    import polars as pl
    import torch

    from calibri_pipeline.features import make_feature_extractor
    from calibri_pipeline.method.diversity import diversity_per_prompt

    model, reward, run_key = partition(context)
    store, cat = object_store.store, catalog.catalog
    rows = cat.query("SELECT image_id, prompt_id, seed, steps, calibration, uri FROM images WHERE run_key = ? "
                     "ORDER BY calibration, steps, prompt_id, seed", [run_key])
    if rows.height == 0:
        raise dg.Failure(f"no images for {run_key}")
    extractor = make_feature_extractor("efficientnet-lite0")
    out = []
    for (tag, steps), group in rows.group_by(["calibration", "steps"], maintain_order=True):
        images = torch.stack([
            torch.from_numpy(np.asarray(store.get_png(store.key_of(u)).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
            for u in group["uri"]
        ])
        feats = extractor(images)
        per_prompt = diversity_per_prompt(feats, list(group["prompt_id"]))
        counts = group.group_by("prompt_id").len()
        n_by_prompt = dict(zip(counts["prompt_id"], counts["len"]))
        out += [dict(model=model, calibrated=tag != "baseline", calibration=tag, nfe=int(steps), prompt_id=pid,
                     diversity=float(d), n_seeds=int(n_by_prompt[pid])) for pid, d in per_prompt.items()]
    df = pl.DataFrame(out)
    cat.replace("diversity", df, {"run_key": run_key})
    summary = df.group_by("calibration", "nfe").agg(pl.col("diversity").mean().alias("mean_diversity"), pl.len().alias("prompts")).sort("calibration", "nfe")
    return dg.MaterializeResult(metadata={"rows": df.height, "summary": table_md(summary),
                                          "features": "EfficientNet-Lite0 (ImageNet), pooled"})


@dg.asset_check(asset=diversity, description="calibration did not collapse diversity (>= 50% of the baseline at the same NFE)")
def diversity_not_collapsed(context: dg.AssetCheckExecutionContext, catalog: CatalogResource) -> dg.AssetCheckResult:
    df = catalog.catalog.query(
        "SELECT c.run_key, c.nfe, avg(c.diversity) AS calibrated, "
        "(SELECT avg(b.diversity) FROM diversity b WHERE b.run_key = c.run_key AND b.nfe = c.nfe AND NOT b.calibrated) AS baseline "
        "FROM diversity c WHERE c.calibrated GROUP BY c.run_key, c.nfe"
    )
    if df.height == 0:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "no calibrated diversity rows"})
    bad = df.filter(df["calibrated"] < 0.5 * df["baseline"])
    return dg.AssetCheckResult(passed=bad.height == 0, metadata={"pairs": df.height, "collapsed": bad.height,
                                                                 "table": table_md(df)})


@dg.asset(partitions_def=PARTITIONS, group_name=GROUP, deps=[calibration], kinds={"pytorch", "safetensors"})
def calibrated_checkpoint(context: dg.AssetExecutionContext, catalog: CatalogResource, object_store: ObjectStoreResource,
                          compute: ComputeResource) -> dg.MaterializeResult:
    """The calibration baked into the transformer weights; stock diffusers ``from_pretrained`` loads it."""
    from calibri_pipeline.method.export import export_calibrated

    model, reward, run_key = partition(context)
    store, cat = object_store.store, catalog.catalog
    run = _load_calibration(cat, store, model, reward)
    backbone = _backbone(model, compute, store)
    prefix = f"checkpoints/{model}/{reward}"
    manifest = export_calibrated(backbone, run["granularity"], run["coefficients"], run["n_models"], store, prefix,
                                 extra={"run_id": run["run_id"], "reward": reward, "model": model})
    return dg.MaterializeResult(metadata={"uri": store.uri(prefix), "files": len(manifest["files"]),
                                          "members": dg.MetadataValue.json(manifest["members"])})




# ------------------------------------------------------------------------------------------------
# the paper's tables, across every partition
# ------------------------------------------------------------------------------------------------


@dg.asset(group_name=GROUP, deps=[evaluation, diversity], kinds={"duckdb"})
def paper_tables(context: dg.AssetExecutionContext, catalog: CatalogResource) -> dg.MaterializeResult:
    """Tables 2, 6 and 7 in the paper's layout over every calibrated partition (a reward-hacking view:
    calibrating for one reward, read every other one, including the exact scorer)."""
    tables = paper_tables_from_catalog(catalog.catalog)
    if not tables:
        raise dg.Failure("no finished calibration with an evaluation in the catalog yet")
    return dg.MaterializeResult(metadata={name: table_md(t, max_rows=60) for name, t in tables.items()})


#: the model x reward partitioned chain; paper_tables reads across all partitions
PARTITIONED_ASSETS = [prompts, prompt_embeddings, baseline_images, baseline_scores, block_ablation, scale_sweep,
                      calibration, evaluation, diversity, calibrated_checkpoint]
ALL_ASSETS = [*PARTITIONED_ASSETS, paper_tables]
ALL_CHECKS = [baseline_scores_are_finite, calibration_beats_baseline, diversity_not_collapsed]
