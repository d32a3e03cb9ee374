"""HPSv3 (Ma et al., 2025), the reward the paper calibrates with, through the ``hpsv3`` package.

The package pins its own transformers (``hpsv3 1.0.0`` requires ``transformers==4.45.2`` and a Qwen2-VL-7B
backbone), which cannot share an environment with this project's transformers. The intended set-up is the
reward server in its own virtualenv (the pins: :mod:`calibri_pipeline.rewards.envs`)::

    calibri reward-env hpsv3 ~/envs/hpsv3 --device cuda
    ~/envs/hpsv3/bin/python -m calibri_pipeline.rewards.server --reward hpsv3 --port 8001 --kwargs '{"device": "cuda"}'

and ``make_reward("http://127.0.0.1:8001")`` in the pipeline. ``HPSv3RewardInferencer.reward`` is always
called with keyword arguments: its positional order changed between releases.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.rewards.base import RewardError, check_images, check_scores
from calibri_pipeline.rewards.common import (
    as_dtype,
    autocast,
    batch_slices,
    check_batch_size,
    check_prompts,
    default_device,
    require_package,
    to_pil_images,
)

_SERVER_HINT = (
    "hpsv3 pins transformers==4.45.2: build its own virtualenv with `calibri reward-env hpsv3 DIR` and serve it "
    "from there (see calibri_pipeline/rewards/hpsv3.py)"
)


class HPSv3Reward:
    """HPSv3 preference score: the mean (``mu``) of the model's predicted score distribution per image."""

    name = "hpsv3"
    higher_is_better = True
    scale: tuple[float, float] | None = None  # unbounded; real images typically score 0-15

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        checkpoint_path: str | None = None,
        config_path: str | None = None,
        batch_size: int = 8,
        autocast_dtype: torch.dtype | str | None = None,
        inferencer: Any | None = None,
    ) -> None:
        """``checkpoint_path``/``config_path`` None = the package defaults (weights from the hub,
        ``MizzenAI/HPSv3``). ``inferencer`` injects an already-built ``HPSv3RewardInferencer``.
        ``autocast_dtype`` (a dtype or its name) defaults to bfloat16 on a CPU: the package's shipped
        config loads the model in bf16, but its score head autocasts on CUDA only, so on a CPU it
        multiplies bf16 by fp32 and fails without it."""
        self.device = str(device or default_device())
        self.checkpoint_path = checkpoint_path
        self.config_path = config_path
        self.batch_size = check_batch_size(batch_size)
        self.autocast_dtype = as_dtype(autocast_dtype, "autocast_dtype")
        if autocast_dtype is None and torch.device(self.device).type == "cpu":
            self.autocast_dtype = torch.bfloat16
        if inferencer is None:
            require_package("hpsv3", "hpsv3", what="the HPSv3 reward", hint=_SERVER_HINT)
        elif not callable(getattr(inferencer, "reward", None)):
            raise TypeError(
                f"inferencer must have a reward(prompts=..., image_paths=...) method, got {type(inferencer).__name__}"
            )
        self._inferencer = inferencer

    @property
    def inferencer(self) -> Any:
        if self._inferencer is None:
            from hpsv3 import HPSv3RewardInferencer

            self._inferencer = HPSv3RewardInferencer(
                config_path=self.config_path, checkpoint_path=self.checkpoint_path, device=self.device
            )
        return self._inferencer

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        check_images(images)
        prompts = check_prompts(prompts, images.shape[0])
        inferencer = self.inferencer
        scores: list[torch.Tensor] = []
        for sl in batch_slices(images.shape[0], self.batch_size):
            with autocast(self.device, self.autocast_dtype):
                # keyword arguments on purpose: (image_paths, prompts) vs (prompts, image_paths) across versions
                out = inferencer.reward(prompts=[p.text for p in prompts[sl]], image_paths=to_pil_images(images[sl]))
            out = torch.as_tensor(out).float().cpu()
            if out.ndim != 2 or out.shape[0] != sl.stop - sl.start:
                raise RewardError(f"hpsv3: expected rewards [batch, 2] (mu, sigma), got shape {tuple(out.shape)}")
            scores.append(out[:, 0])  # mu; the authors score with the mean and ignore sigma
        return check_scores(self.name, torch.cat(scores), images.shape[0])
