"""Image grids for inspection: upscaled images with their prompt written underneath."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from calibri_pipeline.atomic_io import atomic_writer

CAPTION_FONT_SIZE = 11
_PAD = 4  # pixels between cells and around captions
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


def _to_uint8_nhwc(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # torch tensor, without importing torch here
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W] in [0, 1], got shape {images.shape}")
    if images.dtype == np.uint8:
        return np.moveaxis(images, 1, -1)
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be float in [0, 1] (or uint8), got dtype {images.dtype}")
    return np.moveaxis((np.clip(np.nan_to_num(images), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), 1, -1)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (falls back to character wrapping for long words)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            # A single word wider than the cell: cut it by characters.
            while font.getlength(word) > width and len(word) > 1:
                cut = max(1, int(len(word) * width / font.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def image_grid(
    images: Any,
    captions: Sequence[str] | None = None,
    ncols: int = 6,
    scale: int = 4,
    max_caption_lines: int = 5,
) -> Image.Image:
    """A grid of ``images`` ([N, 3, H, W] float in [0, 1], torch or numpy), each upscaled ``scale`` times
    (nearest neighbour, so pixels stay exact) with its caption wrapped underneath."""
    arr = _to_uint8_nhwc(images)
    n, h, w, _ = arr.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    if captions is not None and len(captions) != n:
        raise ValueError(f"got {n} images but {len(captions)} captions")
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    cell_w, cell_h = w * scale, h * scale
    font = _font(CAPTION_FONT_SIZE)
    line_h = CAPTION_FONT_SIZE + 3
    wrapped = []
    for caption in captions or [""] * n:
        lines = _wrap(str(caption), font, cell_w)
        if len(lines) > max_caption_lines:
            lines = lines[: max_caption_lines - 1] + [lines[max_caption_lines - 1] + " ..."]
        wrapped.append(lines)
    caption_h = (max(len(x) for x in wrapped) * line_h + _PAD) if captions is not None else 0
    grid = Image.new("RGB", (ncols * (cell_w + _PAD) + _PAD, nrows * (cell_h + caption_h + _PAD) + _PAD), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        row, col = divmod(i, ncols)
        x = _PAD + col * (cell_w + _PAD)
        y = _PAD + row * (cell_h + caption_h + _PAD)
        grid.paste(Image.fromarray(arr[i]).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i] if captions is not None else []):
            draw.text((x, y + cell_h + 2 + j * line_h), line, fill=_TEXT, font=font)
    return grid


def save_png(img: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``img`` as PNG atomically (:func:`calibri_pipeline.atomic_io.atomic_writer`)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"save_png expects a PIL image, got {type(img).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, mode=0o600) as fh:  # 0o600: the mode these files have always had
        img.save(fh, format="PNG")
    return path
