"""Seeded, reproducible train/val/test prompt splits of the world, disjoint by prompt text."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import numpy as np

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.world.grammar import sample_prompt
from calibri_pipeline.world.vocab import CATEGORIES

SPLIT_NAMES = ("train", "val", "test")


def _per_category(n: int, categories: Sequence[str]) -> list[int]:
    """Split ``n`` as evenly as possible (the first categories get the remainder)."""
    base, extra = divmod(n, len(categories))
    return [base + (1 if i < extra else 0) for i in range(len(categories))]


def make_splits(
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    categories: Sequence[str] | None = None,
    max_attempts_per_prompt: int = 200,
) -> dict[str, list[Prompt]]:
    """Draw ``{"train": [...], "val": [...], "test": [...]}`` of world prompts.

    Balanced over ``categories`` (default: all), disjoint by text across and within splits, and
    reproducible: each category has its own random stream (seeded by ``seed`` and the category name),
    and test is drawn first, then val, then train, so the held-out splits do not change when only
    ``n_train`` grows. Raises ``ValueError`` when the grammar cannot produce that many distinct texts.
    """
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    categories = list(CATEGORIES if categories is None else categories)
    if not categories:
        raise ValueError("categories must not be empty")
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or len(set(categories)) != len(categories):
        raise ValueError(f"categories must be distinct names from {list(CATEGORIES)}, got {categories}")

    sizes = {"test": n_test, "val": n_val, "train": n_train}
    out: dict[str, list[Prompt]] = {name: [] for name in SPLIT_NAMES}
    for category in categories:
        # zlib.crc32 is stable across processes (unlike hash()), so streams are the same everywhere.
        rng = np.random.default_rng([int(seed), zlib.crc32(category.encode())])
        seen: set[str] = set()
        for split in ("test", "val", "train"):
            want = _per_category(sizes[split], categories)[categories.index(category)]
            drawn, attempts = 0, 0
            while drawn < want:
                attempts += 1
                if attempts > max_attempts_per_prompt * max(want, 1):
                    raise ValueError(
                        f"could not draw {want} distinct {category!r} prompts for {split!r} "
                        f"(got {drawn}; {len(seen)} distinct texts in this category so far)"
                    )
                prompt = sample_prompt(rng, category)
                if prompt.text in seen:
                    continue
                seen.add(prompt.text)
                out[split].append(dataclasses.replace(prompt, split=split))
                drawn += 1
    # Interleave categories (round-robin order of drawing is per category); keep a stable order.
    for split in SPLIT_NAMES:
        order = np.random.default_rng([int(seed), zlib.crc32(split.encode())]).permutation(len(out[split]))
        out[split] = [out[split][i] for i in order]
    return out
