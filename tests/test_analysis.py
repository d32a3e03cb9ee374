"""Bootstrap statistics, block ablation, scale sweep, settings comparison and NFE study (tables + PNGs)
on the tiny random-init toy backbone of test_population."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_population import ColourMatch, Contrast, backbone, encoder, make_prompts, one_thread  # noqa: F401

from calibri_pipeline.method.analysis import (
    Setting,
    block_ablation,
    evaluate_settings,
    infer_n_models,
    nfe_study,
    scale_sweep,
    table_markdown,
)
from calibri_pipeline.method.ensemble import EnsembleLayout
from calibri_pipeline.method.population import evaluate_population
from calibri_pipeline.method.space import CalibrationSpace
from calibri_pipeline.method.stats import bootstrap_ci, paired_difference_ci

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


#: images are quantised to 8 bits before they are scored, so a ~1e-7 difference between batch
#: compositions (other kernels) can flip one pixel's rounding: 1/255 over an 8x8 image moves a
#: mean-abs score by ~2e-5. Comparisons across batch shapes allow a few such steps.
SCORE_ATOL = 1e-4


def decode(png: bytes) -> Image.Image:
    assert png.startswith(PNG_MAGIC)
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


# --------------------------------------------------------------------------------------------- stats


def test_bootstrap_interval_is_deterministic_and_covers_the_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=400)
    ci = bootstrap_ci(x, n_boot=3000, seed=1)
    assert ci.mean == pytest.approx(x.mean())
    assert ci.low < ci.mean < ci.high
    # close to the normal-theory interval 1.96 * s / sqrt(n)
    assert ci.half_width == pytest.approx(1.96 * x.std(ddof=1) / 20, rel=0.15)
    assert bootstrap_ci(x, n_boot=3000, seed=1) == ci
    assert bootstrap_ci(x, level=0.5, seed=1).half_width < ci.half_width
    assert bootstrap_ci([3.0, 3.0, 3.0]).half_width == 0.0
    assert bootstrap_ci([2.5]).format(2) == "2.50 [2.50, 2.50]"


def test_cluster_bootstrap_is_wider_when_cells_of_a_prompt_agree():
    rng = np.random.default_rng(2)
    prompt_effect = rng.normal(0, 1, size=20)
    x = np.repeat(prompt_effect, 5) + rng.normal(0, 0.05, size=100)  # 5 near-identical seeds per prompt
    prompts = np.repeat(np.arange(20), 5)
    cells = bootstrap_ci(x, seed=0)
    clustered = bootstrap_ci(x, clusters=prompts, seed=0)
    assert clustered.mean == pytest.approx(cells.mean)
    assert clustered.half_width > 1.8 * cells.half_width  # ~sqrt(5) wider


def test_paired_difference_removes_shared_variance():
    rng = np.random.default_rng(3)
    shared = rng.normal(0, 1, size=200)
    a, b = shared + 0.1 + rng.normal(0, 0.01, 200), shared + rng.normal(0, 0.01, 200)
    paired = paired_difference_ci(a, b)
    assert paired.low > 0.09 and paired.high < 0.11
    assert bootstrap_ci(a).half_width > 10 * paired.half_width
    with pytest.raises(ValueError, match="cell for cell"):
        paired_difference_ci(a, b[:10])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"values": []}, "at least one"),
        ({"values": [1.0, np.nan]}, "NaN"),
        ({"values": [1.0, 2.0], "level": 1.5}, "level"),
        ({"values": [1.0, 2.0], "clusters": [1]}, "label every value"),
    ],
)
def test_bootstrap_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(**kwargs)


# ------------------------------------------------------------------------------------- analyses


def _evaluator(backbone, space, rewards, n_models=1):
    from calibri_pipeline.method.population import LocalEvaluator
    from calibri_pipeline.method.sampler import SamplingSettings
    from calibri_pipeline.method.space import SearchSpace

    search = None if space is None else SearchSpace.for_model(space, n_models, uses_cfg=True)
    return LocalEvaluator(backbone, search, rewards, SamplingSettings(steps=2, guidance=2.5))


def test_block_ablation_table_matches_direct_evaluation_and_plots(backbone):
    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    prompts = make_prompts(3, "val", 40)
    result = block_ablation(_evaluator(backbone, space, ColourMatch()), prompts, seeds=(0, 1, 2), n_boot=500)
    table = result.table
    assert table.height == space.size == 4
    assert table["name"].to_list() == space.names
    scores = result.scores["colour_match"]
    assert scores.shape == (5, 9) and len(result.cells) == 9
    # row k+1 is the model with block k bypassed; check one against a direct evaluation
    vector = torch.ones(1, space.search_size(1))
    vector[0, 2] = 0.0
    cell_prompts = [p for p in prompts for _ in range(3)]
    direct = evaluate_population(
        backbone, space, vector, cell_prompts, [0, 1, 2] * 3, ColourMatch(), steps=2, guidance=2.5
    )
    np.testing.assert_allclose(scores[3], direct[0].double().numpy(), atol=SCORE_ATOL)
    base = evaluate_population(backbone, None, None, cell_prompts, [0, 1, 2] * 3, ColourMatch(), steps=2, guidance=2.5)
    np.testing.assert_allclose(scores[0], base[0].double().numpy(), atol=SCORE_ATOL)
    row = table.row(2, named=True)
    assert row["delta"] == pytest.approx(scores[3].mean() - scores[0].mean())
    assert row["delta_low"] <= row["delta"] <= row["delta_high"]
    assert abs(table["delta"]).max() > 1e-3  # bypassing blocks of this model changes its images
    image = decode(result.plot())
    assert image.width > 400 and image.height > 300
    assert table_markdown(table).startswith("| name | index | baseline_mean |")


def test_scale_sweep_grid_and_heatmap(backbone):
    space = CalibrationSpace.from_transformer(backbone.transformer, "block")
    prompts = make_prompts(2, "val", 60)
    alphas = (0.0, 0.5, 1.0, 1.5)
    sweep = scale_sweep(_evaluator(backbone, space, ColourMatch()), prompts, alphas=alphas, seeds=(3, 4), n_boot=300)
    table = sweep.table
    assert table.height == space.size * len(alphas)
    assert sweep.scores["colour_match"].shape == (1 + space.size * 3, 4)  # alpha = 1 is the shared baseline row
    at_one = table.filter(table["alpha"] == 1.0)
    assert at_one["delta"].to_list() == [0.0] * space.size
    # alpha = 0 is the block ablation on the same cells
    ablation = block_ablation(_evaluator(backbone, space, ColourMatch()), prompts, seeds=(3, 4), n_boot=300)
    # the sweep's population is larger than the ablation's, so its images come from other batch shapes
    # (other kernels): the deltas agree up to float rounding of the images, not bitwise
    np.testing.assert_allclose(
        table.filter(table["alpha"] == 0.0)["delta"].to_numpy(), ablation.table["delta"].to_numpy(), atol=SCORE_ATOL
    )
    decode(sweep.plot())
    with pytest.raises(ValueError, match="distinct"):
        scale_sweep(_evaluator(backbone, space, ColourMatch()), prompts, alphas=(0.5, 0.5))


def test_nfe_study_and_settings_comparison(backbone):
    space = CalibrationSpace.from_transformer(backbone.transformer, "gate")
    prompts = make_prompts(2, "test", 80)
    x0_cfg = EnsembleLayout(space.size, 2, cfg=True).initial(2.5)
    tuned = x0_cfg.clone()
    tuned[: space.size] = 0.8
    ev = _evaluator(backbone, space, [ColourMatch(), Contrast()], n_models=2)
    study = nfe_study(ev, {"baseline": None, "calibri": tuned, "x0": x0_cfg}, [1, 3], prompts, seeds=(0, 1), n_boot=300)
    table = study.table
    assert table.columns == ["label", "steps", "reward", "mean", "ci_low", "ci_high", "n_cells"]
    assert table.height == 3 * 2 * 2
    for steps in (1, 3):
        base = evaluate_population(
            backbone,
            None,
            None,
            [p for p in prompts for _ in range(2)],
            [0, 1, 0, 1],
            ColourMatch(),
            steps=steps,
            guidance=2.5,
        )
        row = table.filter(
            (table["label"] == "baseline") & (table["steps"] == steps) & (table["reward"] == "colour_match")
        )
        assert row["mean"].item() == pytest.approx(float(base.double().mean()), abs=1e-6)
        # the CFG-ensemble x0 (g, 1 - g) is standard CFG
        x0_row = table.filter(
            (table["label"] == "x0") & (table["steps"] == steps) & (table["reward"] == "colour_match")
        )
        assert x0_row["mean"].item() == pytest.approx(row["mean"].item(), abs=SCORE_ATOL)
    decode(study.plot())

    comparison = evaluate_settings(
        _evaluator(backbone, space, ColourMatch(), n_models=2),
        {"default": Setting(None, steps=3), "low": Setting(None, steps=1), "calibrated-low": Setting(tuned, steps=1)},
        prompts,
        seeds=(0, 1),
        reference="default",
        n_boot=300,
        clusters="prompt",
    )
    t = comparison.table
    assert t.filter(t["label"] == "default")["delta"].item() == 0.0
    low = t.filter(t["label"] == "low").row(0, named=True)
    assert low["delta"] == pytest.approx(low["mean"] - t.filter(t["label"] == "default")["mean"].item())
    assert t.filter(t["label"] == "calibrated-low")["n_models"].item() == 2
    decode(comparison.plot())
    with pytest.raises(ValueError, match="reference 'nope'"):
        evaluate_settings(_evaluator(backbone, None, ColourMatch()), {"a": Setting()}, prompts, reference="nope")
    with pytest.raises(ValueError, match="search space"):
        evaluate_settings(_evaluator(backbone, None, ColourMatch()), {"a": Setting(tuned)}, prompts)


def test_infer_n_models():
    from diffusers import FluxTransformer2DModel

    tiny = FluxTransformer2DModel(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=1,
        joint_attention_dim=8,
        pooled_projection_dim=8,
        in_channels=4,
        axes_dims_rope=(2, 2, 4),
    )
    space = CalibrationSpace.from_transformer(tiny, "block")
    assert space.size == 2
    assert infer_n_models(space, torch.ones(3)) == 1 and infer_n_models(space, np.ones(6)) == 2
    with pytest.raises(ValueError, match="n \\* 3 entries"):
        infer_n_models(space, torch.ones(4))


def test_search_history_plot():
    from test_search import QuadraticObjective

    from calibri_pipeline.method.analysis import plot_search_history
    from calibri_pipeline.method.search import CalibrationRun
    from calibri_pipeline.method.search_config import SearchConfig

    res = CalibrationRun(
        QuadraticObjective([0.5] * 3),
        [1.0] * 3,
        [-1.0] * 3,
        [2.0] * 3,
        SearchConfig(max_generations=6, bucket_size=4, val_every=2),
    ).run()
    image = decode(plot_search_history(res.generations, title="quadratic"))
    assert image.width > 500
    with pytest.raises(ValueError, match="no generations"):
        plot_search_history([])
