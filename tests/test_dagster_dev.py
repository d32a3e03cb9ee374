"""Dagster side: resources in a real materialization, the `gpu` pool, `dagster dev` serving the definitions,
`calibri dev` stopping with its whole process tree, and `dg check defs`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch

from calibri_pipeline.resources import (
    GPU_POOL,
    CatalogResource,
    ComputeResource,
    ObjectStoreResource,
    default_resources,
    set_gpu_pool_limit,
)

REPO = Path(__file__).resolve().parents[1]


def _subprocess_env(tmp_path: Path) -> dict[str, str]:
    """The current environment with every Calibri / Dagster location inside tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALIBRI_", "DAGSTER_"))}
    env.update(CALIBRI_HOME=str(tmp_path / "calibri_home"), DAGSTER_HOME=str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir(exist_ok=True)
    (tmp_path / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return env


# -- resources ------------------------------------------------------------------------------------
def test_default_resources_follow_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CALIBRI_CATALOG", "CALIBRI_OBJECT_STORE", "CALIBRI_DEVICE", "CALIBRI_DTYPE", "CALIBRI_RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CALIBRI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CALIBRI_THREADS", "2")
    resources = default_resources()
    assert set(resources) == {"compute", "object_store", "catalog", "ray"}
    assert resources["ray"].address is None  # in-process unless CALIBRI_RAY_ADDRESS says otherwise
    assert resources["catalog"].path == str(tmp_path / "home" / "catalog.duckdb")
    assert resources["object_store"].url == str(tmp_path / "home" / "objects")
    assert (resources["compute"].device, resources["compute"].dtype, resources["compute"].threads) == (
        "auto",
        "float32",
        2,
    )
    monkeypatch.setenv("CALIBRI_OBJECT_STORE", "s3://bucket/prefix")
    monkeypatch.setenv("CALIBRI_CATALOG", str(tmp_path / "elsewhere.duckdb"))
    resources = default_resources()
    assert resources["object_store"].url == "s3://bucket/prefix"
    assert resources["catalog"].path == str(tmp_path / "elsewhere.duckdb")
    monkeypatch.setenv("CALIBRI_THREADS", "many")
    with pytest.raises(ValueError, match="CALIBRI_THREADS must be a positive integer"):
        default_resources()
    assert not (tmp_path / "home").exists()  # building resources creates nothing


def test_definitions_are_loadable() -> None:
    from calibri_pipeline.definitions import defs

    dg.Definitions.validate_loadable(defs)
    assert {"compute", "object_store", "catalog"} <= set(defs.resources)


def test_resources_in_a_real_materialization(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    @dg.asset(pool=GPU_POOL)
    def tiny_images(
        compute: ComputeResource, object_store: ObjectStoreResource, catalog: CatalogResource
    ) -> dg.MaterializeResult:
        seen.update(device=compute.torch_device(), dtype=compute.torch_dtype(), threads=torch.get_num_threads())
        image = torch.zeros(3, 4, 4, dtype=compute.torch_dtype(), device=compute.torch_device()).float()
        uri = object_store.store.put_png("baseline/toy/img_0.png", image)
        result = catalog.catalog.replace(
            "images",
            pl.DataFrame(
                {"image_id": ["img_0"], "model": "toy", "prompt_id": "p", "seed": [0], "steps": 4, "uri": [uri]}
            ),
            {"run_key": "baseline/toy"},
        )
        return dg.MaterializeResult(metadata={"rows": result.inserted, "uri": uri})

    resources = {
        "compute": ComputeResource(device="cpu", dtype="bfloat16", threads=1),
        "object_store": ObjectStoreResource(url=str(tmp_path / "objects")),
        "catalog": CatalogResource(path=str(tmp_path / "catalog.duckdb")),
    }
    threads_before = torch.get_num_threads()
    try:
        for _ in range(2):  # materializing twice replaces the partition's rows
            assert dg.materialize([tiny_images], resources=resources).success
    finally:
        torch.set_num_threads(threads_before)
    assert seen == {"device": torch.device("cpu"), "dtype": torch.bfloat16, "threads": 1}
    rows = resources["catalog"].catalog.query("SELECT image_id, uri FROM images")
    assert rows.rows() == [("img_0", f"file://{tmp_path}/objects/baseline/toy/img_0.png")]
    assert np.asarray(resources["object_store"].store.get_png("baseline/toy/img_0.png")).max() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "gpu"}, "device 'gpu' is not one of auto, cpu, cuda, cuda:N"),
        ({"device": "cuda:x"}, "is not one of"),
        ({"dtype": "float8"}, "float32"),
        ({"threads": 0}, "threads must be a positive integer"),
    ],
)
def test_compute_resource_rejects_bad_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ComputeResource(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        ComputeResource(device="cuda").torch_device()
    assert ComputeResource(device="auto").torch_device() == torch.device("cpu")


def test_object_store_resource_without_s3_credentials_fails_before_the_asset_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    ran = []

    @dg.asset
    def needs_store(object_store: ObjectStoreResource) -> None:
        ran.append(True)

    with pytest.raises(Exception) as info:
        dg.materialize([needs_store], resources={"object_store": ObjectStoreResource(url="s3://bucket/prefix")})
    chain = []
    error: BaseException | None = info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    assert any("S3 credentials missing" in text for text in chain), chain
    assert ran == []


# -- the gpu pool -----------------------------------------------------------------------------------
_GPU_STEP = textwrap.dedent(
    """
    import json, os, sys, time
    import dagster as dg
    from calibri_pipeline.resources import GPU_POOL

    name, spans, holding, release = sys.argv[1:5]

    @dg.asset(name=name, pool=GPU_POOL)
    def gpu_step() -> None:
        start = time.time()
        if holding != "-":  # the first run: hold the card until the test has seen the second one wait
            open(holding, "w").close()
            deadline = time.time() + 120
            while not os.path.exists(release) and time.time() < deadline:
                time.sleep(0.1)
        else:
            time.sleep(0.5)  # "on the GPU"
        with open(spans, "a") as f:
            f.write(json.dumps([name, start, time.time()]) + "\\n")

    assert dg.materialize([gpu_step], instance=dg.DagsterInstance.get()).success
    """
)


def _wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_gpu_pool_limit_keeps_two_runs_off_the_same_card(tmp_path: Path) -> None:
    """A second GPU step waits while the first holds the pool's one slot.

    The second run starts once the first holds the slot: Dagster's default SQLite storage claims
    slots without a row lock (its ``FOR UPDATE SKIP LOCKED`` is a no-op there), so two steps that
    claim within the same few milliseconds can both get it; docs/pipeline.md says so (Postgres storage
    for a shared GPU host)."""
    env = _subprocess_env(tmp_path)
    set_gpu_pool_limit(dg.DagsterInstance.from_config(env["DAGSTER_HOME"]), 1)
    with pytest.raises(ValueError, match="positive integer"):
        set_gpu_pool_limit(dg.DagsterInstance.from_config(env["DAGSTER_HOME"]), 0)
    spans, holding, release = tmp_path / "spans.jsonl", tmp_path / "holding", tmp_path / "release"
    logs = {name: tmp_path / f"{name}.log" for name in ("gpu_step_a", "gpu_step_b")}

    def start(name: str, hold: str) -> subprocess.Popen:
        with logs[name].open("w") as out:
            return subprocess.Popen(
                [sys.executable, "-c", _GPU_STEP, name, str(spans), hold, str(release)],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    first = start("gpu_step_a", str(holding))
    try:
        _wait_for(holding.exists, "the first run to hold the gpu slot")
        second = start("gpu_step_b", "-")
        try:
            _wait_for(
                lambda: "blocked by limit for pool gpu" in logs["gpu_step_b"].read_text(), "the second run to wait"
            )
            assert not spans.exists()  # nothing finished yet: the second step is waiting, not running
            release.touch()
            assert second.wait(timeout=150) == 0, logs["gpu_step_b"].read_text()[-3000:]
        finally:
            second.kill()
        assert first.wait(timeout=150) == 0, logs["gpu_step_a"].read_text()[-3000:]
    finally:
        release.touch()
        first.kill()
    a, b = sorted(tuple(json.loads(line)[1:]) for line in spans.read_text().splitlines())
    assert b[0] >= a[1], f"GPU steps overlapped: {a} and {b}"


# -- dagster dev ------------------------------------------------------------------------------------
def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload
    return payload["data"]


_WORKSPACE = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""

_DEFINITIONS = """{
  repositoriesOrError { __typename ... on RepositoryConnection { nodes { name location { name } } } }
  assetNodes { assetKey { path } pools }
  instance { concurrencyLimits { concurrencyKey slotCount } }
}"""

_RESOURCES = """query($repo: String!, $location: String!) {
  allTopLevelResourceDetailsOrError(repositorySelector: {repositoryName: $repo, repositoryLocationName: $location}) {
    __typename ... on ResourceDetailsList { results { name configuredValues { key value } } }
  }
}"""


def _wait_until_loaded(process: subprocess.Popen, port: int, log_path: Path, timeout: float = 90) -> list[dict]:
    """Poll the webserver on 127.0.0.1:port until every code location is LOADED; its location entries."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
        try:
            entries = _graphql(port, _WORKSPACE)["workspaceOrError"].get("locationEntries")
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return entries
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass  # not listening yet
        time.sleep(1)
    pytest.fail(f"the server was not ready within {timeout:g} s:\n{log_path.read_text()[-3000:]}")


def _restore_default_signals() -> None:
    # A background launcher may have SIGINT/SIGTERM ignored; dagster dev would inherit that and
    # never shut down. Runs in the child between fork and exec.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _group_alive(pgid: int) -> bool:
    """Whether a live process (not a zombie waiting for init to reap it) is in process group pgid."""
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split() if stat else []
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_dagster_dev_serves_the_definitions(tmp_path: Path, loopback_port: int) -> None:
    from calibri_pipeline.definitions import defs

    env = _subprocess_env(tmp_path)
    set_gpu_pool_limit(dg.DagsterInstance.from_config(env["DAGSTER_HOME"]), 1)
    port = loopback_port
    log_path = tmp_path / "dagster_dev.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster",
                "dev",
                "-w",
                str(REPO / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we stop all of it by this PID
            preexec_fn=_restore_default_signals,
        )
    try:
        entries = _wait_until_loaded(process, port, log_path)
        assert [e["name"] for e in entries] == ["calibri"]
        location = entries[0]["locationOrLoadError"]
        assert location["__typename"] == "RepositoryLocation", location

        data = _graphql(port, _DEFINITIONS)
        repositories = data["repositoriesOrError"]["nodes"]
        assert [r["location"]["name"] for r in repositories] == ["calibri"]
        served = {tuple(node["assetKey"]["path"]): sorted(node["pools"]) for node in data["assetNodes"]}
        graph = defs.resolve_asset_graph()
        expected = {tuple(key.path): sorted(graph.get(key).pools or []) for key in graph.get_all_asset_keys()}
        assert served == expected  # every asset of the code location, with its pools
        assert {"concurrencyKey": GPU_POOL, "slotCount": 1} in data["instance"]["concurrencyLimits"]

        resources = _graphql(port, _RESOURCES, {"repo": repositories[0]["name"], "location": "calibri"})
        details = resources["allTopLevelResourceDetailsOrError"]
        assert details["__typename"] == "ResourceDetailsList", details
        by_name = {r["name"]: {v["key"]: v["value"] for v in r["configuredValues"]} for r in details["results"]}
        assert {"compute", "object_store", "catalog"} <= set(by_name)
        assert json.loads(by_name["catalog"]["path"]) == str(tmp_path / "calibri_home" / "catalog.duckdb")
        assert "AWS" not in json.dumps(by_name)  # no credentials in resource config
    finally:
        pgid = process.pid
        # SIGTERM to dagster dev alone: it stops webserver, daemon and code server itself. Signalled
        # too, the code server exits first and dagster dev restarts it, leaving one behind.
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 30
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)  # the webserver, daemon and code server shut down after dagster dev
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
            time.sleep(1)
    assert not _group_alive(pgid), "dagster dev left processes behind"


# -- calibri dev: stops on SIGINT and SIGTERM with everything it started -----------------------------
def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, start time) of a process from /proc, or None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every process below ``root`` right now (from /proc)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
            starts[int(entry.name)] = stat[3]
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def _running(pid: int, start: int) -> bool:
    """Whether that process (same pid and start time, so not a reused pid) still runs; a zombie is dead."""
    stat = _proc_stat(pid)
    return stat is not None and stat[3] == start and stat[0] != "Z"


def _ignores(pid: int, sig: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    raise AssertionError(f"no SigIgn for {pid}")


def _like_a_background_job() -> None:
    # What `make dev &` or a non-interactive shell's `cmd &` hands its job: SIGINT ignored, own group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_and_check_tree(
    launcher: subprocess.Popen, sig: int, tree: dict[int, int], log_path: Path, timeout: float, expected_rc: int
) -> None:
    """Send ``sig`` to the launcher; it must exit with expected_rc within timeout and leave nothing running."""
    t0 = time.monotonic()
    os.kill(launcher.pid, sig)
    try:
        rc = launcher.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"launcher still running {timeout:g} s after {signal.Signals(sig).name}:\n{log_path.read_text()[-3000:]}"
        )
    assert rc == expected_rc, f"launcher exit code {rc}:\n{log_path.read_text()[-3000:]}"
    deadline = time.monotonic() + 5
    while (left := {p for p, start in tree.items() if _running(p, start)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"still running after the launcher exited: {left}\n{log_path.read_text()[-3000:]}"
    print(f"{signal.Signals(sig).name}: launcher and {len(tree)} descendants gone in {time.monotonic() - t0:.1f} s")


def _kill_leftovers(launcher: subprocess.Popen, tree: dict[int, int]) -> None:
    for pid, start in [(launcher.pid, None), *tree.items()]:
        if start is None or _running(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    launcher.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("sig", "cli"), [(signal.SIGTERM, "dg"), (signal.SIGINT, "dagster")], ids=["SIGTERM-dg", "SIGINT-dagster"]
)
def test_calibri_dev_stops_with_its_whole_tree(tmp_path: Path, loopback_port: int, sig: int, cli: str) -> None:
    """`calibri dev` started like a background job (SIGINT ignored) serves the definitions, and one
    SIGTERM or SIGINT to it stops the webserver, daemon and code servers cleanly (exit 0, no SIGKILL)."""
    from calibri_pipeline.definitions import defs

    env = _subprocess_env(tmp_path)
    log_path = tmp_path / "calibri_dev.log"
    with open(log_path, "wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "calibri_pipeline.cli", "dev", "--cli", cli, "--port", str(loopback_port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            process_group=0,
            preexec_fn=_like_a_background_job,
        )
    tree: dict[int, int] = {}
    try:
        entries = _wait_until_loaded(launcher, loopback_port, log_path)
        assert [e["name"] for e in entries] == ["calibri"]
        served = {tuple(node["assetKey"]["path"]) for node in _graphql(loopback_port, _DEFINITIONS)["assetNodes"]}
        assert served == {tuple(key.path) for key in defs.resolve_asset_graph().get_all_asset_keys()}
        assert (tmp_path / "calibri_home" / "dagster_home" / "dagster.yaml").is_file()  # the demo's instance layout

        tree = _descendants(launcher.pid)
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in tree}
        module = {"dg": "dagster_dg_cli.cli", "dagster": "dagster"}[cli]
        server = [pid for pid, cmd in commands.items() if f"-m {module} dev " in cmd]
        assert len(server) == 1, commands
        assert any("dagster_webserver" in cmd for cmd in commands.values()), commands
        assert any("dagster._daemon" in cmd for cmd in commands.values()), commands
        assert any("code-server" in cmd for cmd in commands.values()), commands
        for pid in tree:  # the cause of the bug, gone: nothing below the launcher ignores SIGINT or SIGTERM
            assert not _ignores(pid, signal.SIGINT) and not _ignores(pid, signal.SIGTERM), commands[pid]
        assert {_proc_stat(pid)[2] for pid in tree} == {server[0]}  # one process group, led by the server

        _stop_and_check_tree(launcher, sig, tree, log_path, timeout=40, expected_rc=0)
        assert "outlived the server" not in log_path.read_text()  # nothing needed a SIGKILL
    finally:
        if launcher.poll() is None or any(_running(p, s) for p, s in tree.items()):
            _kill_leftovers(launcher, tree)


_STUBBORN = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # ignored signals stay ignored in the grandchild too
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    open(sys.argv[1], "w").close()
    time.sleep(300)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("second_signal", [False, True], ids=["after-grace", "on-second-signal"])
def test_launcher_kills_a_server_that_will_not_stop(tmp_path: Path, second_signal: bool) -> None:
    """A server (and its child) that ignore SIGINT and SIGTERM are SIGKILLed after the grace period,
    or at once on a second signal; the launcher then exits with 128 + 9."""
    ready = tmp_path / "ready"
    grace = 60 if second_signal else 1
    code = (
        f"import sys; from calibri_pipeline.dev_server import supervise; "
        f"sys.exit(supervise([sys.executable, '-c', {_STUBBORN!r}, {str(ready)!r}], grace={grace}))"
    )
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=_like_a_background_job,
        )
    tree: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert launcher.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        tree = _descendants(launcher.pid)
        assert len(tree) == 2, tree  # the server and its child
        if second_signal:
            os.kill(launcher.pid, signal.SIGTERM)
            time.sleep(0.5)
            _stop_and_check_tree(launcher, signal.SIGINT, tree, log_path, timeout=10, expected_rc=128 + signal.SIGKILL)
        else:
            _stop_and_check_tree(launcher, signal.SIGTERM, tree, log_path, timeout=10, expected_rc=128 + signal.SIGKILL)
    finally:
        if launcher.poll() is None or any(_running(p, s) for p, s in tree.items()):
            _kill_leftovers(launcher, tree)


# -- dg ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_dg_check_defs(tmp_path: Path) -> None:
    """`dg check defs` finds the project through [tool.dg] in pyproject.toml and loads its definitions."""
    result = subprocess.run(
        [sys.executable, "-m", "dagster_dg_cli.cli", "check", "defs"],
        cwd=REPO,
        env=_subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All definitions loaded successfully" in result.stdout + result.stderr
