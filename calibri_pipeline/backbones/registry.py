"""Backbones by name: the embedded toy, presets for the paper's models, or any diffusers checkpoint.

    load_backbone("toy")                                   # the embedded default (no GPU, no download)
    load_backbone("flux")                                  # black-forest-labs/FLUX.1-dev from the hub
    load_backbone("flux", path="/models/flux-dev")         # a preset's architecture from a local copy
    load_backbone("sd3", lora="my-org/flow-grpo-lora")     # SD-3.5 Medium + a LoRA fused into it
    load_backbone("/ckpt/step-4000")                       # a local diffusers folder (model_index.json)
    load_backbone("someone/flux-finetune", arch="flux")    # any hub id of a supported architecture

Everything except ``"toy"`` goes to :meth:`DiffusersBackbone.from_pretrained`; its options (``device``,
``dtype``, ``resolution``, ``default_steps``, ``default_guidance``, ``max_sequence_length``,
``default_max_batch``, ``vae_batch``, ``lora``, ``lora_scale``, ``lora_weight_name``, ``revision``,
``variant``, ``name``) pass through. Heavy libraries are imported only when a backbone is loaded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from calibri_pipeline.method.sampler import Backbone


@dataclass(frozen=True)
class HubModel:
    arch: str
    hub_id: str
    description: str


HUB_MODELS: dict[str, HubModel] = {
    "flux": HubModel("flux", "black-forest-labs/FLUX.1-dev", "FLUX.1-dev (guidance-distilled, 12B)"),
    "sd3": HubModel("sd3", "stabilityai/stable-diffusion-3.5-medium", "Stable Diffusion 3.5 Medium (CFG, 2.5B)"),
    "qwen-image": HubModel("qwen-image", "Qwen/Qwen-Image", "Qwen-Image (true CFG, 20B)"),
}
ALIASES: dict[str, str] = {
    "flux-dev": "flux",
    "flux.1-dev": "flux",
    "flux1-dev": "flux",
    "sd3.5": "sd3",
    "sd-3.5": "sd3",
    "sd3.5-medium": "sd3",
    "sd-3.5m": "sd3",
    "sd35m": "sd3",
    "qwen": "qwen-image",
    "qwen_image": "qwen-image",
    "qwenimage": "qwen-image",
}
TOY = "toy"


def available() -> dict[str, str]:
    """Names :func:`load_backbone` knows, with what they load."""
    out = {TOY: "the embedded toy DiT (trained in this project; CPU, offline)"}
    out.update({name: f"{p.description}: {p.hub_id}" for name, p in HUB_MODELS.items()})
    return out


def resolve(kind_or_id: str) -> tuple[str, HubModel | None]:
    """``(key, preset)``: a known name (presets and aliases, case-insensitive) or ``(kind_or_id, None)``."""
    if not isinstance(kind_or_id, str):
        raise TypeError(f"backbone must be a name, hub id or path (str), got {type(kind_or_id).__name__}")
    text = kind_or_id.strip()
    if not text:
        raise ValueError(f"backbone name is empty; choose one of {', '.join(available())}, a hub id or a local path")
    key = text.lower()
    key = ALIASES.get(key, key)
    if key == TOY:
        return TOY, None
    if key in HUB_MODELS:
        return key, HUB_MODELS[key]
    return text, None


def load_backbone(kind_or_id: str, **options: Any) -> Backbone:
    """Load a backbone: ``"toy"``, a preset (``flux``, ``sd3``, ``qwen-image``), a hub id or a local folder.

    For a preset, ``path=`` loads the same architecture from a local copy instead of the hub. A hub id
    or folder that is not a preset takes ``arch=`` (flux | sd3 | qwen-image); a folder's
    ``model_index.json`` names its pipeline, so ``arch`` is optional there.
    """
    key, preset = resolve(kind_or_id)
    if key == TOY:
        return _load_toy(options)
    from calibri_pipeline.backbones.diffusers_dit import DiffusersBackbone, _normalise_arch

    if preset is not None:
        arch = options.pop("arch", None)
        if arch is not None and _normalise_arch(arch) != preset.arch:
            raise ValueError(f"backbone {kind_or_id!r} is a {preset.arch} preset, but arch={arch!r} was given")
        source = options.pop("path", None) or preset.hub_id
        options.setdefault("name", key)
        return DiffusersBackbone.from_pretrained(source, arch=preset.arch, **options)
    if "path" in options:
        raise TypeError(f"path= is only for presets ({', '.join(HUB_MODELS)}); {kind_or_id!r} is already the source")
    if "/" not in key and "\\" not in key and not key.startswith((".", "~")):
        from pathlib import Path

        if not Path(key).exists():
            raise ValueError(
                f"unknown backbone {kind_or_id!r}; choose one of {', '.join(available())}, "
                "a hub id (owner/name) or a local diffusers folder"
            )
    return DiffusersBackbone.from_pretrained(key, **options)


def _load_toy(options: dict[str, Any]) -> Backbone:
    from calibri_pipeline.backbones.toy import load_toy_backbone

    allowed = set(inspect.signature(load_toy_backbone).parameters)
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(
            f"the toy backbone takes {', '.join(sorted(allowed))}; got unexpected {', '.join(sorted(unknown))}"
        )
    return load_toy_backbone(**options)


__all__ = ["load_backbone", "available", "resolve", "HUB_MODELS", "ALIASES", "HubModel"]
