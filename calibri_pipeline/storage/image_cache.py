"""The pipeline's image cache: PNGs in the object store, one ``image_cache`` catalog row each.

Implements :class:`calibri_pipeline.method.population.ImageCache`. An image's key hashes everything
that determines it (the backbone's identity, prompt text, seed, steps, guidance, Calibri vector), so
every asset that needs an image the pipeline already made reads it back instead of sampling it again:
the ablation reads the sweep's alpha = 0 images, the evaluation reads the baselines, a calibration
that selected x0 reads the baseline images as its own.

Objects live under ``images/<model>/<identity>/<setting>/nfe<steps>/g<guidance>/<prompt_id>_<seed>.png``
(``setting`` is ``baseline`` or ``v-`` + the vector's digest), readable by people browsing the store.
The PNG is written before its catalog row, so a row always points at a whole image; a PNG without
a row (a crash in between) is simply made again and overwritten.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Sequence

import numpy as np
import polars as pl
import torch

if TYPE_CHECKING:
    from calibri_pipeline.method.population import CachedImage
    from calibri_pipeline.storage.catalog import Catalog
    from calibri_pipeline.storage.object_store import ObjectStore


def _guidance_tag(guidance: float | None) -> str:
    return "gnone" if guidance is None else f"g{guidance:g}".replace("-", "m")


def cache_object_key(item: CachedImage) -> str:
    setting = "baseline" if item.vector_id == "baseline" else f"v-{item.vector_id[:16]}"
    return (
        f"images/{item.model}/{item.identity}/{setting}/nfe{item.steps}/{_guidance_tag(item.guidance)}/"
        f"{item.prompt.prompt_id}_{item.seed}.png"
    )


def read_png_tensor(store: ObjectStore, uri: str) -> torch.Tensor:
    """A stored PNG as ``[3, H, W]`` float32 in [0, 1] (exactly what was scored)."""
    image = store.get_png(store.key_of(uri)).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class StoredImageCache:
    """Images of one model key: looked up in the catalog, read from and written to the object store."""

    def __init__(self, store: ObjectStore, catalog: Catalog, model: str) -> None:
        self.store = store
        self.catalog = catalog
        self.model = model
        self._lock = threading.Lock()
        rows = catalog.query("SELECT image_key, uri FROM image_cache WHERE model = ?", [model])
        self._uris: dict[str, str] = dict(zip(rows["image_key"].to_list(), rows["uri"].to_list()))
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._uris)

    def uri(self, key: str) -> str | None:
        return self._uris.get(key)

    def get(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        with self._lock:
            found = {k: self._uris[k] for k in keys if k in self._uris}
            self.hits += len(found)
            self.misses += len(keys) - len(found)
        return {k: read_png_tensor(self.store, uri) for k, uri in found.items()}

    def put(self, images: Sequence[CachedImage]) -> None:
        rows = []
        for item in images:
            if item.model != self.model:
                raise ValueError(f"this cache holds images of model {self.model!r}, got one of {item.model!r}")
            uri = self.store.put_png(cache_object_key(item), item.image)
            rows.append(
                dict(
                    image_key=item.key,
                    model=item.model,
                    identity=item.identity,
                    prompt_id=item.prompt.prompt_id,
                    text=getattr(item.prompt, "text", str(item.prompt)),
                    seed=int(item.seed),
                    steps=int(item.steps),
                    guidance=None if item.guidance is None else float(item.guidance),
                    vector_id=item.vector_id,
                    vector=item.vector,
                    uri=uri,
                    width=int(item.image.shape[-1]),
                    height=int(item.image.shape[-2]),
                )
            )
        if not rows:
            return
        df = pl.DataFrame(rows, schema_overrides={"vector": pl.List(pl.Float64), "guidance": pl.Float64})
        self.catalog.insert_new("image_cache", df, key="image_key")
        with self._lock:
            self._uris.update({r["image_key"]: r["uri"] for r in rows})


__all__ = ["StoredImageCache", "cache_object_key", "read_png_tensor"]
