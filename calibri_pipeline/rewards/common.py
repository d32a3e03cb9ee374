"""Helpers shared by the reward adapters: package checks, devices, batching, tensor -> PIL/PNG.

Kept free of heavy imports (torch and pillow only) so that the reward server can run in a virtualenv
that holds nothing but one reward's dependencies.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from typing import Any, Iterator, Sequence

import torch

from calibri_pipeline.arguments import positive_int
from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.rewards.base import check_images


def require_package(module: str, pip_name: str, *, what: str, hint: str | None = None) -> None:
    """Raise a clear ImportError when ``module`` is not importable, saying how to get it."""
    if importlib.util.find_spec(module) is None:
        message = (
            f"{what} needs the '{pip_name}' package (module '{module}'), which is not installed: pip install {pip_name}"
        )
        if hint:
            message += f". {hint}"
        raise ImportError(message)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def as_dtype(value: Any, what: str = "dtype") -> torch.dtype | None:
    """``value`` as a ``torch.dtype``: a dtype, None, or its name as JSON can carry it (``"bfloat16"``,
    ``"torch.bfloat16"``, ``"bf16"``, ``"fp16"``, ``"float32"``), so ``--kwargs`` on the command line works."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.strip().removeprefix("torch.")
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
            name, name
        )
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    raise ValueError(f"{what} must be a floating torch dtype or its name (e.g. 'bfloat16'), got {value!r}")


def autocast(device: str | torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type at ``dtype``; no autocast when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def check_batch_size(batch_size: int) -> int:
    return positive_int("batch_size", batch_size)


def check_prompts(prompts: Sequence[Prompt], n_images: int) -> list[Prompt]:
    prompts = list(prompts)
    if len(prompts) != n_images:
        raise ValueError(f"got {n_images} images but {len(prompts)} prompts: one prompt per image is required")
    for i, p in enumerate(prompts):
        if not isinstance(p, Prompt):
            raise TypeError(f"prompts[{i}] must be a calibri_pipeline Prompt, got {type(p).__name__}")
    return prompts


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` float in [0, 1] -> ``[N, H, W, 3]`` uint8 (round to nearest, like saving a PNG)."""
    check_images(images)
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    return (images.detach().float().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)


def to_pil_images(images: torch.Tensor) -> list:
    """The images as RGB PIL images (what the reward models' own preprocessing expects)."""
    from PIL import Image

    return [Image.fromarray(arr.contiguous().numpy()) for arr in to_uint8(images)]


def encode_png(image_hwc_uint8: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # compress_level 1: PNG is lossless at every level; the lowest is several times faster to write
    Image.fromarray(image_hwc_uint8.contiguous().numpy()).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> ``[3, H, W]`` float32 in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
