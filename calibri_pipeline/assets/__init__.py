"""Dagster assets by stage, their checks, jobs, sensors and schedules (collected by calibri_pipeline.definitions).

prompts -> baselines -> analyses (sweep, ablation) -> alternatives -> calibration -> evaluation (+ diversity)
-> export (+ the paper's tables across partitions); automation holds the jobs, the sensor and the schedule.
Every asset is a thin call into the framework-free core.
"""

from calibri_pipeline.assets.alternatives import alternatives
from calibri_pipeline.assets.analyses import block_ablation, scale_sweep
from calibri_pipeline.assets.baselines import baseline_images, baseline_scores, baseline_scores_are_finite
from calibri_pipeline.assets.calibration import calibration
from calibri_pipeline.assets.evaluation import (
    calibrated_beats_baseline,
    calibrated_not_worse_than_guidance_tuning,
    diversity,
    diversity_not_collapsed,
    evaluation,
)
from calibri_pipeline.assets.export import calibrated_checkpoint, paper_tables
from calibri_pipeline.assets.prompts import prompt_embeddings, prompts

#: the model x reward partitioned chain, in stage order; paper_tables reads across all partitions
PARTITIONED_ASSETS = [
    prompts,
    prompt_embeddings,
    baseline_images,
    baseline_scores,
    scale_sweep,
    block_ablation,
    alternatives,
    calibration,
    evaluation,
    diversity,
    calibrated_checkpoint,
]
ALL_ASSETS = [*PARTITIONED_ASSETS, paper_tables]
ALL_ASSET_CHECKS = [
    baseline_scores_are_finite,
    calibrated_beats_baseline,
    calibrated_not_worse_than_guidance_tuning,
    diversity_not_collapsed,
]

from calibri_pipeline.assets.automation import ALL_JOBS, ALL_SCHEDULES, ALL_SENSORS  # noqa: E402  (jobs select the assets above)

__all__ = ["ALL_ASSETS", "ALL_ASSET_CHECKS", "ALL_JOBS", "ALL_SENSORS", "ALL_SCHEDULES", "PARTITIONED_ASSETS"]
