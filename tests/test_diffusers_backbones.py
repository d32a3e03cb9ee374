"""FLUX / SD-3.5 / Qwen-Image adapters on tiny random-init pipelines of the real diffusers classes.

Nothing is downloaded: every pipeline (transformer, VAE, CLIP / T5 / Qwen2.5-VL text encoders and their
tokenizers) is built offline from configs by :mod:`calibri_pipeline.backbones.random_init`. The stock
pipelines' own ``__call__`` is the reference for the unmodified model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from calibri_pipeline.backbones import random_init
from calibri_pipeline.backbones.diffusers_dit import (
    DiffusersBackbone,
    FluxBackbone,
    QwenImageBackbone,
    SD3Backbone,
    pack_2x2,
    parse_dtype,
    scheduler_shift,
    unpack_2x2,
)
from calibri_pipeline.backbones.registry import load_backbone, resolve
from calibri_pipeline.method.ensemble import EnsembleLayout
from calibri_pipeline.method.sampler import flow_sigmas
from calibri_pipeline.method.space import CalibrationSpace

STEPS = 3
RES = 32
BUILDERS = {
    "flux": (random_init.tiny_flux_pipeline, FluxBackbone, {"max_sequence_length": 16}),
    "sd3": (random_init.tiny_sd3_pipeline, SD3Backbone, {"max_sequence_length": 16}),
    "qwen-image": (random_init.tiny_qwen_image_pipeline, QwenImageBackbone, {}),
}
ARCHS = list(BUILDERS)
CFG_ARCHS = ["sd3", "qwen-image"]
PROMPTS = ["a red cat", "two blue dogs on green grass", "a yellow car"]


@pytest.fixture(scope="module")
def pipes():
    return {arch: BUILDERS[arch][0]() for arch in ARCHS}


@pytest.fixture(scope="module")
def backbones(pipes):
    return {arch: DiffusersBackbone.from_pipeline(pipes[arch], resolution=RES, **BUILDERS[arch][2]) for arch in ARCHS}


def _gen(backbone, prompts, seeds, **kw):
    kw.setdefault("steps", STEPS)
    return backbone.generate(prompts, seeds, **kw)


def _layout(backbone, space, n_models):
    return EnsembleLayout(space.size, n_models, cfg=backbone.uses_cfg)


# ------------------------------------------------------------------------------------------------
# Pure helpers against the pipelines' own code
# ------------------------------------------------------------------------------------------------


def test_pack_matches_the_pipelines_packing(pipes):
    latents = torch.randn(2, 4, 8, 6)
    packed = pack_2x2(latents)
    flux_packed = pipes["flux"]._pack_latents(latents, 2, 4, 8, 6)
    assert torch.equal(packed, flux_packed)
    assert torch.equal(packed, pipes["qwen-image"]._pack_latents(latents, 2, 4, 8, 6))
    assert torch.equal(unpack_2x2(packed, 8, 6), latents)
    # FLUX's _unpack_latents takes pixel sizes (latent size x VAE factor)
    vsf = pipes["flux"].vae_scale_factor
    assert torch.equal(pipes["flux"]._unpack_latents(packed, 8 * vsf, 6 * vsf, vsf), latents)


@pytest.mark.parametrize("image_seq_len", [64, 1024, 4096])
def test_dynamic_shift_reproduces_the_scheduler_sigmas(image_seq_len):
    """FLUX / Qwen: exp(mu) as an SD3-style shift gives exactly the scheduler's sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = random_init.FLUX_DEV_SCHEDULER
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    steps = 15
    mu = calculate_shift(
        image_seq_len,
        config["base_image_seq_len"],
        config["max_image_seq_len"],
        config["base_shift"],
        config["max_shift"],
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    shift = scheduler_shift(scheduler.config, image_seq_len)
    assert shift == pytest.approx(math.exp(mu))
    torch.testing.assert_close(flow_sigmas(steps, shift), scheduler.sigmas, atol=1e-6, rtol=0)


def test_static_shift_and_the_documented_sd3_difference():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert scheduler_shift(scheduler.config, 1024) == 3.0
    steps = 40
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))  # what the cross-check passes
    torch.testing.assert_close(flow_sigmas(steps, 3.0), scheduler.sigmas, atol=1e-6, rtol=0)
    scheduler.set_timesteps(steps)  # the stock default ends at the training schedule's smallest sigma
    assert scheduler.sigmas[-2] < 0.01 < flow_sigmas(steps, 3.0)[-2]


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float32") is torch.float32
    assert parse_dtype(None) is None and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int8")


# ------------------------------------------------------------------------------------------------
# Every architecture: the Backbone contract
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_end_to_end(backbones, arch):
    bb = backbones[arch]
    assert bb.arch == arch and bb.name == arch and bb.resolution == (RES, RES)
    assert bb.uses_cfg == (arch in CFG_ARCHS)
    images = _gen(bb, PROMPTS, [0, 1, 2])
    assert images.shape == (3, 3, RES, RES) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert (images[0] - images[1]).abs().max() > 1e-3  # different prompt and seed, different image
    same_prompt = _gen(bb, [PROMPTS[0], PROMPTS[0]], [0, 7])
    assert (same_prompt[0] - same_prompt[1]).abs().max() > 1e-3  # the seed matters
    other_prompt = _gen(bb, [PROMPTS[1]], [0])
    assert (other_prompt[0] - images[0]).abs().max() > 1e-4  # and so does the prompt


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic_and_independent_of_batch_mates(backbones, arch):
    bb = backbones[arch]
    alone = _gen(bb, [PROMPTS[0]], [11])
    again = _gen(bb, [PROMPTS[0]], [11])
    assert torch.equal(alone, again)
    mixed = _gen(bb, [PROMPTS[1], PROMPTS[0], PROMPTS[2]], [5, 11, 3], max_batch=3)
    torch.testing.assert_close(mixed[1:2], alone, atol=2e-5, rtol=0)
    split = _gen(bb, [PROMPTS[1], PROMPTS[0], PROMPTS[2]], [5, 11, 3], max_batch=2)
    torch.testing.assert_close(split, mixed, atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_vector_equals_unmodified_model(backbones, arch):
    bb = backbones[arch]
    space = CalibrationSpace.from_transformer(bb.transformer, "gate")
    base = _gen(bb, PROMPTS[:2], [1, 2])
    for n_models in (1, 2):
        x0 = _layout(bb, space, n_models).initial(bb.default_guidance)
        calibrated = _gen(bb, PROMPTS[:2], [1, 2], space=space, vectors=x0, n_models=n_models)
        torch.testing.assert_close(calibrated, base, atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_vector_changes_the_image_per_sample(backbones, arch):
    bb = backbones[arch]
    space = CalibrationSpace.from_transformer(bb.transformer, "block")
    layout = _layout(bb, space, 1)
    x0 = layout.initial(bb.default_guidance)
    scaled = x0.clone()
    scaled[: space.size] = torch.linspace(0.2, 1.8, space.size, dtype=scaled.dtype)
    base = _gen(bb, PROMPTS[:2], [1, 2])
    vectors = torch.stack([scaled, x0])
    both = _gen(bb, PROMPTS[:2], [1, 2], space=space, vectors=vectors)
    assert (both[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(both[1], base[1], atol=2e-5, rtol=0)  # its own vector: unmodified
    alone = _gen(bb, PROMPTS[:1], [1], space=space, vectors=scaled)
    torch.testing.assert_close(alone[0], both[0], atol=2e-5, rtol=0)
    assert not bb.transformer._forward_hooks and all(not m._forward_hooks for m in bb.transformer.modules())


@pytest.mark.parametrize("arch", CFG_ARCHS)
def test_cfg_ensemble(backbones, arch):
    """n_models=2 on a CFG model: conditional and unconditional members with their own coefficients."""
    bb = backbones[arch]
    space = CalibrationSpace.from_transformer(bb.transformer, "gate")
    layout = _layout(bb, space, 2)
    assert layout.mode == "cfg"
    x0 = layout.initial(bb.default_guidance)
    base = _gen(bb, PROMPTS[:1], [4])
    # weights (1, 0): only the conditional member counts == sampling with guidance 1
    cond_only = x0.clone()
    cond_only[-2:] = torch.tensor([1.0, 0.0], dtype=x0.dtype)
    guidance_one = _gen(bb, PROMPTS[:1], [4], guidance=1.0)
    torch.testing.assert_close(
        _gen(bb, PROMPTS[:1], [4], space=space, vectors=cond_only, n_models=2), guidance_one, atol=2e-5, rtol=0
    )
    assert (guidance_one - base).abs().max() > 1e-3
    # calibrating only the unconditional member changes the guided image
    uncond_scaled = x0.clone()
    uncond_scaled[space.size : 2 * space.size] = 0.5
    changed = _gen(bb, PROMPTS[:1], [4], space=space, vectors=uncond_scaled, n_models=2)
    assert (changed - base).abs().max() > 1e-3
    # a third member is another conditional pass that starts at weight 0: x0 is still standard CFG,
    # and with some blocks at 0 it is skip-layer guidance (weights g + s, 1 - g, -s)
    x0_3 = _layout(bb, space, 3).initial(bb.default_guidance)
    torch.testing.assert_close(
        _gen(bb, PROMPTS[:1], [4], space=space, vectors=x0_3, n_models=3), base, atol=2e-5, rtol=0
    )  # a third pass enlarges the batch: equal up to rounding
    slg = x0_3.clone()
    slg[2 * space.size : 2 * space.size + 4] = 0.0  # the first block's gates skipped in member 3
    g = bb.default_guidance
    slg[-3:] = torch.tensor([g + 1.5, 1.0 - g, -1.5], dtype=slg.dtype)
    assert (_gen(bb, PROMPTS[:1], [4], space=space, vectors=slg, n_models=3) - base).abs().max() > 1e-3


def test_flux_ensemble_and_guidance_embedding(backbones):
    bb = backbones["flux"]
    space = CalibrationSpace.from_transformer(bb.transformer, "block")
    layout = _layout(bb, space, 2)
    assert layout.mode == "ensemble"
    base = _gen(bb, PROMPTS[:1], [9])
    torch.testing.assert_close(
        _gen(bb, PROMPTS[:1], [9], space=space, vectors=layout.initial(), n_models=2), base, atol=2e-5, rtol=0
    )
    vec = layout.initial().clone()
    vec[: space.size] = 0.3  # member 1 heavily attenuated, member 2 intact
    assert (_gen(bb, PROMPTS[:1], [9], space=space, vectors=vec, n_models=2) - base).abs().max() > 1e-3
    # guidance-distilled: the scale is an input of the transformer, not a second pass
    assert (_gen(bb, PROMPTS[:1], [9], guidance=1.5) - base).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------
# Cross-check against the stock pipelines (same latents -> same image)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_stock_pipeline_call(pipes, backbones, arch):
    bb, pipe = backbones[arch], pipes[arch]
    seeds = [3, 8]
    ours = _gen(bb, PROMPTS[:2], seeds)
    latents = bb.pack(bb.initial_noise(seeds))
    common = dict(height=RES, width=RES, num_inference_steps=STEPS, latents=latents, output_type="pt")
    if arch == "flux":
        ref = pipe(PROMPTS[:2], guidance_scale=bb.default_guidance, max_sequence_length=16, **common).images
    elif arch == "sd3":
        # the stock SD3 default schedule ends at sigma_min ~ 0.003; give it flow_sigmas' grid to compare
        ref = pipe(
            PROMPTS[:2],
            guidance_scale=bb.default_guidance,
            max_sequence_length=16,
            sigmas=list(np.linspace(1.0, 1 / STEPS, STEPS)),
            **common,
        ).images
    else:
        ref = pipe(PROMPTS[:2], negative_prompt=" ", true_cfg_scale=bb.default_guidance, **common).images
    assert ref.shape == ours.shape
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=0)
    # the per-seed noise is what the pipeline draws from per-sample CPU generators
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    if arch == "sd3":
        drawn = pipe.prepare_latents(2, 4, RES, RES, torch.float32, "cpu", gens)
    elif arch == "flux":
        drawn = pipe.prepare_latents(2, 4, RES, RES, torch.float32, "cpu", gens)[0]
    else:
        drawn = pipe.prepare_latents(2, 4, RES, RES, torch.float32, "cpu", gens)
    assert torch.equal(drawn, latents)


def test_qwen_cfg_norm_rescaling_matters(pipes, backbones):
    """Qwen-Image's true CFG rescales the guided velocity to the conditional one's norm (stock behaviour)."""
    plain = QwenImageBackbone(pipes["qwen-image"], resolution=RES, cfg_renorm=False)
    diff = (_gen(plain, PROMPTS[:1], [2]) - _gen(backbones["qwen-image"], PROMPTS[:1], [2])).abs().max()
    assert diff > 1e-4


def test_unreproducible_scheduler_options_are_named(pipes, caplog):
    """Qwen-Image's real scheduler stretches its schedule to end at 0.02 (shift_terminal): say so."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = pipes["qwen-image"]
    original = pipe.scheduler
    try:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(**random_init.QWEN_IMAGE_SCHEDULER)
        with caplog.at_level("WARNING", logger="calibri_pipeline.backbones.diffusers_dit"):
            bb = QwenImageBackbone(pipe, resolution=RES)
        assert "shift_terminal" in caplog.text
        assert bb.sigma_shift() == pytest.approx(math.exp(0.5 + (0.9 - 0.5) / (8192 - 256) * (64 - 256)))
    finally:
        pipe.scheduler = original


def test_qwen_variable_length_prompts_are_padded_and_masked(backbones):
    bb = backbones["qwen-image"]
    batch = bb.encode([PROMPTS[0], PROMPTS[1]])
    lengths = [bb.embedding(t)["states"].shape[1] for t in PROMPTS[:2]]
    assert lengths[0] != lengths[1] and batch["states"].shape[1] == max(lengths)
    assert batch["mask"].sum(dim=1).tolist() == lengths


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_bad_input_is_rejected_clearly(pipes, backbones):
    bb = backbones["sd3"]
    space = CalibrationSpace.from_transformer(bb.transformer, "block")
    with pytest.raises(ValueError, match="one seed per prompt"):
        bb.generate(PROMPTS[:2], [1])
    with pytest.raises(TypeError, match="not a single string"):
        bb.generate("a cat", [1])
    with pytest.raises(ValueError, match="needs `space`"):
        bb.generate(PROMPTS[:1], [1], vectors=torch.ones(space.search_size(1)))
    with pytest.raises(ValueError, match=r"search_size\(1\)"):
        bb.generate(PROMPTS[:1], [1], space=space, vectors=torch.ones(space.size))
    with pytest.raises(ValueError, match="NaN or inf"):
        bb.generate(PROMPTS[:1], [1], space=space, vectors=torch.full((space.search_size(1),), float("nan")))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        bb.generate(PROMPTS[:1], [1], steps=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        SD3Backbone(pipes["sd3"], resolution=30)
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        FluxBackbone(pipes["sd3"])
    with pytest.raises(TypeError, match="from_pipeline"):
        DiffusersBackbone(pipes["sd3"])
    with pytest.raises(ValueError, match="arch='flux' but"):
        DiffusersBackbone.from_pipeline(pipes["sd3"], arch="flux")
    assert bb.generate([], []).shape == (0, 3, RES, RES)


def test_prompt_cache_is_bounded_and_exact(pipes, backbones):
    small = DiffusersBackbone.from_pipeline(pipes["sd3"], resolution=RES, max_sequence_length=16, prompt_cache_size=2)
    images = _gen(small, PROMPTS, [0, 1, 2])  # more distinct prompts (+ the negative) than the cache holds
    assert len(small._prompt_cache) == 2
    torch.testing.assert_close(images, _gen(backbones["sd3"], PROMPTS, [0, 1, 2]), atol=0, rtol=0)
    assert all(v.device.type == "cpu" for entry in small._prompt_cache.values() for v in entry.values())


def test_precomputed_embeddings_without_text_encoders():
    pipe = random_init.tiny_flux_pipeline(text_encoders=False)
    bb = DiffusersBackbone.from_pipeline(pipe, resolution=RES)
    with pytest.raises(ValueError, match="no text encoders"):
        _gen(bb, ["a cat"], [0])
    with pytest.raises(ValueError, match="missing"):
        bb.cache_prompt_embeddings("a cat", {"states": torch.randn(1, 8, 24)})
    bb.cache_prompt_embeddings("a cat", {"states": torch.randn(1, 8, 24), "pooled": torch.randn(1, 16)})
    assert _gen(bb, ["a cat"], [0], steps=2).shape == (1, 3, RES, RES)


# ------------------------------------------------------------------------------------------------
# Loading: local folders (from_pretrained), presets, the toy, LoRA
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pipes):
    root = tmp_path_factory.mktemp("pipelines")
    for arch in ARCHS:
        pipes[arch].save_pretrained(root / arch)
    return root


@pytest.mark.parametrize("arch", ARCHS)
def test_registry_loads_local_folders(saved, backbones, arch):
    opts = dict(resolution=RES, device="cpu", dtype="float32", **BUILDERS[arch][2])
    loaded = load_backbone(str(saved / arch), **opts)  # model_index.json names the pipeline
    assert type(loaded) is BUILDERS[arch][1] and loaded.name == arch
    # exact: the same weights in the same dtype, in fresh aligned memory (see the next test), run the
    # same kernels as the in-memory original: a replay of the same computation
    torch.testing.assert_close(_gen(loaded, PROMPTS[:1], [6]), _gen(backbones[arch], PROMPTS[:1], [6]), atol=0, rtol=0)
    preset = load_backbone(arch, path=str(saved / arch), **opts)  # a preset's architecture from a local copy
    assert type(preset) is BUILDERS[arch][1] and preset.name == arch


def _misplaced_tensors(modules) -> list[str]:
    """CPU parameters and buffers that are not 64-byte aligned or not contiguous (as fresh memory is)."""
    return [
        f"{component}.{name}"
        for component, module in modules.items()
        for name, t in [*module.named_parameters(), *module.named_buffers()]
        if t.device.type == "cpu" and t.numel() and (t.data_ptr() % 64 or not t.is_contiguous())
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_reloaded_weights_are_in_aligned_contiguous_memory(saved, pipes, arch):
    """from_pretrained memory-maps safetensors at unaligned offsets, where CPU kernels round differently."""
    loaded = load_backbone(str(saved / arch), resolution=RES, device="cpu", dtype="float32", **BUILDERS[arch][2])
    modules = {k: v for k, v in loaded.pipeline.components.items() if isinstance(v, torch.nn.Module)}
    assert {"transformer", "vae", "text_encoder"} <= set(modules)
    assert _misplaced_tensors(modules) == []
    # pure data movement: the original's weights, bit for bit
    original = pipes[arch].transformer.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.transformer.state_dict().items())


def test_realign_cpu_weights_copies_only_misplaced_tensors():
    from calibri_pipeline.backbones.diffusers_dit import realign_cpu_weights

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    model.register_buffer("scale", torch.arange(8.0))
    weight, bias = model[0].weight, model[0].bias
    values = weight.detach().clone()
    weight.data = torch.empty(65)[1:].view(8, 8).copy_(values)  # 4 bytes past an aligned start
    bias.data = torch.randn(8, 2)[:, 0]  # strided
    model.scale = torch.empty(9)[1:].copy_(torch.arange(8.0))
    untouched = model[1].weight.data_ptr()
    assert len(_misplaced_tensors({"m": model})) == 3
    assert realign_cpu_weights([model]) == 3
    assert _misplaced_tensors({"m": model}) == []
    assert model[0].weight is weight and model[0].bias is bias  # the same Parameters, new memory
    assert torch.equal(weight, values) and torch.equal(model.scale, torch.arange(8.0))
    assert model[1].weight.data_ptr() == untouched and realign_cpu_weights([model]) == 0


def test_registry_errors(saved, tmp_path):
    assert resolve("FLUX.1-dev") == ("flux", resolve("flux")[1]) and resolve("Qwen")[0] == "qwen-image"
    with pytest.raises(ValueError, match="unknown backbone 'nonsense'"):
        load_backbone("nonsense")
    with pytest.raises(ValueError, match="empty"):
        load_backbone("  ")
    with pytest.raises(TypeError, match="str"):
        load_backbone(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone("./no/such/checkpoint")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        load_backbone(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="sd3 preset, but arch='flux'"):
        load_backbone("sd3", arch="flux", path=str(saved / "sd3"))
    with pytest.raises(ValueError, match="arch='sd3' but"):
        load_backbone(str(saved / "flux"), arch="sd3", device="cpu")
    with pytest.raises(ValueError, match="unknown arch"):
        load_backbone(str(saved / "flux"), arch="unet")
    with pytest.raises(ValueError, match="not both"):
        load_backbone(str(saved / "flux"), dtype="bf16", torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_backbone(str(saved / "flux"), dtype="int4")
    bad = tmp_path / "other"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="holds a StableDiffusionPipeline"):
        load_backbone(str(bad))
    # a preset goes to the hub: with an empty cache and no downloads it fails with an error naming the model
    with pytest.raises(OSError, match="stable-diffusion-3.5-medium"):
        load_backbone("sd3", device="cpu", local_files_only=True, cache_dir=str(tmp_path / "hf-cache"))


def test_registry_toy_dispatch(tmp_path):
    from safetensors.torch import save_file

    from calibri_pipeline.backbones.toy import ToyBackbone, ToyModelConfig, build_toy_transformer

    config = ToyModelConfig(
        image_size=8, patch_size=2, num_double_blocks=1, num_single_blocks=1, num_heads=2, head_dim=8, text_max_length=4
    )
    model = build_toy_transformer(config, zero_init=False)
    (tmp_path / "config.json").write_text(json.dumps({"model": config.to_dict()}))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    toy = load_backbone("toy", path=tmp_path)
    assert isinstance(toy, ToyBackbone)
    assert all(torch.equal(a, b) for a, b in zip(toy.transformer.state_dict().values(), model.state_dict().values()))
    assert _misplaced_tensors({"transformer": toy.transformer}) == []  # loaded into freshly built modules
    with pytest.raises(TypeError, match="unexpected lora"):
        load_backbone("toy", lora="x")
    with pytest.raises(FileNotFoundError):
        load_backbone("toy", path=tmp_path / "missing")


def test_lora_is_fused_into_plain_linear_layers(tmp_path):
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = random_init.tiny_flux_pipeline(seed=1)
    pipe.save_pretrained(tmp_path / "base")
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    torch.manual_seed(5)
    rank, alpha = 2, 4
    targets = ["to_q", "to_out.0", "to_add_out", "proj_out"]  # includes branch projections Calibri scales
    pipe.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets))
    lora_state = get_peft_model_state_dict(pipe.transformer)
    FluxPipeline.save_lora_weights(
        tmp_path / "lora",
        transformer_lora_layers=lora_state,
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict(),
    )
    scale = 0.5
    bb = load_backbone(
        str(tmp_path / "base"),
        lora=str(tmp_path / "lora"),
        lora_scale=scale,
        resolution=RES,
        max_sequence_length=16,
        device="cpu",
    )
    fused = bb.transformer.state_dict()
    assert set(fused) == set(base)  # no lora_A / lora_B left behind
    for name in (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_add_out",
        "single_transformer_blocks.1.proj_out",
    ):
        delta = lora_state[f"{name}.lora_B.weight"] @ lora_state[f"{name}.lora_A.weight"]
        expected = base[f"{name}.weight"] + scale * (alpha / rank) * delta
        torch.testing.assert_close(fused[f"{name}.weight"], expected, atol=1e-6, rtol=0)
    assert torch.equal(fused["transformer_blocks.0.attn.to_k.weight"], base["transformer_blocks.0.attn.to_k.weight"])
    space = CalibrationSpace.from_transformer(bb.transformer, "gate")
    assert space.size == 2 * 2 + 2  # one double block (4 gates) + two single blocks
    assert {type(bb.transformer.get_submodule(b.target)) for b in space.branches} == {torch.nn.Linear}
    plain = load_backbone(str(tmp_path / "base"), resolution=RES, max_sequence_length=16, device="cpu")
    with_lora = _gen(bb, PROMPTS[:1], [0], steps=2)
    assert (with_lora - _gen(plain, PROMPTS[:1], [0], steps=2)).abs().max() > 1e-4
    vec = EnsembleLayout(space.size, 1).initial()
    vec[0] = 0.5
    assert (_gen(bb, PROMPTS[:1], [0], steps=2, space=space, vectors=vec) - with_lora).abs().max() > 1e-4
    with pytest.raises(FileNotFoundError, match="LoRA"):
        load_backbone(str(tmp_path / "base"), lora=str(tmp_path / "nope"), device="cpu")


# ------------------------------------------------------------------------------------------------
# The GPU scale benchmark: skip JSON without CUDA, and its CPU smoke mode runs the same code
# ------------------------------------------------------------------------------------------------


def _benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_flux_scale.py"
    spec = importlib.util.spec_from_file_location("gpu_flux_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_skips_without_cuda_and_smoke_runs_on_cpu(capsys):
    bench = _benchmark()
    if not torch.cuda.is_available():
        assert bench.main([])["skipped"] is True
        assert json.loads(capsys.readouterr().out)["skipped"] is True
    result = bench.main(["--device", "cpu", "--tiny", "--steps", "2", "--bucket", "2", "--repeats", "1"])
    assert result["skipped"] is False and result["rounds"] == 1 and result["nonfinite_pixels"] == 0
    assert result["projection"]["popsize"] == 16 and result["projection"]["images"] == 200 * 16 * 2
    for variant in ("baseline", "calibrated"):
        timing = result["per_image"][variant]
        assert timing["all_in_s"] > 0 and timing["reward_s"] > 0 and timing["denoise_tflops"] > 0
