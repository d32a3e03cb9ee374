"""Which training prompts and noise seeds each score uses: a pure function of the search's seed.

A generation's :class:`Bucket` (common random numbers: every candidate sees the same items and
seeds), the fixed validation seeds, and the fresh seeds of the final confirmation come from
disjoint streams of one seed, so a resumed or replayed run sees exactly the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Bucket:
    """The training images of one generation: item (prompt) indices and their noise seeds, ``[B]`` each.

    Every candidate of the generation is scored on exactly these (common random numbers).
    """

    generation: int
    item_indices: tuple[int, ...]
    seeds: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.item_indices)

    def to_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "item_indices": list(self.item_indices), "seeds": list(self.seeds)}


def make_bucket(
    seed: int, generation: int, n_items: int, bucket_size: int, seeds_per_prompt: int = 1, *, probe: int = 0
) -> Bucket:
    """The bucket of ``generation``: a pure function of its arguments, so a resumed run gets the same data.

    Items are drawn epoch by epoch from seeded permutations of all training items (every item is
    used once per epoch; buckets may straddle two epochs), noise seeds from a per-generation stream.
    ``probe > 0`` draws the noise probe's extra bucket number ``probe`` from streams of its own.
    """
    if n_items < bucket_size:
        raise ValueError(
            f"bucket_size={bucket_size} needs at least that many training prompts, got {n_items}; "
            "lower SearchConfig.bucket_size or add training prompts"
        )
    start = generation * bucket_size
    picked: list[int] = []
    epoch = start // n_items
    offset = start % n_items
    if probe:
        picked = [int(i) for i in np.random.default_rng([seed, 0x9B0BE, probe]).permutation(n_items)[:bucket_size]]
    while len(picked) < bucket_size:
        order = np.random.default_rng([seed, 0xB0C4E7, epoch]).permutation(n_items)
        take = order[offset : offset + bucket_size - len(picked)]
        picked.extend(int(i) for i in take)
        epoch, offset = epoch + 1, 0
    stream = [seed, 0x5EED5, generation] + ([0x9B0BE, probe] if probe else [])
    noise = np.random.default_rng(stream).integers(0, 2**31 - 1, size=bucket_size * seeds_per_prompt)
    items = tuple(i for i in picked for _ in range(seeds_per_prompt))
    return Bucket(generation, items, tuple(int(s) for s in noise))


def validation_seeds(seed: int, n_items: int, seeds_per_prompt: int = 1) -> list[int]:
    """Fixed noise seeds of the validation images (the same for every validated vector)."""
    rng = np.random.default_rng([seed, 0x7A11D])
    return [int(s) for s in rng.integers(0, 2**31 - 1, size=n_items * seeds_per_prompt)]


#: per-prompt seeds of the confirmation re-scoring start here (validation and test use small ones)
CONFIRM_SEED_BASE = 1_000_000


def confirmation_seeds(seed: int, n_items: int, seeds_per_prompt: int = 1) -> list[int]:
    """Fresh noise seeds for the final re-scoring (disjoint streams from validation's and the buckets')."""
    rng = np.random.default_rng([seed, 0xC0F1A])
    return [int(s) for s in rng.integers(0, 2**31 - 1, size=n_items * seeds_per_prompt)]


__all__ = ["Bucket", "make_bucket", "validation_seeds", "confirmation_seeds", "CONFIRM_SEED_BASE"]
