"""The toy backbone's data: seeded prompt pools from the procedural world and a batch stream.

Held-out prompts come from :func:`calibri_pipeline.world.make_splits`. Each category draws from its
own random stream (seed + category name) in the order test, val, train, so asking for one category
alone with the same per-category test/val counts reproduces exactly that category's part of the full
split. The training pool therefore never contains a validation or test text, and the held-out sets do
not change when the training pool grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from calibri_pipeline.prompts.base import Prompt

#: the world split every toy checkpoint is trained and evaluated against (recorded in config.json)
SPLIT_SEED = 0
HELDOUT_PER_CATEGORY = {"val": 100, "test": 200}

#: default mix of training categories: weighted towards the compositional ones, single objects kept in
DEFAULT_CATEGORY_WEIGHTS: dict[str, float] = {
    "single": 0.15,
    "color_binding": 0.15,
    "spatial": 0.17,
    "counting": 0.17,
    "size": 0.17,
    "multi": 0.19,
}


def world_categories() -> tuple[str, ...]:
    from calibri_pipeline.world import CATEGORIES

    return tuple(CATEGORIES)


def heldout_prompts(
    split: str,
    n_per_category: int,
    *,
    split_seed: int = SPLIT_SEED,
    categories: Sequence[str] | None = None,
    heldout_per_category: Mapping[str, int] = HELDOUT_PER_CATEGORY,
) -> list[Prompt]:
    """The first ``n_per_category`` prompts of each category of the world's ``split`` ("val" | "test")."""
    from calibri_pipeline.world import make_splits

    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    available = int(heldout_per_category[split])
    if not isinstance(n_per_category, int) or not 1 <= n_per_category <= available:
        raise ValueError(
            f"n_per_category must be an int in 1..{available} (the {split} split holds {available} prompts "
            f"per category), got {n_per_category!r}"
        )
    out: list[Prompt] = []
    for category in categories or world_categories():
        part = make_splits(
            split_seed,
            0,
            int(heldout_per_category["val"]),
            int(heldout_per_category["test"]),
            categories=[category],
        )[split]
        out.extend(part[:n_per_category])
    return out


def training_pool(
    n_per_category: Mapping[str, int],
    *,
    split_seed: int = SPLIT_SEED,
    heldout_per_category: Mapping[str, int] = HELDOUT_PER_CATEGORY,
) -> dict[str, list[Prompt]]:
    """Distinct training prompts per category, disjoint by text from the val and test splits."""
    from calibri_pipeline.world import make_splits

    pool: dict[str, list[Prompt]] = {}
    for category, n in n_per_category.items():
        pool[category] = make_splits(
            split_seed,
            int(n),
            int(heldout_per_category["val"]),
            int(heldout_per_category["test"]),
            categories=[category],
        )["train"]
    return pool


def images_to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 -> ``[N, 3, H, W]`` float32 in ``[-1, 1]`` (the model's pixel range)."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@dataclass
class EncodedPool:
    """Training prompts with their MiniLM encodings (stored float16 to halve memory)."""

    prompts: list[Prompt]
    category_index: dict[str, np.ndarray]  # category -> indices into prompts
    states: torch.Tensor  # [P, L, 384] float16
    pooled: torch.Tensor  # [P, 384] float16
    empty_states: torch.Tensor  # [L, 384] float32, the unconditional ("") input
    empty_pooled: torch.Tensor  # [384]


def encode_pool(pool: Mapping[str, Sequence[Prompt]], text_encoder, progress: bool = False) -> EncodedPool:
    prompts: list[Prompt] = []
    category_index: dict[str, np.ndarray] = {}
    for category, items in pool.items():
        start = len(prompts)
        prompts.extend(items)
        category_index[category] = np.arange(start, len(prompts))
    text_encoder.precompute([p.text for p in prompts], progress=progress)
    states = torch.empty(len(prompts), text_encoder.max_length, text_encoder.hidden_size, dtype=torch.float16)
    pooled = torch.empty(len(prompts), text_encoder.hidden_size, dtype=torch.float16)
    chunk = 512
    for start in range(0, len(prompts), chunk):
        emb = text_encoder.encode([p.text for p in prompts[start : start + chunk]])
        states[start : start + chunk] = emb.states.half()
        pooled[start : start + chunk] = emb.pooled.half()
    empty = text_encoder.encode([""])
    return EncodedPool(prompts, category_index, states, pooled, empty.states[0], empty.pooled[0])


class WorldBatchStream:
    """Seeded stream of training batches: (pixels [-1,1], text states, pooled, categories).

    Every draw picks a category by weight, a prompt of that category, and a fresh random layout of its
    spec, so the model sees each prompt in many arrangements. ``caption_dropout`` of the batch gets
    the empty prompt instead (classifier-free guidance needs the unconditional model).
    """

    def __init__(
        self,
        pool: EncodedPool,
        category_weights: Mapping[str, float],
        batch_size: int,
        caption_dropout: float,
        seed: int,
    ) -> None:
        cats = [c for c in category_weights if category_weights[c] > 0]
        missing = [c for c in cats if c not in pool.category_index or len(pool.category_index[c]) == 0]
        if missing:
            raise ValueError(f"no training prompts for categories {missing}")
        w = np.asarray([float(category_weights[c]) for c in cats])
        self.categories = cats
        self.probabilities = w / w.sum()
        self.pool = pool
        self.batch_size = batch_size
        self.caption_dropout = caption_dropout
        self.rng = np.random.default_rng([int(seed), 0x70A])

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        from calibri_pipeline.world import realize, render

        rng = self.rng
        cat_ids = rng.choice(len(self.categories), size=self.batch_size, p=self.probabilities)
        idx = np.empty(self.batch_size, dtype=np.int64)
        images = []
        for i, c in enumerate(cat_ids):
            members = self.pool.category_index[self.categories[c]]
            idx[i] = members[rng.integers(len(members))]
            scene = realize(self.pool.prompts[idx[i]].spec, rng)
            images.append(render(scene))
        drop = torch.from_numpy(rng.random(self.batch_size) < self.caption_dropout)
        index = torch.from_numpy(idx)
        states = self.pool.states[index].float()
        pooled = self.pool.pooled[index].float()
        states[drop] = self.pool.empty_states
        pooled[drop] = self.pool.empty_pooled
        return images_to_model_range(np.stack(images)), states, pooled, [self.categories[c] for c in cat_ids]
