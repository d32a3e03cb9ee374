"""The Dagster code location: ``dagster dev`` (via workspace.yaml) loads ``defs`` from here.

Assets, checks, jobs, sensors and schedules are collected from ``calibri_pipeline.assets``: define
``ALL_ASSETS``, ``ALL_ASSET_CHECKS``, ``ALL_JOBS``, ``ALL_SENSORS`` and ``ALL_SCHEDULES`` lists there
(each optional) and they appear here without touching this file. Resources come from
:func:`calibri_pipeline.resources.default_resources` under the keys ``compute``, ``object_store``
and ``catalog``; an asset asks for one by naming a parameter after its key.
"""

from __future__ import annotations

import dagster as dg

from calibri_pipeline import assets as _assets
from calibri_pipeline.resources import default_resources


def _collected(name: str) -> list:
    """``calibri_pipeline.assets.<name>`` as a list, or [] while the package does not define it."""
    return list(getattr(_assets, name, None) or [])


defs = dg.Definitions(
    assets=_collected("ALL_ASSETS"),
    asset_checks=_collected("ALL_ASSET_CHECKS"),
    jobs=_collected("ALL_JOBS"),
    sensors=_collected("ALL_SENSORS"),
    schedules=_collected("ALL_SCHEDULES"),
    resources=default_resources(),
)
