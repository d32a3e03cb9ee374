"""Candidates per second: a whole CMA-ES population as one batched generate vs one generate per candidate.

Both paths score the same population (x0 + CMA-ES-like perturbations, pycma's default population size
for the space) on the same bucket of embedded-world prompts with the same seeds, at the calibration
step count, interleaved round-robin over repeats (machine noise hits both alike); medians. The model
is the embedded toy checkpoint when it is installed, otherwise a random-init transformer of the same
architecture (``"model"`` in the JSON says which). Also checks that both give the same scores.
Target: ratio >= 3. Prints JSON.

    python benchmarks/population_eval.py [--granularity block] [--n-models 1] [--bucket 16] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def load_backbone(device: str):
    """The trained toy backbone, or a random-init one of the same architecture when no checkpoint exists."""
    from calibri_pipeline.backbones.toy import (
        ToyBackbone,
        ToyModelConfig,
        build_toy_transformer,
        default_weights_dir,
        load_toy_backbone,
    )

    if (default_weights_dir() / "model.safetensors").is_file():
        return load_toy_backbone(device=device), "toy (trained checkpoint)"
    torch.manual_seed(0)
    transformer = build_toy_transformer(ToyModelConfig(), zero_init=False).to(device)
    return ToyBackbone(
        transformer, ToyModelConfig(), device=device
    ), "toy architecture, random init (no checkpoint installed)"


def main(argv: list[str] | None = None) -> dict:
    from calibri_pipeline.method.ensemble import EnsembleLayout
    from calibri_pipeline.method.population import evaluate_population, evaluate_population_loop
    from calibri_pipeline.method.search_config import default_popsize
    from calibri_pipeline.method.space import CalibrationSpace
    from calibri_pipeline.rewards.world import WorldScore
    from calibri_pipeline.world.splits import make_splits

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--granularity", default="block", choices=["block", "layer", "gate"])
    p.add_argument("--n-models", type=int, default=1)
    p.add_argument("--population", type=int, default=None, help="default: pycma's 4 + floor(3 ln N)")
    p.add_argument("--bucket", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--max-batch", type=int, default=None, help="images per forward in the batched path (default: whole population)"
    )
    p.add_argument(
        "--memory-budget-mb", type=float, default=None, help="derive the batched path's max batch from a memory budget"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone, model = load_backbone(args.device)
    space = CalibrationSpace.from_transformer(backbone.transformer, args.granularity)
    layout = EnsembleLayout(space.size, args.n_models, cfg=backbone.uses_cfg)
    guidance = backbone.default_guidance
    population = args.population or default_popsize(layout.search_size)
    x0 = layout.initial(guidance if layout.mode == "cfg" else None)
    g = torch.Generator().manual_seed(0)
    vectors = x0 + 0.25 * torch.randn(population, x0.numel(), generator=g, dtype=torch.float64)
    vectors[0] = x0
    prompts = make_splits(0, args.bucket, 0, 0)["train"]
    seeds = list(range(args.bucket))
    reward = WorldScore()
    common = dict(steps=args.steps, guidance=guidance, n_models=args.n_models)
    batched_max = args.max_batch if args.max_batch or args.memory_budget_mb else population * args.bucket

    def batched():
        return evaluate_population(
            backbone,
            space,
            vectors,
            prompts,
            seeds,
            reward,
            max_batch=batched_max if not args.memory_budget_mb else None,
            memory_budget_mb=args.memory_budget_mb,
            **common,
        )

    def loop():
        return evaluate_population_loop(
            backbone, space, vectors, prompts, seeds, reward, max_batch=args.bucket, **common
        )

    backbone.text_encoder.precompute([q.text for q in prompts] + [""])
    batched(), loop()  # warm-up: first-call allocations, kernel selection
    times: dict[str, list[float]] = {"batched": [], "loop": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("batched", batched), ("loop", loop)):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    t_batched, t_loop = statistics.median(times["batched"]), statistics.median(times["loop"])
    out = {
        "benchmark": "population_eval",
        "model": model,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "granularity": args.granularity,
        "n_models": args.n_models,
        "search_size": layout.search_size,
        "population": population,
        "bucket": args.bucket,
        "steps": args.steps,
        "images_per_generation": population * args.bucket,
        "batched_max_batch": batched_max if not args.memory_budget_mb else f"from {args.memory_budget_mb} MB budget",
        "loop_max_batch": args.bucket,
        "repeats": args.repeats,
        "batched_seconds": t_batched,
        "loop_seconds": t_loop,
        "batched_candidates_per_s": population / t_batched,
        "loop_candidates_per_s": population / t_loop,
        "ratio": t_loop / t_batched,
        "target_ratio": 3.0,
        "max_abs_score_diff": float((results["batched"] - results["loop"]).abs().max()),
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
