"""A calibration used anywhere: `apply_calibration` on the stock tiny FLUX / SD-3 pipelines reproduces this
project's sampler with the same vector and latents, with one transformer; `Calibration` files round-trip."""

from __future__ import annotations

import json

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
    return pipe(PROMPTS[:2], guidance_scale=guidance, max_sequence_length=16, **common).images


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize(
    "arch,granularity,n_models,segments",
    [
        ("flux", "block", 1, ()),
        ("flux", "gate", 1, (0.5,)),  # time-dependent: one part for the first step, one for the rest
        ("sd3", "gate", 2, ()),  # the paper's SD-3.5 setting: the CFG ensemble
        ("sd3", "block", 2, (0.5,)),
        ("sd3", "layer", 1, ()),
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
        if n_models == 2:  # the weights replace the guidance: any guidance_scale > 1 gives the same images
            other = _stock(arch, pipe, bb, latents, 7.0)
            torch.testing.assert_close(other.float(), calibrated.float(), atol=1e-4, rtol=0)
    assert _hooks(pipe.transformer) == before
    # the tolerance of the stock-pipeline test: the same arithmetic in another order
    torch.testing.assert_close(calibrated.float(), ours, atol=1e-4, rtol=0)
    assert (calibrated.float() - plain.float()).abs().max() > 1e-2  # the calibration really acted
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
    ensemble = Calibration("block", flux_space.names, 2, [1.0] * (2 * flux_space.size + 2))
    with pytest.raises(NotImplementedError, match="ensemble calibration of 2 models"):
        apply_calibration(pipes["flux"], ensemble)
    qwen_space = CalibrationSpace.from_transformer(backbones["qwen-image"].transformer, "block")
    with pytest.raises(NotImplementedError, match="Qwen-Image"):
        apply_calibration(pipes["qwen-image"], Calibration("block", qwen_space.names, 1, [1.0] * (qwen_space.size + 1)))
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
    baked = Calibration.load(str(tmp_path / "objects" / "baked"))
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
