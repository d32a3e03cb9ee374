"""calibri-pipeline: Calibri (parameter-efficient calibration of Diffusion Transformers) as a Dagster pipeline.

The method core lives in :mod:`calibri_pipeline.method` and never imports Dagster. Heavy imports
(torch) happen on first use of an exported name, so ``import calibri_pipeline`` stays cheap.
"""

from __future__ import annotations

from calibri_pipeline.runtime import tune_allocator

# before any tensor exists: keep freed activations in the heap instead of mmap/munmap per call (runtime.py)
tune_allocator()

__version__ = "0.1.0"
__all__ = ["Calibration", "CalibrationSpace", "EnsembleLayout", "apply_calibration"]


def __getattr__(name: str):
    if name == "CalibrationSpace":
        from calibri_pipeline.method.space import CalibrationSpace

        return CalibrationSpace
    if name == "Calibration":
        from calibri_pipeline.method.calibration import Calibration

        return Calibration
    if name == "apply_calibration":
        from calibri_pipeline.backbones.stock import apply_calibration

        return apply_calibration
    if name == "EnsembleLayout":
        from calibri_pipeline.method.ensemble import EnsembleLayout

        return EnsembleLayout
    raise AttributeError(f"module 'calibri_pipeline' has no attribute {name!r}")
