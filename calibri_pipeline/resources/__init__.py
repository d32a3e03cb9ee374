"""Dagster resources: compute device, object store, catalog, and the ``gpu`` concurrency pool."""

from __future__ import annotations

import os
from typing import Any

from calibri_pipeline.resources.compute import GPU_POOL, ComputeResource, set_gpu_pool_limit
from calibri_pipeline.resources.ray import RayResource
from calibri_pipeline.resources.storage import CatalogResource, ObjectStoreResource
from calibri_pipeline.storage.paths import default_catalog_path, default_object_store_url

__all__ = [
    "GPU_POOL",
    "CatalogResource",
    "ComputeResource",
    "ObjectStoreResource",
    "RayResource",
    "default_resources",
    "set_gpu_pool_limit",
]


def default_resources() -> dict[str, Any]:
    """The resources every asset can ask for, configured from the environment at load time.

    ``CALIBRI_DEVICE`` (auto), ``CALIBRI_DTYPE`` (float32), ``CALIBRI_THREADS`` (torch default),
    ``CALIBRI_OBJECT_STORE`` / ``CALIBRI_CATALOG`` / ``CALIBRI_HOME`` (see storage.paths),
    ``CALIBRI_RAY_ADDRESS`` (unset: in-process) / ``CALIBRI_RAY_WORKERS`` (2). Paths are
    resolved here so the UI shows where things actually go.
    """
    threads = os.environ.get("CALIBRI_THREADS", "").strip()
    if threads and not threads.isdigit():
        raise ValueError(f"CALIBRI_THREADS must be a positive integer, got {threads!r}")
    ray_workers = os.environ.get("CALIBRI_RAY_WORKERS", "").strip() or "2"
    if not ray_workers.isdigit() or int(ray_workers) < 1:
        raise ValueError(f"CALIBRI_RAY_WORKERS must be a positive integer, got {ray_workers!r}")
    return {
        "compute": ComputeResource(
            device=os.environ.get("CALIBRI_DEVICE", "auto"),
            dtype=os.environ.get("CALIBRI_DTYPE", "float32"),
            threads=int(threads) if threads else None,
        ),
        "object_store": ObjectStoreResource(url=default_object_store_url()),
        "catalog": CatalogResource(path=str(default_catalog_path())),
        "ray": RayResource(address=os.environ.get("CALIBRI_RAY_ADDRESS") or None, n_workers=int(ray_workers)),
    }
