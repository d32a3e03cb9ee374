"""``calibri calibrate``: one calibration and its held-out comparison, without Dagster.

The same stages as the asset graph, from the same core functions and the same preset: the scale
sweep (which scales the search), the block ablation, the alternatives tuned on validation (guidance,
skip-layer guidance), the CMA-ES calibration, and the test-prompt comparison of Calibri with the
baseline at the same and at twice the NFE and with every tuned alternative, paired over the same
prompts and noise. Images go through an image cache in ``--home`` (so runs that share images, say two
search settings on one model, sample them once). Writes ``result.json``, ``results.md``,
``history.csv`` and plots to ``--out``; resumable (the CMA-ES state is kept under ``--out``).

    calibri calibrate --preset embedded-default --out docs/results/embedded-default
    calibri calibrate --preset embedded-default --set n_models=1 --set weights=paper --out runs/block-n1
    calibri calibrate --preset embedded-default --test-split-seed 7 --out runs/unseen   # prompts outside the splits
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence


class UsageError(ValueError):
    """A bad command line: printed as one line, exit code 2."""


def _value(text: str) -> Any:
    """``4`` -> 4, ``0.5`` -> 0.5, ``true`` -> True, ``none`` -> None, ``1,2`` -> [1, 2], else the text."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if "," in text:
        return [_value(part) for part in text.split(",") if part.strip()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--set takes key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = _value(value)
    return out


def _unseen_test_prompts(split_seed: int, n: int, exclude: set[str]):
    """``n`` world prompts from another seed's test split that are in none of the preset's splits."""
    from dataclasses import replace

    from calibri_pipeline.world import make_splits

    drawn = make_splits(split_seed, 0, 0, 4 * n)["test"]
    fresh = [p for p in drawn if p.text not in exclude][:n]
    if len(fresh) < n:
        raise UsageError(f"split seed {split_seed} gives only {len(fresh)} test prompts outside the preset's splits")
    return [replace(p, split="test") for p in fresh]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import polars as pl

    from calibri_pipeline import stages
    from calibri_pipeline.method.analysis import plot_nfe, plot_search_history, table_markdown
    from calibri_pipeline.method.calibrate import calibrate
    from calibri_pipeline.method.population import LocalEvaluator
    from calibri_pipeline.method.sampler import SamplingSettings
    from calibri_pipeline.method.state_store import LocalStateStore
    from calibri_pipeline.models import load_model
    from calibri_pipeline.presets import get_preset
    from calibri_pipeline.prompt_sets import build_prompt_set
    from calibri_pipeline.report import headline_table, setting_means
    from calibri_pipeline.rewards.names import WORLD_REWARD_NAMES
    from calibri_pipeline.rewards.registry import make_reward
    from calibri_pipeline.storage.catalog import Catalog
    from calibri_pipeline.storage.image_cache import StoredImageCache
    from calibri_pipeline.storage.object_store import ObjectStore

    started = time.perf_counter()
    try:
        preset = get_preset(args.preset).with_overrides(**parse_overrides(args.set))
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    home = Path(args.home)
    store, catalog = ObjectStore(home / "objects"), Catalog(home / "catalog.duckdb")
    backbone = load_model(args.model, store, device=args.device, dtype="float32")
    cache = StoredImageCache(store, catalog, args.model)
    reward_name = args.reward or preset.reward
    reward = make_reward(reward_name)
    eval_rewards = [make_reward(n) for n in dict.fromkeys([reward_name, *preset.eval_rewards])]
    timings: dict[str, float] = {}

    def evaluator(rewards):  # the unmodified model's; each stage sets its own search space and NFE
        sampling = SamplingSettings(max_batch=preset.max_batch)
        return LocalEvaluator(backbone, None, rewards, sampling, cache=cache, model=args.model, progress=not args.quiet)

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[calibri calibrate] {name}: {timings[name]:.0f} s", file=sys.stderr, flush=True)

    prompts = build_prompt_set(preset, seed=args.split_seed)
    by_split = {s: [p for p in prompts if p.split == s] for s in ("train", "val", "test")}
    test = by_split["test"]
    if args.test_split_seed is not None:
        test = _unseen_test_prompts(args.test_split_seed, len(test), {p.text for p in prompts})
    test_seeds = list(args.test_seeds) if args.test_seeds else list(preset.seeds)
    low = preset.calibration_steps

    t0 = time.perf_counter()
    val_prompts, val_seeds = by_split["val"], list(preset.val_seeds)
    sweep = stages.scale_sweep(preset, evaluator([reward]), val_prompts)
    ablation = stages.block_ablation(preset, evaluator([reward]), val_prompts)
    stage("sweep + ablation", t0)

    t0 = time.perf_counter()
    block_space = stages.block_search(backbone).space
    tuned = stages.tune_alternatives(
        preset, evaluator([reward]), block_space, val_prompts, val_seeds, ablation=ablation.table
    )
    tunings = {name: t.to_dict() for name, t in tuned.items()}
    stage("alternatives", t0)

    t0 = time.perf_counter()
    try:
        plan = stages.calibration_plan(preset, backbone, sweep=sweep.table, tunings=tunings, seed=args.seed)
    except ValueError as error:
        raise UsageError(str(error)) from None

    def on_generation(r: dict) -> None:
        print(
            f"[calibri calibrate] generation {r['generation']}: mean {r['train_mean']:.4f} best {r['train_best']:.4f}"
            + (f" val {r['val_score']:.4f}" if r.get("val_score") is not None else "")
            + f" ({r['seconds']:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    where = dict(store=LocalStateStore(out / "state"), run_name="cmaes", cache=cache, model=args.model)
    options = plan.options.with_(on_generation=on_generation, **where)
    result = calibrate(backbone, plan.search, by_split["train"], val_prompts, reward, plan.sampling, options)
    stage("calibration", t0)

    if args.no_test:  # choosing between configurations: validation only, the test split stays untouched
        summary = {
            "preset": preset.to_dict(),
            "calibration": dict(
                result.to_dict(),
                noise=result.search.noise,
                confirmation=result.search.confirmation,
                initial_stds=plan.options.initial_stds,
            ),
            "tunings": tunings,
            "timings_s": timings,
            "wall_s": round(time.perf_counter() - started, 1),
        }
        (out / "result.json").write_text(json.dumps(summary, indent=2, default=float))
        print(
            json.dumps(
                {k: summary["calibration"][k] for k in ("val_score", "baseline_val_score", "confirmation")},
                indent=2,
                default=float,
            )
        )
        return summary

    t0 = time.perf_counter()
    calibri = (plan.search, result.vector.tolist(), plan.sampling.guidance, plan.sampling.shift)
    _, evaluated, evals, comparisons = stages.evaluation(
        preset, evaluator(eval_rewards), calibri=calibri, tunings=tunings, test_prompts=test, seeds=test_seeds
    )
    stage("evaluation", t0)

    headline = headline_table(evals, comparisons, reward_name, low, preset.default_steps)
    means = setting_means(
        evals,
        low,
        [r for r in WORLD_REWARD_NAMES if r in evals["reward"].unique().to_list()] or [r.name for r in eval_rewards],
    )
    search_result = result.search
    history = pl.DataFrame(
        [{k: v for k, v in g.items() if not isinstance(v, (list, dict))} for g in search_result.generations]
    )
    history.write_csv(out / "history.csv")
    (out / "training.png").write_bytes(plot_search_history(search_result.generations, title=f"{preset.name}: CMA-ES"))
    nfe_table = evaluated.table.with_columns(evaluated.table["label"].str.split("@").list.get(0).alias("label"))
    (out / "nfe.png").write_bytes(
        plot_nfe(
            nfe_table.select("label", "steps", "reward", "mean", "ci_low", "ci_high"),
            title="reward vs NFE on the test prompts",
        )
    )
    (out / "sweep.png").write_bytes(sweep.plot())
    (out / "ablation.png").write_bytes(ablation.plot())
    summary = {
        "preset": preset.to_dict(),
        "model": args.model,
        "reward": reward_name,
        "split_seed": args.split_seed,
        "test_split_seed": args.test_split_seed,
        "test_prompts": len(test),
        "test_seeds": test_seeds,
        "search_seed": args.seed,
        "calibration": dict(
            result.to_dict(),
            noise=search_result.noise,
            confirmation=search_result.confirmation,
            initial_stds=plan.options.initial_stds,
            guidance=plan.sampling.guidance,
        ),
        "tunings": tunings,
        "evaluations": evals.to_dicts(),
        "comparisons": comparisons.to_dicts(),
        "timings_s": timings,
        "wall_s": round(time.perf_counter() - started, 1),
        "images": {"cache_entries": len(cache), "cache_hits": cache.hits, "cache_misses": cache.misses},
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2, default=float))
    lines = [
        f"# {preset.name} on {args.model}, optimising {reward_name}",
        "",
        f"Calibration: {result.granularity} x {result.n_models} model(s), {search_result.n_generations} generations "
        f"({search_result.stop_reason}), validation {result.baseline_val_score:.4f} -> {result.val_score:.4f}.",
        f"Test: {len(test)} prompts x {len(test_seeds)} seeds"
        + (
            f" (prompts outside the splits, split seed {args.test_split_seed})"
            if args.test_split_seed is not None
            else ""
        )
        + ".",
        "",
        f"## {reward_name} at {low} steps, paired over the same prompts and noise",
        "",
        table_markdown(headline),
        f"## Every reward at {low} steps",
        "",
        table_markdown(means),
        "## Tuned alternatives (validation)",
        "",
        *[f"- {k}: {v['label']} (validation {v['val_mean']:.4f})" for k, v in tunings.items()],
        "",
        f"Wall time {summary['wall_s'] / 60:.1f} min: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
    ]
    if search_result.confirmation:
        lines += [
            "",
            "## Confirmation on fresh seeds",
            "",
            table_markdown(pl.DataFrame(search_result.confirmation["rows"])),
        ]
    if search_result.noise:
        lines += ["", "## Fitness noise (generation 0)", "", "```", json.dumps(search_result.noise, indent=2), "```"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="calibri calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="embedded-default", help="a preset of calibri_pipeline/presets.py")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset field (repeatable; lists as 1,2,3)",
    )
    parser.add_argument("--model", default="toy", help="model key (default: the embedded toy DiT)")
    parser.add_argument("--reward", default=None, help="the reward to optimise (default: the preset's)")
    parser.add_argument("--out", required=True, help="where result.json, results.md, plots and the CMA-ES state go")
    parser.add_argument(
        "--home", default=".calibri/experiments", help="image cache (object store + catalog) shared by runs"
    )
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test prompt splits")
    parser.add_argument(
        "--test-split-seed",
        type=int,
        default=None,
        help="evaluate on prompts from this seed's test split that are in none of the splits",
    )
    parser.add_argument(
        "--test-seeds",
        type=lambda t: [int(x) for x in t.split(",")],
        default=None,
        help="noise seeds per test prompt, e.g. 0,1,2,3 (default: the preset's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the search's seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--no-test",
        action="store_true",
        help="stop after the calibration (validation only: for choosing between configurations)",
    )
    args = parser.parse_args(argv)
    try:
        run(args)
    except UsageError as error:
        print(f"calibri calibrate: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
