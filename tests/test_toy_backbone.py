"""The embedded toy backbone: MiniLM conditioning, packing, deterministic generation, shipped checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from calibri_pipeline.backbones.toy import (
    CONFIG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    ToyBackbone,
    ToyModelConfig,
    build_toy_transformer,
    default_weights_dir,
    load_toy_backbone,
    pack_pixels,
    unpack_pixels,
)
from calibri_pipeline.method.sampler import Backbone
from calibri_pipeline.prompts.base import Prompt

TINY = ToyModelConfig(num_double_blocks=1, num_single_blocks=1, num_heads=2, head_dim=16)
PROMPTS = ["a red circle", "two blue squares", "a green triangle above a cyan diamond", "a big purple square"]


@pytest.fixture(scope="module")
def encoder():
    from calibri_pipeline.text_encoder import MiniLMTextEncoder

    return MiniLMTextEncoder()


@pytest.fixture(scope="module")
def tiny(encoder) -> ToyBackbone:
    torch.manual_seed(0)
    # default (non-zero) init, so velocities, and therefore images, depend on every input
    transformer = build_toy_transformer(TINY, zero_init=False)
    return ToyBackbone(transformer, TINY, encoder, default_steps=3, default_guidance=2.5)


@pytest.fixture(scope="module")
def shipped(encoder) -> ToyBackbone:
    return load_toy_backbone(text_encoder=encoder)


# ----------------------------------------------------------------------------- text encoder


def test_minilm_states_mask_pooled_and_cache(encoder):
    hits, misses = encoder.cache_hits, encoder.cache_misses
    emb = encoder.encode(["a red circle", "", "a red circle"])
    assert emb.states.shape == (3, 32, 384) and emb.mask.shape == (3, 32) and emb.pooled.shape == (3, 384)
    # "" is [CLS] [SEP]: the unconditional input
    assert emb.mask[1].sum().item() == 2
    # padding positions are zero, pooled is the masked mean of the real tokens
    real = emb.mask[0].bool()
    assert torch.all(emb.states[0][~real] == 0)
    assert torch.allclose(emb.pooled[0], emb.states[0][real].mean(0), atol=1e-6)
    assert torch.equal(emb.states[0], emb.states[2])
    assert encoder.cache_misses - misses <= 2  # the repeated text was encoded once at most
    encoder.encode(["a red circle"])
    assert encoder.cache_hits > hits
    assert encoder.cache_misses - misses <= 2
    # different prompts really differ
    assert not torch.allclose(emb.pooled[0], emb.pooled[1])


def test_minilm_encoding_does_not_depend_on_batch_mates(encoder):
    from calibri_pipeline.text_encoder import MiniLMTextEncoder

    fresh = MiniLMTextEncoder()
    alone = fresh.encode(["three yellow stars on a dark background"])
    together = encoder.encode(["a very long prompt " * 3, "three yellow stars on a dark background"])
    fresh.precompute([f"filler prompt {i}" for i in range(20)] + ["a lone cyan diamond"])
    # exact: the encoder always runs batches of exactly encode_batch_size padded rows, so whatever the
    # batch mates the same kernels compute each row (its documented design; the cache depends on it)
    assert torch.equal(fresh.encode(["a lone cyan diamond"]).states, encoder.encode(["a lone cyan diamond"]).states)
    assert torch.equal(alone.states[0], together.states[1])


def test_text_encoder_rejects_bad_input(encoder):
    with pytest.raises(TypeError, match="sequence of prompt strings"):
        encoder.encode("a red circle")
    with pytest.raises(TypeError, match="must be str"):
        encoder.encode(["ok", 3])


def test_minilm_path_override(monkeypatch, tmp_path):
    from calibri_pipeline.text_encoder import MINILM_PATH_ENV, minilm_model_path

    packaged = minilm_model_path()
    monkeypatch.setenv(MINILM_PATH_ENV, str(tmp_path))
    assert minilm_model_path() == str(tmp_path)
    monkeypatch.setenv(MINILM_PATH_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=MINILM_PATH_ENV):
        minilm_model_path()
    monkeypatch.setenv(MINILM_PATH_ENV, "")
    assert minilm_model_path() == packaged


# ----------------------------------------------------------------------------- model pieces


def test_pack_unpack_roundtrip_and_token_count():
    x = torch.randn(2, 3, 32, 32)
    tokens = pack_pixels(x, 2)
    assert tokens.shape == (2, 256, 12)
    assert torch.equal(unpack_pixels(tokens, 32, 2), x)
    # a token is one 2x2 patch: token 1 is rows 0-1, columns 2-3
    assert torch.equal(tokens[0, 1].reshape(3, 2, 2), x[0, :, 0:2, 2:4])


def test_default_architecture_is_flux_class_with_double_and_single_blocks():
    cfg = ToyModelConfig()
    dc = cfg.diffusers_config()
    assert (
        dc["in_channels"] == 3 * cfg.patch_size**2
        and dc["joint_attention_dim"] == 384
        and dc["pooled_projection_dim"] == 384
    )
    assert dc["guidance_embeds"] is False
    assert sum(dc["axes_dims_rope"]) == dc["attention_head_dim"]
    assert dc["num_layers"] >= 2 and dc["num_single_layers"] >= 2
    model = build_toy_transformer(TINY)  # zero-init: modulation and output start at zero
    assert torch.all(model.proj_out.weight == 0)
    assert torch.all(model.transformer_blocks[0].norm1.linear.weight == 0)
    assert torch.all(model.single_transformer_blocks[0].norm.linear.weight == 0)


def test_model_config_validation():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ToyModelConfig(image_size=32, patch_size=3)
    with pytest.raises(ValueError, match="at least one block"):
        ToyModelConfig(num_double_blocks=0, num_single_blocks=0)
    with pytest.raises(ValueError, match="unknown ToyModelConfig keys"):
        ToyModelConfig.from_dict({"width": 3})


# ----------------------------------------------------------------------------- generate


def test_generate_shapes_range_and_protocol(tiny):
    assert isinstance(tiny, Backbone)
    assert tiny.name == "toy" and tiny.uses_cfg
    images = tiny.generate([Prompt(t) for t in PROMPTS[:2]], [0, 1])
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert tiny.generate([], []).shape == (0, 3, 32, 32)


def test_generate_is_deterministic_per_seed(tiny):
    a = tiny.generate(PROMPTS, [1, 2, 3, 4])
    b = tiny.generate(PROMPTS, [1, 2, 3, 4])
    assert torch.equal(a, b)
    c = tiny.generate(PROMPTS, [5, 2, 3, 4])
    assert not torch.equal(a[0], c[0])
    # another batch mate (same batch shape): only a replay is promised bitwise, so compare up to rounding
    torch.testing.assert_close(a[1:], c[1:], atol=1e-5, rtol=0)


def test_image_does_not_depend_on_batch_mates_or_micro_batching(tiny):
    full = tiny.generate(PROMPTS, [1, 2, 3, 4])
    assert torch.equal(full, tiny.generate(PROMPTS, [1, 2, 3, 4]))  # the same call replayed: bitwise
    alone = tiny.generate(PROMPTS[2:3], [3])
    reversed_ = tiny.generate(PROMPTS[::-1], [4, 3, 2, 1])
    micro = tiny.generate(PROMPTS, [1, 2, 3, 4], max_batch=3)
    # alone and max_batch=3 change the batch shape, so CPU GEMM/attention kernels sum in another order
    # (~4e-7 on these [0, 1] images with MKL's AVX path); a reversed batch keeps the shape but is not a
    # replay, which is all that is promised bitwise: equal up to float rounding
    torch.testing.assert_close(full[2], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(full, reversed_.flip(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(full, micro, atol=1e-5, rtol=0)


def test_guidance_and_steps_change_the_image(tiny):
    base = tiny.generate(PROMPTS[:1], [7])
    assert not torch.equal(base, tiny.generate(PROMPTS[:1], [7], guidance=1.0))
    assert not torch.equal(base, tiny.generate(PROMPTS[:1], [7], steps=2))


def test_calibration_vectors_all_ones_equal_unmodified_and_are_per_sample(tiny):
    from calibri_pipeline.method.space import CalibrationSpace

    space = CalibrationSpace.from_transformer(tiny.transformer, "block")
    assert space.size == TINY.num_double_blocks + TINY.num_single_blocks
    plain = tiny.generate(PROMPTS, [1, 2, 3, 4])
    ones = torch.ones(space.search_size(1))
    assert torch.allclose(tiny.generate(PROMPTS, [1, 2, 3, 4], space=space, vectors=ones), plain, atol=1e-5)

    bypass = ones.clone()
    bypass[0] = 0.0  # skip every branch of the first double block
    bypassed = tiny.generate(PROMPTS, [1, 2, 3, 4], space=space, vectors=bypass)
    assert (bypassed - plain).abs().max() > 1e-3
    mixed = tiny.generate(
        PROMPTS, [1, 2, 3, 4], space=space, vectors=torch.stack([ones, bypass, ones, bypass]), max_batch=3
    )
    assert torch.allclose(mixed[0::2], plain[0::2], atol=1e-5)
    assert torch.allclose(mixed[1::2], bypassed[1::2], atol=1e-5)

    # the CFG ensemble (conditional and unconditional copies) at its initial point is standard CFG
    from calibri_pipeline.method.ensemble import EnsembleLayout

    x0 = EnsembleLayout(space.size, 2, cfg=True).initial(tiny.default_guidance).float()
    ens = tiny.generate(PROMPTS, [1, 2, 3, 4], space=space, vectors=x0, n_models=2)
    assert torch.allclose(ens, plain, atol=1e-5)


def test_generate_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match="one seed per prompt"):
        tiny.generate(PROMPTS, [1])
    with pytest.raises(ValueError, match="steps"):
        tiny.generate(PROMPTS[:1], [1], steps=0)
    with pytest.raises(ValueError, match="max_batch"):
        tiny.generate(PROMPTS[:1], [1], max_batch=0)
    with pytest.raises(TypeError, match="not a single string"):
        tiny.generate("a red circle", [1])
    with pytest.raises(ValueError, match="needs `space`"):
        tiny.generate(PROMPTS[:1], [1], vectors=torch.ones(3))
    from calibri_pipeline.method.space import CalibrationSpace

    space = CalibrationSpace.from_transformer(tiny.transformer, "block")
    with pytest.raises(ValueError, match="search_size"):
        tiny.generate(PROMPTS[:1], [1], space=space, vectors=torch.ones(space.search_size(1) + 1))


# ----------------------------------------------------------------------------- the shipped checkpoint


def test_shipped_checkpoint_loads_and_draws_single_objects(shipped):
    from calibri_pipeline.training.data import heldout_prompts
    from calibri_pipeline.world import score_images

    wdir = default_weights_dir()
    for name in (CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE):
        assert (wdir / name).is_file(), f"shipped toy checkpoint lacks {name}"
    assert (wdir / WEIGHTS_FILE).stat().st_size <= 25 * 2**20
    metrics = json.loads((wdir / METRICS_FILE).read_text())
    assert metrics["steps"] > 0 and metrics["total_steps"] >= metrics["steps"] and metrics["parameters"] > 0
    assert shipped.default_steps >= 1 and shipped.default_guidance > 1
    # A real trained model draws recognisable single objects at its default settings. The shipped
    # checkpoint (10,864 steps) gets all 16 of these exactly right (mean alignment 0.99; 98.5% of all
    # 200 single-object test prompts); a random or untrained one gets none (alignment ~0). The
    # thresholds leave room for CPU numeric differences.
    prompts = heldout_prompts("test", 16, categories=["single"])
    images = shipped.generate(prompts, list(range(len(prompts))))
    scores = score_images(images, [p.spec for p in prompts])
    correct = [s["correct"] for s in scores]
    assert sum(correct) >= 14, correct
    assert sum(s["alignment"] for s in scores) / len(scores) >= 0.9


def test_loader_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_toy_backbone(tmp_path / "nope")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(default_weights_dir(), ckpt)
    (ckpt / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        load_toy_backbone(ckpt)
    (ckpt / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="weights"):
        load_toy_backbone(ckpt)
    (ckpt / CONFIG_FILE).write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_toy_backbone(ckpt)
    (ckpt / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="config"):
        load_toy_backbone(ckpt)


def test_loader_rejects_weights_that_do_not_match_the_config(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(default_weights_dir(), ckpt)
    cfg = json.loads((ckpt / CONFIG_FILE).read_text())
    cfg["model"]["num_double_blocks"] += 1
    (ckpt / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        load_toy_backbone(ckpt)
