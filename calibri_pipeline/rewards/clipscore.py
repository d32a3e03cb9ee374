"""CLIP-similarity rewards through transformers: CLIPScore here, PickScore in :mod:`.pickscore`.

Both embed the image and the prompt with a ``CLIPModel`` and compare the unit-normalised embeddings.
The model and processor come either as hub ids / local paths (``from_pretrained``; users with the hub) or
as ready objects (injection: tests build tiny random-init ``CLIPModel``\\ s offline, users can pass models
they already hold). Images go through the processor as PIL images, exactly like the models' reference
code, so scores match what their authors report.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.rewards.base import check_images, check_scores
from calibri_pipeline.rewards.common import (
    as_dtype,
    batch_slices,
    check_batch_size,
    check_prompts,
    default_device,
    require_package,
    to_pil_images,
)


def _embedding(output: Any) -> torch.Tensor:
    # transformers < 5 returns the projected embedding; 5.x returns a ModelOutput whose pooler_output it is
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipSimilarityReward:
    """Shared machinery: ``score = transform(cos(image_emb, text_emb))`` per (image, prompt) pair."""

    name = "clip-similarity"
    higher_is_better = True
    scale: tuple[float, float] | None = None
    default_model: str = ""
    default_processor: str | None = None

    def __init__(
        self,
        model: str | Any | None = None,
        processor: str | Any | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
        max_length: int = 77,
    ) -> None:
        require_package("transformers", "transformers", what=f"the {self.name} reward")
        self.device = torch.device(device or default_device())
        self.dtype = as_dtype(dtype)
        self.batch_size = check_batch_size(batch_size)
        self.max_length = max_length
        self._model_spec = model if model is not None else self.default_model
        processor_default = self.default_processor or (self._model_spec if isinstance(self._model_spec, str) else None)
        self._processor_spec = processor if processor is not None else processor_default
        if self._processor_spec is None:
            raise ValueError(f"{self.name}: a model object was given without a processor; pass processor= too")
        self._model: Any = None if isinstance(self._model_spec, str) else self._prepare(self._model_spec)
        self._processor: Any = None if isinstance(self._processor_spec, str) else self._processor_spec

    def _prepare(self, model: Any) -> Any:
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise TypeError(
                f"{self.name}: model must be a transformers CLIPModel (or hub id), got {type(model).__name__}"
            )
        return model.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)

    def load(self) -> ClipSimilarityReward:
        """Load weights now (otherwise on the first call)."""
        if self._model is None:
            from transformers import CLIPModel

            from calibri_pipeline.features import transformers_dtype_kwargs

            self._model = self._prepare(
                CLIPModel.from_pretrained(self._model_spec, **transformers_dtype_kwargs(self.dtype))
            )
        if self._processor is None:
            from transformers import AutoProcessor

            self._processor = AutoProcessor.from_pretrained(self._processor_spec)
        return self

    @property
    def model(self) -> Any:
        return self.load()._model

    @property
    def processor(self) -> Any:
        return self.load()._processor

    def _transform(self, cosine: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, images: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-normalised image embeddings ``[N, E]`` and text embeddings ``[T, E]`` (float32)."""
        model, processor = self.model, self.processor
        pixel = processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"]
        image_emb = _embedding(model.get_image_features(pixel_values=pixel.to(self.device, self.dtype)))
        text_in = processor(
            text=list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        text_in = {k: v.to(self.device) for k, v in text_in.items() if k in ("input_ids", "attention_mask")}
        text_emb = _embedding(model.get_text_features(**text_in))
        image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
        text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
        return image_emb, text_emb

    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        check_images(images)
        prompts = check_prompts(prompts, images.shape[0])
        scores = []
        for sl in batch_slices(images.shape[0], self.batch_size):
            # several images usually share a prompt (seeds): encode each distinct text once
            texts = list(dict.fromkeys(p.text for p in prompts[sl]))
            row = {t: i for i, t in enumerate(texts)}
            image_emb, text_emb = self.embed(images[sl], texts)
            paired = text_emb[[row[p.text] for p in prompts[sl]]]
            scores.append(self._transform((image_emb * paired).sum(dim=-1)).cpu())
        return check_scores(self.name, torch.cat(scores), images.shape[0])


class CLIPScore(ClipSimilarityReward):
    """CLIPScore as in torchmetrics: ``100 * max(cos(image, text), 0)``; default ``openai/clip-vit-large-patch14``."""

    name = "clipscore"
    scale = (0.0, 100.0)
    default_model = "openai/clip-vit-large-patch14"

    def _transform(self, cosine: torch.Tensor) -> torch.Tensor:
        return 100.0 * cosine.clamp(min=0.0)
