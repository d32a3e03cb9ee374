"""CalibrationSpace on tiny random-init FLUX, SD3 (dual attention) and Qwen-Image transformers.

Invariants of DESIGN.md §4: all-ones == unmodified; zero == bypassing the branch; per-sample ==
each sample alone; baked stock forward == hooked forward (also after save/load); counts on the
real configs built on the meta device.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

from calibri_pipeline import CalibrationSpace  # noqa: E402
from calibri_pipeline.method import space as space_mod  # noqa: E402
from calibri_pipeline.method.space import CalibrationError  # noqa: E402

GRANS = ["block", "layer", "gate"]
ATOL = 2e-5


# --- tiny models and their inputs -------------------------------------------------------------


def tiny_flux():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=12,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def flux_inputs(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    s, t = 16, 5
    img_ids = torch.zeros(s, 3)
    img_ids[:, 1] = torch.arange(s) // 4
    img_ids[:, 2] = torch.arange(s) % 4
    return dict(
        hidden_states=torch.randn(batch, s, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, t, 16, generator=g),
        pooled_projections=torch.randn(batch, 12, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=img_ids,
        txt_ids=torch.zeros(t, 3),
        return_dict=False,
    )


def tiny_sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=8,
        dual_attention_layers=(0, 1),
        qk_norm="rms_norm",
    ).eval()


def sd3_inputs(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
        pooled_projections=torch.randn(batch, 12, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
        return_dict=False,
    )


def tiny_qwen():
    torch.manual_seed(0)
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def qwen_inputs(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
        encoder_hidden_states_mask=torch.ones(batch, 5),
        timestep=torch.rand(batch, generator=g),
        img_shapes=[[(1, 4, 4)]] * batch,
        return_dict=False,
    )


MODELS = {"flux": (tiny_flux, flux_inputs), "sd3": (tiny_sd3, sd3_inputs), "qwen": (tiny_qwen, qwen_inputs)}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def slice_inputs(inputs, i):
    out = {}
    for k, v in inputs.items():
        if k in ("img_ids", "txt_ids", "return_dict"):
            out[k] = v
        elif k == "img_shapes":
            out[k] = v[i : i + 1]
        else:
            out[k] = v[i : i + 1]
    return out


@pytest.fixture(scope="module", params=list(MODELS))
def arch(request):
    build, inputs = MODELS[request.param]
    return request.param, build(), inputs


# --- invariants -----------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANS)
def test_all_ones_is_identical_and_other_values_change_output(arch, granularity):
    name, model, make_inputs = arch
    space = CalibrationSpace.from_transformer(model, granularity)
    inputs = make_inputs(2)
    ref = run(model, inputs)
    with space.apply(model, torch.ones(space.size)):
        same = run(model, inputs)
    assert torch.equal(ref, same)
    with space.apply(model, torch.ones(2, space.size)):
        assert torch.equal(ref, run(model, inputs))
    # and every coefficient matters: moving it moves the output (except the last block's text
    # stream, which Qwen-Image computes and then discards)
    last_block = space.branches[-1].block
    for j in range(space.size):
        if all(b.block == last_block and b.stream == "text" for b in space.groups[j]):
            continue
        c = torch.ones(space.size)
        c[j] = 1.5
        with space.apply(model, c):
            assert not torch.allclose(run(model, inputs), ref, atol=1e-6), space.names[j]
    assert torch.equal(run(model, inputs), ref)  # hooks gone


class _PassThrough(nn.Module):
    """A block that returns its streams unchanged: bypassing the whole block."""

    def forward(self, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        return encoder_hidden_states, hidden_states


@pytest.mark.parametrize("block_index", [0, 1, -1])
def test_zero_block_equals_removing_the_block(arch, block_index):
    name, model, make_inputs = arch
    space = CalibrationSpace.from_transformer(model, "block")
    j = block_index % space.size
    list_name, idx = space.names[j].rsplit(".", 1)
    inputs = make_inputs(2)
    c = torch.ones(space.size)
    c[j] = 0.0
    with space.apply(model, c):
        hooked = run(model, inputs)
    reference_model = copy.deepcopy(model)
    getattr(reference_model, list_name)[int(idx)] = _PassThrough()
    torch.testing.assert_close(hooked, run(reference_model, inputs), atol=ATOL, rtol=0)


def test_zero_block_equals_sd3_skip_layers():
    model = tiny_sd3()
    space = CalibrationSpace.from_transformer(model, "block")
    inputs = sd3_inputs(2)
    for i in range(space.size):
        c = torch.ones(space.size)
        c[i] = 0.0
        with space.apply(model, c):
            hooked = run(model, inputs)
        torch.testing.assert_close(hooked, run(model, {**inputs, "skip_layers": [i]}), atol=ATOL, rtol=0)


@pytest.mark.parametrize("granularity", ["layer", "gate"])
def test_zero_branch_equals_zeroing_its_projection(arch, granularity):
    """A zero coefficient removes exactly that branch: same as a model whose projection outputs 0."""
    name, model, make_inputs = arch
    space = CalibrationSpace.from_transformer(model, granularity)
    inputs = make_inputs(2)
    for j in range(space.size):
        c = torch.ones(space.size)
        c[j] = 0.0
        with space.apply(model, c):
            hooked = run(model, inputs)
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for branch in space.groups[j]:
                lin = ref.get_submodule(branch.target)
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
        torch.testing.assert_close(hooked, run(ref, inputs), atol=ATOL, rtol=0)


def _flux_double_block_without(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb, drop):
    """A hand-written FLUX double block (diffusers' math) that leaves out the branch named in `drop`."""
    norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    norm_e, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(encoder_hidden_states, emb=temb)
    attn_out, ctx_attn_out = block.attn(
        hidden_states=norm_h, encoder_hidden_states=norm_e, image_rotary_emb=image_rotary_emb
    )
    if drop != "attn.image":
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_out
    norm_h = block.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    if drop != "mlp.image":
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * block.ff(norm_h)
    if drop != "attn.text":
        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * ctx_attn_out
    norm_e = block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    if drop != "mlp.text":
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * block.ff_context(norm_e)
    return encoder_hidden_states, hidden_states


@pytest.mark.parametrize("branch", ["attn.image", "attn.text", "mlp.image", "mlp.text"])
def test_zero_gate_equals_handwritten_flux_block(branch):
    model = tiny_flux()
    block = model.transformer_blocks[0]
    space = CalibrationSpace.from_transformer(model, "gate")
    j = space.names.index(f"transformer_blocks.0.{branch}")
    g = torch.Generator().manual_seed(3)
    h, e, temb = (
        torch.randn(2, 16, 16, generator=g),
        torch.randn(2, 5, 16, generator=g),
        torch.randn(2, 16, generator=g),
    )
    ids = torch.zeros(21, 3)
    rope = model.pos_embed(ids)
    c = torch.ones(space.size)
    c[j] = 0.0
    with torch.no_grad():
        with space.apply(model, c):
            e_hooked, h_hooked = block(h, e, temb, image_rotary_emb=rope)
        e_ref, h_ref = _flux_double_block_without(block, h, e, temb, rope, drop=branch)
    torch.testing.assert_close(h_hooked, h_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(e_hooked, e_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("granularity", GRANS)
def test_per_sample_coefficients_equal_running_each_sample_alone(arch, granularity):
    name, model, make_inputs = arch
    space = CalibrationSpace.from_transformer(model, granularity)
    inputs = make_inputs(3)
    coefs = 1 + 0.5 * torch.randn(3, space.size, generator=torch.Generator().manual_seed(7))
    with space.apply(model, coefs):
        batched = run(model, inputs)
    for i in range(3):
        with space.apply(model, coefs[i]):
            alone = run(model, slice_inputs(inputs, i))
        torch.testing.assert_close(batched[i : i + 1], alone, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("granularity", GRANS)
def test_bake_equals_hooked_and_survives_save_pretrained(arch, granularity, tmp_path):
    name, model, make_inputs = arch
    space = CalibrationSpace.from_transformer(model, granularity)
    inputs = make_inputs(2)
    coefs = 1 + 0.4 * torch.randn(space.size, generator=torch.Generator().manual_seed(11))
    coefs[0] = 0.0
    with space.apply(model, coefs):
        hooked = run(model, inputs)
    baked = space.bake(copy.deepcopy(model), coefs)
    torch.testing.assert_close(run(baked, inputs), hooked, atol=1e-4, rtol=1e-4)
    baked.save_pretrained(tmp_path / name)
    reloaded = type(model).from_pretrained(tmp_path / name).eval()  # stock class, no calibri code
    saved_state = baked.state_dict()
    assert all(torch.equal(v, saved_state[k]) for k, v in reloaded.state_dict().items())  # bit for bit
    # exact once the layout is restored: from_pretrained leaves the weights in unaligned mmap memory,
    # where CPU kernels may round differently; load_backbone realigns them the same way
    from calibri_pipeline.backbones.diffusers_dit import realign_cpu_weights

    realign_cpu_weights([reloaded])
    torch.testing.assert_close(run(reloaded, inputs), run(baked, inputs), atol=0, rtol=0)


# --- counts on the real configs (meta device: no weights) -----------------------------------------


def _meta(cls, **config):
    with torch.device("meta"):
        return cls(**config)


def test_counts_on_real_configs():
    flux = _meta(
        diffusers.FluxTransformer2DModel,
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    assert [CalibrationSpace.from_transformer(flux, g).size for g in GRANS] == [57, 76, 114]
    sd35m = _meta(
        diffusers.SD3Transformer2DModel,
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    )
    gate = CalibrationSpace.from_transformer(sd35m, "gate")
    assert gate.size == 107 and gate.search_size(2) == 216
    qwen = _meta(
        diffusers.QwenImageTransformer2DModel,
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    )
    gate = CalibrationSpace.from_transformer(qwen, "gate")
    assert gate.size == 240 and gate.search_size(2) == 482


def test_names_follow_forward_order():
    space = CalibrationSpace.from_transformer(tiny_flux(), "gate")
    assert space.names == [
        "transformer_blocks.0.attn.image",
        "transformer_blocks.0.attn.text",
        "transformer_blocks.0.mlp.image",
        "transformer_blocks.0.mlp.text",
        "transformer_blocks.1.attn.image",
        "transformer_blocks.1.attn.text",
        "transformer_blocks.1.mlp.image",
        "transformer_blocks.1.mlp.text",
        "single_transformer_blocks.0.attn_mlp.joint",
        "single_transformer_blocks.1.attn_mlp.joint",
    ]
    sd3 = CalibrationSpace.from_transformer(tiny_sd3(), "gate")
    # dual-attention blocks have a third image gate; the context_pre_only last block has no text gates
    assert [n for n in sd3.names if n.startswith("transformer_blocks.0.")] == [
        "transformer_blocks.0.attn.image",
        "transformer_blocks.0.attn.text",
        "transformer_blocks.0.attn2.image",
        "transformer_blocks.0.mlp.image",
        "transformer_blocks.0.mlp.text",
    ]
    assert [n for n in sd3.names if n.startswith("transformer_blocks.2.")] == [
        "transformer_blocks.2.attn.image",
        "transformer_blocks.2.mlp.image",
    ]
    assert CalibrationSpace.from_transformer(tiny_sd3(), "layer").names[:3] == [
        "transformer_blocks.0.attn",
        "transformer_blocks.0.attn2",
        "transformer_blocks.0.mlp",
    ]


@pytest.mark.parametrize("build", [tiny_flux, tiny_sd3, tiny_qwen])
def test_generic_discovery_agrees_with_adapters(build, monkeypatch):
    model = build()
    known = CalibrationSpace.from_transformer(model, "gate")
    monkeypatch.setattr(space_mod, "ADAPTERS", {})
    generic = CalibrationSpace.from_transformer(model, "gate")
    assert generic.names == known.names
    assert generic.branches == known.branches


def test_generic_fallback_on_an_unlisted_dit():
    """PixArt (BasicTransformerBlock with an ungated cross-attention) works through structure alone."""
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        norm_type="ada_norm_single",
        caption_channels=12,
        use_additional_conditions=False,
    ).eval()
    space = CalibrationSpace.from_transformer(model, "layer")
    assert space.names == [
        "transformer_blocks.0.attn",
        "transformer_blocks.0.attn2",
        "transformer_blocks.0.mlp",
        "transformer_blocks.1.attn",
        "transformer_blocks.1.attn2",
        "transformer_blocks.1.mlp",
    ]
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
        timestep=torch.tensor([10, 500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
    ref = run(model, inputs)
    with space.apply(model, torch.ones(space.size)):
        assert torch.equal(run(model, inputs), ref)
    coefs = torch.tensor([1.2, 0.0, 0.7, 1.0, 1.1, 0.9])
    with space.apply(model, coefs):
        hooked = run(model, inputs)
    torch.testing.assert_close(run(space.bake(copy.deepcopy(model), coefs), inputs), hooked, atol=1e-4, rtol=1e-4)


def test_unet_gets_a_clear_error():
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    with pytest.raises(CalibrationError, match="nothing to calibrate in UNet2DConditionModel.*to_out"):
        CalibrationSpace.from_transformer(unet, "block")


# --- errors and hook hygiene ----------------------------------------------------------------------


def test_bad_granularity_and_bad_coefficients():
    model = tiny_flux()
    with pytest.raises(ValueError, match="unknown granularity 'blocks'.*block, layer, gate"):
        CalibrationSpace.from_transformer(model, "blocks")
    space = CalibrationSpace.from_transformer(model, "block")
    assert space.size == 4 and space.search_size(1) == 5 and space.search_size(3) == 15
    with pytest.raises(CalibrationError, match="expected 4 coefficients"):
        with space.apply(model, torch.ones(5)):
            pass
    with pytest.raises(CalibrationError, match="shape"):
        with space.apply(model, torch.ones(2, 2, 4)):
            pass
    with pytest.raises(TypeError, match="real numbers"):
        with space.apply(model, torch.ones(4, dtype=torch.bool)):
            pass
    with pytest.raises(TypeError, match="sequence of numbers"):
        with space.apply(model, ["a", "b", "c", "d"]):
            pass
    with pytest.raises(CalibrationError, match="NaN"):
        with space.apply(model, torch.tensor([1.0, float("nan"), 1.0, 1.0])):
            pass
    with pytest.raises(CalibrationError, match="expected 4"):
        space.bake(model, [1.0, 1.0])
    with pytest.raises(CalibrationError, match="shape"):
        space.bake(model, torch.ones(2, 4))
    with pytest.raises(ValueError, match="n_models"):
        space.search_size(0)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_dtype_and_device_are_converted():
    model = tiny_flux()
    space = CalibrationSpace.from_transformer(model, "block")
    inputs = flux_inputs(1)
    with space.apply(model, torch.tensor([1.0, 0.5, 1.0, 2.0], dtype=torch.float64)):
        a = run(model, inputs)
    with space.apply(model, [1, 0.5, 1, 2]):
        b = run(model, inputs)
    with space.apply(model, (torch.tensor([1, 1, 1, 1]))):  # ints are fine: converted to float
        c = run(model, inputs)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(c, run(model, inputs))


def test_hooks_removed_when_forward_raises_and_nested_apply_refused():
    model = tiny_flux()
    space = CalibrationSpace.from_transformer(model, "gate")
    inputs = flux_inputs(2)
    ref = run(model, inputs)
    with pytest.raises(CalibrationError, match="batch of 3"):
        with space.apply(model, torch.full((3, space.size), 0.5)):  # wrong batch: the forward raises
            run(model, inputs)
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(run(model, inputs), ref)
    with space.apply(model, torch.full((space.size,), 0.9)):
        with pytest.raises(RuntimeError, match="already active"):
            with space.apply(model, torch.ones(space.size)):
                pass
        with pytest.raises(RuntimeError, match="cannot bake"):
            space.bake(model, torch.ones(space.size))
    with space.apply(model, torch.ones(space.size)):  # usable again after the error
        assert torch.equal(run(model, inputs), ref)


def test_space_built_for_another_architecture_is_refused():
    flux_space = CalibrationSpace.from_transformer(tiny_flux(), "block")
    with pytest.raises(CalibrationError, match="different architecture"):
        with flux_space.apply(tiny_qwen(), torch.full((flux_space.size,), 0.5)):
            pass


def test_package_exports_the_contract():
    import calibri_pipeline

    assert calibri_pipeline.CalibrationSpace is CalibrationSpace
