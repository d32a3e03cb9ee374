"""Measure the toy backbone on held-out world prompts, per category and step count.

``evaluate_toy(backbone, n_per_category, steps_list, guidance, seed)`` generates one image per test
prompt (seed = ``seed + index``) at every step count and scores it with the world's exact scorer:
``correct`` accuracy, mean ``alignment`` and mean ``quality`` per category (and over all). The CLI
(``calibri eval-toy``) prints the table as markdown and can save a grid of samples.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from calibri_pipeline.atomic_io import atomic_writer, write_json_atomic
from calibri_pipeline.training.data import heldout_prompts, world_categories

DEFAULT_STEPS_LIST = (1, 2, 4, 8, 15, 30)


@dataclass
class EvalRow:
    category: str
    steps: int
    n: int
    accuracy: float
    alignment: float
    quality: float

    @property
    def accuracy_stderr(self) -> float:
        return math.sqrt(max(self.accuracy * (1 - self.accuracy), 0.0) / max(self.n, 1))


@dataclass
class EvalTable:
    guidance: float
    split: str
    seed: int
    rows: list[EvalRow] = field(default_factory=list)

    def get(self, category: str, steps: int) -> EvalRow:
        for row in self.rows:
            if row.category == category and row.steps == steps:
                return row
        raise KeyError(f"no row for category {category!r} at {steps} steps")

    @property
    def steps_list(self) -> list[int]:
        return sorted({r.steps for r in self.rows})

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(r.category for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        return {
            "guidance": self.guidance,
            "split": self.split,
            "seed": self.seed,
            "rows": [
                {
                    "category": r.category,
                    "steps": r.steps,
                    "n": r.n,
                    "accuracy": r.accuracy,
                    "accuracy_stderr": r.accuracy_stderr,
                    "alignment": r.alignment,
                    "quality": r.quality,
                }
                for r in self.rows
            ],
        }

    def to_markdown(self) -> str:
        steps = self.steps_list
        n_by_cat = {r.category: r.n for r in self.rows}
        head = "| category | n | " + " | ".join(f"{s} steps" for s in steps) + " |"
        sep = "|---|---:|" + "---:|" * len(steps)
        out = []
        for title, attr, fmt in (
            ("accuracy (`correct`, %)", "accuracy", lambda v: f"{100 * v:.1f}"),
            ("mean alignment", "alignment", lambda v: f"{v:.3f}"),
            ("mean quality", "quality", lambda v: f"{v:.3f}"),
        ):
            out.append(f"**{title}** — {self.split} prompts, guidance {self.guidance:g}, seed {self.seed}\n")
            out.append(head)
            out.append(sep)
            for cat in self.categories:
                cells = [fmt(getattr(self.get(cat, s), attr)) for s in steps]
                out.append(f"| {cat} | {n_by_cat[cat]} | " + " | ".join(cells) + " |")
            out.append("")
        return "\n".join(out)


def evaluate_toy(
    backbone,
    n_per_category: int = 100,
    steps_list: Sequence[int] = DEFAULT_STEPS_LIST,
    guidance: float | None = None,
    seed: int = 0,
    *,
    split: str = "test",
    categories: Sequence[str] | None = None,
    max_batch: int | None = None,
    progress: bool = False,
) -> EvalTable:
    """Score ``backbone`` on ``n_per_category`` held-out prompts of each category at each step count."""
    from calibri_pipeline.world import score_images

    steps_list = list(steps_list)
    if not steps_list or any(not isinstance(s, int) or s < 1 for s in steps_list):
        raise ValueError(f"steps_list must be positive ints, got {steps_list!r}")
    cats = list(categories or world_categories())
    prompts = heldout_prompts(split, n_per_category, categories=cats)
    seeds = [int(seed) + i for i in range(len(prompts))]
    guidance = backbone.default_guidance if guidance is None else float(guidance)
    table = EvalTable(guidance=guidance, split=split, seed=int(seed))
    for steps in steps_list:
        images = backbone.generate(
            prompts, seeds, steps=steps, guidance=guidance, max_batch=max_batch, progress=progress
        )
        scores = score_images(images, [p.spec for p in prompts])
        by_cat: dict[str, list[dict[str, Any]]] = {}
        for p, s in zip(prompts, scores):
            by_cat.setdefault(p.category, []).append(s)
        groups = [(c, by_cat[c]) for c in cats] + [("all", scores)]
        for cat, items in groups:
            table.rows.append(
                EvalRow(
                    category=cat,
                    steps=steps,
                    n=len(items),
                    accuracy=float(np.mean([bool(s["correct"]) for s in items])),
                    alignment=float(np.mean([s["alignment"] for s in items])),
                    quality=float(np.mean([s["quality"] for s in items])),
                )
            )
    return table


def save_sample_grid(
    backbone,
    path: str | Path,
    *,
    per_category: int = 6,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    split: str = "test",
    scale: int = 4,
) -> Path:
    """A PNG grid: one row per category, prompt under each image, scorer verdict marked."""
    from PIL import Image, ImageDraw

    from calibri_pipeline.world import score_images

    cats = list(world_categories())
    prompts = heldout_prompts(split, per_category, categories=cats)
    seeds = [int(seed) + i for i in range(len(prompts))]
    images = backbone.generate(prompts, seeds, steps=steps, guidance=guidance)
    scores = score_images(images, [p.spec for p in prompts])
    size = images.shape[-1] * scale
    cell_w, text_h = max(size, 150), 40
    grid = Image.new("RGB", (cell_w * per_category, (size + text_h) * len(cats)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i, (p, s) in enumerate(zip(prompts, scores)):
        r, c = divmod(i, per_category)
        x, y = c * cell_w, r * (size + text_h)
        tile = Image.fromarray(arr[i]).resize((size, size), Image.NEAREST)
        grid.paste(tile, (x + (cell_w - size) // 2, y))
        mark = "OK" if s["correct"] else "x"
        text = f"[{mark}] {p.text}"
        lines = [text[j : j + 26] for j in range(0, min(len(text), 78), 26)]
        for k, line in enumerate(lines):
            draw.text((x + 2, y + size + 1 + 12 * k), line, fill=(0, 110, 0) if s["correct"] else (170, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as fh:
        grid.save(fh, format="PNG")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="calibri eval-toy", description="Held-out accuracy of the toy backbone.")
    p.add_argument("--weights", type=Path, default=None, help="checkpoint directory (default: the shipped one)")
    p.add_argument("--n-per-category", type=int, default=100)
    p.add_argument(
        "--steps", type=str, default=",".join(map(str, DEFAULT_STEPS_LIST)), help="comma-separated step counts"
    )
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (default; the numbers in docs/method.md) or a CUDA device")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    p.add_argument("--grid", type=Path, default=None, help="also save a sample grid PNG at the default steps")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    try:
        steps_list = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        print(f"calibri eval-toy: --steps must be comma-separated ints, got {args.steps!r}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from calibri_pipeline.backbones.toy import load_toy_backbone

    try:
        backbone = load_toy_backbone(args.weights, device=args.device)
    except (RuntimeError, ValueError) as exc:  # e.g. --device cuda without CUDA
        print(f"calibri eval-toy: cannot load on {args.device!r}: {exc}", file=sys.stderr)
        return 2
    try:
        table = evaluate_toy(
            backbone,
            args.n_per_category,
            steps_list,
            args.guidance,
            args.seed,
            split=args.split,
            progress=args.progress,
        )
    except ValueError as exc:
        print(f"calibri eval-toy: {exc}", file=sys.stderr)
        return 2
    print(table.to_markdown())
    if args.json is not None:
        write_json_atomic(args.json, table.to_dict(), mode=0o644)
    if args.grid is not None:
        save_sample_grid(backbone, args.grid, guidance=args.guidance, seed=args.seed, split=args.split)
        print(f"sample grid: {args.grid}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
