"""The bad-input table: each bad input gives a clear error AND leaves nothing half-written.

Every case runs against the same small world: a local object store holding one object, a catalog
holding rows of a `prompts` partition, and (for the cases that need a model) a tiny random-init toy
DiT. Before and after the bad call, every file under the test's directory is hashed (temp files
included) and every catalog table's rows are hashed: both must be unchanged.

``python tests/test_bad_inputs.py`` prints the table as markdown (the bad-input table in docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from pydantic import ValidationError

from calibri_pipeline.demo import DemoUsageError
from calibri_pipeline.method.space import CalibrationError
from calibri_pipeline.prompts.loaders import PromptFileError
from calibri_pipeline.rewards.base import RewardError
from calibri_pipeline.storage.object_store import ObjectStoreError

CATALOG_FILES = ("catalog.duckdb", "catalog.duckdb.wal", "catalog.duckdb.lock", "catalog.duckdb.lock-queue")
PARTITION = "toy|world_score"


# ------------------------------------------------------------------------------------------------
# The world each case runs in
# ------------------------------------------------------------------------------------------------


class World:
    def __init__(self, root: Path) -> None:
        import polars as pl

        from calibri_pipeline.storage.catalog import Catalog
        from calibri_pipeline.storage.object_store import ObjectStore

        self.root = root
        self.store_dir = root / "objects"
        self.store = ObjectStore(self.store_dir)
        self.store.put_json("models/existing.json", {"kind": "toy", "path": None})
        self.catalog_path = root / "catalog.duckdb"
        self.catalog = Catalog(self.catalog_path, lock_timeout=30)
        rows = pl.DataFrame(
            {
                "prompt_id": ["p1", "p2"],
                "text": ["a red cube", "a blue ball"],
                "source": ["test"] * 2,
                "split": ["train", "test"],
            }
        )
        self.catalog.replace("prompts", rows, {"prompt_set": PARTITION})

    def snapshot(self) -> dict[str, Any]:
        files = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and path.name not in CATALOG_FILES:
                files[str(path.relative_to(self.root))] = hashlib.sha1(path.read_bytes()).hexdigest()
        tables = {}
        for table in self.catalog.tables():
            df = self.catalog.query(f'SELECT * FROM "{table}"')
            rows = sorted(repr(row) for row in df.rows())
            tables[table] = (df.height, hashlib.sha1("\n".join(rows).encode()).hexdigest())
        return {"files": files, "tables": tables}


_TINY: dict[str, Any] = {}


def tiny_backbone():
    """A tiny random-init toy DiT (the real FluxTransformer2DModel class, real MiniLM), built once."""
    if "backbone" not in _TINY:
        from calibri_pipeline.backbones.toy import ToyBackbone
        from calibri_pipeline.text_encoder import MiniLMTextEncoder

        from tiny_models import tiny_toy_transformer

        config, transformer = tiny_toy_transformer(1)
        _TINY["backbone"] = ToyBackbone(
            transformer,
            config,
            MiniLMTextEncoder(max_length=8),
            default_steps=1,
            default_guidance=2.0,
        )
    return _TINY["backbone"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# The cases
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    bad_input: str
    run: Callable[[World], Any]
    error: type[BaseException] | tuple[type[BaseException], ...]
    match: str
    guarantee: str


def _materialize_prompts(world: World, model: str = "toy", reward: str = "world_score", **config: Any) -> None:
    """The `prompts` asset of one partition, with the tiny demo config plus ``config``."""
    import dagster as dg

    from calibri_pipeline.assets.automation import _asset_config
    from calibri_pipeline.assets.prompts import prompts
    from calibri_pipeline.demo import SIZES
    from calibri_pipeline.resources import CatalogResource, ObjectStoreResource

    fields = {**SIZES["tiny"], "preset": "embedded-default", **config}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("model", [model])
        instance.add_dynamic_partitions("reward", [reward])
        dg.materialize(
            [prompts],
            partition_key=dg.MultiPartitionKey({"model": model, "reward": reward}),
            instance=instance,
            resources={
                "catalog": CatalogResource(path=str(world.catalog_path)),
                "object_store": ObjectStoreResource(url=str(world.store_dir)),
            },
            run_config=_asset_config([prompts], **{k: v for k, v in fields.items() if v is not None}),
        )


def _unknown_backbone(world: World) -> None:
    from calibri_pipeline.backbones.registry import load_backbone

    load_backbone("flux-pro-ultra")


def _unknown_model_key(world: World) -> None:
    from calibri_pipeline.models import model_spec

    model_spec("sdxl", world.store)


def _unknown_model_partition(world: World) -> None:
    _materialize_prompts(world, model="sdxl", preset=None)  # the preset then comes from the model's kind


def _unknown_reward_partition(world: World) -> None:
    _materialize_prompts(world, reward="hpsv4")  # a dynamic partition anyone can add; not a known reward


def _demo_args(*argv: str, home: str | None = None) -> Callable[[World], None]:
    """`calibri demo <argv> --home <home>`, up to the point where `main` would create the home."""

    def run(world: World) -> None:
        from calibri_pipeline.demo import DemoUsageError, parse_args

        target = world.root / (home or "home")
        existed = target.exists()
        try:
            parse_args([*argv, "--home", str(target)])
        except DemoUsageError:
            assert existed or not target.exists(), f"{target} was created"
            raise

    return run


def _missing_checkpoint(world: World) -> None:
    from calibri_pipeline.backbones.registry import load_backbone

    load_backbone(str(world.root / "checkpoints" / "step-9999"))


def _missing_toy_checkpoint(world: World) -> None:
    from calibri_pipeline.backbones.toy import load_toy_backbone

    load_toy_backbone(world.root / "no-such-toy")


def _truncated_safetensors(world: World) -> None:
    from calibri_pipeline.backbones.toy import default_weights_dir, load_toy_backbone

    ckpt = world.root / "ckpt"
    ckpt.mkdir()
    shutil.copy(default_weights_dir() / "config.json", ckpt / "config.json")
    data = (default_weights_dir() / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])  # a copy that was cut off
    world.before = world.snapshot()
    load_toy_backbone(ckpt)


def _unet_checkpoint(world: World) -> None:
    from calibri_pipeline.backbones.registry import load_backbone

    folder = world.root / "sd15"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    world.before = world.snapshot()
    load_backbone(str(folder))


def _empty_prompt_file(world: World) -> None:
    from calibri_pipeline.prompts.loaders import load_prompts

    path = world.root / "prompts.txt"
    path.write_text("\n   \n")
    world.before = world.snapshot()  # the prompt file is the input, not something written by the call
    load_prompts(path)


def _malformed_jsonl(world: World) -> None:
    from calibri_pipeline.prompts.loaders import load_prompts

    path = world.root / "prompts.jsonl"
    path.write_text('{"text": "a red cube"}\n{"text": "a blue ball",\n{"text": "a star"}\n')
    world.before = world.snapshot()
    load_prompts(path)


def _reward_with(value: float) -> Callable[[World], None]:
    def run(world: World) -> None:
        from calibri_pipeline.method.calibrate import CalibrationOptions, calibrate
        from calibri_pipeline.method.sampler import SamplingSettings
        from calibri_pipeline.method.search_config import SearchConfig
        from calibri_pipeline.method.space import CalibrationSpace, SearchSpace
        from calibri_pipeline.method.state_store import LocalStateStore
        from calibri_pipeline.prompts.base import Prompt

        class Broken:
            name, higher_is_better, scale = "broken", True, None

            def __call__(self, images, prompts):
                scores = images.mean(dim=(1, 2, 3))
                scores[1] = value
                return scores

        backbone = tiny_backbone()
        space = CalibrationSpace.from_transformer(backbone.transformer, "block")
        train = [Prompt(f"a red cube #{i}") for i in range(4)]
        calibrate(
            backbone,
            SearchSpace.for_model(space, 1, uses_cfg=backbone.uses_cfg),
            train,
            [Prompt("a blue ball")],
            Broken(),
            SamplingSettings(steps=1),
            CalibrationOptions(
                config=SearchConfig(max_generations=2, bucket_size=4, popsize=3),
                store=LocalStateStore(world.root / "state"),
                run_name="broken",
            ),
        )

    return run


def _reward_server_down(world: World) -> None:
    from calibri_pipeline.rewards.client import HTTPReward

    HTTPReward(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.0, timeout=5)


def _reward_url_with_password(world: World) -> None:
    from calibri_pipeline.rewards.registry import make_reward

    make_reward("http://scorer:hunter2@127.0.0.1:8123")


def _s3_without_credentials(world: World) -> None:
    import os

    from calibri_pipeline.storage.object_store import ObjectStore

    saved = {k: os.environ.pop(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if k in os.environ}
    try:
        ObjectStore("s3://calibri-bucket/runs")
    finally:
        os.environ.update(saved)


def _unknown_granularity(world: World) -> None:
    from calibri_pipeline.method.space import CalibrationSpace

    CalibrationSpace.from_transformer(tiny_backbone().transformer, "blocks")


def _export_wrong_length(world: World) -> None:
    from calibri_pipeline.method.export import export_calibrated

    export_calibrated(tiny_backbone(), "block", [1.0, 1.0], 1, world.store, "checkpoints/toy/world_score")


def _apply_wrong_length(world: World) -> None:
    import torch

    from calibri_pipeline.method.space import CalibrationSpace

    backbone = tiny_backbone()
    space = CalibrationSpace.from_transformer(backbone.transformer, "gate")
    with space.apply(backbone.transformer, torch.ones(space.size + 1)):
        pass


def _traversal_model_key(world: World) -> None:
    from calibri_pipeline.models import register_model

    register_model(world.store, "../../etc/passwd", "toy", "/tmp/x")


def _traversal_object_key(world: World) -> None:
    world.store.put_bytes("images/../../outside.png", b"x")


def _unknown_preset(world: World) -> None:
    _materialize_prompts(world, preset="flux-turbo")


def _negative_n_train(world: World) -> None:
    _materialize_prompts(world, n_train=-5)


def _unknown_reward(world: World) -> None:
    from calibri_pipeline.rewards.registry import make_reward

    make_reward("hpsv4")


def _sql_write(world: World) -> None:
    from calibri_pipeline.sql_cli import run_sql

    run_sql(world.catalog_path, "DELETE FROM prompts")


def _sql_write_hidden_in_cte(world: World) -> None:
    from calibri_pipeline.sql_cli import run_sql

    run_sql(world.catalog_path, "SELECT 1; DROP TABLE prompts")


def _warm_start(values: list[float]) -> Callable[[World], None]:
    def run(world: World) -> None:
        from calibri_pipeline.method.calibrate import CalibrationOptions, calibrate
        from calibri_pipeline.method.sampler import SamplingSettings
        from calibri_pipeline.method.search_config import SearchConfig
        from calibri_pipeline.method.space import CalibrationSpace, SearchSpace
        from calibri_pipeline.method.state_store import LocalStateStore
        from calibri_pipeline.prompts.base import Prompt
        from calibri_pipeline.rewards.world import WorldQuality

        backbone = tiny_backbone()
        space = CalibrationSpace.from_transformer(backbone.transformer, "block")
        calibrate(
            backbone,
            SearchSpace.for_model(space, 1, uses_cfg=backbone.uses_cfg),
            [Prompt(f"p{i}") for i in range(4)],
            [Prompt("v")],
            WorldQuality(),
            SamplingSettings(steps=1),
            CalibrationOptions(
                warm_start=values,
                config=SearchConfig(max_generations=1, bucket_size=4, popsize=3),
                store=LocalStateStore(world.root / "state"),
            ),
        )

    return run


def _nan_png(world: World) -> None:
    import torch

    image = torch.rand(3, 8, 8)
    image[0, 0, 0] = math.nan
    world.store.put_png("images/toy/world_score/baseline/nfe4/p1_0.png", image)


def _nan_json(world: World) -> None:
    world.store.put_json("calibrations/toy/world_score/result.json", {"val_score": math.nan})


def _resume_other_settings(world: World) -> None:
    import numpy as np

    from calibri_pipeline.method.objective import PopulationScores
    from calibri_pipeline.method.search import CalibrationRun
    from calibri_pipeline.method.search_config import SearchConfig

    class Quadratic:
        n_train_items = 4

        def train(self, vectors, bucket):
            return PopulationScores(-((vectors - 0.5) ** 2).sum(1))

        validate = lambda self, vectors: PopulationScores(-((vectors - 0.5) ** 2).sum(1))  # noqa: E731

        def describe(self):
            return {"kind": "quadratic"}

    store = world.store.state_store("calibration-state/toy/world_score/block-n1")
    CalibrationRun(
        Quadratic(), np.ones(3), [-1.0] * 3, [2.0] * 3, SearchConfig(max_generations=2, bucket_size=4), store=store
    ).run()
    world.before = world.snapshot()  # the finished run is the state that must survive the bad resume
    CalibrationRun(
        Quadratic(),
        np.ones(3),
        [-1.0] * 3,
        [2.0] * 3,
        SearchConfig(max_generations=2, bucket_size=4, seed=9),
        store=store,
    ).run()


def _corrupt_model_spec(world: World) -> None:
    from calibri_pipeline.models import model_spec

    world.store.put_bytes("models/toy--broken.json", b'{"path": "/ckpt"}')
    world.before = world.snapshot()
    model_spec("toy--broken", world.store)


def _bad_ray_address(world: World) -> None:
    from calibri_pipeline.resources.ray import RayResource

    RayResource(address="ray://admin:hunter2@head:10001")


NOTHING_WRITTEN = "the call fails before it writes anything"
DEMO_CHECKED = (
    "checked in `main` before the home is set up (one stderr line, exit 2): no home, catalog, Dagster home "
    "or objects folder"
)
CASES: list[Case] = [
    Case(
        "unknown-backbone",
        '`load_backbone("flux-pro-ultra")`',
        _unknown_backbone,
        ValueError,
        r"unknown backbone 'flux-pro-ultra'; choose one of toy, flux, sd3, qwen-image",
        NOTHING_WRITTEN,
    ),
    Case(
        "unknown-model-key",
        "model key `sdxl` (not built in, no `models/sdxl.json`)",
        _unknown_model_key,
        ValueError,
        r"unknown model 'sdxl': built-in models are",
        NOTHING_WRITTEN,
    ),
    Case(
        "unknown-model-partition",
        "`prompts` asset materialized for model partition `sdxl`",
        _unknown_model_partition,
        ValueError,
        r"unknown model 'sdxl'",
        "the asset fails while resolving its preset, before `Catalog.replace`",
    ),
    Case(
        "missing-checkpoint",
        '`load_backbone("<dir>/checkpoints/step-9999")` (no such folder)',
        _missing_checkpoint,
        FileNotFoundError,
        r"checkpoint folder .*step-9999' does not exist",
        NOTHING_WRITTEN,
    ),
    Case(
        "missing-toy-checkpoint",
        '`load_toy_backbone("<dir>/no-such-toy")`',
        _missing_toy_checkpoint,
        FileNotFoundError,
        r"toy checkpoint directory .*no-such-toy does not exist",
        NOTHING_WRITTEN,
    ),
    Case(
        "truncated-safetensors",
        "toy checkpoint whose `model.safetensors` was cut in half",
        _truncated_safetensors,
        ValueError,
        r"model.safetensors are corrupt or unreadable",
        "loading only reads; the checkpoint folder is untouched",
    ),
    # (a UNet module handed to CalibrationSpace directly: tests/test_space.py::test_unet_gets_a_clear_error)
    Case(
        "non-dit-checkpoint",
        "a diffusers folder holding a `StableDiffusionPipeline` (UNet)",
        _unet_checkpoint,
        ValueError,
        r"holds a StableDiffusionPipeline; supported pipelines: FluxPipeline",
        NOTHING_WRITTEN,
    ),
    Case(
        "empty-prompt-file",
        "a prompt `.txt` with only blank lines",
        _empty_prompt_file,
        PromptFileError,
        r"prompts.txt: no prompts \(the file is empty or only blank lines\)",
        NOTHING_WRITTEN,
    ),
    Case(
        "malformed-jsonl",
        "a prompt `.jsonl` whose line 2 is not JSON",
        _malformed_jsonl,
        PromptFileError,
        r"prompts.jsonl:2: invalid JSON",
        NOTHING_WRITTEN,
    ),
    Case(
        "nan-reward",
        "a reward returning NaN during `calibrate(..., CalibrationOptions(store=...))`",
        _reward_with(math.nan),
        RewardError,
        r"reward 'broken' returned non-finite scores at images \[1\]",
        "the generation is saved only after it is scored: no state file, no manifest",
    ),
    Case(
        "inf-reward",
        "a reward returning +inf during `calibrate(..., CalibrationOptions(store=...))`",
        _reward_with(math.inf),
        RewardError,
        r"reward 'broken' returned non-finite scores at images \[1\]",
        "the generation is saved only after it is scored: no state file, no manifest",
    ),
    Case(
        "reward-server-down",
        '`HTTPReward("http://127.0.0.1:<closed port>")`',
        _reward_server_down,
        RewardError,
        r"failed after 2 attempt\(s\): cannot reach the server",
        NOTHING_WRITTEN,
    ),
    Case(
        "reward-url-with-password",
        '`make_reward("http://scorer:<password>@127.0.0.1:8123")`',
        _reward_url_with_password,
        ValueError,
        r"reward server url must not carry credentials",
        "refused before any request; the password is not echoed",
    ),
    Case(
        "s3-credentials-missing",
        '`ObjectStore("s3://calibri-bucket/runs")` without `AWS_*` keys',
        _s3_without_credentials,
        ObjectStoreError,
        r"S3 credentials missing: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY not set",
        "the store refuses to be built, so no step can start writing",
    ),
    Case(
        "unknown-granularity",
        "granularity `blocks`",
        _unknown_granularity,
        ValueError,
        r"unknown granularity 'blocks'; choose one of block, layer, gate",
        NOTHING_WRITTEN,
    ),
    Case(
        "export-wrong-length",
        "exporting 2 numbers for a model whose block vector needs 2 coefficients + 1 weight",
        _export_wrong_length,
        ValueError,
        r"Calibri vectors must have shape \[P, 3\] .* got \(1, 2\)",
        "the vector is split before any member is baked or uploaded",
    ),
    Case(
        "apply-wrong-length",
        "`space.apply(transformer, ones(size + 1))`",
        _apply_wrong_length,
        CalibrationError,
        r"expected 5 coefficients \(gate granularity of FluxTransformer2DModel\), got 6",
        "checked before any hook is registered",
    ),
    Case(
        "traversal-model-key",
        "checkpoint registered as model key `../../etc/passwd`",
        _traversal_model_key,
        ValueError,
        r"invalid model key '../../etc/passwd'",
        "the key is validated before `models/<key>.json` is written",
    ),
    Case(
        "traversal-object-key",
        "object key `images/../../outside.png`",
        _traversal_object_key,
        ValueError,
        r"path traversal and empty segments are not allowed",
        "keys are validated before any path is built",
    ),
    Case(
        "unknown-preset",
        "`prompts` asset with config `preset: flux-turbo`",
        _unknown_preset,
        ValueError,
        r"unknown preset 'flux-turbo'; choose one of embedded-default",
        "the asset fails before `Catalog.replace`",
    ),
    Case(
        "negative-n-train",
        "`prompts` asset with config `n_train: -5`",
        _negative_n_train,
        ValueError,
        r"n_train must be a non-negative int, got -5",
        "the asset fails before `Catalog.replace`",
    ),
    Case(
        "unknown-reward",
        "reward `hpsv4`",
        _unknown_reward,
        ValueError,
        r"unknown reward 'hpsv4'; known rewards: world_score",
        NOTHING_WRITTEN,
    ),
    Case(
        "sql-write",
        '`calibri sql "DELETE FROM prompts"`',
        _sql_write,
        ValueError,
        r"the catalog is read-only here: DELETE statements are refused",
        "refused before the catalog is opened",
    ),
    Case(
        "sql-two-statements",
        '`calibri sql "SELECT 1; DROP TABLE prompts"`',
        _sql_write_hidden_in_cte,
        ValueError,
        r"give exactly one SQL statement, got 2",
        "refused before the catalog is opened",
    ),
    Case(
        "warm-start-wrong-length",
        "`calibrate(..., CalibrationOptions(warm_start=[1, 1, 1, 1]))` for a 2-block model",
        _warm_start([1.0] * 4),
        ValueError,
        r"warm_start must have 3 entries .* or 2 \(one model's coefficients\), got 4",
        NOTHING_WRITTEN,
    ),
    Case(
        "warm-start-nan",
        "`calibrate(..., CalibrationOptions(warm_start=[nan, 1]))`",
        _warm_start([math.nan, 1.0]),
        ValueError,
        r"x0 contains NaN or infinite values",
        NOTHING_WRITTEN,
    ),
    Case(
        "nan-image",
        "an image tensor with a NaN pixel to `ObjectStore.put_png`",
        _nan_png,
        ValueError,
        r"image contains NaN or infinite pixels",
        "converted and checked in memory before the atomic write",
    ),
    Case(
        "nan-json",
        "`put_json` of a value holding NaN",
        _nan_json,
        ValueError,
        r"value contains NaN or infinity, which JSON cannot hold",
        "serialised in memory before the atomic write",
    ),
    Case(
        "resume-other-settings",
        "resuming a stored CMA-ES run with a different seed",
        _resume_other_settings,
        ValueError,
        r"already holds a run named 'calibration' with different settings \(config.seed\)",
        "the stored state is compared before anything is saved; the finished run stays as it was",
    ),
    Case(
        "corrupt-model-spec",
        "`models/<key>.json` without a `kind`",
        _corrupt_model_spec,
        ValueError,
        r"model spec models/toy--broken.json is malformed \(no 'kind'\)",
        "only reads the spec",
    ),
    Case(
        "credentials-in-ray-address",
        '`RayResource(address="ray://admin:hunter2@head:10001")`',
        _bad_ray_address,
        ValidationError,
        r"must not carry credentials",
        NOTHING_WRITTEN,
    ),
    Case(
        "demo-unknown-preset",
        "`calibri demo --preset flux-turbo`",
        _demo_args("--preset", "flux-turbo"),
        DemoUsageError,
        r"unknown preset 'flux-turbo'; the demo runs one of embedded-default, embedded-4-steps, embedded-gate-cfg, embedded-2-steps",
        DEMO_CHECKED,
    ),
    Case(
        "demo-preset-for-another-model",
        "`calibri demo --preset flux-block-hpsv3`",
        _demo_args("--preset", "flux-block-hpsv3"),
        DemoUsageError,
        r"preset 'flux-block-hpsv3' is for model 'flux', the demo runs model 'toy'",
        DEMO_CHECKED,
    ),
    Case(
        "demo-unknown-reward",
        "`calibri demo --reward hpsv4`",
        _demo_args("--reward", "hpsv4"),
        DemoUsageError,
        r"unknown reward 'hpsv4' for the demo .*choose one of world_score, world_alignment, world_quality",
        DEMO_CHECKED,
    ),
    Case(
        "demo-unknown-size",
        "`calibri demo --size huge`",
        _demo_args("--size", "huge"),
        DemoUsageError,
        r"unknown size 'huge'; choose one of default, small, tiny",
        DEMO_CHECKED,
    ),
    Case(
        "demo-home-is-a-file",
        "`calibri demo --home <an existing file>`",
        _demo_args(home="objects/models/existing.json"),
        DemoUsageError,
        r"--home .*existing.json is a file, not a directory",
        DEMO_CHECKED,
    ),
    Case(
        "demo-home-under-a-file",
        "`calibri demo --home <an existing file>/home`",
        _demo_args(home="objects/models/existing.json/home"),
        DemoUsageError,
        r"--home .*existing.json/home cannot be created: .*existing.json is a file",
        DEMO_CHECKED,
    ),
    Case(
        "unknown-reward-partition",
        "`prompts` asset materialized for reward partition `hpsv4`",
        _unknown_reward_partition,
        ValueError,
        r"unknown reward partition 'hpsv4'; a calibration optimises one of world_score",
        "the asset fails while reading its partition keys, before `Catalog.replace`",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_a_clear_error_and_writes_nothing(case: Case, tmp_path: Path) -> None:
    world = World(tmp_path)
    world.before = world.snapshot()
    with pytest.raises(case.error) as raised:
        case.run(world)
    message = _full_message(raised.value)
    import re

    assert re.search(case.match, message), f"{case.id}: message does not say what went wrong:\n{message}"
    assert "hunter2" not in message  # a credential never comes back in an error
    after = world.snapshot()
    assert after == world.before, f"{case.id}: something was written: {_diff(world.before, after)}"


def _full_message(error: BaseException) -> str:
    """The error and its causes (Dagster wraps an asset's exception in its own)."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def _diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    out = []
    for kind in ("files", "tables"):
        for key in sorted(set(before[kind]) | set(after[kind])):
            if before[kind].get(key) != after[kind].get(key):
                out.append(f"{kind}:{key}: {before[kind].get(key)} -> {after[kind].get(key)}")
    return "; ".join(out)


def test_the_table_has_enough_distinct_cases() -> None:
    assert len(CASES) >= 15 and len({c.id for c in CASES}) == len(CASES)


def test_the_docs_show_this_table() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    for line in markdown_table().strip().splitlines():
        assert line in page, line


#: `calibri demo` with a bad choice, run as a command: (id, arguments, words its one stderr line must hold)
DEMO_BAD_CHOICES = [
    ("unknown-preset", ["--preset", "flux-turbo"], ["unknown preset", "'flux-turbo'", "embedded-default"]),
    (
        "preset-for-another-model",
        ["--preset", "flux-block-hpsv3"],
        ["preset 'flux-block-hpsv3'", "model 'flux'", "embedded-default"],
    ),
    ("unknown-reward", ["--reward", "hpsv4"], ["unknown reward", "'hpsv4'", "world_score"]),
    ("unknown-size", ["--size", "huge"], ["unknown size", "'huge'", "tiny"]),
    ("home-is-a-file", ["--home", "{file}"], ["--home", "is a file, not a directory"]),
    ("home-under-a-file", ["--home", "{file}/home"], ["--home", "cannot be created", "is a file"]),
]


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in DEMO_BAD_CHOICES], ids=[c[0] for c in DEMO_BAD_CHOICES])
def test_calibri_demo_refuses_a_bad_choice_in_one_line_and_creates_nothing(
    argv: list[str], words: list[str], tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    home = tmp_path / "home"
    argv = [a.replace("{file}", str(blocker)) for a in argv]
    if "--home" not in argv:
        argv += ["--home", str(home)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALIBRI_", "DAGSTER_"))}
    env["PYTHONPATH"] = str(repo)
    before = sorted(tmp_path.rglob("*"))
    # run from tmp_path: without --home the demo would use ./.calibri, so the working directory is watched too
    proc = subprocess.run(
        [sys.executable, "-m", "calibri_pipeline.cli", "demo", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not home.exists()
    assert sorted(tmp_path.rglob("*")) == before  # no home, catalog, dagster_home or objects folder anywhere


def markdown_table() -> str:
    lines = ["| # | bad input | error (key words) | why nothing is half-written |", "|---|---|---|---|"]
    for i, case in enumerate(CASES, 1):
        errors = case.error if isinstance(case.error, tuple) else (case.error,)
        names = "/".join(e.__name__ for e in errors)
        match = case.match.split("|")[0].replace("\\", "").replace(".*", " … ")
        lines.append(f"| {i} | {case.bad_input} | {names}: `{match}` | {case.guarantee} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
