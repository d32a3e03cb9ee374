"""Time-dependent calibration (beyond the paper): coefficients per part of the noise schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_image_cache import PROMPTS, MeanPixel, backbone  # noqa: F401  (the tiny toy backbone fixture)

from calibri_pipeline.method.ensemble import GuidanceCoordinates
from calibri_pipeline.method.population import unmodified_guidance
from calibri_pipeline.method.space import CalibrationSpace, SearchSpace


def _space(backbone) -> CalibrationSpace:
    return CalibrationSpace.from_transformer(backbone.transformer, "block")


def test_a_search_space_with_segments(backbone):
    space = _space(backbone)
    search = SearchSpace.for_model(space, 2, uses_cfg=True, segments=(0.8,))
    one = SearchSpace.for_model(space, 2, uses_cfg=True)
    assert search.n_segments == 2 and search.dimension == 2 * one.dimension
    assert search.x0(2.5).tolist() == one.x0(2.5).tolist() * 2
    assert search.names()[0].startswith("sigma1-0.8/") and search.names()[-1].startswith("sigma0.8-0/")
    assert [search.segment_of(s) for s in (1.0, 0.81, 0.8, 0.5, 0.25)] == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match=r"2 schedule parts x space.search_size\(2\)"):
        search.check(torch.ones(one.dimension))
    for bad in ((1.0,), (0.5, 0.8), (0.5, 0.5)):
        with pytest.raises(ValueError, match="descending"):
            SearchSpace.for_model(space, 1, uses_cfg=True, segments=bad)
    # every part of x0 alike is the unmodified model (and shares its cached images); a part that differs is not
    assert unmodified_guidance(search, search.check(search.x0(2.0))[0], 2.5) == 2.0
    first_only = search.check(search.x0(2.0))[0].clone()
    first_only[0] = 0.5
    assert unmodified_guidance(search, first_only, 2.5) is False
    assert search.effective_guidance(torch.cat([one.x0(2.0), one.x0(3.0)])) == pytest.approx([2.0, 3.0])
    assert SearchSpace.for_model(space, 1, uses_cfg=True).effective_guidance(torch.ones(3)) is None
    coords = GuidanceCoordinates(search.layout, search.n_segments)
    z = coords.encode(search.x0(3.0).tolist())
    assert z[one.dimension - 2 : one.dimension] == pytest.approx([3.0, 1.0]) and z[-2:] == pytest.approx([3.0, 1.0])
    assert coords.decode(z) == pytest.approx(search.x0(3.0).tolist())


def test_each_step_uses_the_part_of_the_schedule_its_noise_level_is_in(backbone):
    space = _space(backbone)
    search = SearchSpace.for_model(space, 1, uses_cfg=True, segments=(0.6,))
    one = SearchSpace.for_model(space, 1, uses_cfg=True)
    early = one.x0(None).clone()
    early[0] = 0.0  # the first block bypassed, only while sigma > 0.6
    vector = torch.cat([early, one.x0(None)])
    # at 2 steps the noise levels are 1 and 0.5: the first step uses `early`, the second x0
    images = backbone.generate(PROMPTS, [1, 2, 3], steps=2, space=space, vectors=vector, segments=(0.6,))
    assert search.check(vector).shape == (1, search.dimension)
    from calibri_pipeline.method.sampler import make_velocity_fn

    cond, uncond = backbone.conditioning([p.text for p in PROMPTS])
    noise = backbone.initial_noise([1, 2, 3])

    def model_fn(x, sigma, c):
        return backbone.model_fn(x, sigma, c)

    v_early = make_velocity_fn(model_fn, cond, uncond, 2.5, search=one, transformer=backbone.transformer, vectors=early)
    v_late = make_velocity_fn(model_fn, cond, uncond, 2.5)
    x = noise + (0.5 - 1.0) * v_early(noise, torch.full((3,), 1.0))  # Euler step 1 (sigma 1 -> 0.5)
    x = x + (0.0 - 0.5) * v_late(x, torch.full((3,), 0.5))  # step 2 (0.5 -> 0)
    torch.testing.assert_close(images, backbone.decode_images(x), atol=1e-5, rtol=0)
    constant = backbone.generate(PROMPTS, [1, 2, 3], steps=2, space=space, vectors=early)
    assert (constant - images).abs().max() > 1e-3  # bypassing for both steps is another image


def test_calibrate_and_export_a_schedule(backbone, tmp_path):
    from calibri_pipeline.method.calibrate import CalibrationOptions, calibrate
    from calibri_pipeline.method.export import export_calibrated
    from calibri_pipeline.method.sampler import SamplingSettings
    from calibri_pipeline.method.search_config import SearchConfig
    from calibri_pipeline.prompts.base import Prompt
    from calibri_pipeline.storage.object_store import ObjectStore

    space = _space(backbone)
    train = [Prompt(f"a shape #{i}") for i in range(8)]
    val = [Prompt(f"a val shape #{i}") for i in range(3)]
    search = SearchSpace.for_model(space, 2, uses_cfg=True, segments=(0.6,))
    config = SearchConfig(max_generations=2, bucket_size=4, popsize=4, val_every=1)
    options = CalibrationOptions(config=config, guidance_coordinates=True)
    result = calibrate(backbone, search, train, val, MeanPixel(), SamplingSettings(steps=2), options)
    assert result.vector.size == search.dimension and result.segments == (0.6,)
    assert result.coefficients.shape == (2, 2, space.size) and result.weights.shape == (2, 2)
    np.testing.assert_array_equal(result.search.x0[-2:], [2.5, 1.0])  # guidance x scale, in the last part too
    store = ObjectStore(tmp_path / "objects")
    manifest = export_calibrated(backbone, "block", result.vector.tolist(), 2, store, "ckpt", segments=(0.6,))
    assert manifest["mode"] == "schedule" and manifest["members"] == []
    saved = store.get_json("ckpt/calibri_schedule.json")
    assert saved["segments"] == [0.6] and saved["vector"] == pytest.approx(result.vector.tolist())
    with pytest.raises(ValueError, match="needs 2 x|needs"):
        export_calibrated(backbone, "block", result.vector.tolist()[:-1], 2, store, "ckpt2", segments=(0.6,))


def test_the_run_record_rebuilds_the_search_space_and_names_its_segments(backbone):
    """One run record (SearchSpace.to_dict) serves Ray, the catalog and export: it round-trips on the same
    model, is refused on another, and a run's id and state folder tell two segmentations apart."""
    from calibri_pipeline.assets.calibration import run_id_for

    space = _space(backbone)
    search = SearchSpace.for_model(space, 2, uses_cfg=True, segments=(0.9, 0.4))
    record = search.to_dict()
    assert record == {
        "granularity": "block",
        "names": list(space.names),
        "n_models": 2,
        "cfg": True,
        "segments": [0.9, 0.4],
    }
    for model in (backbone.transformer, space):  # the space discovered on the transformer, or given
        rebuilt = SearchSpace.from_dict(record, model)
        assert rebuilt.to_dict() == record and rebuilt.names() == search.names()
        assert rebuilt.layout == search.layout and rebuilt.dimension == search.dimension == 3 * (2 * space.size + 2)
    gate = CalibrationSpace.from_transformer(backbone.transformer, "gate")
    with pytest.raises(ValueError, match="made for another architecture"):
        SearchSpace.from_dict(record, gate)
    with pytest.raises(ValueError, match=r"needs \['cfg'\]"):
        SearchSpace.from_dict({k: v for k, v in record.items() if k != "cfg"}, space)
    assert run_id_for("toy", "world_score", "block", 2) == "toy|world_score|block|n2"
    assert run_id_for("toy", "world_score", "block", 2, (0.9,)) == "toy|world_score|block|n2|s0.9"
    assert run_id_for("toy", "world_score", "block", 2, (0.8,)) != run_id_for("toy", "world_score", "block", 2, (0.9,))
