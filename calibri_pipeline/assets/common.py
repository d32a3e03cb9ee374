"""What every asset shares: partitions, the config, the stage context (preset, backbone, cache), metadata helpers."""

from __future__ import annotations

import base64
import inspect
import io
import json
import time
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Sequence

import dagster as dg
from pydantic import Field, create_model

from calibri_pipeline.presets import DEFAULT_PRESET, Preset, default_preset_for_model, get_preset
from calibri_pipeline.resources import GPU_POOL, CatalogResource, ComputeResource, ObjectStoreResource, RayResource
from calibri_pipeline.rewards.names import OPTIMISABLE_REWARDS

if TYPE_CHECKING:
    import polars as pl

    from calibri_pipeline.prompts.base import Prompt
    from calibri_pipeline.storage.catalog import Catalog

#: rewards a calibration can optimise: the keys a ``reward`` partition may have (checked by `partition`)
REWARD_KEYS = list(OPTIMISABLE_REWARDS)

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
        raise ValueError(
            f"unknown reward partition {reward!r}; a calibration optimises one of {', '.join(REWARD_KEYS)}"
        )
    return reward


def partition(context: dg.AssetExecutionContext) -> tuple[str, str, str]:
    """(model, reward, run_key) of the running partition; run_key tags every catalog row.

    Both keys are validated here, at the top of every asset, so a bad partition fails before
    anything is written."""
    from calibri_pipeline.models import check_model_key

    keys = context.partition_key.keys_by_dimension
    model, reward = check_model_key(keys["model"]), check_reward_key(keys["reward"])
    return model, reward, f"{model}|{reward}"


def check_run_key(context: dg.AssetCheckExecutionContext) -> str:
    """The run_key of the one model x reward partition an asset check runs for."""
    if not context.has_partition_key:
        raise dg.Failure("this check runs on one model x reward partition; run it with its asset's partition")
    keys = context.partition_key.keys_by_dimension
    return f"{keys['model']}|{keys['reward']}"


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


def table_md(df: pl.DataFrame, digits: int = 4, max_rows: int = 40) -> dg.MetadataValue:
    from calibri_pipeline.method.analysis import table_markdown

    return dg.MetadataValue.md(table_markdown(df.head(max_rows), digits=digits))


def load_prompt_set(catalog: Catalog, run_key: str, split: str | None = None) -> list[Prompt]:
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


def latest_calibration(catalog: Catalog, model: str, reward: str) -> dict[str, Any] | None:
    df = catalog.query(
        "SELECT * FROM calibration_runs WHERE model = ? AND reward = ? AND status = 'finished' "
        "ORDER BY ended_at DESC LIMIT 1",
        [model, reward],
    )
    return None if df.height == 0 else df.row(0, named=True)


# ------------------------------------------------------------------------------------------------
# the config every asset takes, and the per-step context built from it
# ------------------------------------------------------------------------------------------------

GROUP = "calibri"


def _optional(annotation: Any) -> Any:
    """A preset field's type as an optional run-config type (tuples become lists: the launchpad edits YAML)."""
    import types
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return list[args[0]] | None
    if origin in (typing.Union, types.UnionType):
        return _optional(args[0]) if len(args) == 1 else annotation | None
    return annotation | None


def _run_config_fields() -> dict[str, Any]:
    """One optional run-config field per overridable preset field (and the search's, by their names)."""
    import dataclasses
    import typing

    from calibri_pipeline.method.search_config import SearchConfig
    from calibri_pipeline.presets import PRESET_OVERRIDES, SEARCH_OVERRIDES

    out: dict[str, Any] = {}
    for cls, names, where in ((Preset, PRESET_OVERRIDES, "preset"), (SearchConfig, SEARCH_OVERRIDES, "search")):
        hints = typing.get_type_hints(cls)
        docs = {f.name: f.metadata.get("doc") for f in dataclasses.fields(cls)}
        for name in names:
            if hasattr(dg.Config, name):  # `validate` is pydantic's: set it through a preset or `--set`
                continue
            description = docs[name] or f"the {where}'s {name}"
            out[name] = (_optional(hints[name]), Field(default=None, description=description))
    return out


#: options shared by every asset: generated from the preset's fields (calibri_pipeline/presets.py) and
#: the search's, so no field is written twice; empty fields take the preset's value
CalibriConfig = create_model(
    "CalibriConfig",
    __base__=dg.Config,
    __doc__="Options shared by every asset; empty fields take the preset's value (calibri_pipeline/presets.py).",
    preset=(str | None, Field(default=None, description="preset name (default: by model kind, see presets.py)")),
    llm_rewrite=(
        bool,
        Field(default=False, description="rewrite world prompts with the LLM (checked against their specs)"),
    ),
    warm_start_from=(
        str | None,
        Field(default=None, description="model key whose latest calibration seeds CMA-ES"),
    ),
    **_run_config_fields(),
)


class Stage:
    """One asset step's context: its partition, preset, backbone (loaded once per process), image
    cache, and evaluators over them; what every asset needs before its one call into the core."""

    def __init__(self, context, config: CalibriConfig | None, catalog, object_store, compute=None) -> None:
        self.context = context
        self.config = config
        self.model, self.reward, self.run_key = partition(context)
        self.store = object_store.store
        self.catalog = catalog.catalog
        self.compute = compute
        fields = {} if config is None else config.model_dump(exclude={"preset", "llm_rewrite", "warm_start_from"})
        self.preset = resolve_preset(self.model, None if config is None else config.preset, self.store, **fields)
        self.started = time.perf_counter()

    def log(self, message: str) -> None:
        self.context.log.info(message)

    @cached_property
    def backbone(self):
        from calibri_pipeline.models import load_model

        if self.compute is None:
            raise RuntimeError("this asset did not ask for the compute resource")
        backbone = load_model(self.model, self.store, device=str(self.compute.torch_device()), dtype=self.compute.dtype)
        warm_text_cache(backbone, self.store, self.model, self.reward)
        return backbone

    @cached_property
    def image_cache(self):
        from calibri_pipeline.storage.image_cache import StoredImageCache

        return StoredImageCache(self.store, self.catalog, self.model)

    def prompts(self, split: str | None = None) -> list[Prompt]:
        return load_prompt_set(self.catalog, self.run_key, split)

    def rewards(self, names: Sequence[str]) -> list:
        from calibri_pipeline.rewards.registry import make_reward

        return [make_reward(n) for n in dict.fromkeys(names)]

    @property
    def eval_reward_names(self) -> list[str]:
        return list(dict.fromkeys([self.reward, *self.preset.eval_rewards]))

    def space(self, granularity: str | None = None):
        from calibri_pipeline.method.space import CalibrationSpace

        return CalibrationSpace.from_transformer(self.backbone.transformer, granularity or self.preset.granularity)

    def search(self, granularity: str | None = None, n_models: int = 1):
        from calibri_pipeline.method.space import SearchSpace

        return SearchSpace.for_model(self.space(granularity), n_models, uses_cfg=bool(self.backbone.uses_cfg))

    def evaluator(self, search, rewards, *, steps: int | None = None, guidance: float | None = None):
        """An in-process evaluator reading and writing the pipeline's image cache, with a progress bar."""
        from calibri_pipeline.method.population import LocalEvaluator
        from calibri_pipeline.method.sampler import SamplingSettings

        sampling = SamplingSettings(steps=steps, guidance=guidance, max_batch=self.preset.max_batch)
        return LocalEvaluator(
            self.backbone, search, rewards, sampling, cache=self.image_cache, model=self.model, progress=True
        )

    def summary(self, what: str, evaluator=None) -> str:
        """One line for the run log: what was done, how many images were made vs read, how long."""
        line = f"{what} in {time.perf_counter() - self.started:.0f} s"
        if evaluator is not None:
            st = evaluator.stats
            line += f" ({st.images} images: {st.generated} sampled, {st.cached} from the image cache)"
        self.log(line)
        return line


#: the resources a stage asset may ask for, by parameter name
STAGE_RESOURCES = {
    "catalog": CatalogResource,
    "object_store": ObjectStoreResource,
    "compute": ComputeResource,
    "ray": RayResource,
}


def stage_asset(
    *,
    kinds: set[str],
    deps: Sequence[Any] = (),
    gpu: bool = False,
    config: bool = True,
    resources: Sequence[str] = ("catalog", "object_store", "compute"),
):
    """A partitioned asset whose body takes its :class:`Stage` (and ``ray=`` when it asks for that
    resource): the partitions, group, run config, resources and stage set-up are written here once.
    ``gpu``: runs in the GPU pool (one at a time per GPU); ``config``: takes the shared run config."""

    def decorate(body: Callable[..., dg.MaterializeResult]) -> dg.AssetsDefinition:
        def compute_fn(context, config=None, **given):
            stage = Stage(context, config, given["catalog"], given["object_store"], given.get("compute"))
            return body(stage, **({"ray": given["ray"]} if "ray" in given else {}))

        # Dagster reads the resources and the config a compute function takes from its signature
        P = inspect.Parameter
        params = [P("context", P.POSITIONAL_OR_KEYWORD, annotation=dg.AssetExecutionContext)]
        if config:
            params.append(P("config", P.POSITIONAL_OR_KEYWORD, annotation=CalibriConfig))
        params += [P(name, P.KEYWORD_ONLY, annotation=STAGE_RESOURCES[name]) for name in resources]
        compute_fn.__signature__ = inspect.Signature(params, return_annotation=dg.MaterializeResult)
        compute_fn.__annotations__ = {p.name: p.annotation for p in params} | {"return": dg.MaterializeResult}
        compute_fn.__name__ = compute_fn.__qualname__ = body.__name__
        compute_fn.__module__, compute_fn.__doc__ = body.__module__, body.__doc__
        return dg.asset(
            name=body.__name__,
            partitions_def=PARTITIONS,
            group_name=GROUP,
            deps=list(deps),
            kinds=kinds,
            pool=GPU_POOL if gpu else None,
            description=inspect.cleandoc(body.__doc__ or "") or None,
        )(compute_fn)

    return decorate


def warm_text_cache(backbone, store, model: str, reward: str) -> None:
    """Fill the backbone's text cache from the prompt_embeddings asset, when it was materialized."""
    encoder = getattr(backbone, "text_encoder", None)
    key = f"embeddings/{model}/{reward}.safetensors"
    if encoder is None or not hasattr(encoder, "import_cache") or not store.exists(key):
        return
    texts = json.loads(store.get_safetensors_metadata(key)["texts"])
    encoder.import_cache(texts, store.get_safetensors(key))


def cells(prompts: Sequence[Prompt], seeds: Sequence[int]) -> tuple[list[Prompt], list[int]]:
    """Every (prompt, seed) pair, prompt-major: what the analyses call cells."""
    return [p for p in prompts for _ in seeds], [int(s) for _ in prompts for s in seeds]


def image_rows(stage: Stage, cell_prompts, cell_seeds, keys: Sequence[str], *, steps: int, guidance, calibration: str):
    """``images`` rows for cached images, one per cell (keys from an Evaluation)."""
    import polars as pl

    rows = []
    for p, seed, key in zip(cell_prompts, cell_seeds, keys):
        uri = stage.image_cache.uri(key)
        if uri is None:
            raise RuntimeError(f"image {key} is not in the image cache (was the evaluator asked to store it?)")
        rows.append(
            dict(
                image_id=key,
                run_key=stage.run_key,
                model=stage.model,
                prompt_id=p.prompt_id,
                seed=int(seed),
                steps=int(steps),
                guidance=None if guidance is None else float(guidance),
                calibration=calibration,
                uri=uri,
            )
        )
    return pl.DataFrame(rows, schema_overrides={"guidance": pl.Float64})


def grid_of(images, prompts, n: int = 16, stride: int = 1) -> bytes:
    """A captioned grid of the first ``n`` cells (one seed per prompt with ``stride`` = seeds)."""
    picked = images[: n * stride][::stride]
    return image_grid_png(picked, [p.text for p in prompts[:n]])
