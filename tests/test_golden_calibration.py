"""A calibration whose every result is pinned: moving code must not move a coefficient.

Recorded with ``CALIBRI_WRITE_GOLDEN=1 pytest tests/test_golden_calibration.py`` before the sampler and
the search loop were reorganised (commit 89d51af); every later commit must end the same run in the
same place. It exercises what the demo's calibration uses: the CFG ensemble, guidance coordinates,
two time segments, the noise probe that resizes validation, and the confirmation on fresh seeds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from calibri_pipeline.method.calibrate import CalibrationOptions, calibrate
from calibri_pipeline.method.sampler import SamplingSettings
from calibri_pipeline.method.search_config import SearchConfig
from calibri_pipeline.method.space import CalibrationSpace, SearchSpace

GOLDEN = Path(__file__).parent / "data" / "golden_calibration.json"


@pytest.fixture(scope="module")
def backbone():
    from calibri_pipeline.backbones.toy import ToyBackbone
    from calibri_pipeline.text_encoder import MiniLMTextEncoder

    from tiny_models import tiny_toy_transformer

    config, transformer = tiny_toy_transformer(2, gain=3.0)
    return ToyBackbone(transformer, config, MiniLMTextEncoder(max_length=8), default_steps=3, default_guidance=2.5)


def run_golden(backbone) -> dict:
    from test_population import ColourMatch, make_prompts

    torch.set_num_threads(1)  # the same kernels wherever the suite runs
    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    train, val = make_prompts(10, "train"), make_prompts(4, "val", 400)
    config = SearchConfig(
        max_generations=5,
        bucket_size=3,
        popsize=5,
        val_every=2,
        seed=3,
        patience=None,
        probe_buckets=2,
        target_gain=0.01,
        max_val_seeds=2,
        confirm_top=2,
    )
    search = SearchSpace.for_model(space, 2, uses_cfg=True, segments=(0.7,))
    sampling = SamplingSettings(steps=2, guidance=2.5, shift=2.0, max_batch=64)
    options = CalibrationOptions(config=config, guidance_coordinates=True)
    result = calibrate(backbone, search, train, val, ColourMatch(), sampling, options)
    search = result.search
    return {
        "vector": search.vector.tolist(),
        "val_score": search.val_score,
        "baseline_val_score": search.baseline_val_score,
        "best_generation": search.best_generation,
        "stop_reason": search.stop_reason,
        "validations": [
            {k: v for k, v in row.items() if isinstance(v, (int, float, str))} for row in search.validations
        ],
        "train_best": [row["train_best"] for row in search.generations],
        "sigmas": [row["sigma"] for row in search.generations],
        "candidates": [list(map(float, c["vector"])) + [float(c["fitness"])] for c in search.candidates],
        "confirmation_kept": search.confirmation["chosen"],
        "confirmation_gains": [row["gain"] for row in search.confirmation["rows"]],
        "noise": {k: v for k, v in (search.noise or {}).items() if isinstance(v, (int, float))},
    }


def test_the_pinned_calibration_ends_where_it_was_recorded(backbone):
    got = run_golden(backbone)
    if os.environ.get("CALIBRI_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert got["stop_reason"] == want["stop_reason"] and got["best_generation"] == want["best_generation"]
    assert got["confirmation_kept"] == want["confirmation_kept"]
    assert [row.get("generation") for row in got["validations"]] == [
        row.get("generation") for row in want["validations"]
    ]
    # the same computation replayed on this CPU is bitwise equal; another CPU class picks other
    # kernels (last bits of a float), so across machines the numbers agree to 1e-6, not bit for bit
    np.testing.assert_allclose(got["vector"], want["vector"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        [got["val_score"], got["baseline_val_score"]], [want["val_score"], want["baseline_val_score"]], atol=1e-6
    )
    for key in ("train_best", "sigmas", "candidates", "confirmation_gains"):
        np.testing.assert_allclose(np.array(got[key]), np.array(want[key]), atol=1e-6, err_msg=key)
    assert got["noise"].keys() == want["noise"].keys()
    np.testing.assert_allclose([got["noise"][k] for k in want["noise"]], list(want["noise"].values()), atol=1e-6)
