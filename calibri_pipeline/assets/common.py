"""Small helpers shared by the assets: partitions, presets, markdown pictures, prompt sets."""

from __future__ import annotations

import base64
import io
import json
from typing import TYPE_CHECKING, Any, Sequence

import dagster as dg

from calibri_pipeline.presets import DEFAULT_PRESET, Preset, default_preset_for_model, get_preset

if TYPE_CHECKING:
    import polars as pl

    from calibri_pipeline.prompts.base import Prompt
    from calibri_pipeline.storage.catalog import Catalog

#: rewards a calibration can optimise: the keys a ``reward`` partition may have (checked by `partition`)
REWARD_KEYS = ["world_score", "world_alignment", "world_quality", "hpsv3", "pickscore", "imagereward", "qalign", "clipscore"]

MODEL_PARTITIONS = dg.DynamicPartitionsDefinition(name="model")
# Rewards are dynamic too, not a static list of REWARD_KEYS: with a static dimension every model
# has 8 reward partitions, so a demo that calibrates one reward shows "1 of 8" and the grey
# "not materialized" mark in the lineage view. Only rewards actually used exist as partitions
# (the demo adds its reward, the checkpoint sensor the one it recalibrates for); REWARD_KEYS
# stays the list they are validated against.
REWARD_PARTITIONS = dg.DynamicPartitionsDefinition(name="reward")
PARTITIONS = dg.MultiPartitionsDefinition({"model": MODEL_PARTITIONS, "reward": REWARD_PARTITIONS})


def check_reward_key(reward: str) -> str:
    """``reward`` if a calibration can optimise it (a REWARD_KEYS entry), else a ValueError."""
    if reward not in REWARD_KEYS:
        raise ValueError(f"unknown reward partition {reward!r}; a calibration optimises one of {', '.join(REWARD_KEYS)}")
    return reward


def partition(context: dg.AssetExecutionContext) -> tuple[str, str, str]:
    """(model, reward, run_key) of the running partition; run_key tags every catalog row.

    Both keys are validated here, at the top of every asset, so a bad partition fails before
    anything is written."""
    from calibri_pipeline.models import check_model_key

    keys = context.partition_key.keys_by_dimension
    model, reward = check_model_key(keys["model"]), check_reward_key(keys["reward"])
    return model, reward, f"{model}|{reward}"


def resolve_preset(model: str, name: str | None, store=None, **overrides: Any) -> Preset:
    """The preset named in the config, else the first one for the model's kind."""
    from calibri_pipeline.models import model_spec

    if name:
        preset = get_preset(name)
    else:
        kind = model_spec(model, store)["kind"]
        preset = get_preset(DEFAULT_PRESET) if kind == "toy" else default_preset_for_model(kind)
    return preset.with_overrides(**overrides)


def png_markdown(png: bytes, alt: str = "plot") -> dg.MetadataValue:
    """A PNG shown inline in the Dagster UI (markdown with a base64 data URI)."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def image_grid_png(images, captions: Sequence[str], ncols: int = 8) -> bytes:
    from calibri_pipeline.viz import image_grid

    img = image_grid(images, captions, ncols=ncols)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def table_md(df: "pl.DataFrame", digits: int = 4, max_rows: int = 40) -> dg.MetadataValue:
    from calibri_pipeline.method.analysis import table_markdown

    return dg.MetadataValue.md(table_markdown(df.head(max_rows), digits=digits))


def load_prompt_set(catalog: "Catalog", run_key: str, split: str | None = None) -> list["Prompt"]:
    from calibri_pipeline.prompts.base import Prompt

    sql = "SELECT text, spec, category, source, split, meta FROM prompts WHERE prompt_set = ?"
    params: list[Any] = [run_key]
    if split is not None:
        sql += " AND split = ?"
        params.append(split)
    df = catalog.query(sql + " ORDER BY split, prompt_id", params)
    if df.height == 0:
        raise dg.Failure(f"no {split or ''} prompts for {run_key}: materialize `prompts` for this partition first")
    out = []
    for row in df.iter_rows(named=True):
        spec = json.loads(row["spec"]) if isinstance(row["spec"], str) else row["spec"]
        meta = json.loads(row["meta"]) if isinstance(row["meta"], str) else (row["meta"] or {})
        out.append(Prompt(row["text"], spec, row["category"], row["source"], row["split"], meta))
    return out


def latest_calibration(catalog: "Catalog", model: str, reward: str) -> dict[str, Any] | None:
    df = catalog.query(
        "SELECT * FROM calibration_runs WHERE model = ? AND reward = ? AND status = 'finished' "
        "ORDER BY ended_at DESC LIMIT 1",
        [model, reward],
    )
    return None if df.height == 0 else df.row(0, named=True)
