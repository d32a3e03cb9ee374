"""The toy backbone's data: seeded prompt pools from the procedural world and a batch stream.

Held-out prompts come from :func:`calibri_pipeline.world.make_splits`. Each category draws from its
own random stream (seed + category name) in the order test, val, train, so asking for one category
alone with the same per-category test/val counts reproduces exactly that category's part of the full
split. The training pool therefore never contains a validation or test text, and the held-out sets do
not change when the training pool grows.
"""

from __future__ import annotations

from collections import deque
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


def draw_batch(
    specs: Sequence[object],
    members: Sequence[np.ndarray],
    probabilities: np.ndarray,
    batch_size: int,
    caption_dropout: float,
    seed: int,
    index: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batch number ``index`` of a stream: (images uint8 [B,H,W,3], prompt ids [B], dropped [B], category ids [B]).

    Each batch has its own random stream (seed, index), so batches can be drawn in any order, by any
    number of worker processes, and the sequence is the same.
    """
    from calibri_pipeline.world import realize, render

    rng = np.random.default_rng([int(seed), 0x70A, int(index)])
    cat_ids = rng.choice(len(members), size=batch_size, p=probabilities)
    idx = np.empty(batch_size, dtype=np.int64)
    images = []
    for i, c in enumerate(cat_ids):
        idx[i] = members[c][rng.integers(len(members[c]))]
        images.append(render(realize(specs[idx[i]], rng)))
    drop = rng.random(batch_size) < caption_dropout
    return np.stack(images), idx, drop, cat_ids


_WORKER_ARGS: tuple | None = None


def _init_worker(args: tuple) -> None:
    global _WORKER_ARGS
    _WORKER_ARGS = args


def _draw_in_worker(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    assert _WORKER_ARGS is not None, "worker not initialised"
    return draw_batch(*_WORKER_ARGS, index)


class WorldBatchStream:
    """Seeded stream of training batches: (pixels [-1,1], text states, pooled, categories).

    Every draw picks a category by weight, a prompt of that category, and a fresh random layout of its
    spec, so the model sees each prompt in many arrangements. ``caption_dropout`` of the batch gets
    the empty prompt instead (classifier-free guidance needs the unconditional model).

    ``workers > 0`` renders batches in that many processes (a GPU consumes them faster than one CPU
    core draws them), ``2 * workers`` batches ahead; the batches are identical for any worker count.
    Call :meth:`close` (or use it as a context manager) to stop the workers.
    """

    def __init__(
        self,
        pool: EncodedPool,
        category_weights: Mapping[str, float],
        batch_size: int,
        caption_dropout: float,
        seed: int,
        workers: int = 0,
    ) -> None:
        cats = [c for c in category_weights if category_weights[c] > 0]
        missing = [c for c in cats if c not in pool.category_index or len(pool.category_index[c]) == 0]
        if missing:
            raise ValueError(f"no training prompts for categories {missing}")
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        w = np.asarray([float(category_weights[c]) for c in cats])
        self.categories = cats
        self.probabilities = w / w.sum()
        self.pool = pool
        self.batch_size = batch_size
        self.caption_dropout = caption_dropout
        self.seed = int(seed)
        self.index = 0
        self._draw_args = (
            [p.spec for p in pool.prompts],
            [pool.category_index[c] for c in cats],
            self.probabilities,
            batch_size,
            caption_dropout,
            self.seed,
        )
        self._workers = None
        self._pending: deque = deque()
        if workers:
            import multiprocessing

            # spawn, not fork: the parent may already hold CUDA or OpenMP state that must not be forked
            self._workers = multiprocessing.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(self._draw_args,)
            )
            self._ahead = 2 * workers
            self._submitted = 0

    def _draw(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._workers is None:
            return draw_batch(*self._draw_args, self.index)
        while self._submitted < self.index + self._ahead:
            self._pending.append(self._workers.apply_async(_draw_in_worker, (self._submitted,)))
            self._submitted += 1
        return self._pending.popleft().get()

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        images, idx, drop_np, cat_ids = self._draw()
        self.index += 1
        drop = torch.from_numpy(drop_np)
        index = torch.from_numpy(idx)
        states = self.pool.states[index].float()
        pooled = self.pool.pooled[index].float()
        states[drop] = self.pool.empty_states
        pooled[drop] = self.pool.empty_pooled
        return images_to_model_range(images), states, pooled, [self.categories[c] for c in cat_ids]

    def close(self) -> None:
        if self._workers is not None:
            self._workers.terminate()
            self._workers.join()
            self._workers = None
            self._pending.clear()

    def __enter__(self) -> WorldBatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
