"""PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences.

``score = exp(logit_scale) * cos(image_emb, text_emb)`` (about 18-24 for real images, the numbers in the
paper's tables). Defaults: model ``yuvalkirstain/PickScore_v1``, processor
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the pairing the authors publish).
"""

from __future__ import annotations

import torch

from calibri_pipeline.rewards.clipscore import ClipSimilarityReward


class PickScore(ClipSimilarityReward):
    name = "pickscore"
    scale = None  # exp(logit_scale) bounds it (|score| <= 100 for the released model) but real images sit near 20
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def _transform(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.exp().float().cpu() * cosine.cpu()
