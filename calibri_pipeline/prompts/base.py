"""The prompt record every part of the pipeline passes around."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Prompt:
    """A text prompt, optionally with the structured spec it was generated from.

    ``spec`` is JSON-serialisable (the embedded world's scene spec; ``None`` for free text).
    ``source`` records where the prompt came from (``"world-grammar"``, ``"llm:<model>"``,
    ``"t2i-compbench:<file>"`` ...); ``split`` is ``"train" | "val" | "test"`` or ``None``.
    """

    text: str
    spec: dict[str, Any] | None = None
    category: str | None = None
    source: str = "user"
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_id(self) -> str:
        """Stable id from the text and spec (same prompt -> same id on every machine)."""
        payload = json.dumps({"text": self.text, "spec": self.spec}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "text": self.text,
            "spec": self.spec,
            "category": self.category,
            "source": self.source,
            "split": self.split,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prompt:
        return cls(
            text=d["text"],
            spec=d.get("spec"),
            category=d.get("category"),
            source=d.get("source", "user"),
            split=d.get("split"),
            meta=dict(d.get("meta") or {}),
        )
