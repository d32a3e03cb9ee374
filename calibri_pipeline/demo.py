"""`calibri demo`: materialize the whole asset graph on the embedded default and print the result.

Runs in-process the preset's Dagster job (``preset__<name>`` from the Definitions, asset checks
included) and then ``build_paper_tables``, against a persistent Dagster instance in
``<CALIBRI_HOME>/dagster_home``, so ``dagster dev`` started with the same ``DAGSTER_HOME`` shows
both runs (Runs, Jobs), every materialization, its plots and image grids afterwards.

Every choice (size, preset, reward, home) is checked before anything is written: a bad one is
one line on stderr and exit code 2, with no catalog, Dagster home or object folder left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from calibri_pipeline.rewards.names import OPTIMISABLE_REWARDS, WORLD_REWARD_NAMES

#: rewards of the embedded world that a calibration can optimize offline (the `reward` partitions may
#: hold any of OPTIMISABLE_REWARDS; the demo has no model hub, so only the world's own)
EMBEDDED_REWARDS = tuple(r for r in WORLD_REWARD_NAMES if r in OPTIMISABLE_REWARDS)
#: the model partition the demo runs (the shipped toy DiT)
DEMO_MODEL = "toy"

#: run-config overrides per demo size (the preset supplies everything else)
SIZES: dict[str, dict] = {
    "default": {},
    # fewer prompts and generations than the default in every stage (the grids stay the preset's)
    "small": dict(n_train=200, n_val=32, n_test=48, max_generations=4, ablation_prompts=8),
    "tiny": dict(
        n_train=24,
        n_val=6,
        n_test=6,
        seeds=[0, 1],
        val_seeds=[0],
        calibration_steps=2,
        default_steps=4,
        max_generations=2,
        popsize=4,
        bucket_size=4,
        val_every=1,
        ablation_prompts=3,
        ablation_seeds=[0],
        sweep_alphas=[0.0, 2.0],
        nfe_list=[1, 2],
        guidance_grid=[2.0, 3.5],
        shift_grid=[1.0, 3.0],
        slg_candidates=1,
        slg_scales=[1.0],
        probe_buckets=1,
        max_val_seeds=2,
        confirm_top=1,
    ),
}


class DemoUsageError(ValueError):
    """A bad choice on the demo's command line; `main` prints it as one line and exits with 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block and exit; we want one line
        raise DemoUsageError(message)


@dataclass(frozen=True)
class DemoArgs:
    home: Path
    size: str
    preset: str
    reward: str
    verbose: bool = False


def demo_presets(model: str = DEMO_MODEL) -> list[str]:
    """The presets of the registry that run on the demo's model."""
    from calibri_pipeline.presets import PRESETS

    return [name for name, p in PRESETS.items() if p.model == model]


def check_choices(home: Path, size: str, preset: str, reward: str, model: str = DEMO_MODEL) -> None:
    """Raise DemoUsageError for a choice the demo cannot run; reads only, writes nothing."""
    from calibri_pipeline.presets import PRESETS

    if size not in SIZES:
        raise DemoUsageError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    runnable = demo_presets(model)
    if preset not in PRESETS:
        raise DemoUsageError(f"unknown preset {preset!r}; the demo runs one of {', '.join(runnable)}")
    if preset not in runnable:
        raise DemoUsageError(
            f"preset {preset!r} is for model {PRESETS[preset].model!r}, the demo runs model {model!r}; "
            f"choose one of {', '.join(runnable)}"
        )
    if reward not in EMBEDDED_REWARDS:
        raise DemoUsageError(
            f"unknown reward {reward!r} for the demo (it optimises offline rewards only); "
            f"choose one of {', '.join(EMBEDDED_REWARDS)}"
        )
    check_home(home)


def check_home(home: Path) -> None:
    """``home`` is a writable directory, or can be created as one (nothing is created here)."""
    home = Path(home)
    if home.exists():
        if not home.is_dir():
            raise DemoUsageError(f"--home {home} is a file, not a directory")
        if not os.access(home, os.W_OK | os.X_OK):
            raise DemoUsageError(f"--home {home} is not writable")
        for child in ("dagster_home", "objects"):
            if (home / child).exists() and not (home / child).is_dir():
                raise DemoUsageError(f"--home {home} holds a file {child!r} where the demo needs a directory")
        return
    parent = home.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DemoUsageError(f"--home {home} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DemoUsageError(f"--home {home} cannot be created: {parent} is not writable")


def parse_args(argv: list[str] | None = None) -> DemoArgs:
    """The demo's options, every choice checked (DemoUsageError); writes nothing."""
    parser = _Parser(prog="calibri demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        default="default",
        metavar="{" + ",".join(SIZES) + "}",
        help="how much to compute (default: minutes on 2 CPU cores, see the README; tiny ~1 min)",
    )
    parser.add_argument(
        "--preset",
        default="embedded-default",
        metavar="{" + ",".join(demo_presets()) + "}",
        help="a preset of calibri_pipeline/presets.py for the toy model: embedded-default (2 steps, one set "
        "of block coefficients of the CFG ensemble per step, on top of the tuned timestep shift and guidance), "
        "embedded-4-steps (the paper's setting at 4 steps), embedded-2-steps (2 steps from the guidance-tuned "
        "model) or embedded-gate-cfg (gate, CFG ensemble)",
    )
    parser.add_argument(
        "--reward",
        default="world_score",
        metavar="{" + ",".join(EMBEDDED_REWARDS) + "}",
        help="the reward CMA-ES optimizes (every world reward is still evaluated): run the demo again "
        "with another one into the same --home to fill Table 7 and see whether a reward is gamed",
    )
    parser.add_argument(
        "--home",
        default=os.environ.get("CALIBRI_HOME", ".calibri"),
        help="where the catalog, images and Dagster instance go",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Dagster's DEBUG events (every step and output) too"
    )
    ns = parser.parse_args(argv)
    if not ns.home.strip():
        raise DemoUsageError("--home is empty")
    args = DemoArgs(
        home=Path(ns.home).expanduser().resolve(), size=ns.size, preset=ns.preset, reward=ns.reward, verbose=ns.verbose
    )
    check_choices(args.home, args.size, args.preset, args.reward)
    return args


def _setup_home(home: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    os.environ["CALIBRI_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return dagster_home


def preset_job_name(preset: str) -> str:
    """The Dagster job of a preset (calibri_pipeline.assets.automation.PRESET_JOBS)."""
    return f"preset__{preset.replace('-', '_')}"


def run_demo(
    home: Path,
    size: str = "default",
    preset: str = "embedded-default",
    reward: str = "world_score",
    model: str = DEMO_MODEL,
    verbose: bool = False,
) -> dict:
    check_choices(Path(home), size, preset, reward, model)  # before anything is written
    _setup_home(Path(home))
    import dagster as dg

    from calibri_pipeline.assets import PARTITIONED_ASSETS
    from calibri_pipeline.assets.automation import _asset_config
    from calibri_pipeline.assets.common import MODEL_PARTITIONS, REWARD_PARTITIONS
    from calibri_pipeline.definitions import defs
    from calibri_pipeline.resources import default_resources

    instance = dg.DagsterInstance.get()
    for dimension, key in ((MODEL_PARTITIONS, model), (REWARD_PARTITIONS, reward)):
        if key not in instance.get_dynamic_partitions(dimension.name):
            instance.add_dynamic_partitions(dimension.name, [key])
    # resources built now, from this home (defs may have been imported before CALIBRI_HOME was set)
    resources = default_resources()
    tags = {"calibri/demo": size}
    # Dagster's own events (step starts, outputs, ...) are DEBUG lines; the assets log one INFO line per stage
    loggers = {"loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else "INFO"}}}}
    t0 = time.perf_counter()
    result = defs.resolve_job_def(preset_job_name(preset)).execute_in_process(
        instance=instance,
        partition_key=dg.MultiPartitionKey({"model": model, "reward": reward}),
        run_config={**_asset_config(PARTITIONED_ASSETS, **SIZES[size], preset=preset), **loggers},
        tags=tags,
        resources=resources,
    )
    if result.success:  # the cross-partition tables, as their own run of their own job
        result = defs.resolve_job_def("build_paper_tables").execute_in_process(
            instance=instance, tags=tags, resources=resources, run_config=loggers
        )
    wall = time.perf_counter() - t0
    if not result.success:
        raise SystemExit("demo run failed: see the log above (or `dagster dev` for the run)")
    return {"wall_seconds": wall, "run_id": result.run_id, "partition": f"{model}|{reward}"}


def summary_text(home: Path, info: dict) -> str:
    from calibri_pipeline.assets.common import latest_calibration
    from calibri_pipeline.method.analysis import table_markdown
    from calibri_pipeline.report import headline_table, setting_means, verdict_line
    from calibri_pipeline.storage.catalog import Catalog
    from calibri_pipeline.storage.paths import default_catalog_path, default_object_store_url

    model, reward = info["partition"].split("|")
    catalog = Catalog(default_catalog_path())
    run = latest_calibration(catalog, model, reward)
    evals = catalog.query("SELECT * FROM evaluations WHERE run_key = ?", [info["partition"]])
    comparisons = catalog.query("SELECT * FROM comparisons WHERE run_key = ?", [info["partition"]])
    run_config = json.loads(run["config"])
    preset = run_config["preset"]
    low, default = preset["calibration_steps"], preset["default_steps"]
    headline = headline_table(evals, comparisons, reward, low, default)
    means = setting_means(evals, low, list(WORLD_REWARD_NAMES))
    tunings = catalog.query("SELECT name, label, val_mean FROM tunings WHERE run_key = ?", [info["partition"]])
    verdict = verdict_line(comparisons, tunings, reward, low)
    lines = [
        "",
        *([verdict] if verdict else []),
        f"Calibri on the embedded default ({preset['name']}: {run['granularity']} scaling, n_models={run['n_models']}, "
        f"{run['generations']} of at most {run_config['search']['max_generations']} CMA-ES generations) in {info['wall_seconds'] / 60:.1f} min",
        f"validation {reward}: start {run['baseline_val']:.4f} -> selected {run['best_val']:.4f}",
        "",
        f"Held-out test prompts, {reward} (mean [95% CI]; paired differences on the same prompts and noise):",
        table_markdown(headline),
        f"Every reward at {low} steps (means):",
        table_markdown(means),
        "",
        f"images:   {default_object_store_url()}/images/{model}/",
        f"catalog:  {default_catalog_path()}",
        "UI:       make dev   (or: .venv/bin/calibri dev --home " + str(home) + "; open http://127.0.0.1:3000)",
        'SQL:      .venv/bin/calibri sql "SELECT setting, reference, reward, round(delta, 4) AS delta, round(ci_low, 4) AS lo, '
        "round(ci_high, 4) AS hi FROM comparisons WHERE setting LIKE 'calibri@%' ORDER BY ALL\"",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except DemoUsageError as error:
        print(f"calibri demo: error: {error} (see `calibri demo --help`)", file=sys.stderr)
        return 2
    info = run_demo(args.home, args.size, args.preset, reward=args.reward, verbose=args.verbose)
    print(summary_text(args.home, info))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
