"""End to end: `calibri demo --size tiny` materializes the whole graph on temporary storage.

Then: the catalog holds every table's rows, re-materializing a partition duplicates nothing, the
exported checkpoint loads with stock diffusers, and the checkpoint sensor turns a new folder into
a partition plus a warm-started recalibration request.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _tiny_demo(home: Path, *args: str) -> str:
    """`calibri demo --size tiny` into ``home`` in a clean environment; its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALIBRI_", "DAGSTER_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "calibri_pipeline.cli", "demo", "--size", "tiny", "--home", str(home), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("calibri_home")
    return home, _tiny_demo(home)


def _catalog(home: Path):
    from calibri_pipeline.storage.catalog import Catalog

    return Catalog(home / "catalog.duckdb", create=False)


def test_demo_prints_the_headline_table(demo_home):
    home, out = demo_home
    assert "Held-out test prompts" in out
    # its first line: Calibri against the alternative that was best on validation, with the paired CI
    first = out.strip().splitlines()[0]
    assert first.startswith("Calibri@2 vs the best cheap alternative on validation, ") and "held-out images" in first
    best = _catalog(home).query("SELECT name FROM tunings ORDER BY val_mean DESC, name LIMIT 1").item()
    assert f"{best}@2" in first
    for setting in ("baseline@4", "baseline@2", "guidance-tuned@2", "shift-tuned@2", "schedule-tuned@2", "calibri@2"):
        assert f"| {setting} |" in out
    for column in (
        "vs baseline (same NFE)",
        "vs guidance-tuned",
        "vs shift-tuned",
        "vs schedule-tuned",
        "vs baseline at 2x NFE",
    ):
        assert column in out
    assert "calibri sql" in out and str(home / "catalog.duckdb") in out


def _n_blocks() -> int:
    from calibri_pipeline.backbones.toy import load_toy_backbone
    from calibri_pipeline.method.space import CalibrationSpace

    return CalibrationSpace.from_transformer(load_toy_backbone().transformer, "block").size


def test_catalog_holds_every_stage(demo_home):
    home, _ = demo_home
    cat = _catalog(home)
    n_blocks = _n_blocks()
    key = "toy|world_score"
    assert cat.count("prompts", {"prompt_set": key}) == 24 + 6 + 6
    # 6 test prompts x 2 seeds at 2 and 4 steps (baseline) + at 2 steps (calibrated, and each alternative)
    assert cat.count("images", {"run_key": key, "calibration": "baseline"}) == 6 * 2 * 2
    run = cat.query("SELECT * FROM calibration_runs").row(0, named=True)
    assert run["status"] == "finished" and run["granularity"] == "block" and run["n_models"] == 2
    # the CFG ensemble: per block a conditional and an unconditional coefficient, then the two weights,
    # once for the first step and once for the rest (time-dependent)
    assert len(run["vector"]) == 2 * (2 * len(run["names"]) + 2) == 2 * (2 * n_blocks + 2)
    assert run["best_val"] >= run["baseline_val"]
    assert json.loads(run["noise"])["bucket_images"] == 4  # the noise probe's report is kept with the run
    assert cat.count("images", {"run_key": key, "calibration": run["run_id"]}) == 6 * 2
    for tag in ("guidance-tuned", "shift-tuned", "schedule-tuned"):
        assert cat.count("images", {"run_key": key, "calibration": tag}) == 6 * 2
    tunings = {r["name"]: r for r in cat.query("SELECT * FROM tunings").iter_rows(named=True)}
    assert set(tunings) == {"guidance-tuned", "shift-tuned", "schedule-tuned"}
    # the guidance schedule is tuned at the tuned shift, around its guidance
    shift = json.loads(tunings["shift-tuned"]["params"])["shift"]
    assert json.loads(tunings["schedule-tuned"]["params"])["shift"] == shift
    assert json.loads(run["config"])["shift"] is None  # calibrated at the model's own schedule
    # every image row points into the image cache, and the cache holds each image once
    assert cat.query("SELECT count(*) FROM images i ANTI JOIN image_cache c ON c.image_key = i.image_id").item() == 0
    assert cat.query("SELECT count(*) - count(DISTINCT image_key) FROM image_cache").item() == 0
    uris = cat.query("SELECT uri FROM images")["uri"].to_list()
    assert all(Path(u.removeprefix("file://")).is_file() for u in uris)
    scores = cat.query(
        "SELECT reward, count(*) AS n, count(*) FILTER (WHERE isfinite(score)) AS finite FROM scores GROUP BY reward"
    )
    assert set(scores["reward"]) == {"world_score", "world_alignment", "world_accuracy", "world_quality"}
    assert (scores["n"] == scores["finite"]).all() and (scores["n"] == 24 + 4 * 12).all()
    assert cat.count("ablations") == n_blocks and cat.count("sweeps") == n_blocks * 2
    gens = cat.query("SELECT * FROM cmaes_generations ORDER BY generation")
    assert gens.height == run["generations"] >= 2
    assert cat.count("cmaes_candidates", {"run_id": run["run_id"]}) == 4 * gens.height
    evals = cat.query("SELECT DISTINCT nfe FROM evaluations ORDER BY nfe")["nfe"].to_list()
    assert evals == [1, 2, 4]
    # baseline at 1, 2, 4 steps; guidance-tuned and Calibri at 1 and 2; shift- and schedule-tuned at 2: x 4 rewards
    assert cat.count("evaluations") == (3 + 2 + 2 + 2) * 4
    comparisons = cat.query("SELECT DISTINCT reference FROM comparisons ORDER BY ALL")["reference"].to_list()
    assert comparisons == ["baseline@2", "baseline@4", "guidance-tuned@2", "schedule-tuned@2", "shift-tuned@2"]
    div = cat.query("SELECT calibration, nfe, count(*) AS n, avg(diversity) AS d FROM diversity GROUP BY ALL")
    assert div.height == 6 and (div["n"] == 6).all()  # baseline at 2 and 4 steps, the four settings at 2


def test_the_default_exports_its_schedule(demo_home):
    """The default is time-dependent: one vector per part of the noise schedule, exported as
    calibri_schedule.json (a stock checkpoint holds one set of weights)."""
    home, _ = demo_home
    run = _catalog(home).query("SELECT * FROM calibration_runs").row(0, named=True)
    ckpt = home / "objects" / "checkpoints" / "toy" / "world_score"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    schedule = json.loads((ckpt / "calibri_schedule.json").read_text())
    assert manifest["mode"] == "schedule" and not (ckpt / "cond").exists()
    assert schedule["segments"] == [0.9] and schedule["vector"] == pytest.approx(run["vector"])


def test_four_step_preset_bakes_a_stock_checkpoint_and_tunes_slg(tmp_path):
    """`embedded-4-steps` (one set of coefficients): the calibration is baked into checkpoints that stock
    diffusers loads, and skip-layer guidance is tuned beside the guidance."""
    import torch
    from diffusers import FluxTransformer2DModel

    home = tmp_path / "home"
    out = _tiny_demo(home, "--preset", "embedded-4-steps")
    assert "| slg-tuned@2 |" in out and "| calibri@2 |" in out
    assert set(_catalog(home).query("SELECT name FROM tunings")["name"]) == {"guidance-tuned", "slg-tuned"}
    ckpt = home / "objects" / "checkpoints" / "toy" / "world_score"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    # the CFG pair as one transformer (the conditional coefficients baked in) + the hook's calibration.json
    assert manifest["mode"] == "cfg" and manifest["members"] == ["model"] and (ckpt / "calibration.json").exists()
    model = FluxTransformer2DModel.from_pretrained(ckpt / "model")
    assert isinstance(model, FluxTransformer2DModel)
    # the baked weights equal the original ones scaled by the coefficients
    from calibri_pipeline.backbones.toy import load_toy_backbone
    from calibri_pipeline.method.space import CalibrationSpace

    original = load_toy_backbone().transformer
    space = CalibrationSpace.from_transformer(original, "block")
    target = space.groups[0][0].target
    c = manifest["vector"][0]
    torch.testing.assert_close(model.get_submodule(target).weight, original.get_submodule(target).weight * c)


def test_demo_runs_the_preset_job_on_partitions_that_all_exist(demo_home, monkeypatch):
    """The UI's Runs and Jobs pages show the demo, and its partition reads as 1 of 1 materialized."""
    import dagster as dg

    from calibri_pipeline.assets import PARTITIONED_ASSETS
    from calibri_pipeline.assets.common import PARTITIONS

    home, _ = demo_home
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    with dg.DagsterInstance.get() as instance:
        runs = [r.dagster_run for r in instance.get_run_records()]
        demo_runs = {r.job_name: r for r in runs if "calibri/demo" in r.tags}
        assert sorted(demo_runs) == ["build_paper_tables", "preset__embedded_default"]  # no __ephemeral_asset_job__
        [preset_run] = [r for r in runs if r.job_name == "preset__embedded_default"]
        assert preset_run.status == dg.DagsterRunStatus.SUCCESS
        assert demo_runs["build_paper_tables"].status == dg.DagsterRunStatus.SUCCESS
        checks = instance.all_logs(preset_run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        assert {e.dagster_event.event_specific_data.check_name for e in checks} == {
            "baseline_scores_are_finite",
            "calibrated_beats_baseline",
            "calibrated_not_worse_than_guidance_tuning",
            "diversity_not_collapsed",
        }
        assert instance.get_dynamic_partitions("model") == ["toy"]
        assert instance.get_dynamic_partitions("reward") == ["world_score"]
        assert PARTITIONS.get_partition_keys(dynamic_partitions_store=instance) == ["toy|world_score"]
        for asset in PARTITIONED_ASSETS:  # every partition that exists is materialized: "1 of 1" in the UI
            assert instance.get_materialized_partitions(asset.key) == {"toy|world_score"}, asset.key


def test_rematerializing_every_asset_adds_no_rows(demo_home, monkeypatch):
    import dagster as dg

    home, _ = demo_home
    monkeypatch.setenv("CALIBRI_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    from calibri_pipeline.assets import PARTITIONED_ASSETS as ALL_ASSETS
    from calibri_pipeline.assets.automation import _asset_config
    from calibri_pipeline.demo import SIZES
    from calibri_pipeline.resources import default_resources

    cat = _catalog(home)
    tables = [t for t in cat.tables() if t != "catalog_meta"]
    objects = home / "objects"

    def state():
        files = sorted(str(p.relative_to(objects)) for p in objects.rglob("*") if p.is_file())
        return {t: cat.count(t) for t in tables}, files

    before = state()
    assert all(n > 0 for n in before[0].values()), before[0]  # every table has rows to duplicate
    result = dg.materialize(
        ALL_ASSETS,
        partition_key=dg.MultiPartitionKey({"model": "toy", "reward": "world_score"}),
        instance=dg.DagsterInstance.get(),
        resources=default_resources(),
        run_config=_asset_config(ALL_ASSETS, **SIZES["tiny"], preset="embedded-default"),
    )
    assert result.success
    after = state()
    assert after[0] == before[0]  # same rows per table
    assert after[1] == before[1]  # same objects: images, embeddings, CMA-ES state, checkpoint files
    # and no duplicates by natural key
    # (one image can serve two settings: a calibration that selected x0 shares the baseline's images)
    for table, key in (
        ("images", "image_id, calibration"),
        ("scores", "image_id, reward, calibration"),
        ("prompts", "prompt_set, prompt_id"),
        ("cmaes_candidates", "run_id, generation, candidate"),
        ("cmaes_generations", "run_id, generation"),
        ("evaluations", "run_key, reward, setting, nfe"),
        ("calibration_runs", "run_id"),
        ("comparisons", "run_key, reward, setting, reference"),
        ("tunings", "run_key, name"),
        ("image_cache", "image_key"),
        ("diversity", "run_key, calibration, nfe, prompt_id"),
    ):
        dupes = cat.query(f"SELECT count(*) - count(DISTINCT ({key})) AS d FROM {table}").item()
        assert dupes == 0, (table, key)
    # the finished calibration was replayed from its stored state, not searched again
    run = cat.query("SELECT status, generations FROM calibration_runs").row(0, named=True)
    assert run["status"] == "finished" and run["generations"] == before[0]["cmaes_generations"]


def test_checkpoint_sensor_adds_partition_and_requests_warm_started_run(tmp_path, monkeypatch):
    import dagster as dg

    from calibri_pipeline.assets.automation import checkpoint_sensor
    from calibri_pipeline.backbones.toy import default_weights_dir
    from calibri_pipeline.resources import ObjectStoreResource

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    monkeypatch.setenv("CALIBRI_CHECKPOINT_DIR", str(incoming))
    store = ObjectStoreResource(url=str(tmp_path / "objects"))
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"object_store": store})
        first = checkpoint_sensor(ctx)
        assert first.run_requests == []  # nothing new yet; only the built-in toy partition
        assert [r.partition_keys for r in first.dynamic_partitions_requests] == [["toy"]]  # no reward without a run
        instance.add_dynamic_partitions("model", ["toy"])  # what the daemon does with the request
        assert instance.get_dynamic_partitions("reward") == []
        shutil.copytree(default_weights_dir(), incoming / "step-0500")
        (incoming / "half-copied").mkdir()  # no weights yet: ignored until complete
        (incoming / "half-copied" / "config.json").write_text("{")
        ctx = dg.build_sensor_context(instance=instance, resources={"object_store": store}, cursor=first.cursor)
        second = checkpoint_sensor(ctx)
        model_request, reward_request = second.dynamic_partitions_requests  # the reward it recalibrates for, too
        assert model_request.partitions_def_name == "model" and model_request.partition_keys == ["toy--step-0500"]
        assert reward_request.partitions_def_name == "reward" and reward_request.partition_keys == ["world_score"]
        instance.add_dynamic_partitions("model", model_request.partition_keys)
        instance.add_dynamic_partitions("reward", reward_request.partition_keys)
        [request] = second.run_requests
        assert request.partition_key == dg.MultiPartitionKey({"model": "toy--step-0500", "reward": "world_score"})
        assert request.run_config["ops"]["calibration"]["config"]["warm_start_from"] == "toy"
        spec = json.loads((tmp_path / "objects" / "models" / "toy--step-0500.json").read_text())
        assert spec["kind"] == "toy" and spec["parent"] == "toy" and spec["path"].endswith("step-0500")
        shutil.copytree(default_weights_dir(), incoming / "step-1000")
        ctx = dg.build_sensor_context(instance=instance, resources={"object_store": store}, cursor=second.cursor)
        third = checkpoint_sensor(ctx)
        assert [r.partition_keys for r in third.dynamic_partitions_requests] == [["toy--step-1000"]]  # reward exists
        [request] = third.run_requests  # the older checkpoint is not requested again
        assert request.run_config["ops"]["calibration"]["config"]["warm_start_from"] == "toy--step-0500"


def test_partition_keys_cannot_escape_the_store():
    from calibri_pipeline.models import check_model_key, checkpoint_key

    for bad in ("../etc", "a/b", "", "UPPER", "x" * 200, "..", "a..b"):
        with pytest.raises(ValueError, match="invalid model key"):
            check_model_key(bad)
    assert checkpoint_key("toy", "../../Weird Name!") == "toy--weird-name"
