"""Prompt files -> ``list[Prompt]``: T2I-CompBench++ txt, HPDv3 ``test.json``, plain txt and jsonl.

Every loader sets ``Prompt.source`` to ``"<format>:<file name>"`` so a prompt's origin survives into the
catalog, fails with the file name and line number on malformed input, and refuses an empty file (an empty
prompt set would silently turn every later mean into NaN). :func:`split_prompts` cuts any prompt list into
seeded train/val/test splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from calibri_pipeline.prompts.base import Prompt

PathLike = str | os.PathLike[str]


class PromptFileError(ValueError):
    """A prompt file is empty or malformed (the message names the file and line)."""


def _read_text(path: PathLike) -> tuple[Path, str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {p}")
    try:
        return p, p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{p}: not UTF-8 text ({exc})") from exc


def _non_blank_lines(text: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped:
            yield number, stripped


def _dedupe(prompts: list[Prompt]) -> list[Prompt]:
    """Drop repeated texts, keeping the first occurrence (ids are derived from the text)."""
    seen: set[str] = set()
    out: list[Prompt] = []
    for prompt in prompts:
        if prompt.text not in seen:
            seen.add(prompt.text)
            out.append(prompt)
    return out


def load_txt_prompts(
    path: PathLike, *, source: str | None = None, category: str | None = None, dedupe: bool = True
) -> list[Prompt]:
    """One prompt per line; blank lines are skipped. ``source`` defaults to ``"txt:<file name>"``."""
    p, text = _read_text(path)
    source = source or f"txt:{p.name}"
    prompts = [
        Prompt(text=line, category=category, source=source, meta={"line": number})
        for number, line in _non_blank_lines(text)
    ]
    if not prompts:
        raise PromptFileError(f"{p}: no prompts (the file is empty or only blank lines)")
    return _dedupe(prompts) if dedupe else prompts


def load_t2i_compbench(path: PathLike, *, category: str | None = None, dedupe: bool = True) -> list[Prompt]:
    """A T2I-CompBench++ prompt file (one prompt per line), source ``"t2i-compbench:<file name>"``.

    T2I-CompBench++ ships one file per category (``color_val.txt``, ``spatial_train.txt`` ...); when
    ``category`` is not given it is taken from the file name's first word if that is a known category.
    """
    p = Path(path)
    if category is None:
        category = _compbench_category(p.name)
    return load_txt_prompts(p, source=f"t2i-compbench:{p.name}", category=category, dedupe=dedupe)


_COMPBENCH_CATEGORIES = ("color", "shape", "texture", "spatial", "3d_spatial", "non_spatial", "numeracy", "complex")


def _compbench_category(file_name: str) -> str | None:
    stem = file_name.rsplit(".", 1)[0].lower()
    # longest first so "3d_spatial_val" is not read as "spatial"
    for cat in sorted(_COMPBENCH_CATEGORIES, key=len, reverse=True):
        if stem == cat or stem.startswith(cat + "_"):
            return cat
    return None


def load_jsonl_prompts(path: PathLike, *, source: str | None = None, dedupe: bool = True) -> list[Prompt]:
    """One JSON object per line: ``{"text": ..., "category": optional}``; other keys go to ``meta``."""
    p, text = _read_text(path)
    source = source or f"jsonl:{p.name}"
    prompts: list[Prompt] = []
    for number, line in _non_blank_lines(text):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{p}:{number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise PromptFileError(
                f"{p}:{number}: expected a JSON object with a 'text' field, got {type(record).__name__}"
            )
        prompt_text = record.get("text")
        if not isinstance(prompt_text, str) or not prompt_text.strip():
            raise PromptFileError(f"{p}:{number}: 'text' must be a non-empty string, got {prompt_text!r}")
        category = record.get("category")
        if category is not None and not isinstance(category, str):
            raise PromptFileError(f"{p}:{number}: 'category' must be a string, got {category!r}")
        meta: dict[str, Any] = {k: v for k, v in record.items() if k not in ("text", "category")}
        meta["line"] = number
        prompts.append(Prompt(text=prompt_text.strip(), category=category, source=source, meta=meta))
    if not prompts:
        raise PromptFileError(f"{p}: no prompts (the file is empty or only blank lines)")
    return _dedupe(prompts) if dedupe else prompts


def load_hpdv3_test(path: PathLike) -> list[Prompt]:
    """HPDv3 ``test.json``: a JSON list of image-pair records, each with a ``prompt`` field.

    Many pairs share a prompt, so prompts are deduplicated (first occurrence kept); ``meta["n_pairs"]`` says
    how many records carried it. Source ``"hpdv3:<file name>"``.
    """
    p, text = _read_text(path)
    if not text.strip():
        raise PromptFileError(f"{p}: empty file (expected a JSON list of records with a 'prompt' field)")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{p}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(records, list):
        raise PromptFileError(f"{p}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise PromptFileError(f"{p}: the list of records is empty")
    counts: dict[str, int] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "prompt" not in record:
            raise PromptFileError(f"{p}: record {index} has no 'prompt' field")
        prompt_text = record["prompt"]
        if not isinstance(prompt_text, str) or not prompt_text.strip():
            raise PromptFileError(f"{p}: record {index}: 'prompt' must be a non-empty string, got {prompt_text!r}")
        key = prompt_text.strip()
        counts[key] = counts.get(key, 0) + 1
    source = f"hpdv3:{p.name}"
    return [Prompt(text=t, source=source, meta={"n_pairs": n}) for t, n in counts.items()]


def load_prompts(path: PathLike, format: str | None = None, **kwargs: Any) -> list[Prompt]:
    """Dispatch on ``format`` (``"txt" | "t2i-compbench" | "jsonl" | "hpdv3"``) or the file extension."""
    loaders = {
        "txt": load_txt_prompts,
        "t2i-compbench": load_t2i_compbench,
        "jsonl": load_jsonl_prompts,
        "hpdv3": load_hpdv3_test,
    }
    if format is None:
        suffix = Path(path).suffix.lower()
        format = {".txt": "txt", ".jsonl": "jsonl", ".json": "hpdv3"}.get(suffix)
        if format is None:
            raise ValueError(
                f"cannot tell the prompt format of {path} from its extension; pass format= one of {sorted(loaders)}"
            )
    if format not in loaders:
        raise ValueError(f"unknown prompt format {format!r}; known: {sorted(loaders)}")
    return loaders[format](path, **kwargs)


def split_prompts(
    prompts: Sequence[Prompt],
    seed: int,
    fractions: Mapping[str, float] | Sequence[float] = (0.8, 0.1, 0.1),
) -> dict[str, list[Prompt]]:
    """Seeded split into ``train``/``val``/``test`` (or the names of a ``{name: fraction}`` mapping).

    Prompts are de-duplicated by text, then ordered by a hash of ``(seed, prompt_id)`` — so a prompt's
    place does not depend on the input order — and cut by the fractions (largest-remainder rounding).
    Each returned prompt has ``split`` set.
    """
    if isinstance(fractions, Mapping):
        names, values = list(fractions), [float(v) for v in fractions.values()]
    else:
        values = [float(v) for v in fractions]
        if len(values) != 3:
            raise ValueError(f"give three fractions (train, val, test) or a {{name: fraction}} mapping, got {values}")
        names = ["train", "val", "test"]
    if any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(zip(names, values))}")
    unique: dict[str, Prompt] = {}
    for p in prompts:
        unique.setdefault(p.text, p)
    ordered = sorted(unique.values(), key=lambda p: hashlib.sha256(f"{seed}:{p.prompt_id}".encode()).hexdigest())
    n = len(ordered)
    exact = [v * n for v in values]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(values)), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    out: dict[str, list[Prompt]] = {}
    start = 0
    for name, count in zip(names, counts):
        out[name] = [dataclasses.replace(p, split=name) for p in ordered[start : start + count]]
        start += count
    return out
