"""Candidates per second with 1 vs 2 Ray workers (each a model replica with its own CPU thread / GPU).

One local Ray cluster (random auth token, session files in a temp dir, removed at the end) holds both
evaluators at once, so their runs interleave round-robin over the repeats (machine noise hits both
alike); medians. The same CMA-ES-like population (x0 + perturbations, pycma's default size) is
scored on the same bucket of embedded-world prompts and seeds at the calibration step count (world
score plus each image's mean pixel, a continuous check that the images agree); an in-process run
with one torch thread is the reference for Ray's own overhead, and all three must give the same
scores. Prints JSON; ``ratio`` = 2-worker / 1-worker candidates per second.

On a machine with N free cores the ideal ratio is min(2, N); on the project's 2-core dev box,
shared with other work, expect ~1.0-1.6.

    python benchmarks/ray_scaling.py [--bucket 16] [--steps 4] [--repeats 3] [--granularity block]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


class PixelMean:
    """A continuous score of every image (its mean pixel value), so that "same scores" compares the
    images themselves even where the world reward is flat. Defined in ``__main__``: Ray ships it by value."""

    name = "pixel_mean"
    higher_is_better = True
    scale = (0.0, 1.0)

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--granularity", default="block", choices=["block", "layer", "gate"])
    p.add_argument("--population", type=int, default=None, help="default: pycma's 4 + floor(3 ln N)")
    p.add_argument("--bucket", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads-per-worker", type=int, default=1)
    args = p.parse_args(argv)

    import ray

    from calibri_pipeline.backbones.toy import load_toy_backbone
    from calibri_pipeline.method.population import LocalEvaluator
    from calibri_pipeline.method.ray_eval import RayWorkerPool, connect_ray
    from calibri_pipeline.method.sampler import SamplingSettings
    from calibri_pipeline.method.search_config import default_popsize
    from calibri_pipeline.method.space import CalibrationSpace, SearchSpace
    from calibri_pipeline.rewards.world import WorldScore
    from calibri_pipeline.world.splits import make_splits

    torch.set_num_threads(args.threads_per_worker)  # the in-process reference gets what one worker gets
    backbone = load_toy_backbone()
    space = CalibrationSpace.from_transformer(backbone.transformer, args.granularity)
    search = SearchSpace.for_model(space, 1, uses_cfg=backbone.uses_cfg)
    population = args.population or default_popsize(search.dimension)
    x0 = search.x0(backbone.default_guidance).to(torch.float64)
    g = torch.Generator().manual_seed(0)
    vectors = x0 + 0.25 * torch.randn(population, x0.numel(), generator=g, dtype=torch.float64)
    vectors[0] = x0
    prompts = make_splits(0, args.bucket, 0, 0)["train"]
    seeds = list(range(args.bucket))
    rewards = [WorldScore(), PixelMean()]
    sampling = SamplingSettings(steps=args.steps, guidance=backbone.default_guidance)

    with tempfile.TemporaryDirectory(prefix="calibri-ray-bench-") as temp_dir:
        # 3 logical CPUs: both evaluators (1 + 2 workers) stay up; idle actors use no CPU
        connect_ray("local", num_cpus=3 * args.threads_per_worker, num_gpus=0, temp_dir=temp_dir)  # CPU replicas
        try:
            started = time.perf_counter()
            pools = {
                n: RayWorkerPool(load_toy_backbone, n_workers=n, threads_per_worker=args.threads_per_worker)
                for n in (1, 2)
            }
            startup_s = time.perf_counter() - started
            evaluators = {
                "in_process": LocalEvaluator(backbone, search, rewards, sampling),
                "ray_1_worker": pools[1].evaluator(backbone, search, rewards, sampling),
                "ray_2_workers": pools[2].evaluator(backbone, search, rewards, sampling),
            }
            runs = {
                name: (lambda ev=ev: {k: torch.from_numpy(v) for k, v in ev(vectors, prompts, seeds).scores.items()})
                for name, ev in evaluators.items()
            }
            scores = {name: fn() for name, fn in runs.items()}  # warm-up: text cache, first allocations
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeats):
                for name, fn in runs.items():
                    t0 = time.perf_counter()
                    scores[name] = fn()
                    times[name].append(time.perf_counter() - t0)
            for pool in pools.values():
                pool.close()
        finally:
            ray.shutdown()

    seconds = {name: statistics.median(t) for name, t in times.items()}
    per_s = {name: population / s for name, s in seconds.items()}
    out = {
        "benchmark": "ray_scaling",
        "model": "toy (shipped checkpoint)",
        "cpu_cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "threads_per_worker": args.threads_per_worker,
        "granularity": args.granularity,
        "population": population,
        "bucket": args.bucket,
        "steps": args.steps,
        "images_per_generation": population * args.bucket,
        "repeats": args.repeats,
        "worker_startup_seconds_both_evaluators": startup_s,
        "seconds_per_generation": seconds,
        "candidates_per_s": per_s,
        "ratio": per_s["ray_2_workers"] / per_s["ray_1_worker"],
        "ray_1_worker_vs_in_process": per_s["ray_1_worker"] / per_s["in_process"],
        "max_abs_score_diff_vs_in_process": {
            r.name: max(
                float((scores[run][r.name] - scores["in_process"][r.name]).abs().max())
                for run in ("ray_1_worker", "ray_2_workers")
            )
            for r in rewards
        },
        "score_spread": {r.name: float(scores["in_process"][r.name].std()) for r in rewards},
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
