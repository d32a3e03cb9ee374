"""Atomic file writes: a reader, or a process killed mid-write, sees the old file or the new one, never half.

Every writer here puts the bytes in a temporary file in the destination's own directory (so the rename
never crosses a file system), flushes and fsyncs it (durable before visible: a power cut never leaves an
empty file), then moves it into place with ``os.replace``. Whatever interrupts the write, the temporary
file is removed and the exception propagates; only a process killed outright can leave one behind, under
a hidden name (``.<name>.<random>.tmp`` unless the caller chooses another prefix/suffix) that no reader
takes for the file.

- :func:`atomic_writer`: a context manager yielding the temporary binary file (for encoders that stream).
- :func:`write_bytes_atomic`: one ``bytes`` payload.
- :func:`write_json_atomic`: JSON, serialised in memory first; NaN and infinity are refused (not JSON).
- :func:`encode_json`: that strict serialisation alone (for writers with their own transport).

The destination's directory must exist; these functions create no directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterator

PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def atomic_writer(
    path: PathLike, *, prefix: str | None = None, suffix: str = ".tmp", mode: int | None = None
) -> Iterator[BinaryIO]:
    """Write ``path`` atomically through the binary file this yields.

    The temporary file is ``<prefix><random hex><suffix>`` next to ``path`` (``prefix`` defaults to
    ``".<name>."``), created exclusively with the permissions ``open()`` would give (0o666 less the
    umask), or exactly ``mode`` when given. On leaving the block without an exception it is flushed,
    fsynced and renamed onto ``path``; on any exception (also from the rename) it is deleted.
    """
    path = Path(path)
    if prefix is None:
        prefix = f".{path.name}."
    tmp = path.parent / f"{prefix}{uuid.uuid4().hex}{suffix}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.chmod(tmp, mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        # never leave a half-written temp file behind, whatever interrupted us
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(
    path: PathLike,
    data: bytes | bytearray | memoryview,
    *,
    prefix: str | None = None,
    suffix: str = ".tmp",
    mode: int | None = None,
) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer` for ``prefix``/``suffix``/``mode``)."""
    with atomic_writer(path, prefix=prefix, suffix=suffix, mode=mode) as handle:
        handle.write(data)


def encode_json(
    value: Any, *, what: str, indent: int | None = 2, ensure_ascii: bool = True, trailing_newline: bool = True
) -> bytes:
    """``value`` as UTF-8 JSON; ValueError for NaN/infinity, TypeError for what JSON cannot hold.

    ``what`` names the value in the error message (a path, ``"put_json('key')"`` ...)."""
    try:
        text = json.dumps(value, allow_nan=False, indent=indent, ensure_ascii=ensure_ascii)
    except ValueError as e:
        raise ValueError(f"{what}: value contains NaN or infinity, which JSON cannot hold") from e
    except TypeError as e:
        raise TypeError(f"{what}: value is not JSON-serialisable: {e}") from e
    return (text + "\n" if trailing_newline else text).encode("utf-8")


def write_json_atomic(path: PathLike, payload: Any, *, mode: int | None = None) -> None:
    """Write ``payload`` to ``path`` as JSON (indent 2, a final newline) atomically; NaN/infinity refused.

    Nothing is written, and ``path`` keeps its old content, when the payload cannot be serialised."""
    write_bytes_atomic(path, encode_json(payload, what=str(path)), mode=mode)
