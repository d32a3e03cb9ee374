"""A calibration used anywhere: `apply_calibration` on the stock tiny FLUX / SD-3 pipelines reproduces this
project's sampler with the same vector and latents, with one transformer; `Calibration` files round-trip."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from test_diffusers_backbones import PROMPTS, RES, STEPS, backbones, pipes  # noqa: F401  (tiny pipelines)

from calibri_pipeline import Calibration, apply_calibration
from calibri_pipeline.method.space import CalibrationSpace, SearchSpace

SIGMAS = list(np.linspace(1.0, 1 / STEPS, STEPS))  # flow_sigmas' grid (the stock SD3 default ends at ~0.003)


def _vector(search: SearchSpace, guidance: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = search.x0(guidance)
    return x0 + 0.3 * torch.randn(x0.shape, generator=g)


def _stock(arch, pipe, bb, latents, guidance):
    common = dict(height=RES, width=RES, num_inference_steps=STEPS, latents=latents.clone(), output_type="pt")
    if arch == "sd3":
        return pipe(PROMPTS[:2], guidance_scale=guidance, max_sequence_length=16, sigmas=SIGMAS, **common).images
    if arch == "qwen-image":  # true CFG: two transformer calls per step, the guided velocity rescaled
        return pipe(PROMPTS[:2], negative_prompt=" ", true_cfg_scale=guidance, **common).images
    return pipe(PROMPTS[:2], guidance_scale=guidance, max_sequence_length=16, **common).images


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize(
    "arch,granularity,n_models,segments",
    [
        ("flux", "block", 1, ()),
        ("flux", "gate", 1, (0.5,)),  # time-dependent: one part for the first step, one for the rest
        ("flux", "block", 2, ()),  # an ensemble of conditional copies (FLUX has no CFG pass)
        ("flux", "layer", 3, (0.5,)),
        ("sd3", "gate", 2, ()),  # the paper's SD-3.5 setting: the CFG ensemble
        ("sd3", "block", 2, (0.5,)),
        ("sd3", "layer", 1, ()),
        ("qwen-image", "gate", 2, ()),  # the paper's Qwen-Image setting
        ("qwen-image", "block", 2, (0.5,)),
        ("qwen-image", "block", 1, ()),
    ],
)
def test_the_stock_pipeline_under_apply_calibration_is_the_calibrated_sampler(
    pipes, backbones, arch, granularity, n_models, segments
):
    bb, pipe = backbones[arch], pipes[arch]
    space = CalibrationSpace.from_transformer(bb.transformer, granularity)
    search = SearchSpace.for_model(space, n_models, uses_cfg=bb.uses_cfg, segments=segments)
    vector = _vector(search, bb.default_guidance, seed=len(segments) + n_models)
    cal = Calibration(granularity, space.names, n_models, vector.tolist(), segments)
    seeds = [3, 8]
    ours = bb.generate(
        PROMPTS[:2], seeds, steps=STEPS, space=space, vectors=vector, n_models=n_models, segments=segments
    )
    latents = bb.pack(bb.initial_noise(seeds))
    plain = _stock(arch, pipe, bb, latents, bb.default_guidance)
    before = _hooks(pipe.transformer)
    with apply_calibration(pipe, cal):
        calibrated = _stock(arch, pipe, bb, latents, bb.default_guidance)
        if n_models == 2 and bb.uses_cfg:  # the weights replace the guidance: any guidance_scale > 1, same images
            other = _stock(arch, pipe, bb, latents, 7.0)
            torch.testing.assert_close(other.float(), calibrated.float(), atol=1e-4, rtol=0)
    assert _hooks(pipe.transformer) == before
    # the tolerance of the stock-pipeline test: the same arithmetic in another order
    torch.testing.assert_close(calibrated.float(), ours, atol=1e-4, rtol=0)
    # the calibration really acted: 10x the tolerance (Qwen-Image rescales to the conditional norm, a small effect)
    assert (calibrated.float() - plain.float()).abs().max() > 1e-3
    after = _stock(arch, pipe, bb, latents, bb.default_guidance)
    assert torch.equal(after, plain)  # the same computation replayed: bitwise the unmodified pipeline


def test_hooks_are_gone_after_an_error_and_after_remove(pipes, backbones):
    bb, pipe = backbones["sd3"], pipes["sd3"]
    space = CalibrationSpace.from_transformer(bb.transformer, "block")
    search = SearchSpace.for_model(space, 2, uses_cfg=True)
    cal = Calibration("block", space.names, 2, _vector(search, bb.default_guidance, 0).tolist())
    before = _hooks(pipe.transformer)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_calibration(pipe, cal):
            raise RuntimeError("boom")
    assert _hooks(pipe.transformer) == before
    handle = apply_calibration(pipe, cal)
    assert _hooks(pipe.transformer) == before + 2
    handle.remove()
    handle.remove()  # idempotent
    assert _hooks(pipe.transformer) == before
    latents = bb.pack(bb.initial_noise([1, 2]))
    with apply_calibration(pipe, cal), pytest.raises(ValueError, match="guidance_scale 1.0 cannot carry"):
        pipe(PROMPTS[:2], guidance_scale=1.0, num_inference_steps=1, latents=latents, output_type="pt")


def test_a_calibration_is_refused_on_another_architecture_and_unsupported_cases_say_why(pipes, backbones):
    flux, sd3 = backbones["flux"], backbones["sd3"]
    flux_space = CalibrationSpace.from_transformer(flux.transformer, "block")
    cal = Calibration("block", flux_space.names, 1, [1.0] * (flux_space.size + 1))
    with pytest.raises(ValueError, match="made for another architecture"):
        apply_calibration(pipes["sd3"], cal)
    sd3_space = CalibrationSpace.from_transformer(sd3.transformer, "block")
    three = Calibration("block", sd3_space.names, 3, [1.0] * (3 * sd3_space.size + 3))
    with pytest.raises(NotImplementedError, match="CFG ensemble of 3 members"):
        apply_calibration(pipes["sd3"], three)
    qwen = backbones["qwen-image"]
    qwen_space = CalibrationSpace.from_transformer(qwen.transformer, "block")
    search = SearchSpace.for_model(qwen_space, 2, uses_cfg=True)
    cfg_ensemble = Calibration("block", qwen_space.names, 2, _vector(search, 4.0, 2).tolist())
    latents = qwen.pack(qwen.initial_noise([1, 2]))
    with (
        apply_calibration(pipes["qwen-image"], cfg_ensemble),
        pytest.raises(ValueError, match="needs the pipeline's true CFG"),
    ):
        pipes["qwen-image"](
            PROMPTS[:2], num_inference_steps=2, height=RES, width=RES, latents=latents, output_type="pt"
        )
    with pytest.raises(ValueError, match="has 10 numbers, got 3"):
        Calibration("block", ["a", "b", "c", "d"], 1, [1.0, 1.0, 1.0], segments=(0.5,))
    assert sd3.uses_cfg


def test_calibration_files_round_trip_and_the_pipelines_exports_read(tmp_path, backbones):
    from calibri_pipeline.method.export import export_calibrated
    from calibri_pipeline.storage.object_store import ObjectStore

    bb = backbones["sd3"]
    space = CalibrationSpace.from_transformer(bb.transformer, "block")
    search = SearchSpace.for_model(space, 2, uses_cfg=True, segments=(0.6,))
    vector = _vector(search, 4.5, 5).tolist()
    cal = Calibration("block", space.names, 2, vector, (0.6,), cfg=True, source={"run_id": "r1"})
    path = cal.save(str(tmp_path / "cal.json"))
    again = Calibration.load(path)
    assert again.vector == cal.vector and again.segments == (0.6,) and again.cfg is True
    assert again.source == {"run_id": "r1", "file": path}
    assert json.loads((tmp_path / "cal.json").read_text())["format"] == "calibri-calibration/1"
    store = ObjectStore(tmp_path / "objects")  # the export asset's schedule (time-dependent) ...
    export_calibrated(bb, "block", vector, 2, store, "ckpt", segments=(0.6,))
    schedule = Calibration.load(str(tmp_path / "objects" / "ckpt"))
    assert schedule.vector == cal.vector and schedule.cfg is None  # the schedule file leaves cfg to the model
    assert schedule.search_space(bb.transformer, cfg=True).to_dict() == search.to_dict()
    constant = search.x0(4.5)[: search.layout.search_size].tolist()  # ... and the baked manifest (constant)
    export_calibrated(bb, "block", constant, 2, store, "baked")
    manifest = json.loads((tmp_path / "objects" / "baked" / "manifest.json").read_text())
    baked = Calibration.from_dict(manifest)
    assert baked.cfg is True and list(baked.vector) == pytest.approx(constant)
    with pytest.raises(FileNotFoundError, match="no calibration.json"):
        Calibration.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        Calibration.load(str(tmp_path / "missing.json"))


def test_a_catalog_run_is_a_calibration(tmp_catalog):
    import polars as pl

    row = dict(
        run_id="toy|world_score|block|n2|s0.9",
        model="toy",
        reward="world_score",
        granularity="block",
        n_models=2,
        segments=[0.9],
        names=["a", "b"],
        vector=[1.0, 1.1, 0.9, 1.0, 2.0, -1.0] * 2,
        status="finished",
        config=json.dumps({"guidance": None, "shift": 3.0}),
    )
    tmp_catalog.replace("calibration_runs", pl.DataFrame([row]), {"run_id": row["run_id"]})
    cal = Calibration.from_catalog(tmp_catalog, row["run_id"])
    assert cal.segments == (0.9,) and cal.n_models == 2 and cal.source["shift"] == 3.0
    assert cal.parts()[1] == tuple(row["vector"][6:])
    with pytest.raises(ValueError, match="no calibration run 'nope'"):
        Calibration.from_catalog(tmp_catalog, "nope")


def test_calibri_export_writes_a_calibration_file_and_baked_checkpoints(tmp_path, monkeypatch):
    """`calibri export` reads a finished run of the catalog; the toy run bakes into a stock diffusers folder."""
    import polars as pl
    from diffusers import FluxTransformer2DModel

    from calibri_pipeline.cli import main
    from calibri_pipeline.models import load_model
    from calibri_pipeline.storage.catalog import Catalog

    toy = load_model("toy")
    space = CalibrationSpace.from_transformer(toy.transformer, "block")
    vector = [1.0 + 0.01 * i for i in range(space.size)] + [1.0]
    catalog = Catalog(tmp_path / "catalog.duckdb")
    row = dict(run_id="toy|world_score|block|n1", model="toy", reward="world_score", granularity="block")
    row.update(n_models=1, segments=[], names=list(space.names), vector=vector, status="finished", config="{}")
    catalog.replace("calibration_runs", pl.DataFrame([row]), {"run_id": row["run_id"]})
    monkeypatch.setenv("CALIBRI_CATALOG", str(tmp_path / "catalog.duckdb"))
    assert main(["export", "--run-id", row["run_id"], "--out", str(tmp_path / "cal.json")]) == 0
    assert list(Calibration.load(str(tmp_path / "cal.json")).vector) == pytest.approx(vector)
    assert main(["export", "--run-id", row["run_id"], "--out", str(tmp_path / "cal.json")]) == 2  # never overwritten
    assert main(["export", "--run-id", "nope", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
    out = tmp_path / "ckpt"
    assert main(["export", "--run-id", row["run_id"], "--format", "diffusers", "--out", str(out)]) == 0
    baked = FluxTransformer2DModel.from_pretrained(out / "model")  # a stock from_pretrained
    hooked = CalibrationSpace.from_transformer(toy.transformer, "block")
    block = baked.transformer_blocks[0].attn.to_out[0].weight
    reference = toy.transformer.transformer_blocks[0].attn.to_out[0].weight
    assert torch.allclose(block, reference * vector[0]) and hooked.size == space.size
    assert Calibration.load(str(out)).vector == tuple(vector)
    official_file = tmp_path / "cmaes_step_0001.json"
    assert main(["export", "--run-id", row["run_id"], "--format", "official", "--out", str(official_file)]) == 0
    assert Calibration.load(str(official_file), model=toy.transformer).vector == pytest.approx(vector)


# ------------------------------------------------------------------------------------------------
# The official release's files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,granularity,n_models,per_model",
    [
        ("flux", "gate", 1, lambda nd, ns: 4 * nd + ns + 1),
        ("flux", "layer", 1, lambda nd, ns: 2 * nd + ns + 1),
        ("flux", "block", 1, lambda nd, ns: nd + ns + 1),
        ("sd3", "gate", 2, None),
        ("qwen-image", "gate", 2, lambda nb, _: 4 * nb + 1),
    ],
)
def test_an_official_file_round_trips_on_the_model_it_was_made_for(
    tmp_path, backbones, arch, granularity, n_models, per_model
):
    bb = backbones[arch]
    t = bb.transformer
    space = CalibrationSpace.from_transformer(t, granularity)
    search = SearchSpace.for_model(space, n_models, uses_cfg=bb.uses_cfg)
    cal = Calibration(granularity, space.names, n_models, _vector(search, 4.5, 11).tolist())
    path = cal.to_official(str(tmp_path / "cmaes_step_0010.json"), t)
    record = json.loads((tmp_path / "cmaes_step_0010.json").read_text())
    n_double = len(getattr(t, "transformer_blocks", []))
    n_single = len(getattr(t, "single_transformer_blocks", []))
    if per_model is not None:  # the release's length formulas (FLUX.1-dev: 115 / 77 / 58; Qwen-Image: 482 at n=2)
        assert len(record["solution"]) == record["shapes"]["total"] == n_models * per_model(n_double, n_single)
    else:  # SD-3: 2 per block + 2 per block with a text stream + 1 per dual-attention block, + the weight
        blocks = t.transformer_blocks
        n_ctx = sum(not b.context_pre_only for b in blocks)
        n_dual = sum(bool(getattr(b, "use_dual_attention", False)) for b in blocks)
        assert record["shapes"]["total"] == n_models * (2 * len(blocks) + 2 * n_ctx + n_dual + 1)
    assert record["solution"][-n_models:] == list(cal.vector[-n_models:])  # the trailing weights stay last
    back = Calibration.load(path, model=t)  # the granularity read from `shapes`
    assert back.granularity == granularity and back.vector == pytest.approx(cal.vector)
    assert back.source["official"] and back.cfg == bb.uses_cfg
    with pytest.raises(ValueError, match="give the model it was made for"):
        Calibration.load(path)
    other = "sd3" if arch != "sd3" else "flux"
    with pytest.raises(ValueError):
        Calibration.load(path, model=backbones[other].transformer)


def test_the_official_flux_gate_order_is_image_pairs_then_text_pairs_then_singles(backbones):
    """The order the release's flux_sg.py reads (its file says nothing about it): spelled out on the tiny FLUX."""
    from calibri_pipeline.method import official

    t = backbones["flux"].transformer
    space = CalibrationSpace.from_transformer(t, "gate")
    variant, parts = official.sections(space)
    nd, ns = len(t.transformer_blocks), len(t.single_transformer_blocks)
    assert variant == "black-forest-labs/FLUX.1-dev"
    assert parts[0][:2] == ["transformer_blocks.0.attn.image", "transformer_blocks.0.mlp.image"]
    assert parts[1][:2] == ["transformer_blocks.0.attn.text", "transformer_blocks.0.mlp.text"]
    assert [len(p) for p in parts] == [2 * nd, 2 * nd, ns]
    cal = Calibration("gate", space.names, 1, [1.0 + 0.01 * i for i in range(space.size + 1)])
    flat = official.to_flat(cal.vector, 1, space)
    assert flat[0] == cal.vector[space.names.index("transformer_blocks.0.attn.image")]
    assert flat[2 * nd] == cal.vector[space.names.index("transformer_blocks.0.attn.text")]
    timed = Calibration("gate", space.names, 1, [1.0] * (2 * space.size + 2), (0.5,))
    with pytest.raises(ValueError, match="no official form"):
        timed.to_official("unused.json", t)


OFFICIAL_CODE = os.environ.get("CALIBRI_OFFICIAL_CODE")  # a checkout of github.com/v-gen-ai/Calibri (its src/)


@pytest.mark.skipif(not OFFICIAL_CODE, reason="set CALIBRI_OFFICIAL_CODE to a checkout of the official release")
@pytest.mark.parametrize("granularity", ["gate", "layer", "block"])
def test_the_official_hooks_and_ours_give_the_same_flux_output_for_the_same_file(backbones, granularity):
    """Behaviour, not layout: the same cmaes_step file through the release's own FLUX hooks (run from its
    checkout, not copied) and through this project's coefficients gives the same transformer output."""
    import copy
    import importlib
    import sys
    import types

    sys.path.insert(0, OFFICIAL_CODE)
    module, cls = {
        "gate": ("src.models.flux_sg", "SGFluxPipeline"),
        "layer": ("src.models.flux_sg_mlp_attn", "SGFluxPipeline_MlpAttn"),
        "block": ("src.models.flux_sg_block", "SGFluxPipelineBlock"),
    }[granularity]
    from calibri_pipeline.method import official

    theirs_module = importlib.import_module(module)
    t = backbones["flux"].transformer
    space = CalibrationSpace.from_transformer(t, granularity)
    g = torch.Generator().manual_seed(7)
    vector = (1.0 + 0.4 * torch.randn(space.size + 1, generator=g)).tolist()
    cal = Calibration(granularity, space.names, 1, vector)
    flat = np.asarray(official.to_flat(cal.vector, 1, space))
    n_img, n_txt = 16, 8
    inputs = dict(
        hidden_states=torch.randn(2, n_img, t.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(2, n_txt, t.config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(2, t.config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.7, 0.7]),
        img_ids=torch.zeros(n_img, 3),
        txt_ids=torch.zeros(n_txt, 3),
        guidance=torch.full((2,), 3.5) if t.config.guidance_embeds else None,
        return_dict=False,
    )
    official_model = theirs_module.extend_transformer_with_sg(copy.deepcopy(t), num_models=1)
    pipe = getattr(theirs_module, cls).__new__(getattr(theirs_module, cls))
    pipe.pipeline = types.SimpleNamespace(transformer=official_model)
    pipe.apply_coefficients(flat)
    with torch.no_grad():
        theirs = official_model(**inputs)[0]
        with space.apply(t, torch.tensor(vector[:-1])):
            ours = t(**inputs)[0] * vector[-1]
        plain = t(**inputs)[0]
        swapped = flat.copy()  # the same numbers in another order: what a wrong mapping would give
        swapped[:-1] = flat[:-1][::-1]
        pipe.apply_coefficients(swapped)
        wrong = official_model(**inputs)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - plain).abs().max() > 1e-3 and (wrong - theirs).abs().max() > 1e-3  # the check can fail


def test_a_cfg_ensemble_bakes_into_one_transformer_that_the_hook_completes(tmp_path, pipes, backbones):
    """The CFG pair exported as one baked transformer + calibration.json: a stock pipeline holding only the
    baked transformer, under apply_calibration(pipe, Calibration.load(folder)), gives the calibrated images."""
    from calibri_pipeline.method.export import export_calibrated
    from calibri_pipeline.storage.object_store import ObjectStore

    bb, pipe = backbones["sd3"], pipes["sd3"]
    space = CalibrationSpace.from_transformer(bb.transformer, "gate")
    search = SearchSpace.for_model(space, 2, uses_cfg=True)
    vector = _vector(search, bb.default_guidance, 21)
    seeds = [3, 8]
    ours = bb.generate(PROMPTS[:2], seeds, steps=STEPS, space=space, vectors=vector, n_models=2)
    manifest = export_calibrated(bb, "gate", vector.tolist(), 2, ObjectStore(tmp_path / "objects"), "ckpt")
    folder = tmp_path / "objects" / "ckpt"
    assert manifest["members"] == ["model"] and (folder / "calibration.json").exists()
    baked = type(pipe.transformer).from_pretrained(folder / "model")
    stock = type(pipe)(**{**pipe.components, "transformer": baked})
    latents = bb.pack(bb.initial_noise(seeds))
    with apply_calibration(stock, Calibration.load(str(folder))):
        images = _stock("sd3", stock, bb, latents, bb.default_guidance)
    torch.testing.assert_close(images.float(), ours, atol=1e-4, rtol=0)
    stuck = vector.clone()
    stuck[0], stuck[space.size] = 0.0, 0.5  # the conditional pass switches a branch off, the other keeps it
    with pytest.raises(ValueError, match="one baked transformer cannot hold both"):
        export_calibrated(bb, "gate", stuck.tolist(), 2, ObjectStore(tmp_path / "objects"), "stuck")
