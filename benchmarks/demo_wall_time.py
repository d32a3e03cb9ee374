"""End-to-end wall time of ``calibri demo --size SIZE`` in a fresh temporary home. Prints JSON.

The demo runs as a subprocess exactly as a user starts it (``python -m calibri_pipeline.cli demo``),
with every ``CALIBRI_*`` / ``DAGSTER_*`` variable of the caller removed, so nothing of an existing
home is reused (no cached embeddings, no previous calibration to resume). ``--ray local`` scores the
CMA-ES populations on a local Ray cluster instead (``CALIBRI_RAY_ADDRESS``).

    python benchmarks/demo_wall_time.py [--size tiny|small|default] [--ray local] [--keep-home DIR]
    python benchmarks/demo_wall_time.py --size default --repo /path/to/an/older/checkout   # the same, before

Per-asset seconds come from the run's own Dagster events (step start to step success), so the
numbers are what the UI shows. ``--repo`` runs the demo of another checkout of this project (its
package shadows the installed one: ``python -m`` puts the working directory first on sys.path), to
measure before and after side by side with one script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "default"])
    p.add_argument("--preset", default="embedded-default")
    p.add_argument(
        "--ray", default=None, help="a Ray address for the calibration step (e.g. 'local'); default in-process"
    )
    p.add_argument("--ray-workers", type=int, default=2)
    p.add_argument("--keep-home", default=None, help="run in this directory and keep it (default: a temp dir, removed)")
    p.add_argument("--timeout", type=float, default=4 * 3600)
    p.add_argument("--repo", default=str(REPO), help="the checkout whose demo runs (default: this one)")
    args = p.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALIBRI_", "DAGSTER_"))}
    if args.ray:
        env["CALIBRI_RAY_ADDRESS"] = args.ray
        env["CALIBRI_RAY_WORKERS"] = str(args.ray_workers)
    home = Path(args.keep_home).resolve() if args.keep_home else Path(tempfile.mkdtemp(prefix="calibri-demo-bench-"))
    if args.keep_home and home.exists() and any(home.iterdir()):
        raise SystemExit(f"--keep-home {home} is not empty: the benchmark needs a fresh home")
    try:
        command = [
            sys.executable,
            "-m",
            "calibri_pipeline.cli",
            "demo",
            "--size",
            args.size,
            "--preset",
            args.preset,
            "--home",
            str(home),
        ]
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=args.repo, env=env, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"calibri demo failed with exit code {proc.returncode}")
        found = re.search(
            r"validation (\S+): (?:baseline|start) ([-\d.]+) -> (?:calibrated|selected) ([-\d.]+)", proc.stdout
        )
        inner = re.search(r"CMA-ES generations\) in ([\d.]+) min", proc.stdout)
        out = {
            "benchmark": "demo_wall_time",
            "repo": args.repo,
            "size": args.size,
            "preset": args.preset,
            "ray": args.ray,
            "ray_workers": args.ray_workers if args.ray else None,
            "cpu_cores": os.cpu_count(),
            "load_average_1m_after": os.getloadavg()[0],
            "wall_seconds": wall,  # process start to exit: imports, Dagster run, summary
            "materialize_seconds": float(inner.group(1)) * 60 if inner else None,  # as the demo reports it
            "asset_seconds": step_seconds(home / "dagster_home"),
            "validation_reward": found.group(1) if found else None,
            "baseline_val": float(found.group(2)) if found else None,
            "calibrated_val": float(found.group(3)) if found else None,
        }
    finally:
        if not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return out


def step_seconds(dagster_home: Path) -> dict[str, float]:
    """Seconds from STEP_START to STEP_SUCCESS of every step of every run in a Dagster home."""
    code = (
        "import json, dagster as dg\n"
        "out = {}\n"
        "with dg.DagsterInstance.get() as instance:\n"
        "    for record in instance.get_run_records():\n"
        "        starts = {}\n"
        "        for e in instance.all_logs(record.dagster_run.run_id):\n"
        "            if e.dagster_event is None or e.step_key is None:\n"
        "                continue\n"
        "            kind = e.dagster_event.event_type_value\n"
        "            if kind == 'STEP_START':\n"
        "                starts[e.step_key] = e.timestamp\n"
        "            elif kind == 'STEP_SUCCESS' and e.step_key in starts:\n"
        "                out[e.step_key] = round(e.timestamp - starts[e.step_key], 1)\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALIBRI_", "DAGSTER_"))}
    env["DAGSTER_HOME"] = str(dagster_home)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-500:]}


if __name__ == "__main__":
    main()
