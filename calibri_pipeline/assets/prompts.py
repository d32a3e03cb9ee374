"""Stage 1: the prompt set and its text embeddings."""

import json
import time

import dagster as dg

from calibri_pipeline.assets.common import Stage, stage_asset, table_md


@stage_asset(kinds={"python", "duckdb"}, resources=("catalog", "object_store"))
def prompts(stage: Stage) -> dg.MaterializeResult:
    """Train / val / test prompts: the embedded world's grammar (optionally LLM-rewritten) or a prompt file."""
    import polars as pl

    from calibri_pipeline.prompt_sets import build_prompt_set

    prompt_list = build_prompt_set(stage.preset, llm_rewrite=stage.config.llm_rewrite, log=stage.log)
    # specs go in as JSON text: a polars struct column would unify keys across rows (adding nulls)
    rows = [
        dict(p.to_dict(), prompt_set=stage.run_key, spec=json.dumps(p.spec), meta=json.dumps(p.meta))
        for p in prompt_list
    ]
    df = pl.DataFrame(rows, schema_overrides={"spec": pl.String, "meta": pl.String})
    stage.catalog.replace("prompts", df, {"prompt_set": stage.run_key})
    summary = df.group_by("split", "category").len().sort("split", "category")
    stage.summary(
        f"prompts: {len(prompt_list)} ({', '.join(f'{s} {n}' for s, n in df.group_by('split').len().sort('split').iter_rows())})"
    )
    return dg.MaterializeResult(
        metadata={
            "rows": len(prompt_list),
            "preset": stage.preset.name,
            "source": stage.preset.prompt_source,
            "by_split_and_category": table_md(summary),
            "examples": dg.MetadataValue.md("\n".join(f"- {p.text}" for p in prompt_list[:8])),
        }
    )


@stage_asset(deps=[prompts], kinds={"pytorch", "safetensors"})
def prompt_embeddings(stage: Stage) -> dg.MaterializeResult:
    """Text-encoder states of every prompt, computed once and cached in the object store (safetensors)."""
    texts = sorted({p.text for p in stage.prompts()} | {""})
    encoder = getattr(stage.backbone, "text_encoder", None)
    t0 = time.perf_counter()
    if encoder is None or not hasattr(encoder, "export_cache"):
        stage.log(f"{stage.model}: its backbone encodes prompts itself (in-memory cache); nothing to persist")
        return dg.MaterializeResult(metadata={"prompts": len(texts), "persisted": False})
    encoder.precompute(texts, progress=False)
    tensors = encoder.export_cache(texts)
    key = f"embeddings/{stage.model}/{stage.reward}.safetensors"
    uri = stage.store.put_safetensors(key, tensors, metadata={"texts": json.dumps(texts)})
    stage.summary(f"prompt_embeddings: {len(texts)} texts encoded")
    return dg.MaterializeResult(
        metadata={"prompts": len(texts), "uri": uri, "seconds": round(time.perf_counter() - t0, 2), "persisted": True}
    )
