"""ImageReward (Xu et al., 2023) through the ``image-reward`` package (``import ImageReward as RM``).

``image-reward 1.5`` needs torchvision, ``timm==0.6.13``, ``fairscale==0.4.13`` and OpenAI's ``clip`` module,
and downloads its BLIP weights and a BERT tokenizer (``bert-base-uncased``, even for a local checkpoint)
from the hub on load; like HPSv3 it runs in its own virtualenv behind the reward server
(``calibri reward-env imagereward DIR``, then ``--reward imagereward``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.rewards.base import RewardError, check_images, check_scores
from calibri_pipeline.rewards.common import (
    as_dtype,
    autocast,
    check_batch_size,
    check_prompts,
    default_device,
    require_package,
    to_pil_images,
)

_SERVER_HINT = (
    "image-reward needs torchvision, timm==0.6.13, fairscale==0.4.13, OpenAI's clip and transformers<4.56: build its "
    "own virtualenv with `calibri reward-env imagereward DIR` and serve it from there"
)


class ImageRewardReward:
    """ImageReward score (standardised: about N(0, 1) over its training images)."""

    name = "imagereward"
    higher_is_better = True
    scale: tuple[float, float] | None = None

    def __init__(
        self,
        model: str = "ImageReward-v1.0",
        *,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        download_root: str | None = None,
        med_config: str | None = None,
        autocast_dtype: torch.dtype | str | None = None,
        scorer: Any | None = None,
    ) -> None:
        """``model``: a name known to ``RM.load`` or a checkpoint path. ``scorer`` injects a loaded model
        (anything with ``inference_rank(prompt, images) -> (ranks, rewards)``)."""
        self.model_name = model
        self.device = str(device or default_device())
        self.batch_size = check_batch_size(batch_size)
        self.download_root = download_root
        self.med_config = med_config
        self.autocast_dtype = as_dtype(autocast_dtype, "autocast_dtype")
        if scorer is None:
            require_package("ImageReward", "image-reward", what="the ImageReward reward", hint=_SERVER_HINT)
        elif not callable(getattr(scorer, "inference_rank", None)):
            raise TypeError(f"scorer must have an inference_rank(prompt, images) method, got {type(scorer).__name__}")
        self._scorer = scorer

    @property
    def scorer(self) -> Any:
        if self._scorer is None:
            import ImageReward as RM

            self._scorer = RM.load(
                self.model_name, device=self.device, download_root=self.download_root, med_config=self.med_config
            ).eval()
        return self._scorer

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        check_images(images)
        prompts = check_prompts(prompts, images.shape[0])
        scorer = self.scorer
        # inference_rank scores many images against ONE prompt (the text is encoded once): group by prompt
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.text, []).append(i)
        scores = torch.full((images.shape[0],), float("nan"))
        for text, rows in groups.items():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                with autocast(self.device, self.autocast_dtype):
                    _, rewards = scorer.inference_rank(text, to_pil_images(images[chunk]))
                # inference_rank squeezes its output: a single image comes back as a bare float
                values = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
                if values.numel() != len(chunk):
                    raise RewardError(f"imagereward: {values.numel()} scores for {len(chunk)} images")
                scores[chunk] = values
        return check_scores(self.name, scores, images.shape[0])
