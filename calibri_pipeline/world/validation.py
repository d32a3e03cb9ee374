"""How trustworthy is the exact scorer? Numbers for the README and the tests.

``python -m calibri_pipeline.world.validation [n_per_category] [seed]`` prints them as JSON:
accuracy / alignment / quality on ground-truth renders per category, on noise and blank images,
alignment against another prompt's spec, and quality under growing blur and noise.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
from scipy import ndimage

from calibri_pipeline.world.grammar import sample_prompt
from calibri_pipeline.world.scene import realize, render
from calibri_pipeline.world.scorer import score_images
from calibri_pipeline.world.vocab import CATEGORIES, IMAGE_SIZE

BLUR_SIGMAS = (0.0, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0)
NOISE_MIXES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def ground_truth_batch(n_per_category: int, seed: int) -> tuple[np.ndarray, list]:
    """Ground-truth renders ``uint8 [N, H, W, 3]`` of random prompts, ``n_per_category`` of each category."""
    rng = np.random.default_rng(seed)
    prompts, images = [], []
    for category in CATEGORIES:
        for _ in range(n_per_category):
            prompt = sample_prompt(rng, category)
            prompts.append(prompt)
            images.append(render(realize(prompt.spec, rng)))
    return np.stack(images), prompts


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``uint8 [N, H, W, 3]`` images over the two spatial axes."""
    if sigma == 0:
        return images
    out = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, sigma, sigma, 0))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _means(results: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "accuracy": float(np.mean([r["correct"] for r in results])),
        "alignment": float(np.mean([r["alignment"] for r in results])),
        "quality": float(np.mean([r["quality"] for r in results])),
    }


def validate_scorer(n_per_category: int = 200, seed: int = 0) -> dict[str, Any]:
    """Measure the scorer on ground truth and on degraded / unrelated images (all numbers are means)."""
    images, prompts = ground_truth_batch(n_per_category, seed)
    specs = [p.spec for p in prompts]
    start = time.perf_counter()
    truth = score_images(images, specs)
    seconds = time.perf_counter() - start
    report: dict[str, Any] = {"n_images": len(specs), "seconds_per_1000_images": 1000 * seconds / len(specs)}
    report["ground_truth"] = {c: _means([r for r in truth if r["category"] == c]) for c in CATEGORIES}
    rng = np.random.default_rng(seed + 1)
    shape = (len(specs), IMAGE_SIZE, IMAGE_SIZE, 3)
    report["uniform_noise"] = _means(score_images(rng.random(shape).astype(np.float32), specs))
    report["blank"] = _means(score_images(np.zeros(shape, dtype=np.uint8), specs))
    shifted = specs[1:] + specs[:1]  # the next prompt of the same category (mostly a different spec)
    report["other_spec_alignment"] = _means(score_images(images, shifted))["alignment"]
    report["blur"] = {f"{s:g}": _means(score_images(blur(images, s), specs)) for s in BLUR_SIGMAS}
    noise = rng.random(images.shape)
    report["noise_mix"] = {
        f"{t:g}": _means(score_images(((1 - t) * images / 255.0 + t * noise).astype(np.float32), specs))
        for t in NOISE_MIXES
    }
    return report


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    print(json.dumps(validate_scorer(n, seed), indent=2))
