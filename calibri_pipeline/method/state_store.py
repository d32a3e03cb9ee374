"""Where a resumable calibration keeps its state: a tiny key -> bytes interface.

The search writes small JSON documents through it after every generation; the pipeline plugs in an
object-store implementation (fsspec/s3) with the same three methods. Names are flat, relative,
``/``-free-of-surprises strings such as ``"run/manifest.json"``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

from calibri_pipeline.atomic_io import write_bytes_atomic

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


@runtime_checkable
class StateStore(Protocol):
    """Key -> bytes storage. ``save`` must be atomic: a reader sees the old bytes or the new ones."""

    def save(self, name: str, data: bytes) -> None: ...

    def load(self, name: str) -> bytes: ...

    def exists(self, name: str) -> bool: ...


def check_state_name(name: str) -> str:
    """Reject names that could escape the store's root or that object stores treat oddly."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name) or ".." in name.split("/"):
        raise ValueError(
            f"state name {name!r} is not allowed: use relative names of letters, digits, '_', '-', '.' "
            "separated by '/', without '..'"
        )
    return name


class LocalStateStore:
    """A directory on the local filesystem. Writes go to a temporary file, are fsynced, then renamed."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.root / check_state_name(name)

    def save(self, name: str, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"state {name!r}: data must be bytes, got {type(data).__name__}")
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data, mode=0o600)  # private, as the state files always were

    def load(self, name: str) -> bytes:
        path = self._path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no state {name!r} in {self.root}")
        return path.read_bytes()

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def __repr__(self) -> str:
        return f"LocalStateStore({str(self.root)!r})"


class MemoryStateStore:
    """A dict-backed store: for tests and for runs that need no resumption."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    def save(self, name: str, data: bytes) -> None:
        self._data[check_state_name(name)] = bytes(data)

    def load(self, name: str) -> bytes:
        if name not in self._data:
            raise FileNotFoundError(f"no state {name!r} in memory store")
        return self._data[name]

    def exists(self, name: str) -> bool:
        return name in self._data
