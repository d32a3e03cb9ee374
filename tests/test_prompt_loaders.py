"""Prompt loaders: the real T2I-CompBench++ files from ../shared/prompts, HPDv3 and jsonl fixtures, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.prompts.loaders import (
    PromptFileError,
    load_hpdv3_test,
    load_jsonl_prompts,
    load_prompts,
    load_t2i_compbench,
    load_txt_prompts,
)

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "prompts"
needs_shared = pytest.mark.skipif(
    not SHARED_PROMPTS.is_dir(), reason=f"the shared T2I-CompBench++ prompt files are not at {SHARED_PROMPTS}"
)


def _expected_unique_lines(path: Path) -> list[str]:
    seen: dict[str, None] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            seen.setdefault(line.strip(), None)
    return list(seen)


@needs_shared
@pytest.mark.parametrize("name", ["t2i_compbench_train.txt", "t2i_compbench_val_random_crop.txt"])
def test_t2i_compbench_real_files(name: str) -> None:
    path = SHARED_PROMPTS / name
    prompts = load_t2i_compbench(path)
    assert [p.text for p in prompts] == _expected_unique_lines(path)
    assert all(isinstance(p, Prompt) and p.source == f"t2i-compbench:{name}" for p in prompts)
    assert len({p.prompt_id for p in prompts}) == len(prompts)


@needs_shared
def test_t2i_compbench_train_counts() -> None:
    # 5,601 lines: one blank line and 41 repeated prompts in the file as shipped
    path = SHARED_PROMPTS / "t2i_compbench_train.txt"
    assert len(load_t2i_compbench(path)) == 5559
    assert len(load_t2i_compbench(path, dedupe=False)) == 5600
    val = load_t2i_compbench(SHARED_PROMPTS / "t2i_compbench_val_random_crop.txt")
    assert len(val) == 499 and val[0].text == "a red boat and a blue book"


def test_t2i_compbench_category_from_file_name(tmp_path: Path) -> None:
    for name, category in [
        ("color_val.txt", "color"),
        ("3d_spatial_train.txt", "3d_spatial"),
        ("spatial.txt", "spatial"),
        ("mine.txt", None),
    ]:
        f = tmp_path / name
        f.write_text("a red apple\n")
        assert load_t2i_compbench(f)[0].category == category


def test_hpdv3_test_json_dedupes_prompts(tmp_path: Path) -> None:
    records = [
        {"prompt": "a cat on a sofa", "path1": "a/1.jpg", "path2": "a/2.jpg", "choice": 1},
        {"prompt": "a lighthouse at dusk", "path1": "b/1.jpg", "path2": "b/2.jpg", "choice": 0},
        {"prompt": "a cat on a sofa", "path1": "a/3.jpg", "path2": "a/4.jpg", "choice": 0},
        {"prompt": " a cat on a sofa ", "path1": "a/5.jpg", "path2": "a/6.jpg", "choice": 1},
    ]
    f = tmp_path / "test.json"
    f.write_text(json.dumps(records, indent=2))
    prompts = load_hpdv3_test(f)
    assert [p.text for p in prompts] == ["a cat on a sofa", "a lighthouse at dusk"]
    assert [p.meta["n_pairs"] for p in prompts] == [3, 1]
    assert {p.source for p in prompts} == {"hpdv3:test.json"}
    assert load_prompts(f)[0].text == "a cat on a sofa"  # .json -> HPDv3 by extension


def test_jsonl_prompts(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    f.write_text(
        '{"text": "a red cube", "category": "color", "weight": 2}\n\n{"text": "two dogs"}\n{"text": "a red cube"}\n'
    )
    prompts = load_jsonl_prompts(f)
    assert [(p.text, p.category) for p in prompts] == [("a red cube", "color"), ("two dogs", None)]
    assert prompts[0].meta == {"weight": 2, "line": 1}
    assert prompts[1].meta["line"] == 3
    assert {p.source for p in prompts} == {"jsonl:mine.jsonl"}
    assert len(load_prompts(f)) == 2


def test_plain_txt(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("  first prompt \nsecond\n")
    prompts = load_txt_prompts(f, category="mine")
    assert [p.text for p in prompts] == ["first prompt", "second"]
    assert prompts[0].source == "txt:p.txt" and prompts[0].category == "mine"
    assert load_txt_prompts(f, source="user:custom")[0].source == "user:custom"


@pytest.mark.parametrize(
    ("name", "content", "loader", "message"),
    [
        ("e.txt", "", load_txt_prompts, r"e\.txt: no prompts"),
        ("b.txt", "\n  \n\n", load_t2i_compbench, "no prompts"),
        ("e.jsonl", "", load_jsonl_prompts, "no prompts"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": "broken"\n', load_jsonl_prompts, r"bad\.jsonl:2: invalid JSON"),
        ("list.jsonl", '{"text": "ok"}\n\n["x"]\n', load_jsonl_prompts, r"list\.jsonl:3: expected a JSON object"),
        ("notext.jsonl", '{"prompt": "x"}\n', load_jsonl_prompts, r":1: 'text' must be a non-empty string"),
        ("cat.jsonl", '{"text": "x", "category": 3}\n', load_jsonl_prompts, "'category' must be a string"),
        ("empty.json", "", load_hpdv3_test, "empty file"),
        ("broken.json", '[\n{"prompt": "a"},\n{"prompt": }\n]', load_hpdv3_test, r"broken\.json:3: invalid JSON"),
        ("obj.json", '{"prompt": "a"}', load_hpdv3_test, "expected a JSON list"),
        ("nolist.json", "[]", load_hpdv3_test, "empty"),
        ("noprompt.json", '[{"prompt": "a"}, {"caption": "b"}]', load_hpdv3_test, "record 1 has no 'prompt'"),
        ("blank.json", '[{"prompt": "  "}]', load_hpdv3_test, "record 0: 'prompt' must be a non-empty string"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path: Path, name: str, content: str, loader, message: str) -> None:
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(PromptFileError, match=message):
        loader(f)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_txt_prompts(tmp_path / "nope.txt")
    f = tmp_path / "p.csv"
    f.write_text("a\n")
    with pytest.raises(ValueError, match="cannot tell the prompt format"):
        load_prompts(f)
    with pytest.raises(ValueError, match="unknown prompt format 'csv'"):
        load_prompts(f, format="csv")
    assert load_prompts(f, format="txt")[0].text == "a"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_txt_prompts(latin)
