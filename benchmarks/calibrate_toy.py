"""A real Calibri calibration on the embedded world, evaluated on held-out test prompts.

Calibrates the embedded toy backbone at a low step count with CMA-ES on train prompts (selection on
val prompts), then scores on TEST prompts (never used for tuning), with bootstrap intervals:
baseline at the default step count, baseline at the low step count, calibrated at the low step
count, for world_score / world_alignment / world_accuracy / world_quality; plus an NFE study and
the training curve. Resumable: rerunning with the same arguments continues from --out/state.
Writes results.md, result.json, history.csv and PNG plots under --out.

    python benchmarks/calibrate_toy.py --granularity block --n-models 1 --out /work/notes/calibration/block-n1
    python benchmarks/calibrate_toy.py --granularity gate --n-models 2 --out /work/notes/calibration/gate-cfg
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REWARDS = ("world_score", "world_alignment", "world_accuracy", "world_quality")


def main(argv: list[str] | None = None) -> dict:
    from calibri_pipeline.backbones.toy import load_toy_backbone
    from calibri_pipeline.method.analysis import (
        Setting,
        evaluate_settings,
        nfe_study,
        plot_search_history,
        table_markdown,
    )
    from calibri_pipeline.method.calibrate import calibrate
    from calibri_pipeline.method.search import SearchConfig
    from calibri_pipeline.method.space import CalibrationSpace
    from calibri_pipeline.method.state_store import LocalStateStore
    from calibri_pipeline.method.stats import paired_difference_ci
    from calibri_pipeline.rewards.world import WORLD_REWARDS
    from calibri_pipeline.world.splits import make_splits

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--granularity", default="block", choices=["block", "layer", "gate"])
    p.add_argument("--n-models", type=int, default=1)
    p.add_argument("--low-steps", type=int, default=4)
    p.add_argument("--default-steps", type=int, default=None, help="default: the backbone's")
    p.add_argument("--reward", default="world_score", choices=REWARDS)
    p.add_argument("--popsize", type=int, default=None, help="default: pycma's 4 + floor(3 ln N)")
    p.add_argument("--generations", type=int, default=30)
    p.add_argument("--bucket", type=int, default=16)
    p.add_argument("--val-every", type=int, default=3)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--sigma0", type=float, default=0.25)
    p.add_argument("--n-train", type=int, default=240)
    p.add_argument("--n-val", type=int, default=48)
    p.add_argument("--n-test", type=int, default=96)
    p.add_argument("--eval-seeds", type=int, default=2, help="noise seeds per test prompt")
    p.add_argument("--nfe-steps", default="2,4,8,16", help="comma-separated step counts for the NFE study ('' to skip)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="images per transformer forward (default: the backbone's, 32 for the toy model; on a CPU larger batches are slower)",
    )
    p.add_argument("--weights", default=None, help="toy checkpoint directory (default: the one shipped in the package)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    backbone = load_toy_backbone(args.weights)
    default_steps = args.default_steps or backbone.default_steps
    guidance = backbone.default_guidance
    space = CalibrationSpace.from_transformer(backbone.transformer, args.granularity)
    splits = make_splits(args.split_seed, args.n_train, args.n_val, args.n_test)
    train, val, test = splits["train"], splits["val"], splits["test"]
    rewards = [WORLD_REWARDS[name]() for name in REWARDS]
    backbone.text_encoder.precompute([q.text for q in train + val + test] + [""])

    config = SearchConfig(
        sigma0=args.sigma0,
        popsize=args.popsize,
        max_generations=args.generations,
        bucket_size=args.bucket,
        val_every=args.val_every,
        patience=args.patience,
        sigma_plateau_window=None,
        seed=args.seed,
    )

    def log(row: dict) -> None:
        val = "" if row["val_score"] is None else f" val={row['val_score']:.4f}{' *' if row['val_is_best'] else ''}"
        print(
            f"gen {row['generation']:3d}  sigma={row['sigma']:.4f}  best={row['train_best']:.4f}  "
            f"mean={row['train_mean']:.4f}{val}  ({row['seconds']:.1f}s)",
            flush=True,
        )

    result = calibrate(
        backbone,
        space,
        train,
        val,
        rewards,
        reward_weights={args.reward: 1.0},
        steps=args.low_steps,
        guidance=guidance,
        n_models=args.n_models,
        config=config,
        store=LocalStateStore(out / "state"),
        run_name="run",
        on_generation=log,
        max_batch=args.max_batch,
    )
    search_seconds = time.perf_counter() - started
    print(
        f"search: {result.search.n_generations} generations in {search_seconds:.0f}s, stop={result.search.stop_reason}; "
        f"val {result.baseline_val_score:.4f} -> {result.val_score:.4f} (generation {result.search.best_generation})",
        flush=True,
    )

    # ---- held-out evaluation ----------------------------------------------------------------
    seeds = list(range(10_000, 10_000 + args.eval_seeds))  # disjoint from the training noise streams
    settings = {
        f"baseline@{default_steps}": Setting(None, steps=default_steps),
        f"baseline@{args.low_steps}": Setting(None, steps=args.low_steps),
        f"calibri@{args.low_steps}": Setting(result.vector, steps=args.low_steps),
    }
    comparison = evaluate_settings(
        backbone,
        settings,
        test,
        rewards,
        space=space,
        seeds=seeds,
        reference=f"baseline@{default_steps}",
        max_batch=args.max_batch,
    )
    # paired difference of the calibrated model to the same-steps baseline, per reward
    extra = []
    for name in REWARDS:
        m = comparison.scores[name]
        labels = list(settings)
        d = paired_difference_ci(
            m[labels.index(f"calibri@{args.low_steps}")], m[labels.index(f"baseline@{args.low_steps}")]
        )
        extra.append({"reward": name, "delta_vs_low": d.mean, "delta_vs_low_low": d.low, "delta_vs_low_high": d.high})
    eval_seconds = time.perf_counter() - started - search_seconds

    nfe = None
    nfe_steps = [int(s) for s in args.nfe_steps.split(",") if s.strip()]
    if nfe_steps:
        nfe = nfe_study(
            backbone,
            {"baseline": None, f"calibri (tuned @{args.low_steps})": result.vector},
            nfe_steps,
            test,
            rewards,
            space=space,
            seeds=seeds[:1],
            max_batch=args.max_batch,
        )
        (out / "nfe.png").write_bytes(nfe.plot())
        (out / "nfe.md").write_text(nfe.markdown())

    # ---- write everything -------------------------------------------------------------------
    (out / "evaluation.png").write_bytes(comparison.plot())
    (out / "training.png").write_bytes(
        plot_search_history(
            result.search.generations,
            title=f"{args.granularity} scaling, n_models={args.n_models}, {args.low_steps} steps",
        )
    )
    result.search.generations_frame().drop(["bucket_items", "bucket_seeds"]).write_csv(out / "history.csv")
    summary = {
        "args": vars(args),
        "backbone": {"name": backbone.name, "default_steps": default_steps, "guidance": guidance},
        "space": {
            "granularity": space.granularity,
            "size": space.size,
            "search_size": space.search_size(args.n_models),
        },
        "popsize": result.search.popsize,
        "generations_run": result.search.n_generations,
        "stop_reason": result.search.stop_reason,
        "search_seconds": search_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - started,
        "calibration": result.to_dict(),
        "evaluation": comparison.table.to_dicts(),
        "delta_vs_low": extra,
        "nfe": nfe.table.to_dicts() if nfe is not None else None,
        "splits": {k: len(v) for k, v in splits.items()},
        "eval_seeds": seeds,
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))

    import polars as pl

    table = comparison.table.join(pl.DataFrame(extra), on="reward", how="left")
    table = table.with_columns(
        [
            pl.when(pl.col("label") == f"calibri@{args.low_steps}").then(pl.col(c)).otherwise(None).alias(c)
            for c in ("delta_vs_low", "delta_vs_low_low", "delta_vs_low_high")
        ]
    )
    lines = [
        f"# Calibration on the embedded world: {args.granularity} scaling, n_models={args.n_models}",
        "",
        f"- target reward: `{args.reward}`; low steps {args.low_steps}, default steps {default_steps}, guidance {guidance}",
        f"- search: D={space.search_size(args.n_models)}, popsize={result.search.popsize}, bucket={args.bucket}, "
        f"sigma0={args.sigma0}, {result.search.n_generations} generations (stop: {result.search.stop_reason}), "
        f"validation every {args.val_every} on {len(val)} val prompts",
        f"- validation (selection) score: baseline {result.baseline_val_score:.4f} -> best {result.val_score:.4f} "
        f"at generation {result.search.best_generation}",
        f"- held-out: {len(test)} test prompts x {len(seeds)} seeds = {len(test) * len(seeds)} images per setting; "
        "95% percentile bootstrap over prompt x seed cells; deltas are paired (same prompts and noise)",
        f"- wall time: search {search_seconds / 60:.1f} min, evaluation {eval_seconds / 60:.1f} min (2 shared CPU cores)",
        "",
        "## Held-out test results",
        "",
        table_markdown(
            table.select(
                [
                    "label",
                    "reward",
                    "mean",
                    "ci_low",
                    "ci_high",
                    "delta",
                    "delta_low",
                    "delta_high",
                    "delta_vs_low",
                    "delta_vs_low_low",
                    "delta_vs_low_high",
                ]
            )
        ),
        "`delta*` = vs baseline at the default steps; `delta_vs_low*` = calibrated vs baseline at the same low steps.",
        "",
        "## Calibrated vector",
        "",
        "| name | value |",
        "|---|---|",
        *[f"| {n} | {v:.4f} |" for n, v in zip(result.layout.names(space.names), result.vector)],
        "",
        "Plots: `evaluation.png`, `training.png`" + (", `nfe.png`" if nfe is not None else ""),
    ]
    if nfe is not None:
        lines += ["", "## NFE study (test prompts, 1 seed)", "", nfe.markdown()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print((out / "results.md").read_text())
    return summary


if __name__ == "__main__":
    main()
