"""The search scaled to the model (sweep curvatures, per-coordinate stds, guidance x scale coordinates),
the alternatives as points of the Calibri layout (skip-layer guidance), a preset turned into the
core's arguments, and the headline table."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from calibri_pipeline.method.alternatives import slg_layer_candidates, slg_search, slg_vector
from calibri_pipeline.method.ensemble import EnsembleLayout, GuidanceCoordinates
from calibri_pipeline.method.scaling import STD_RANGE, initial_stds, sweep_curvatures
from calibri_pipeline.method.space import Branch, CalibrationSpace, SearchSpace


def _space(names=("blocks.0", "blocks.1", "blocks.2")) -> CalibrationSpace:
    branches = [Branch(n, "attn", "image", f"{n}.attn.to_out.0") for n in names]
    return CalibrationSpace(branches, "block", "Toy")


def _sweep(curvatures: dict[str, float], alphas=(0.0, 0.5, 1.0, 1.5, 2.0)) -> pl.DataFrame:
    rows = [{"name": n, "alpha": a, "delta": -k * (a - 1.0) ** 2} for n, k in curvatures.items() for a in alphas]
    return pl.DataFrame(rows)


def test_curvatures_fit_the_sweep_near_alpha_one():
    k = sweep_curvatures(_sweep({"blocks.0": 0.4, "blocks.1": 0.05, "blocks.2": 1.0}))
    assert k == pytest.approx({"blocks.0": 0.4, "blocks.1": 0.05, "blocks.2": 1.0})
    # bypassing a block (alpha 0) is another regime: only the alphas within 0.5 of 1 count
    sweep = _sweep({"blocks.0": 0.4}).with_columns(
        pl.when(pl.col("alpha") == 0.0).then(-0.9).otherwise(pl.col("delta")).alias("delta")
    )
    assert sweep_curvatures(sweep)["blocks.0"] == pytest.approx(0.4)
    # a block that gains away from 1 gets the flattest curvature seen, never a negative one
    rising = _sweep({"blocks.0": 0.4, "blocks.1": -0.1})
    assert sweep_curvatures(rising)["blocks.1"] == pytest.approx(0.4)


def test_initial_stds_share_the_target_drop_between_coordinates():
    space = _space()
    search = SearchSpace.for_model(space, 2, uses_cfg=True)
    curv = {"blocks.0": 0.4, "blocks.1": 0.05, "blocks.2": 1.0}
    stds = initial_stds(search, curv, target_drop=0.03, guidance_coordinates=True, guidance=3.5)
    d = 2 * 3  # two members x three blocks
    shared = [math.sqrt(0.03 / (d * k)) for k in curv.values()]

    def clip(v):
        return min(max(v, STD_RANGE[0]), STD_RANGE[1])

    # the conditional member acts through g = 3.5, the unconditional one through 1 - g = -2.5
    assert stds[:3] == pytest.approx([clip(v / 3.5) for v in shared])
    assert stds[3:6] == pytest.approx([clip(v / 2.5) for v in shared])
    # in units of the shared coefficient the sweep measured, the first population's expected drop is the target
    effective = [s * 3.5 for s in stds[:3]] + [s * 2.5 for s in stds[3:6]]
    assert sum(e**2 * k for e, k in zip(effective, list(curv.values()) * 2)) == pytest.approx(0.03)
    assert stds[6:] == pytest.approx([0.25 * 3.5, 0.05])  # guidance relative to itself, the scale small
    paper = initial_stds(search, curv, guidance=3.5)  # the weight pair as it is: each relative to itself
    assert paper[6:] == pytest.approx([0.25 * 3.5, 0.25 * 2.5])
    single = initial_stds(SearchSpace.for_model(space, 1, uses_cfg=True), None, default_std=0.1)
    assert single == pytest.approx([0.1, 0.1, 0.1, 0.05])  # no sweep: the default; the one weight is a scale
    gate = CalibrationSpace(
        [
            Branch("blocks.0", "attn", "image", "blocks.0.attn.to_out.0"),
            Branch("blocks.0", "attn", "text", "blocks.0.attn.to_add_out"),
        ],
        "gate",
        "Toy",
    )
    inherited = initial_stds(SearchSpace.for_model(gate, 1, uses_cfg=False), {"blocks.0": 0.4}, target_drop=0.04)
    assert inherited[:2] == pytest.approx([math.sqrt(0.04 / (2 * 0.4))] * 2)  # finer coefficients inherit their block's


def test_guidance_coordinates_round_trip_and_bounds():
    layout = EnsembleLayout(2, 2, cfg=True)
    coords = GuidanceCoordinates(layout)
    x = layout.initial(3.5).tolist()
    z = coords.encode(x)
    assert z[-2:] == pytest.approx([3.5, 1.0])
    assert coords.decode([1, 1, 1, 1, 2.0, 1.0]) == pytest.approx([1, 1, 1, 1, 2.0, -1.0])  # guidance 2 at scale 1
    assert coords.decode(coords.encode([0.9, 1.1, 1.0, 0.8, 3.0, -1.5])) == pytest.approx(
        [0.9, 1.1, 1.0, 0.8, 3.0, -1.5]
    )
    lower, upper = coords.bounds(*layout.bounds())
    assert lower[-2:] == [0.0, 0.25] and upper[-2:] == [10.0, 4.0] and lower[:4] == [-1.0] * 4
    assert coords.names(["a", "b"])[-2:] == ["guidance", "scale"]
    with pytest.raises(ValueError, match="CFG ensemble layout"):
        GuidanceCoordinates(EnsembleLayout(2, 1, cfg=True))


def test_skip_layer_guidance_is_a_point_of_the_three_member_layout():
    space = _space()
    v = slg_vector(space, [1], guidance=3.0, scale=2.0)
    coefficients, weights = slg_search(space).layout.split(v)
    assert coefficients[0, 0].tolist() == [1, 1, 1] and coefficients[0, 1].tolist() == [1, 1, 1]
    assert coefficients[0, 2].tolist() == [1, 0, 1]  # the third (conditional) pass skips block 1
    assert weights[0].tolist() == [5.0, -2.0, -2.0]  # CFG + 2 x (cond - cond skipped)
    assert slg_search(space).layout.member_kinds() == ["cond", "uncond", "cond"]
    with pytest.raises(ValueError, match="skip indices"):
        slg_vector(space, [3], 3.0, 1.0)
    ablation = pl.DataFrame({"index": [0, 1, 2], "delta": [-0.6, -0.02, -0.2]})
    assert slg_layer_candidates(ablation, 2) == [(1,), (2,)]  # the blocks whose bypass hurts least


def test_slg_through_the_sampler_equals_its_definition():
    """CFG(g) + s * (v_cond - v_cond with the block skipped), computed by hand with the stock model."""
    from calibri_pipeline.method.sampler import make_velocity_fn

    from tiny_models import tiny_flux_with_velocity

    model, model_fn = tiny_flux_with_velocity()
    space = CalibrationSpace.from_transformer(model, "block")
    g = torch.Generator().manual_seed(1)
    cond = {"tokens": torch.randn(2, 3, 6, generator=g), "pooled": torch.randn(2, 6, generator=g)}
    uncond = {"tokens": torch.zeros(1, 3, 6), "pooled": torch.zeros(1, 6)}
    x, sigma = torch.randn(2, 9, 4, generator=g), torch.full((2,), 0.6)
    search = slg_search(space)
    vector = search.check(slg_vector(space, [1], guidance=3.0, scale=1.5))[0]
    v = make_velocity_fn(model_fn, cond, uncond, 3.0, search=search, transformer=model, vectors=vector)(x, sigma)
    with torch.no_grad():
        v_c = model_fn(x, sigma, cond)
        v_u = model_fn(x, sigma, {k: t.expand(2, *t.shape[1:]) for k, t in uncond.items()})
        with space.apply(model, torch.tensor([1.0, 0.0])):
            v_skip = model_fn(x, sigma, cond)
    expected = 3.0 * v_c + (1 - 3.0) * v_u + 1.5 * (v_c - v_skip)
    torch.testing.assert_close(v, expected, atol=5e-5, rtol=1e-4)  # one batch of 6 vs three of 2: rounding


def test_a_preset_becomes_the_core_arguments():
    from calibri_pipeline.presets import get_preset
    from calibri_pipeline.stages import calibration_arguments, comparison_settings, search_config

    class Toy:  # what calibration_arguments reads of a backbone
        uses_cfg = True
        default_guidance = 3.5

    space = _space()
    default = get_preset("embedded-4-steps")  # the paper's setting on the toy: one part of the schedule
    assert default.start == "guidance-tuned"
    preset = default.with_overrides(start="stock")  # the stock start first: x0 is the unmodified model
    cfg = search_config(preset, seed=3)
    assert (cfg.sigma0, cfg.max_generations, cfg.probe_buckets, cfg.confirm_top, cfg.seed) == (
        1.0,
        preset.search.max_generations,
        preset.search.probe_buckets,
        preset.search.confirm_top,
        3,
    )
    sweep = _sweep({"blocks.0": 0.4, "blocks.1": 0.05, "blocks.2": 1.0})
    args = calibration_arguments(preset, Toy(), space, sweep=sweep)
    assert args["guidance_coordinates"] and args["warm_start"] is None and args["guidance"] == 3.5
    assert len(args["initial_stds"]) == SearchSpace.for_model(space, preset.n_models, uses_cfg=True).dimension
    started = calibration_arguments(
        preset.with_overrides(start="guidance-tuned"), Toy(), space, sweep=sweep, tuned_guidance=2.0
    )
    np.testing.assert_allclose(started["warm_start"][-2:], [2.0, -1.0])  # the CFG pair at the tuned guidance
    assert started["initial_stds"][-2] == pytest.approx(0.25 * 2.0)
    one = calibration_arguments(
        preset.with_overrides(n_models=1, weights="paper", start="guidance-tuned"),
        Toy(),
        space,
        sweep=sweep,
        tuned_guidance=2.0,
    )
    assert one["guidance"] == 2.0 and one["warm_start"] is None  # one guided model: sampled at the tuned guidance
    with pytest.raises(ValueError, match="needs the CFG ensemble"):
        calibration_arguments(preset.with_overrides(n_models=1), Toy(), space, sweep=sweep)
    with pytest.raises(ValueError, match="run the sweep first"):
        calibration_arguments(preset, Toy(), space, sweep=None)
    with pytest.raises(ValueError, match="tune the guidance first"):
        calibration_arguments(default, Toy(), space, sweep=sweep)
    # on top of the shift-tuned model: x0 at its guidance, and the whole search samples at its shift
    shifted = preset.with_overrides(start="shift-tuned", alternatives=("guidance", "shift"))
    on_shift = calibration_arguments(shifted, Toy(), space, sweep=sweep, tuned_guidance=1.5, tuned_shift=3.0)
    assert on_shift["shift"] == 3.0 and started["shift"] is None
    np.testing.assert_allclose(on_shift["warm_start"][-2:], [1.5, -0.5])
    with pytest.raises(ValueError, match="tune the shift first"):
        calibration_arguments(shifted, Toy(), space, sweep=sweep, tuned_guidance=1.5)
    with pytest.raises(ValueError, match="needs the 'shift' alternative"):
        preset.with_overrides(start="shift-tuned", alternatives=("guidance",))
    # the tuned guidance schedule (one scale per part) at the tuned shift as x0
    demo = get_preset("embedded-default").with_overrides(start="schedule-tuned")
    assert demo.segments and demo.calibration_steps == 2 and "schedule" in demo.alternatives
    scheduled = calibration_arguments(
        demo, Toy(), space, sweep=sweep, tuned_guidance=2.0, tuned_shift=3.0, tuned_schedule=[2.5, 1.5]
    )
    assert scheduled["shift"] == 3.0
    part = SearchSpace.for_model(space, 2, uses_cfg=True).dimension
    np.testing.assert_allclose(scheduled["warm_start"][part - 2 : part], [2.5, -1.5])  # first part's CFG pair
    np.testing.assert_allclose(scheduled["warm_start"][-2:], [1.5, -0.5])
    np.testing.assert_allclose(scheduled["warm_start"][: part - 2], 1.0)
    with pytest.raises(ValueError, match="tune the schedule first"):
        calibration_arguments(demo, Toy(), space, sweep=sweep, tuned_guidance=2.0, tuned_shift=3.0)
    with pytest.raises(ValueError, match="cannot start"):
        calibration_arguments(demo, Toy(), space, sweep=sweep, tuned_schedule=[2.0])
    with pytest.raises(ValueError, match="needs segments and the CFG ensemble"):
        demo.with_overrides(segments=())
    with pytest.raises(ValueError, match="scaling must be one of"):
        preset.with_overrides(scaling="magic")

    search = SearchSpace.for_model(space, 2, uses_cfg=True)
    tunings = {
        "guidance-tuned": {"guidance": 2.0},
        "slg-tuned": {"vector": slg_vector(space, [0], 3.5, 1.0).tolist(), "guidance": 3.5},
    }
    settings, references = comparison_settings(
        preset, calibri=(search, search.x0(3.5).tolist(), 3.5), tunings=tunings, slg_space=space
    )
    low = preset.calibration_steps
    assert references == {
        "baseline": f"baseline@{low}",
        "twice the NFE": f"baseline@{2 * low}",
        "guidance-tuned": f"guidance-tuned@{low}",
        "slg-tuned": f"slg-tuned@{low}",
    }
    assert {
        f"baseline@{low}",
        f"baseline@{2 * low}",
        f"baseline@{preset.default_steps}",
        f"calibri@{low}",
        f"slg-tuned@{low}",
    } <= set(settings)
    assert settings[f"guidance-tuned@{low}"].guidance == 2.0 and settings[f"slg-tuned@{low}"].search.n_models == 3
    assert "shift-tuned" not in references and settings[f"calibri@{low}"].shift is None
    # a shift-tuned alternative (a catalog row: its shift in the params JSON) and Calibri calibrated on top of it
    tunings["shift-tuned"] = {"name": "shift-tuned", "guidance": 1.5, "params": '{"shift": 3.0, "guidance": 1.5}'}
    settings, references = comparison_settings(
        preset, calibri=(search, search.x0(1.5).tolist(), 3.5), tunings=tunings, slg_space=space, calibri_shift=3.0
    )
    assert references["shift-tuned"] == f"shift-tuned@{low}"
    assert settings[f"shift-tuned@{low}"].shift == 3.0 and settings[f"shift-tuned@{low}"].guidance == 1.5
    assert all(settings[f"calibri@{n}"].shift == 3.0 for n in {low, *preset.nfe_list})


def test_headline_table_reads_the_catalog_rows():
    from calibri_pipeline.report import headline_table

    evals = pl.DataFrame(
        [
            {
                "setting": s,
                "nfe": n,
                "reward": "world_score",
                "guidance": g,
                "mean": m,
                "ci_low": m - 0.01,
                "ci_high": m + 0.01,
            }
            for s, n, g, m in [
                ("baseline", 4, 3.5, 0.70),
                ("baseline", 8, 3.5, 0.78),
                ("baseline", 30, 3.5, 0.83),
                ("guidance-tuned", 4, 2.0, 0.75),
                ("calibri", 4, 3.5, 0.77),
            ]
        ]
    )
    comps = pl.DataFrame(
        [
            {
                "setting": "calibri@4",
                "reference": "baseline@4",
                "reward": "world_score",
                "delta": 0.07,
                "ci_low": 0.05,
                "ci_high": 0.09,
            },
            {
                "setting": "calibri@4",
                "reference": "guidance-tuned@4",
                "reward": "world_score",
                "delta": 0.02,
                "ci_low": -0.01,
                "ci_high": 0.04,
            },
        ]
    )
    table = headline_table(evals, comps, "world_score", 4, 30)
    assert table["setting"].to_list() == ["baseline@4", "baseline@8", "baseline@30", "guidance-tuned@4", "calibri@4"]
    row = table.filter(pl.col("setting") == "calibri@4").row(0, named=True)
    assert row["world_score"] == "0.770 [0.760, 0.780]"
    assert (
        row["vs baseline (same NFE)"] == "+0.070 [+0.050, +0.090]"
        and row["vs guidance-tuned"] == "+0.020 [-0.010, +0.040]"
    )
    assert table.filter(pl.col("setting") == "baseline@4")["vs baseline (same NFE)"].item() == "-"
