"""Dagster assets, checks, jobs, sensors and schedules (collected by calibri_pipeline.definitions)."""

from calibri_pipeline.assets.automation import ALL_JOBS, ALL_SCHEDULES, ALL_SENSORS
from calibri_pipeline.assets.pipeline import ALL_ASSETS, ALL_CHECKS

ALL_ASSET_CHECKS = ALL_CHECKS

__all__ = ["ALL_ASSETS", "ALL_ASSET_CHECKS", "ALL_JOBS", "ALL_SENSORS", "ALL_SCHEDULES"]
