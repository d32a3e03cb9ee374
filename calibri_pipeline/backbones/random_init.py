"""Random-init diffusers pipelines of the real classes, built offline from configs.

No weights can be downloaded here, so the real loading and sampling code is exercised on pipelines of
the same classes at random init: ``tiny`` configs for tests (a few thousand parameters per module) and
the ``full`` published architecture for timing (``benchmarks/gpu_flux_scale.py``; weights are random,
so only speed means anything).

Tokenizers are built from scratch with the ``tokenizers`` library: a character-level vocabulary
(every printable ASCII character, special tokens, and the chat markers Qwen's prompt template uses),
so distinct prompts give distinct token ids, wrapped in :class:`transformers.PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import string
from typing import Any

import torch

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")

#: FLUX.1-dev's published configs (transformer, VAE, scheduler); text encoders are not rebuilt at full
#: scale: prompt embeddings of the right shapes stand in for them (they are computed once per prompt).
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_DEV_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}
FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
#: Qwen-Image's published scheduler config (shift_terminal stretches the schedule to end at 0.02).
QWEN_IMAGE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}
FLUX_DEV_T5_DIM = 4096  # T5-XXL hidden size = joint_attention_dim
FLUX_DEV_CLIP_DIM = 768  # CLIP-L pooled output = pooled_projection_dim
FLUX_DEV_MAX_SEQUENCE_LENGTH = 512


def offline_tokenizer(
    model_max_length: int,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
    chat_markers: bool = False,
    padding_side: str = "right",
):
    """A character-level :class:`~transformers.PreTrainedTokenizerFast` built without any download.

    Ids: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, then every non-blank printable ASCII character;
    whitespace separates characters and is dropped. ``chat_markers`` adds Qwen's ``<|im_start|>`` /
    ``<|im_end|>`` as single special tokens (its prompt template relies on them).
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if not isinstance(model_max_length, int) or model_max_length < 2:
        raise ValueError(f"model_max_length must be an int >= 2, got {model_max_length!r}")
    specials = [PAD, UNK, BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(specials + [c for c in string.printable if not c.isspace()])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    template = " ".join(([BOS] if add_bos else []) + ["$A"] + ([EOS] if add_eos else []))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=model_max_length,
        padding_side=padding_side,
    )
    if chat_markers:
        fast.add_special_tokens({"additional_special_tokens": list(CHAT_MARKERS)})
    return fast


def _seeded(seed: int):
    torch.manual_seed(seed)


def _tiny_clip(cls_name: str, vocab_size: int, hidden: int, projection: int, max_positions: int):
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
        projection_dim=projection,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return getattr(transformers, cls_name)(config).eval()


def _tiny_t5(vocab_size: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _tiny_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16],
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def tiny_flux_pipeline(seed: int = 0, *, text_length: int = 16, text_encoders: bool = True):
    """A FluxPipeline of the real classes at random init: CLIP-L/T5 stand-ins, a 2x VAE, 1+2 blocks.

    ``text_encoders=False`` leaves them out (prompt embeddings must then be supplied).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    _seeded(seed)
    clip_tokenizer = offline_tokenizer(text_length)
    t5_tokenizer = offline_tokenizer(text_length, add_bos=False)
    vocab = len(clip_tokenizer)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=[2, 2, 4],
    ).eval()
    vae = _tiny_vae(4, 0.3611, 0.1159)
    clip = _tiny_clip("CLIPTextModel", vocab, 16, 16, text_length) if text_encoders else None
    t5 = _tiny_t5(vocab, 24) if text_encoders else None
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer if text_encoders else None,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer if text_encoders else None,
        transformer=transformer,
    )


def tiny_sd3_pipeline(seed: int = 0, *, text_length: int = 16):
    """A StableDiffusion3Pipeline (SD-3.5 layout: dual attention in block 0, RMS qk-norm) at random init."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    _seeded(seed)
    tokenizer = offline_tokenizer(text_length)
    tokenizer_2 = offline_tokenizer(text_length)
    tokenizer_3 = offline_tokenizer(text_length, add_bos=False)
    vocab = len(tokenizer)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 width; the two CLIP widths (8 + 8) are zero-padded up to it
        caption_projection_dim=16,
        pooled_projection_dim=24,  # the two CLIP projections (12 + 12) concatenated
        out_channels=4,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_tiny_vae(4, 1.5305, 0.0609),
        text_encoder=_tiny_clip("CLIPTextModelWithProjection", vocab, 8, 12, text_length),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_clip("CLIPTextModelWithProjection", vocab, 8, 12, text_length),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_tiny_t5(vocab, 32),
        tokenizer_3=tokenizer_3,
    )


def tiny_qwen_text_encoder(vocab_size: int, hidden: int = 32):
    """A Qwen2.5-VL (the class Qwen-Image uses) with a 2-layer text model and a 1-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = 4
    head_dim = hidden // heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # temporal, height, width rotary sections
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [0],
        },
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_pipeline(seed: int = 0):
    """A QwenImagePipeline at random init: tiny Qwen2.5-VL text encoder, tiny AutoencoderKLQwenImage."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    _seeded(seed)
    # the template's system prompt is dropped by token count (34 for Qwen's real tokenizer); with a
    # character-level vocabulary the rest of it stays in front of the prompt, which is harmless here
    tokenizer = offline_tokenizer(4096, add_bos=False, add_eos=False, chat_markers=True)
    z_dim = 4
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, -0.4],
        latents_std=[1.5, 0.8, 2.0, 1.2],
    ).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    # Qwen-Image's scheduler without shift_terminal, which flow_sigmas cannot express: with it off the
    # stock pipeline's schedule is exactly the project sampler's, so the two can be compared
    scheduler = FlowMatchEulerDiscreteScheduler(**{**QWEN_IMAGE_SCHEDULER, "shift_terminal": None})
    return QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=tiny_qwen_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        transformer=transformer,
    )


def flux_dev_pipeline(device: str | torch.device, dtype: torch.dtype = torch.bfloat16, *, tiny: bool = False):
    """FLUX.1-dev's transformer + VAE at random init (real allocation on ``device``), without text encoders.

    Parameters are created directly on ``device`` in ``dtype`` (no float32 copy of 12B parameters). The
    default init of ``nn.Linear`` keeps activations finite through all 57 blocks in bf16 at random init,
    which is all a speed measurement needs. ``tiny=True`` swaps in the tiny test configs (CPU smoke runs).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    if tiny:
        return tiny_flux_pipeline(text_encoders=False).to(device=device, dtype=dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER).eval()
            vae = AutoencoderKL(**FLUX_DEV_VAE).eval()
    finally:
        torch.set_default_dtype(previous)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
