"""The tiny random-init toy DiT the tests share: the real FluxTransformer2DModel class, 8x8 pixels."""

from __future__ import annotations

import torch

from calibri_pipeline.backbones.toy import ToyModelConfig, build_toy_transformer


def tiny_toy_transformer(blocks: int = 1, *, gain: float = 1.0):
    """``(config, transformer)`` with ``blocks`` double and ``blocks`` single blocks, seeded 0.

    ``gain`` multiplies every parameter: random init is near-silent, and 3 makes every branch matter.
    """
    torch.manual_seed(0)
    config = ToyModelConfig(
        image_size=8,
        patch_size=2,
        num_double_blocks=blocks,
        num_single_blocks=blocks,
        num_heads=2,
        head_dim=16,
        text_max_length=8,
    )
    transformer = build_toy_transformer(config, zero_init=False)
    if gain != 1.0:
        with torch.no_grad():
            for p in transformer.parameters():
                p.mul_(gain)
    return config, transformer


def tiny_flux_with_velocity():
    """``(model, model_fn)``: a seeded 1+1-block FluxTransformer2DModel on 3x3 latent tokens of 4
    channels, text 6-d, and its velocity ``model_fn(x, sigma, cond)`` with ``cond`` = tokens, pooled."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=6,
        pooled_projection_dim=6,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    ids = torch.zeros(9, 3)
    ids[:, 1] = torch.arange(9) // 3
    ids[:, 2] = torch.arange(9) % 3

    def model_fn(x, sigma, cond):
        return model(
            hidden_states=x,
            encoder_hidden_states=cond["tokens"],
            pooled_projections=cond["pooled"],
            timestep=sigma,
            img_ids=ids,
            txt_ids=torch.zeros(cond["tokens"].shape[1], 3),
            return_dict=False,
        )[0]

    return model, model_fn
