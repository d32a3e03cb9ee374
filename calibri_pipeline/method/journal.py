"""The run journal of a CMA-ES search: one JSON document per generation over a :class:`StateStore`.

A run is resumed by *replay*, never by unpickling: the search re-asks and re-tells the stored
generations to a fresh strategy, and the journal hands it the stored records after checking that
they belong to the same run (its *fingerprint*: configuration, x0, bounds, the objective's identity,
library versions). Writes go generation file first, then the manifest that makes it count, so a crash
in between leaves a stray file that the resumed run recomputes (identically) and overwrites.

Layout under ``run_name``: ``manifest.json`` and ``generation-NNNNNN.json``, plus named extras the
search keeps with the run (``noise.json``, ``confirmation.json``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from calibri_pipeline.method.state_store import StateStore, check_state_name

STATE_FORMAT = "calibri-cma-run/2"


def json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the run state")


def jsonable(value: Any) -> Any:
    """Normalise to what a JSON round trip gives (tuples -> lists, numpy scalars -> Python)."""
    return json.loads(json.dumps(value, default=json_default))


def fingerprint_diff(stored: Any, current: Any, path: str = "") -> list[str]:
    """Dotted paths where two fingerprints differ (keys present in only one count too)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        diffs = []
        for key in sorted(set(stored) | set(current)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in stored or key not in current:
                diffs.append(sub)
            else:
                diffs.extend(fingerprint_diff(stored[key], current[key], sub))
        return diffs
    return [] if stored == current else [path or "<root>"]


class RunJournal:
    """The stored generations of one named run (``store=None``: a run that keeps nothing)."""

    def __init__(self, store: StateStore | None, run_name: str) -> None:
        self.store = store
        self.run_name = check_state_name(run_name)

    def _name(self, leaf: str) -> str:
        return f"{self.run_name}/{leaf}"

    def _generation_name(self, generation: int) -> str:
        return self._name(f"generation-{generation:06d}.json")

    def load(self, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
        """``{"manifest", "generations"}`` of the stored run, None when there is none.

        A stored run with another fingerprint is an error: a stale state is never silently continued.
        """
        if self.store is None or not self.store.exists(self._name("manifest.json")):
            return None
        manifest = json.loads(self.store.load(self._name("manifest.json")))
        if manifest.get("format") != STATE_FORMAT:
            raise ValueError(
                f"run {self.run_name!r} in the store has format {manifest.get('format')!r}, expected {STATE_FORMAT!r}; "
                "use another run_name, or resume=False to overwrite"
            )
        diffs = fingerprint_diff(manifest["fingerprint"], fingerprint)
        if diffs:
            raise ValueError(
                f"the store already holds a run named {self.run_name!r} with different settings "
                f"({', '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}); use another run_name, or resume=False to overwrite"
            )
        records = []
        for g in range(int(manifest["generations_done"])):
            record = json.loads(self.store.load(self._generation_name(g)))
            if record["generation"] != g:
                raise ValueError(
                    f"stored generation file {self._generation_name(g)} holds generation {record['generation']}"
                )
            records.append(record)
        return {"manifest": manifest, "generations": records}

    def save_generation(self, record: dict[str, Any], fingerprint: dict[str, Any], stop_reason: str | None) -> None:
        if self.store is None:
            return
        g = record["generation"]
        self.store.save(self._generation_name(g), json.dumps(record, default=json_default).encode())
        manifest = {
            "format": STATE_FORMAT,
            "fingerprint": fingerprint,
            "generations_done": g + 1,
            "finished": stop_reason is not None,
            "stop_reason": stop_reason,
        }
        self.store.save(self._name("manifest.json"), json.dumps(manifest, default=json_default).encode())

    def load_extra(self, name: str) -> Any | None:
        """A named document kept with the run (written by :meth:`save_extra`), or None."""
        if self.store is None or not self.store.exists(self._name(name)):
            return None
        return json.loads(self.store.load(self._name(name)))

    def save_extra(self, name: str, value: Any) -> None:
        if self.store is not None:
            self.store.save(self._name(name), json.dumps(value, default=json_default).encode())


__all__ = ["RunJournal", "STATE_FORMAT", "fingerprint_diff", "jsonable", "json_default"]
