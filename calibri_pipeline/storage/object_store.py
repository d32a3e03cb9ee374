"""Object storage for images, tensors and JSON: a local directory or an S3 bucket, through fsspec.

``ObjectStore(url)`` takes

- a plain path or ``file:///abs/path``: a local directory (created on the first write); every
  write goes to a hidden temporary file in the destination directory and is moved into place with
  ``os.replace``, so a reader (or a process killed mid-write) never sees half a file;
- ``s3://bucket/optional/prefix``: an S3 bucket through ``s3fs``. Credentials come from the
  environment only (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optional
  ``AWS_SESSION_TOKEN``); the endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
  (S3-compatible servers, tests on loopback); the region from ``AWS_REGION`` /
  ``AWS_DEFAULT_REGION``. A single S3 PUT is atomic, so S3 writes need no temporary object.

Keys are relative, ``/``-separated paths made of safe characters (letters, digits and ``. _ - = + , @``;
no segment may start with a dot, so ``..`` and hidden names are impossible); anything else is
refused with a ValueError before touching storage. ``uri(key)`` is the address stored in the
catalog; ``key_of(uri)`` maps it back.

Credentials are never stored on the object, never logged and never part of ``repr`` or ``uri``.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

import fsspec

from calibri_pipeline.atomic_io import encode_json, write_bytes_atomic

if TYPE_CHECKING:
    import torch
    from PIL import Image

# One key segment: starts with a letter, digit or underscore (so never "." / ".." / hidden temp
# names), then the same plus a few separators that are safe in URLs, shells and file systems.
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+,@-]*")
_MAX_KEY_LENGTH = 1024
_MAX_SEGMENT_LENGTH = 255
_TMP_PREFIX = ".calibri-tmp-"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class ObjectStoreError(RuntimeError):
    """The store cannot be used as configured (missing credentials, bad URL, unreachable bucket)."""


def validate_key(key: str, *, what: str = "key", allow_empty: bool = False) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ValueError saying why."""
    if not isinstance(key, str):
        raise TypeError(f"object store {what} must be a str, got {type(key).__name__}")
    if key == "":
        if allow_empty:
            return key
        raise ValueError(f"object store {what} is empty")
    if len(key) > _MAX_KEY_LENGTH:
        raise ValueError(f"object store {what} is {len(key)} characters long; at most {_MAX_KEY_LENGTH} allowed")
    if "\\" in key:
        raise ValueError(f"object store {what} {key!r} contains a backslash; use '/' to separate segments")
    if key.startswith("/") or re.match(r"^[A-Za-z]:", key):
        raise ValueError(f"object store {what} {key!r} is absolute; keys are relative to the store root")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(
                f"object store {what} {key!r} has an empty, '.' or '..' segment; "
                "path traversal and empty segments are not allowed"
            )
        if len(segment) > _MAX_SEGMENT_LENGTH:
            raise ValueError(f"object store {what} {key!r} has a segment longer than {_MAX_SEGMENT_LENGTH} characters")
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"object store {what} {key!r}: segment {segment!r} has unsafe characters; allowed are "
                "letters, digits and . _ - = + , @ (not starting with '.', '-', '=', '+', ',' or '@')"
            )
    return key


def _s3_credentials_from_environment() -> dict[str, Any]:
    key = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        missing = [n for n, v in (("AWS_ACCESS_KEY_ID", key), ("AWS_SECRET_ACCESS_KEY", secret)) if not v]
        raise ObjectStoreError(
            f"S3 credentials missing: {' and '.join(missing)} not set. An s3:// object store reads its "
            "credentials from the environment only (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional "
            "AWS_SESSION_TOKEN; endpoint from AWS_ENDPOINT_URL for S3-compatible servers)."
        )
    options: dict[str, Any] = {"key": key, "secret": secret}
    token = os.environ.get("AWS_SESSION_TOKEN")
    if token:
        options["token"] = token
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


class ObjectStore:
    """Keys -> bytes in a local directory or an S3 bucket (see the module docstring)."""

    def __init__(self, url: str | os.PathLike[str]) -> None:
        url = os.fspath(url)
        if not isinstance(url, str) or not url.strip():
            raise ValueError("object store URL is empty; give a directory path, file:///path or s3://bucket/prefix")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        # A single letter "scheme" is a Windows drive, i.e. a plain path.
        if scheme in ("", "file") or len(scheme) == 1:
            path = parts.path if scheme == "file" else url
            if scheme == "file" and parts.netloc not in ("", "localhost"):
                raise ValueError(f"object store URL {url!r}: file URLs must be file:///absolute/path")
            self.is_local = True
            self._root = str(Path(path).expanduser().resolve())
            self.url = "file://" + self._root
            self._fs = fsspec.filesystem("file")
        elif scheme == "s3":
            if "@" in parts.netloc or parts.username or parts.password:
                raise ValueError(
                    "object store URL must not carry credentials; set AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY in the environment instead"
                )
            if parts.query or parts.fragment:
                raise ValueError(f"object store URL s3://{parts.netloc}{parts.path} must not have a query or fragment")
            bucket = parts.netloc
            if not _BUCKET.fullmatch(bucket):
                raise ValueError(f"object store URL: {bucket!r} is not a valid S3 bucket name")
            prefix = parts.path.strip("/")
            validate_key(prefix, what="URL prefix", allow_empty=True)
            self.is_local = False
            self._root = f"{bucket}/{prefix}" if prefix else bucket
            self.url = f"s3://{self._root}"
            import s3fs  # lazily: only S3 users pay for botocore's import

            # Instance cache off: credentials may change between stores in one process (tests,
            # rotated keys). Listings cache off: other processes write the same bucket.
            self._fs = s3fs.S3FileSystem(
                skip_instance_cache=True, use_listings_cache=False, **_s3_credentials_from_environment()
            )
        else:
            raise ValueError(
                f"object store URL scheme {parts.scheme!r} is not supported; use a directory path, "
                "file:///path or s3://bucket/prefix"
            )

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    # -- addressing -------------------------------------------------------------------------
    def _path(self, key: str, *, allow_empty: bool = False) -> str:
        validate_key(key, allow_empty=allow_empty)
        return f"{self._root}/{key}" if key else self._root

    def uri(self, key: str) -> str:
        """The full address of ``key`` (``file:///...`` or ``s3://...``), as stored in the catalog."""
        return ("file://" if self.is_local else "s3://") + self._path(key)

    def key_of(self, uri: str) -> str:
        """The key of a URI produced by :meth:`uri` of this store; ValueError if it lies elsewhere."""
        root_uri = self.url.rstrip("/") + "/"
        if not isinstance(uri, str) or not uri.startswith(root_uri):
            raise ValueError(f"URI {uri!r} is not inside object store {self.url!r}")
        return validate_key(uri[len(root_uri) :])

    # -- bytes ------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` atomically (replacing any previous object); return its URI."""
        path = self._path(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"put_bytes({key!r}) needs bytes, got {type(data).__name__}")
        if self.is_local:
            directory, name = os.path.split(path)
            os.makedirs(directory, exist_ok=True)
            # hidden temp name, which list() skips; durable before visible, removed on any error
            write_bytes_atomic(path, data, prefix=_TMP_PREFIX, suffix=f"-{name}")
        else:
            try:
                self._fs.pipe_file(path, bytes(data))
            except FileNotFoundError as e:
                raise ObjectStoreError(f"cannot write {key!r} to {self.url}: {e} (does the bucket exist?)") from e
            except PermissionError as e:
                raise ObjectStoreError(
                    f"cannot write {key!r} to {self.url}: access denied ({e}); check the AWS_* credentials in the environment"
                ) from e
        return self.uri(key)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return self._fs.cat_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no object {key!r} in {self.url}") from None
        except IsADirectoryError:
            raise FileNotFoundError(f"{key!r} in {self.url} is a prefix, not an object") from None

    def exists(self, key: str) -> bool:
        """Whether an object (not merely a prefix) is stored under ``key``."""
        return bool(self._fs.isfile(self._path(key)))

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of every object under ``prefix`` (a whole-segment prefix; "" = everything)."""
        root = self._path(prefix, allow_empty=True)
        try:
            found = self._fs.find(root)
        except FileNotFoundError:
            return []
        base = self._root.rstrip("/") + "/"
        keys = []
        for path in found:
            path = path.replace(os.sep, "/") if self.is_local else path
            if not path.startswith(base):
                continue
            key = path[len(base) :]
            # Skip temporary files of writes in flight and anything else we could not have written.
            if any(seg.startswith(".") for seg in key.split("/")):
                continue
            keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> bool:
        """Delete one object; return whether it existed."""
        path = self._path(key)
        if not self._fs.isfile(path):
            return False
        self._fs.rm_file(path)
        return True

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (a whole-segment prefix); return how many were deleted.

        The empty prefix is refused: deleting a whole store is never what a partition wants.
        """
        if prefix == "":
            raise ValueError("delete_prefix('') would delete the whole object store; give a prefix")
        keys = self.list(prefix)
        if keys:
            self._fs.rm([self._path(k) for k in keys])
        if self.is_local:
            directory = self._path(prefix)
            # Leave no empty directory tree behind (S3 has no directories to clean).
            if os.path.isdir(directory):
                for dirpath, _dirs, _files in sorted(os.walk(directory), key=lambda w: -len(w[0])):
                    try:
                        os.rmdir(dirpath)
                    except OSError:
                        pass  # not empty: a concurrent writer put something there
        return len(keys)

    def state_store(self, prefix: str) -> ObjectStateStore:
        """The engine's resumable-state interface (``save/load/exists``) under ``prefix``."""
        return ObjectStateStore(self, prefix)

    # -- typed helpers ------------------------------------------------------------------------
    def put_json(self, key: str, value: Any) -> str:
        """Store ``value`` as UTF-8 JSON (NaN/inf refused: they are not JSON)."""
        data = encode_json(value, what=f"put_json({key!r})", ensure_ascii=False, trailing_newline=False)
        return self.put_bytes(key, data)

    def get_json(self, key: str) -> Any:
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"object {key!r} in {self.url} is not valid JSON: {e}") from e

    def put_png(self, key: str, image: torch.Tensor | Image.Image | Any) -> str:
        """Store one image as PNG.

        ``image``: a PIL image, a tensor ``[C, H, W]`` (C = 1, 3 or 4; float in [0, 1] or uint8), or a
        numpy array ``[H, W]`` / ``[H, W, C]`` (uint8, or float in [0, 1]). Floats are clamped to
        [0, 1] and rounded; NaN or infinite pixels are refused.
        """
        pil = _to_pil(image, key)
        buffer = io.BytesIO()
        pil.save(buffer, format="PNG")
        return self.put_bytes(key, buffer.getvalue())

    def get_png(self, key: str) -> Image.Image:
        from PIL import Image

        data = self.get_bytes(key)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.copy()

    def put_safetensors(
        self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> str:
        """Store a name -> tensor mapping as safetensors (optionally with string metadata)."""
        import torch
        from safetensors.torch import save

        if not isinstance(tensors, Mapping):
            raise TypeError(f"put_safetensors({key!r}) needs a dict of name -> tensor, got {type(tensors).__name__}")
        prepared: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"put_safetensors({key!r}): entry {name!r} must map a str to a torch.Tensor, "
                    f"got {type(tensor).__name__}"
                )
            prepared[name] = tensor.detach().to("cpu").contiguous()
        if metadata is not None:
            bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
            if bad:
                raise TypeError(f"put_safetensors({key!r}): metadata must map str to str; bad entries {bad}")
        return self.put_bytes(key, save(prepared, metadata=dict(metadata) if metadata else None))

    def get_safetensors(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        data = self.get_bytes(key)
        try:
            return load(data)
        except Exception as e:  # safetensors raises its own SafetensorError on corrupt headers
            raise ValueError(f"object {key!r} in {self.url} is not a valid safetensors file: {e}") from e

    def get_safetensors_metadata(self, key: str) -> dict[str, str]:
        """The string metadata of a safetensors object (empty dict if none)."""
        data = self.get_bytes(key)
        try:
            (header_len,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + header_len])
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"object {key!r} in {self.url} is not a valid safetensors file: {e}") from e
        return dict(header.get("__metadata__") or {})


class ObjectStateStore:
    """``calibri_pipeline.method.state_store.StateStore`` over an :class:`ObjectStore` prefix.

    The CMA-ES search saves its resume state through this, so a calibration resumes from S3 or a
    local directory alike; every save is atomic (see :meth:`ObjectStore.put_bytes`).
    """

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store = store
        self.prefix = validate_key(prefix, what="state prefix")

    def _key(self, name: str) -> str:
        return validate_key(f"{self.prefix}/{name}", what="state name")

    def save(self, name: str, data: bytes) -> None:
        self.store.put_bytes(self._key(name), data)

    def load(self, name: str) -> bytes:
        try:
            return self.store.get_bytes(self._key(name))
        except FileNotFoundError:
            raise FileNotFoundError(f"no state {name!r} in {self.store.uri(self.prefix)}") from None

    def exists(self, name: str) -> bool:
        return self.store.exists(self._key(name))

    def __repr__(self) -> str:
        return f"ObjectStateStore({self.store.uri(self.prefix)!r})"


def _to_pil(image: Any, key: str) -> Image.Image:
    """Convert a PIL image / CHW tensor / HWC numpy array to an 8-bit PIL image (see put_png)."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if type(image).__module__.startswith("torch"):
        import torch

        if not isinstance(image, torch.Tensor):
            raise TypeError(f"put_png({key!r}): unsupported image type {type(image).__name__}")
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(
                f"put_png({key!r}): a tensor image must be [C, H, W] with C in (1, 3, 4), got shape "
                f"{tuple(image.shape)} (store a batch one image at a time)"
            )
        array = image.detach().to("cpu")
        array = (array.float() if array.dtype != torch.uint8 else array).permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(
                f"put_png({key!r}): a numpy image must be [H, W] or [H, W, C] with C in (1, 3, 4), "
                f"got shape {array.shape}"
            )
    else:
        raise TypeError(
            f"put_png({key!r}): image must be a PIL image, a torch tensor [C, H, W] or a numpy array "
            f"[H, W, C], got {type(image).__name__}"
        )
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"put_png({key!r}): pixels must be uint8 or float in [0, 1], got {array.dtype}")
        if not np.isfinite(array).all():
            raise ValueError(f"put_png({key!r}): image contains NaN or infinite pixels")
        array = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    # Pillow infers L / RGB / RGBA from the shape of a uint8 array.
    return Image.fromarray(np.ascontiguousarray(array[:, :, 0] if array.shape[2] == 1 else array))
