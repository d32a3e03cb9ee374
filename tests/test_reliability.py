"""Reliability of the pipeline under concurrency.

The other reliability checks live next to the code they exercise:

- kill -9 a calibration mid-generation, restart, identical result:
  ``tests/test_resume.py::test_killed_run_resumes_to_exactly_the_uninterrupted_result`` (a real
  subprocess killed three times, bit-identical coefficients, candidates and validations), and
  ``tests/test_population.py::test_calibrate_warm_start_and_resume_after_a_crash`` (``calibrate`` on a
  real backbone);
- a Ray worker killed mid-chunk or between generations: ``tests/test_ray_eval.py``;
- re-materializing every asset adds no rows: ``tests/test_pipeline_e2e.py::test_rematerializing_every_asset_adds_no_rows``;
- a writer killed between DELETE and INSERT, writer processes vs a busy reader: ``tests/test_catalog.py``;
- bad input leaves nothing half-written: ``tests/test_bad_inputs.py``.

Here: two Dagster runs in two processes materialize different partitions of the `prompts` asset
(tiny demo config) against ONE catalog file and one Dagster instance, several times each, started
together; every row of both partitions is there afterwards, nothing is duplicated, and a reader
polling alongside always sees whole partitions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REPEATS = 3

RUNNER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import dagster as dg
    from calibri_pipeline.assets.automation import _asset_config
    from calibri_pipeline.assets.prompts import prompts
    from calibri_pipeline.demo import SIZES
    from calibri_pipeline.resources import CatalogResource, ObjectStoreResource

    catalog, store, reward, go, repeats = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5])
    instance = dg.DagsterInstance.get()  # the shared DAGSTER_HOME
    resources = {"catalog": CatalogResource(path=catalog, lock_timeout=120), "object_store": ObjectStoreResource(url=store)}
    config = _asset_config([prompts], **SIZES["tiny"], preset="embedded-default")
    key = dg.MultiPartitionKey({"model": "toy", "reward": reward})
    while not go.exists():  # start together with the other process
        time.sleep(0.01)
    for _ in range(repeats):
        result = dg.materialize([prompts], partition_key=key, instance=instance, resources=resources, run_config=config)
        assert result.success
    """
)


def test_two_processes_materializing_different_partitions_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg

    from calibri_pipeline.demo import SIZES
    from calibri_pipeline.storage.catalog import Catalog

    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALIBRI_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(dagster_home), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("model", ["toy"])
        instance.add_dynamic_partitions("reward", ["world_score", "world_quality"])  # reward partitions are dynamic

    catalog = Catalog(tmp_path / "catalog.duckdb", lock_timeout=120)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    go = tmp_path / "go"
    rewards = ("world_score", "world_quality")
    runners = [
        subprocess.Popen(
            [sys.executable, str(script), str(catalog.path), str(tmp_path / "objects"), reward, str(go), str(REPEATS)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for reward in rewards
    ]
    tiny = SIZES["tiny"]
    per_partition = tiny["n_train"] + tiny["n_val"] + tiny["n_test"]
    time.sleep(2.0)  # both import Dagster and wait at the start line
    go.touch()
    reads = 0
    try:
        while any(r.poll() is None for r in runners):
            # a reader alongside the writers sees each partition whole or not at all
            counts = catalog.query("SELECT prompt_set, count(*) AS n FROM prompts GROUP BY 1")
            assert all(n == per_partition for n in counts["n"]), counts
            reads += 1
            time.sleep(0.05)
        for runner in runners:
            _, err = runner.communicate(timeout=300)
            assert runner.returncode == 0, err.decode()[-4000:]
    finally:
        for runner in runners:
            if runner.poll() is None:
                runner.kill()
    assert reads > 0
    counts = catalog.query(
        "SELECT prompt_set, count(*) AS n, count(DISTINCT prompt_id) AS ids FROM prompts GROUP BY 1 ORDER BY 1"
    )
    assert counts.rows() == [(f"toy|{r}", per_partition, per_partition) for r in sorted(rewards)]
    # both processes recorded all their runs in the shared Dagster instance
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(runs) == 2 * REPEATS and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)


def test_replacing_the_same_partition_from_two_processes_keeps_one_copy(tmp_path: Path) -> None:
    """Two writers racing on the SAME partition: the last replace wins whole, never a mix or a double."""
    from calibri_pipeline.storage.catalog import Catalog

    catalog = Catalog(tmp_path / "catalog.duckdb", lock_timeout=60)
    writer = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        import polars as pl
        from calibri_pipeline.storage.catalog import Catalog
        catalog, tag, go, repeats = Catalog(sys.argv[1], lock_timeout=60), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
        while not go.exists():
            time.sleep(0.005)
        for i in range(repeats):
            rows = pl.DataFrame({"prompt_id": [f"{tag}-{i}-{j}" for j in range(50)], "text": ["t"] * 50, "source": [tag] * 50})
            catalog.replace("prompts", rows, {"prompt_set": "toy|world_score"})
        """
    )
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", writer, str(catalog.path), tag, str(go), "20"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for tag in ("a", "b")
    ]
    time.sleep(1.0)
    go.touch()
    seen = 0
    while any(p.poll() is None for p in procs):
        df = catalog.query("SELECT source, count(*) AS n FROM prompts GROUP BY 1")
        assert df.height <= 1 and (df.height == 0 or df["n"][0] == 50), df  # one writer's whole partition
        seen += 1
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-3000:]
    final = catalog.query("SELECT source, count(*) AS n, count(DISTINCT prompt_id) AS ids FROM prompts GROUP BY 1")
    assert final.height == 1 and final.row(0)[1:] == (50, 50)
    assert seen > 0
