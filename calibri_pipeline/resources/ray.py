"""Where a calibration scores its CMA-ES populations: in-process (default) or on Ray actors.

``RayResource(address=None)`` keeps everything in the step's process. ``address="local"`` starts a
private Ray cluster on this machine (random auth token, no dashboard, session files in a temp dir);
``"ray://head:10001"`` uses a remote cluster through Ray Client and ``"auto"`` joins the cluster this
machine belongs to. Each of ``n_workers`` actors holds one model replica (one GPU per actor when
the cluster has GPUs), see :class:`calibri_pipeline.method.ray_eval.RayWorkerPool`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import dagster as dg
from pydantic import ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from calibri_pipeline.method.ray_eval import BackboneFactory, RayWorkerPool


class RayResource(dg.ConfigurableResource):
    """Ray cluster for population evaluation; ``address=None`` means no Ray at all."""

    # a mistyped address could hold a secret: validation errors must not echo it back into logs
    model_config = ConfigDict(hide_input_in_errors=True)

    address: str | None = Field(
        default=None,
        description="None: in-process; 'local': a private local Ray cluster; 'auto' or 'host:port': join a "
        "running cluster; 'ray://host:10001': Ray Client",
    )
    n_workers: int = Field(default=2, description="Ray actors, each holding one model replica")
    threads_per_worker: int = Field(default=1, description="torch CPU threads (and Ray CPUs) per actor")
    gpus_per_worker: float | None = Field(
        default=None, description="Ray GPUs per actor (None: 1 when the cluster has GPUs, else 0)"
    )
    max_retries: int = Field(default=3, description="re-evaluations of a chunk whose worker died, before failing")

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value:
            return None
        if not (value in ("local", "auto") or value.startswith("ray://") or ":" in value):
            raise ValueError(
                f"Ray address {value!r} is not one of None, 'local', 'auto', 'host:port', 'ray://host:port'"
            )
        if "@" in value:
            raise ValueError("the Ray address must not carry credentials; use RAY_AUTH_TOKEN in the environment")
        return value

    @field_validator("n_workers", "threads_per_worker")
    @classmethod
    def _check_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive integer, got {value}")
        return value

    @field_validator("max_retries")
    @classmethod
    def _check_retries(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"max_retries must be >= 0, got {value}")
        return value

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @contextmanager
    def worker_pool(self, backbone_factory: BackboneFactory) -> Iterator[RayWorkerPool | None]:
        """A started worker pool for the step (None when in-process); its workers stop on exit."""
        if not self.enabled:
            yield None
            return
        from calibri_pipeline.method.ray_eval import RayWorkerPool

        pool = RayWorkerPool(
            backbone_factory,
            self.n_workers,
            address=self.address,
            threads_per_worker=self.threads_per_worker,
            gpus_per_worker=self.gpus_per_worker,
            max_retries=self.max_retries,
        )
        try:
            yield pool
        finally:
            pool.close()
