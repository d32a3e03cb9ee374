"""How close the embedded default's sampler runs to the CPU's matmul rate. Prints JSON.

In one process: (1) the FLOPs of one image, counted in eager mode with torch's ``FlopCounterMode``
over a whole ``generate`` call (CFG, so two transformer passes per step); (2) images/s through
``ToyBackbone.generate`` at the demo's batch (median of repeats after a warm-up call); (3) a large
fp32 matmul's GFLOP/s (median of repeats) as the machine's reachable rate. The ratio
``sampler GFLOP/s / matmul GFLOP/s`` is the target (>= 0.5). Also the minor page faults and system
time of one timed call, which show allocator churn (glibc mmaps and unmaps big tensors unless its
thresholds are raised; see ``calibri_pipeline/runtime.py``).

    python benchmarks/sampler_efficiency.py [--steps 4] [--images 32] [--repeats 5] [--matmul 2048]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_gflops(n: int, repeats: int) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> dict:
    from calibri_pipeline import runtime

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--images", type=int, default=32, help="images per generate call (the demo's micro-batch)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--matmul", type=int, default=2048, help="side of the square fp32 matmul")
    p.add_argument("--guidance", type=float, default=2.0)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from calibri_pipeline.backbones.toy import load_toy_backbone
    from calibri_pipeline.world.grammar import sample_prompt

    backbone = load_toy_backbone()
    rng = np.random.default_rng(0)
    prompts = [sample_prompt(rng) for _ in range(args.images)]
    seeds = list(range(args.images))

    def run():
        return backbone.generate(prompts, seeds, steps=args.steps, guidance=args.guidance)

    run()  # warm-up: text encodings cached, kernels chosen
    before_peak = matmul_gflops(args.matmul, 20)
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    flops_per_image = counter.get_total_flops() / args.images

    times, faults, sys_times = [], [], []
    for _ in range(args.repeats):
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        sys_times.append(after.ru_stime - before.ru_stime)
    seconds = statistics.median(times)
    images_per_s = args.images / seconds
    sampler_gflops = flops_per_image * images_per_s / 1e9
    # the matmul's rate drifts with the CPU's clock: the median of many short runs, before and after
    peak = statistics.median([before_peak, matmul_gflops(args.matmul, 20)])
    result = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "allocator": runtime.allocator_report(),
        "steps": args.steps,
        "images_per_call": args.images,
        "gflop_per_image": round(flops_per_image / 1e9, 3),
        "seconds_per_call": round(seconds, 3),
        "images_per_s": round(images_per_s, 2),
        "sampler_gflops": round(sampler_gflops, 1),
        "matmul_gflops": round(peak, 1),
        "matmul_gflops_before_after": [round(before_peak, 1), round(matmul_gflops(args.matmul, 20), 1)],
        "ratio": round(sampler_gflops / peak, 3),
        "minor_faults_per_call": int(statistics.median(faults)),
        "system_s_per_call": round(statistics.median(sys_times), 3),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "target_ratio": 0.5,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
