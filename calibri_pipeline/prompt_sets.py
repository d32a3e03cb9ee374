"""A preset's prompt set, split train / val / test: the embedded world's grammar, the paper's
T2I-CompBench++ files, or any prompt file (txt / jsonl)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from calibri_pipeline.presets import Preset
    from calibri_pipeline.prompts.base import Prompt

#: the environment variable naming the folder with the T2I-CompBench++ prompt files
PROMPTS_DIR_ENV = "CALIBRI_PROMPTS_DIR"


def build_prompt_set(
    preset: Preset, *, llm_rewrite: bool = False, seed: int = 0, log: Callable[[str], None] = print
) -> list[Prompt]:
    """Every prompt of the preset's source with its ``split`` set (seeded, reproducible).

    ``llm_rewrite`` rewrites the world's train and val prompts with the LLM (checked against their
    specs); test prompts stay grammar-phrased, a fixed yardstick.
    """
    source = preset.prompt_source
    if source == "world":
        from calibri_pipeline.world import make_splits

        splits = make_splits(seed, preset.n_train, preset.n_val, preset.n_test)
        if llm_rewrite:
            from calibri_pipeline.prompts.llm import PromptLLM
            from calibri_pipeline.world.rewrite import rewrite_world_prompts

            llm = PromptLLM()
            for split in ("train", "val"):
                splits[split], report = rewrite_world_prompts(splits[split], llm, seed=seed)
                log(f"LLM rewrite of {split}: acceptance {report.acceptance_rate:.1%}, coverage {report.coverage:.1%}")
        return [p for split in ("train", "val", "test") for p in splits[split]]
    from calibri_pipeline.prompts.loaders import load_prompts, split_prompts

    if source == "t2i-compbench":
        from calibri_pipeline.presets import T2I_COMPBENCH_TRAIN, T2I_COMPBENCH_VAL

        root = os.environ.get(PROMPTS_DIR_ENV)
        if not root:
            raise ValueError(
                f"prompt_source 't2i-compbench' needs {PROMPTS_DIR_ENV} (the folder with the T2I-CompBench++ txt files)"
            )
        train = load_prompts(Path(root) / T2I_COMPBENCH_TRAIN)[: preset.n_train]
        val = load_prompts(Path(root) / T2I_COMPBENCH_VAL)
        val, test = val[: preset.n_val], val[preset.n_val : preset.n_val + preset.n_test]
        return (
            [replace(p, split="train") for p in train]
            + [replace(p, split="val") for p in val]
            + [replace(p, split="test") for p in test]
        )
    loaded = load_prompts(source)
    total = preset.n_train + preset.n_val + preset.n_test
    fractions = {"train": preset.n_train / total, "val": preset.n_val / total, "test": preset.n_test / total}
    splits = split_prompts(loaded[:total], seed=seed, fractions=fractions)
    return [p for split in ("train", "val", "test") for p in splits.get(split, [])]


__all__ = ["build_prompt_set", "PROMPTS_DIR_ENV"]
