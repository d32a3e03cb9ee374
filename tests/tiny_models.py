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
