"""Which search configuration to make the default: every run's selected vector on the same fresh
validation cells (the validation prompts with seeds none of the runs saw), paired CIs against the
unmodified model and every tuned alternative the runs hold (guidance-, shift- and schedule-tuned; each
sampled at its own shift, and each run's vector at the shift it was calibrated at). The test split is
not touched. Prints JSON and a table.

    python benchmarks/compare_configurations.py RUN_DIR [RUN_DIR ...] [--seeds 2000,2001,2002,2003]

Each RUN_DIR is a ``calibri calibrate --out`` folder (``result.json``: the preset, the selected
vector and the tuned alternatives). All runs must share the model, the calibration NFE and the
prompt split seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--seeds", default="2000,2001,2002,2003", help="fresh noise seeds per validation prompt")
    p.add_argument("--model", default="toy")
    p.add_argument("--home", default=".calibri/experiments", help="the image cache the runs used")
    p.add_argument("--split-seed", type=int, default=0)
    args = p.parse_args(argv)

    from calibri_pipeline import stages
    from calibri_pipeline.method.analysis import Setting, evaluate_settings, table_markdown
    from calibri_pipeline.method.population import LocalEvaluator
    from calibri_pipeline.method.sampler import SamplingSettings
    from calibri_pipeline.method.space import CalibrationSpace, SearchSpace
    from calibri_pipeline.models import load_model
    from calibri_pipeline.presets import Preset
    from calibri_pipeline.prompt_sets import build_prompt_set
    from calibri_pipeline.rewards.registry import make_reward
    from calibri_pipeline.storage.catalog import Catalog
    from calibri_pipeline.storage.image_cache import StoredImageCache
    from calibri_pipeline.storage.object_store import ObjectStore

    runs = {Path(r).name: json.loads((Path(r) / "result.json").read_text()) for r in args.runs}
    presets = {name: Preset.from_dict(r["preset"]) for name, r in runs.items()}
    first = next(iter(presets.values()))
    if len({(p.calibration_steps, p.n_val, p.n_train, p.n_test, p.reward) for p in presets.values()}) != 1:
        raise SystemExit("the runs differ in NFE, prompt sets or reward: they cannot share validation cells")
    home = Path(args.home)
    store, catalog = ObjectStore(home / "objects"), Catalog(home / "catalog.duckdb")
    backbone = load_model(args.model, store)
    val = [p for p in build_prompt_set(first, seed=args.split_seed) if p.split == "val"]
    seeds = [int(s) for s in args.seeds.split(",")]
    reward = make_reward(first.reward)
    low = first.calibration_steps
    # the alternatives the runs tuned (the first run holding each), as the evaluation builds them, at the runs' NFE
    tunings: dict = {}
    for r in runs.values():
        for name, tuning in r.get("tunings", {}).items():
            tunings.setdefault(name, tuning)
    every, references = stages.comparison_settings(
        first, calibri=None, tunings=tunings, slg_space=stages.block_search(backbone).space
    )
    alternatives = {ref: references[ref] for ref in references if ref.endswith("-tuned")}
    settings = {label: every[label] for label in (references["baseline"], *alternatives.values())}
    for name, r in runs.items():
        preset = presets[name]
        space = CalibrationSpace.from_transformer(backbone.transformer, preset.granularity)
        search = SearchSpace.for_model(space, preset.n_models, uses_cfg=backbone.uses_cfg, segments=preset.segments)
        settings[name] = Setting(
            r["calibration"]["vector"],
            steps=low,
            guidance=r["calibration"].get("guidance"),
            search=search,
            shift=r["calibration"].get("shift"),
        )
    evaluator = LocalEvaluator(
        backbone,
        None,
        reward,
        SamplingSettings(steps=low),
        cache=StoredImageCache(store, catalog, args.model),
        model=args.model,
        progress=True,
    )
    result = evaluate_settings(
        evaluator, settings, val, seeds=seeds, reference=references["baseline"], references=alternatives
    )
    table = result.table.select("label", "shift", "mean", "ci_low", "ci_high", "delta", "delta_low", "delta_high")
    print(table_markdown(table))
    vs_alternatives = [c for c in result.meta["comparisons"] if c["reference"] in alternatives.values()]
    for c in vs_alternatives:
        print(f"{c['setting']:<40} vs {c['reference']:<15} {c['delta']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]")
    out = {
        "cells": len(val) * len(seeds),
        "seeds": seeds,
        "table": table.to_dicts(),
        "vs_alternatives": vs_alternatives,
    }
    print(json.dumps(out, indent=2, default=float))
    return out


if __name__ == "__main__":
    main()
