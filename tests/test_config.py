"""One configuration: the preset declares every field; the Dagster run config and the search config derive from it."""

from __future__ import annotations

import pytest

from calibri_pipeline.assets.common import CalibriConfig, resolve_preset
from calibri_pipeline.method.search_config import SearchConfig
from calibri_pipeline.presets import PRESET_OVERRIDES, SEARCH_OVERRIDES, Preset, get_preset
from calibri_pipeline.stages import search_config

PIPELINE_ONLY = {"preset", "llm_rewrite", "warm_start_from"}


def test_the_run_config_is_generated_from_the_preset_and_the_search():
    fields = set(CalibriConfig.model_fields)
    # every overridable field, under its own name; `validate` would shadow pydantic's method
    assert fields == PIPELINE_ONLY | (set(PRESET_OVERRIDES) | set(SEARCH_OVERRIDES)) - {"validate"}
    assert {"segments", "sigma0", "target_drop", "max_generations", "confirm_level"} <= fields
    assert not {"name", "model", "reward", "notes", "search", "seed"} & fields
    assert CalibriConfig.model_fields["segments"].annotation == (list[float] | None)


def test_a_run_config_override_reaches_the_search():
    config = CalibriConfig(max_generations=3, sigma0=0.5, segments=[0.6], n_val=8)
    overrides = config.model_dump(exclude=PIPELINE_ONLY)
    preset = resolve_preset("toy", "embedded-default", **overrides)
    assert preset.search.max_generations == 3 and preset.segments == (0.6,) and preset.n_val == 8
    cfg = search_config(preset, seed=4)
    assert (cfg.max_generations, cfg.sigma0, cfg.seed) == (3, 0.5, 4)
    untouched = get_preset("embedded-default")
    assert preset.search.confirm_top == untouched.search.confirm_top == 2  # only what was set changed


def test_sigma0_follows_the_scaling_unless_set():
    assert search_config(get_preset("embedded-default")).sigma0 == 1.0  # the sweep's stds are absolute
    assert search_config(get_preset("flux-block-hpsv3")).sigma0 == 0.25  # the paper's, on every coordinate
    assert SearchConfig().resolved(has_initial_stds=False).sigma0 == 0.25
    assert SearchConfig(sigma0=0.1).resolved(has_initial_stds=True).sigma0 == 0.1


def test_an_old_or_misspelt_field_is_refused_with_the_right_name():
    with pytest.raises(ValueError, match=r"generations \(did you mean max_generations\?\)"):
        get_preset("embedded-default").with_overrides(generations=3)
    with pytest.raises(ValueError, match="SearchConfig.bucket_size must be a positive int"):
        get_preset("embedded-default").with_overrides(bucket_size=0)


def test_a_preset_round_trips_and_an_older_flat_record_still_reads():
    preset = get_preset("embedded-default")
    assert Preset.from_dict(preset.to_dict()) == preset
    flat = {k: v for k, v in preset.to_dict().items() if k != "search"}  # how result.json held it before
    flat.update(generations=12, bucket_size=16, val_every=3, patience=None, sigma0=None, probe_buckets=2)
    flat.update(target_gain=0.03, max_val_seeds=3, max_bucket_seeds=1, confirm_top=2, separable=False, popsize=None)
    old = Preset.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()})
    assert old == preset.with_overrides(max_generations=12)
