"""Compute resource (device, dtype, CPU threads) and the ``gpu`` concurrency pool.

GPU pool: every asset that runs a model on the accelerator is declared with
``@dg.asset(pool=GPU_POOL)`` (Dagster >= 1.9.12; ``pool=`` replaced the older
``op_tags={"dagster/concurrency_key": ...}``). The pool's limit lives in the Dagster instance, not in
code; set it to the number of GPUs on the machine so two GPU steps never share a card:

- ``dagster instance concurrency set gpu 1`` (once per DAGSTER_HOME), or in Python
  ``instance.event_log_storage.set_concurrency_slots("gpu", 1)`` (see :func:`set_gpu_pool_limit`);
- or, for every pool without an explicit limit, ``concurrency: {pools: {default_limit: 1}}`` in
  ``$DAGSTER_HOME/dagster.yaml``.

Pools are enforced per step across all runs (``concurrency: {pools: {granularity: op}}``, the
default); a step waiting for a slot shows as blocked in the UI.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

import dagster as dg
from pydantic import Field, field_validator

if TYPE_CHECKING:
    import torch

GPU_POOL = "gpu"

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class ComputeResource(dg.ConfigurableResource):
    """Where the models run: ``device`` (auto / cpu / cuda / cuda:N), ``dtype`` and CPU ``threads``."""

    device: str = Field(default="auto", description="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="model weights and activations dtype"
    )
    threads: int | None = Field(default=None, description="torch CPU threads for the step (None: torch's default)")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N")
        return value

    @field_validator("threads")
    @classmethod
    def _check_threads(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"threads must be a positive integer or None, got {value}")
        return value

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)

    def torch_device(self) -> torch.device:
        """The resolved device; a clear error when CUDA is asked for and absent."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"compute device {self.device!r} requested but CUDA is not available here; use device='cpu' or 'auto'"
                )
            index = torch.device(self.device).index
            if index is not None and index >= torch.cuda.device_count():
                raise RuntimeError(
                    f"compute device {self.device!r}: only {torch.cuda.device_count()} CUDA devices visible"
                )
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)


def set_gpu_pool_limit(instance: dg.DagsterInstance, limit: int = 1) -> None:
    """Give the ``gpu`` pool ``limit`` slots on ``instance`` (same as ``dagster instance concurrency set gpu N``)."""
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"gpu pool limit must be a positive integer (the number of GPUs), got {limit!r}")
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, limit)
