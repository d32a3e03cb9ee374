"""Model keys (the ``model`` partition dimension) and how each one is loaded.

Built-in keys name a backbone kind (``toy``, ``flux``, ``sd3``, ``qwen-image``). A checkpoint found
by the recalibration sensor gets its own key (``<kind>--<name>``) whose spec, a small JSON file in
the object store under ``models/<key>.json``, records the kind, the checkpoint path and the
checkpoint it follows (for the warm start).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from calibri_pipeline.method.sampler import Backbone
    from calibri_pipeline.storage.object_store import ObjectStore

BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "toy": {"kind": "toy", "path": None},
    "flux": {"kind": "flux", "path": None},
    "sd3": {"kind": "sd3", "path": None},
    "qwen-image": {"kind": "qwen-image", "path": None},
}

# Partition keys travel into object-store keys and file names: keep them boring.
_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,95}$")


def check_model_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key) or ".." in key:
        raise ValueError(
            f"invalid model key {key!r}: use 1-96 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit, and no '..'"
        )
    return key


def checkpoint_key(kind: str, name: str) -> str:
    """The partition key of a checkpoint ``name`` of backbone ``kind`` (sanitised, validated)."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "checkpoint"
    return check_model_key(f"{kind}--{stem}"[:96])


def model_spec(key: str, store: ObjectStore | None = None) -> dict[str, Any]:
    check_model_key(key)
    if key in BUILTIN_MODELS:
        return dict(BUILTIN_MODELS[key], key=key)
    if store is not None and store.exists(f"models/{key}.json"):
        spec = store.get_json(f"models/{key}.json")
        if not isinstance(spec, dict) or "kind" not in spec:
            raise ValueError(f"model spec models/{key}.json is malformed (no 'kind')")
        return dict(spec, key=key)
    raise ValueError(
        f"unknown model {key!r}: built-in models are {sorted(BUILTIN_MODELS)}; checkpoints are registered "
        "by the checkpoint sensor (models/<key>.json in the object store)"
    )


def register_model(store: ObjectStore, key: str, kind: str, path: str, parent: str | None = None) -> dict[str, Any]:
    check_model_key(key)
    spec = {"kind": kind, "path": path, "parent": parent}
    store.put_json(f"models/{key}.json", spec)
    return dict(spec, key=key)


_CACHE: dict[tuple, Backbone] = {}
_LOCK = threading.Lock()


def load_model(key: str, store: ObjectStore | None = None, device: str = "cpu", dtype: str = "float32") -> Backbone:
    """Load (once per process) the backbone behind a model key."""
    spec = model_spec(key, store)
    cache_key = (key, spec.get("path"), device, dtype)
    with _LOCK:
        if cache_key in _CACHE:
            return _CACHE[cache_key]
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if spec["kind"] == "toy":
        from calibri_pipeline.backbones.toy import load_toy_backbone

        backbone = load_toy_backbone(spec.get("path"), device=device, dtype=torch_dtype)
    else:
        from calibri_pipeline.backbones.registry import load_backbone

        backbone = load_backbone(spec.get("path") or spec["kind"], arch=spec["kind"], device=device, dtype=torch_dtype)
    with _LOCK:
        _CACHE[cache_key] = backbone
    return backbone


@dataclass(frozen=True)
class ModelFactory:
    """Builds the backbone of a model key inside a Ray worker (:func:`load_model`); picklable.

    Carries only the key, the object-store URL (for checkpoint specs) and device/dtype names:
    credentials are read from the worker's own environment, never shipped.
    """

    model: str
    store_url: str | None = None
    device: str = "auto"
    dtype: str = "float32"

    def __call__(self) -> Backbone:
        import torch

        store = None
        if self.store_url is not None:
            from calibri_pipeline.storage.object_store import ObjectStore

            store = ObjectStore(self.store_url)
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda:"):
            device = "cuda"  # Ray shows each actor only the GPU it was given
        return load_model(self.model, store, device=device, dtype=self.dtype)
