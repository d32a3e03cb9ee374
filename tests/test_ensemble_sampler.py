"""EnsembleLayout and the calibrated velocity: CFG as a 2-model ensemble, per-sample vectors, Euler."""

from __future__ import annotations

import pytest
import torch

from calibri_pipeline import CalibrationSpace
from calibri_pipeline.method.ensemble import EnsembleLayout
from calibri_pipeline.method.sampler import euler_sample, flow_sigmas, make_velocity_fn
from calibri_pipeline.method.space import SearchSpace

from tiny_models import tiny_flux_with_velocity


def test_layout_sizes_split_join_initial_bounds():
    layout = EnsembleLayout(size=3, n_models=2, cfg=True)
    assert layout.search_size == 8 == 2 * 3 + 2
    x = torch.arange(16.0).reshape(2, 8)
    coefs, weights = layout.split(x)
    assert coefs.shape == (2, 2, 3) and weights.shape == (2, 2)
    assert coefs[1, 1].tolist() == [11.0, 12.0, 13.0] and weights[0].tolist() == [6.0, 7.0]
    assert layout.join(coefs[0], weights[0]).tolist() == x[0].tolist()
    assert layout.initial(4.0).tolist() == [1, 1, 1, 1, 1, 1, 4.0, -3.0]
    assert EnsembleLayout(3, 1, cfg=True).initial(4.0).tolist() == [1, 1, 1, 1.0]
    assert EnsembleLayout(2, 4).initial().tolist()[-4:] == [0.25] * 4
    lower, upper = layout.bounds()
    assert lower == [-1.0] * 6 + [-10.0] * 2 and upper == [2.0] * 6 + [10.0] * 2
    assert layout.names(["a", "b", "c"])[-3:] == ["model1/c", "weight0", "weight1"]
    with pytest.raises(ValueError, match=r"shape \[P, 8\]"):
        layout.split(torch.ones(2, 7))
    with pytest.raises(ValueError, match="guidance"):
        layout.initial()
    # a CFG layout with 3 members: the extra conditional member starts at weight 0 (skip-layer guidance)
    wide = EnsembleLayout(3, 3, cfg=True)
    assert wide.mode == "cfg" and wide.member_kinds() == ["cond", "uncond", "cond"]
    assert wide.initial(4.0).tolist()[-3:] == [4.0, -3.0, 0.0]
    with pytest.raises(ValueError, match="low < high"):
        layout.bounds((2.0, -1.0))


def test_flow_sigmas_and_exact_euler_on_a_straight_flow():
    assert flow_sigmas(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = flow_sigmas(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and bool((shifted[1:-1] > flow_sigmas(4)[1:-1]).all())
    with pytest.raises(ValueError):
        flow_sigmas(0)
    # an exact rectified flow towards x0: Euler is exact at any step count
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))

    def velocity(x, sigma):
        return (x - (1 - sigma.view(-1, 1, 1, 1)) * x0) / sigma.view(-1, 1, 1, 1) - x0

    for steps in (1, 3, 10):
        torch.testing.assert_close(euler_sample(velocity, noise, steps), x0, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_with_velocity()


def _conds(n):
    g = torch.Generator().manual_seed(5)
    cond = {"tokens": torch.randn(n, 3, 6, generator=g), "pooled": torch.randn(n, 6, generator=g)}
    uncond = {"tokens": torch.zeros(1, 3, 6), "pooled": torch.zeros(1, 6)}
    return cond, uncond


def test_x0_of_every_mode_reproduces_the_base_model_exactly(flux):
    model, model_fn = flux
    space = CalibrationSpace.from_transformer(model, "gate")
    cond, uncond = _conds(3)
    x = torch.randn(3, 9, 4, generator=torch.Generator().manual_seed(2))
    sigma = torch.full((3,), 0.7)
    base = make_velocity_fn(model_fn, cond, uncond, 3.5)(x, sigma)
    for n_models in (1, 2):
        x0 = EnsembleLayout(space.size, n_models, cfg=True).initial(3.5)
        v = make_velocity_fn(
            model_fn,
            cond,
            uncond,
            3.5,
            search=SearchSpace.for_model(space, n_models, uses_cfg=True),
            transformer=model,
            vectors=x0,
        )(x, sigma)
        assert torch.equal(v, base), n_models
    # without CFG: plain model, and an ensemble of 2 identical members at weights 1/2
    plain = make_velocity_fn(model_fn, cond)(x, sigma)
    x0 = EnsembleLayout(space.size, 2, cfg=False).initial()
    v = make_velocity_fn(
        model_fn, cond, search=SearchSpace.for_model(space, 2, uses_cfg=False), transformer=model, vectors=x0
    )(x, sigma)
    # two members double the forward's batch, so the GEMM kernels differ: velocities (|v| ~ 1.6) agree up to
    # float rounding, not bitwise
    torch.testing.assert_close(v, plain, atol=2e-5, rtol=1e-5)


def test_cfg_ensemble_is_a_weighted_sum_of_separately_calibrated_passes(flux):
    model, model_fn = flux
    space = CalibrationSpace.from_transformer(model, "block")
    cond, uncond = _conds(2)
    x = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(3))
    sigma = torch.full((2,), 0.4)
    c_cond, c_uncond, w = torch.tensor([0.8, 1.3]), torch.tensor([1.1, 0.0]), torch.tensor([2.5, -1.2])
    vec = torch.cat([c_cond, c_uncond, w])
    v = make_velocity_fn(
        model_fn,
        cond,
        uncond,
        3.0,
        search=SearchSpace.for_model(space, 2, uses_cfg=True),
        transformer=model,
        vectors=vec,
    )(x, sigma)
    with space.apply(model, c_cond):
        v_c = model_fn(x, sigma, cond)
    with space.apply(model, c_uncond):
        v_u = model_fn(x, sigma, {k: t.expand(2, *t.shape[1:]) for k, t in uncond.items()})
    torch.testing.assert_close(v, w[0] * v_c + w[1] * v_u, atol=2e-5, rtol=1e-5)


def test_per_image_vectors_equal_each_image_alone(flux):
    model, model_fn = flux
    space = CalibrationSpace.from_transformer(model, "layer")
    layout = EnsembleLayout(space.size, 2, cfg=True)
    cond, uncond = _conds(3)
    x = torch.randn(3, 9, 4, generator=torch.Generator().manual_seed(4))
    sigma = torch.full((3,), 0.9)
    vecs = layout.initial(3.0).float() + 0.3 * torch.randn(
        3, layout.search_size, generator=torch.Generator().manual_seed(6)
    )
    v = make_velocity_fn(
        model_fn, cond, uncond, 3.0, search=SearchSpace(space, layout), transformer=model, vectors=vecs
    )(x, sigma)
    for i in range(3):
        alone = make_velocity_fn(
            model_fn,
            {k: t[i : i + 1] for k, t in cond.items()},
            uncond,
            3.0,
            search=SearchSpace(space, layout),
            transformer=model,
            vectors=vecs[i],
        )(x[i : i + 1], sigma[i : i + 1])
        torch.testing.assert_close(v[i : i + 1], alone, atol=2e-5, rtol=1e-5)


def test_velocity_errors(flux):
    model, model_fn = flux
    space = CalibrationSpace.from_transformer(model, "block")
    cond, uncond = _conds(2)
    x, sigma = torch.zeros(2, 9, 4), torch.ones(2)
    with pytest.raises(ValueError, match="guidance scale"):
        make_velocity_fn(model_fn, cond, uncond, None)
    with pytest.raises(ValueError, match="search space"):
        make_velocity_fn(model_fn, cond, vectors=torch.ones(3))
    search = SearchSpace.for_model(space, 1, uses_cfg=False)
    with pytest.raises(ValueError, match="3 Calibri vectors for a batch of 2"):
        make_velocity_fn(model_fn, cond, search=search, transformer=model, vectors=torch.ones(3, 3))(x, sigma)
    with pytest.raises(ValueError, match="without classifier-free guidance"):
        make_velocity_fn(model_fn, cond, uncond, 3.0, search=search, transformer=model, vectors=torch.ones(3))
    with pytest.raises(ValueError, match="batch 5"):
        make_velocity_fn(model_fn, {k: t.repeat(5, *[1] * (t.ndim - 1))[:5] for k, t in cond.items()})(x, sigma)
