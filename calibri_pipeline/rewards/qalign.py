"""Q-Align (Wu et al., 2023; ``q-future/one-align``): image quality / aesthetics on a 1-5 scale.

The checkpoint is an mPLUG-Owl2 model whose modelling code lives in its hub repository, so transformers can
only build it with ``trust_remote_code=True`` — which runs that repository's Python code on this machine.
We never turn that on by ourselves: the user passes ``trust_remote_code=True`` explicitly. The remote code
targets transformers 4.3x; with a newer transformers serve it from its own virtualenv
(``python -m calibri_pipeline.rewards.server --reward qalign --kwargs '{"trust_remote_code": true}'``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.rewards.base import RewardError, check_images, check_scores
from calibri_pipeline.rewards.common import (
    as_dtype,
    batch_slices,
    check_batch_size,
    check_prompts,
    default_device,
    require_package,
    to_pil_images,
)

TASKS = ("quality", "aesthetics")


class QAlignReward:
    """Q-Align score in [1, 5] (prompt-independent: it judges the image alone)."""

    higher_is_better = True
    scale: tuple[float, float] | None = (1.0, 5.0)

    def __init__(
        self,
        model: str | Any = "q-future/one-align",
        *,
        task: str = "quality",
        trust_remote_code: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 8,
    ) -> None:
        """``model``: hub id / local path, or a loaded one-align model (anything with
        ``score(images, task_=..., input_="image")``). ``dtype`` defaults to float16 on CUDA, float32 on CPU."""
        if task not in TASKS:
            raise ValueError(f"qalign task must be one of {TASKS}, got {task!r}")
        self.task = task
        self.name = "qalign" if task == "quality" else f"qalign-{task}"
        self.device = torch.device(device or default_device())
        self.dtype = as_dtype(dtype) or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.batch_size = check_batch_size(batch_size)
        self.trust_remote_code = bool(trust_remote_code)
        if isinstance(model, str):
            if not self.trust_remote_code:
                raise ValueError(
                    f"Q-Align ({model}) is implemented by Python code inside its hub repository, which transformers "
                    "runs only with trust_remote_code=True. We do not enable that for you: pass trust_remote_code=True "
                    "(make_reward('qalign', trust_remote_code=True)) if you trust that repository's code."
                )
            require_package("transformers", "transformers", what="the Q-Align reward")
            self._model_id: str | None = model
            self._model: Any = None
        else:
            if not callable(getattr(model, "score", None)):
                raise TypeError(
                    "model must be a hub id / path or have a score(images, task_=, input_=) method, "
                    f"got {type(model).__name__}"
                )
            self._model_id = None
            self._model = model

    @property
    def model(self) -> Any:
        if self._model is None:
            from transformers import AutoModelForCausalLM

            from calibri_pipeline.features import transformers_dtype_kwargs

            self._model = (
                AutoModelForCausalLM.from_pretrained(
                    self._model_id,
                    trust_remote_code=self.trust_remote_code,
                    attn_implementation="eager",
                    **transformers_dtype_kwargs(self.dtype),
                )
                .to(self.device)
                .eval()
            )
        return self._model

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        check_images(images)
        check_prompts(prompts, images.shape[0])  # one per image, even though Q-Align ignores the text
        model = self.model
        scores = []
        for sl in batch_slices(images.shape[0], self.batch_size):
            out = torch.as_tensor(model.score(to_pil_images(images[sl]), task_=self.task, input_="image"))
            out = out.float().cpu().reshape(-1)
            if out.numel() != sl.stop - sl.start:
                raise RewardError(f"{self.name}: {out.numel()} scores for {sl.stop - sl.start} images")
            scores.append(out)
        return check_scores(self.name, torch.cat(scores), images.shape[0])
