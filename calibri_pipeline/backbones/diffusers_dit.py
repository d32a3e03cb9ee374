"""Real text-to-image DiTs (FLUX.1-dev, SD-3.5, Qwen-Image) from diffusers pipelines, on one sampler.

:class:`DiffusersBackbone` wraps a stock diffusers pipeline object (``FluxPipeline``,
``StableDiffusion3Pipeline``, ``QwenImagePipeline``) or loads one with ``from_pretrained``. Every
architecture samples through the same code: the project's :func:`make_velocity_fn` (classifier-free
guidance, the Calibri ensemble, per-image calibration vectors) and :func:`euler_sample` (rectified-flow
Euler steps over ``flow_sigmas(steps, shift)``). What differs per architecture is kept small and lives in
the three subclasses: how latents are packed into tokens, the transformer's call (its timestep scale,
position inputs, guidance embedding), the sigma shift, and how the VAE's latents are denormalised.

What the stock pipelines do, and what is reproduced (``.venv/.../diffusers/pipelines/{flux,
stable_diffusion_3,qwenimage}``):

- prompts go through the pipeline's own ``encode_prompt``, one prompt at a time (so an embedding never
  depends on which other prompts were encoded with it), cached per text on the CPU (bounded, LRU);
- each image's noise comes from its own ``torch.Generator`` seeded with its seed, drawn on the CPU in
  float32 and then moved: an image's noise never depends on its batch mates, on the device or on
  ``max_batch``, so the image itself is equal up to float rounding across batch compositions (kernels
  choose their code path by batch shape) and bitwise identical when the same call is replayed;
- FLUX: guidance-distilled (no CFG); the guidance scale goes into the ``guidance`` embedding; timestep =
  sigma; the shift is the pipeline's resolution-dependent ``mu`` (``exp(mu)`` is exactly an SD3-style
  shift of the sigmas); latents are packed in 2x2 patches with ``img_ids``/``txt_ids`` for RoPE;
- SD-3.5: true CFG with the empty negative prompt; timestep = sigma * 1000; the scheduler's static shift
  (3.0); the transformer patches latents itself;
- Qwen-Image: true CFG with the negative prompt ``" "`` and the pipeline's rescaling of the guided
  velocity to the conditional velocity's norm (per token); timestep = sigma; dynamic shift like FLUX;
  2x2 packing with ``img_shapes`` for RoPE; a text mask when prompts of different lengths share a batch;
- VAE decode with the pipeline's scaling/shift factors (Qwen: ``latents_mean``/``latents_std``).

Known differences from the stock ``__call__`` (documented, measured in the tests where it matters):
the latent state is integrated in float32 (the stock scheduler keeps it in the model dtype between
steps), and schedule features that ``flow_sigmas`` cannot express (``shift_terminal``, karras/
exponential/beta sigmas) are not reproduced — a warning names them. SD3's stock schedule also ends at
the training schedule's smallest sigma (``linspace(1, ~0.003, n)`` before shifting) where
``flow_sigmas`` uses ``linspace(1, 1/n, n)`` as FLUX and Qwen-Image do; pass ``sigmas=`` to the stock
pipeline to compare the two exactly.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch

from calibri_pipeline.arguments import positive_int
from calibri_pipeline.method.sampler import Backbone, seeded_noise
from calibri_pipeline.tensors import realign_cpu_weights, weights_fingerprint

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

ARCHS = ("flux", "sd3", "qwen-image")

#: transformer class -> architecture (the transformer decides, so pipeline subclasses work too)
TRANSFORMER_ARCH = {
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "QwenImageTransformer2DModel": "qwen-image",
}
#: pipeline class named in a checkpoint's model_index.json -> architecture
PIPELINE_ARCH = {
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
    "QwenImagePipeline": "qwen-image",
}
ARCH_PIPELINE = {arch: cls for cls, arch in PIPELINE_ARCH.items()}

# Scheduler options that flow_sigmas(steps, shift) cannot reproduce.
_UNSUPPORTED_SCHEDULE = (
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class ArchDefaults:
    """Sampling defaults of one architecture (the paper's baseline NFE and guidance; 512 px as in training)."""

    steps: int
    guidance: float
    resolution: int
    max_sequence_length: int


# --------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16`` or a name such as ``"bf16"`` / ``"float32"``; ``None`` passes through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.strip().lower().removeprefix("torch.")]
    raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or one of {', '.join(sorted(_DTYPES))}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, (h/2)(w/2), 4C]``: FLUX's and Qwen-Image's latent tokens (row-major 2x2 patches)."""
    n, c, h, w = latents.shape
    x = latents.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), 4 * c)


def unpack_2x2(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_2x2` for latents of ``height x width``."""
    n, _, channels = tokens.shape
    x = tokens.reshape(n, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels // 4, height, width)


def resolution_dependent_mu(image_seq_len: int, config: Mapping[str, Any], max_shift_default: float) -> float:
    """The pipelines' ``calculate_shift``: ``mu`` linear in the number of image tokens."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", max_shift_default)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def scheduler_shift(config: Mapping[str, Any], image_seq_len: int, max_shift_default: float = 1.15) -> float:
    """The SD3-style shift ``s`` (sigma -> s*sigma / (1 + (s-1)*sigma)) a FlowMatchEuler config applies.

    Dynamic shifting (FLUX, Qwen-Image) maps sigma with ``e^mu / (e^mu + 1/sigma - 1)``, which is that
    formula with ``s = e^mu`` (``s = mu`` for the "linear" shift type); otherwise ``s`` is ``config.shift``.
    """
    if config.get("use_dynamic_shifting", False):
        mu = resolution_dependent_mu(image_seq_len, config, max_shift_default)
        kind = config.get("time_shift_type", "exponential")
        if kind == "exponential":
            return math.exp(mu)
        if kind == "linear":
            return float(mu)
        raise ValueError(f"unknown time_shift_type {kind!r} in the scheduler config (expected exponential|linear)")
    return float(config.get("shift", 1.0))


# --------------------------------------------------------------------------------------------
# LoRA: merged into the weights, so the calibration space sees plain nn.Linear projections
# --------------------------------------------------------------------------------------------


def fuse_lora(
    pipeline: Any, lora: str | Path | Mapping[str, torch.Tensor], *, scale: float = 1.0, weight_name: str | None = None
) -> Any:
    """Load a LoRA with the pipeline's ``load_lora_weights``, fuse it and drop the adapter layers.

    ``fuse_lora`` merges ``scale * B @ A`` into the base weights; ``unload_lora_weights`` then removes
    peft's wrappers and keeps the merged weights, so the transformer holds plain ``nn.Linear`` layers
    again (what :class:`CalibrationSpace` hooks and bakes). Text-encoder LoRA layers are fused too.
    """
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ImportError("loading a LoRA needs peft: pip install 'calibri-pipeline[lora]' (or pip install peft)")
    if not hasattr(pipeline, "load_lora_weights"):
        raise TypeError(f"{type(pipeline).__name__} cannot load LoRA weights (no load_lora_weights)")
    if not math.isfinite(float(scale)):
        raise ValueError(f"lora_scale must be finite, got {scale!r}")
    lora = _lora_source(lora)
    adapter = "calibri_lora"
    kwargs = {"weight_name": weight_name} if weight_name else {}
    pipeline.load_lora_weights(lora, adapter_name=adapter, **kwargs)
    components = [
        c
        for c in getattr(pipeline, "_lora_loadable_modules", ["transformer"])
        if getattr(pipeline, c, None) is not None
    ]
    pipeline.fuse_lora(components=components, lora_scale=float(scale), adapter_names=[adapter])
    pipeline.unload_lora_weights()
    leftover = [name for name, m in pipeline.transformer.named_modules() if hasattr(m, "lora_A")]
    if leftover:
        raise RuntimeError(f"LoRA layers remain after fusing: {leftover[:3]}")
    return pipeline


def _lora_source(lora: Any) -> Any:
    """A LoRA given as a path, hub id or state dict; a path that does not exist fails here, before loading."""
    if isinstance(lora, Mapping):
        return dict(lora)
    if not isinstance(lora, (str, Path)) or not str(lora).strip():
        raise TypeError(f"lora must be a local path, a hub id or a state dict, got {lora!r}")
    local = Path(lora).expanduser()
    if local.exists():
        return str(local)
    if isinstance(lora, Path) or _looks_like_path(str(lora)):
        raise FileNotFoundError(f"LoRA {str(lora)!r} does not exist")
    return str(lora).strip()


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    try:  # diffusers >= 0.42 takes `dtype=` and deprecates `torch_dtype=`
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text


# --------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------


class DiffusersBackbone(Backbone):
    """A diffusers text-to-image DiT as a :class:`~calibri_pipeline.method.sampler.Backbone`.

    Build one with :meth:`from_pipeline` (a pipeline object you hold) or :meth:`from_pretrained`
    (a hub id or a local folder); the subclass is picked from the transformer's class.
    """

    arch: ClassVar[str] = ""
    uses_cfg: ClassVar[bool] = False
    #: the transformer's ``timestep`` per unit of noise level (its pipeline passes ``sigma * timestep_scale``)
    timestep_scale: ClassVar[float] = 1.0
    negative_prompt: ClassVar[str | None] = None
    defaults: ClassVar[ArchDefaults]
    max_shift_default: ClassVar[float] = 1.15
    #: latent pixels per transformer token side (2 for 2x2 packing / patching)
    token_patch: ClassVar[int] = 2

    def __init__(
        self,
        pipeline: Any,
        *,
        name: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        resolution: int | Sequence[int] | None = None,
        default_steps: int | None = None,
        default_guidance: float | None = None,
        max_sequence_length: int | None = None,
        default_max_batch: int = 16,
        vae_batch: int = 4,
        prompt_cache_size: int = 1024,
    ) -> None:
        if type(self) is DiffusersBackbone:
            raise TypeError(
                "use DiffusersBackbone.from_pipeline(...) or .from_pretrained(...), which pick the architecture"
            )
        transformer = getattr(pipeline, "transformer", None)
        found = TRANSFORMER_ARCH.get(type(transformer).__name__)
        if found != self.arch:
            raise TypeError(
                f"{type(self).__name__} needs a pipeline whose transformer is a "
                f"{[k for k, v in TRANSFORMER_ARCH.items() if v == self.arch][0]}, got {type(transformer).__name__}"
            )
        if getattr(pipeline, "vae", None) is None:
            raise ValueError(f"the {self.arch} pipeline has no VAE: images cannot be decoded")
        # options first: a bad one should fail before a 12B-parameter model moves to the GPU
        self.pipeline = pipeline
        self.name = name or self.arch
        steps = self.defaults.steps if default_steps is None else default_steps
        self.default_steps = positive_int("default_steps", steps)
        guidance = self.defaults.guidance if default_guidance is None else float(default_guidance)
        if not math.isfinite(guidance):
            raise ValueError(f"default_guidance must be finite, got {default_guidance!r}")
        self.default_guidance: float | None = guidance
        text_length = self.defaults.max_sequence_length if max_sequence_length is None else max_sequence_length
        self.max_sequence_length = positive_int("max_sequence_length", text_length)
        self.default_max_batch = positive_int("default_max_batch", default_max_batch)
        self.vae_batch = positive_int("vae_batch", vae_batch)
        self.prompt_cache_size = positive_int("prompt_cache_size", prompt_cache_size)
        self.transformer = pipeline.transformer
        self.resolution = self._check_resolution(self.defaults.resolution if resolution is None else resolution)
        dtype = parse_dtype(dtype)
        if device is not None or dtype is not None:
            pipeline.to(
                **({"device": torch.device(device)} if device is not None else {}),
                **({"dtype": dtype} if dtype is not None else {}),
            )
        self.transformer = pipeline.transformer.eval().requires_grad_(False)
        self.vae = pipeline.vae.eval().requires_grad_(False)
        for module in self._text_encoders():
            module.eval().requires_grad_(False)
        # from_pretrained leaves weights in unaligned mmap memory: realigned, they run the saved model's CPU kernels
        realign_cpu_weights(self._torch_components())
        # text -> conditioning (batch 1, on the CPU: a FLUX T5 embedding is 4 MB; least recently used first out)
        self._prompt_cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._warn_unsupported_schedule()

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_pipeline(
        cls,
        pipeline: Any,
        *,
        arch: str | None = None,
        lora: str | Path | Mapping[str, torch.Tensor] | None = None,
        lora_scale: float = 1.0,
        lora_weight_name: str | None = None,
        **options: Any,
    ) -> DiffusersBackbone:
        """Wrap a pipeline object; ``lora`` (path, hub id or state dict) is fused into it first."""
        transformer = getattr(pipeline, "transformer", None)
        if transformer is None:
            raise TypeError(
                f"expected a diffusers text-to-image pipeline with a transformer, got {type(pipeline).__name__}"
            )
        found = TRANSFORMER_ARCH.get(type(transformer).__name__)
        if found is None:
            raise ValueError(
                f"unsupported transformer {type(transformer).__name__}; supported: "
                + ", ".join(f"{k} ({v})" for k, v in TRANSFORMER_ARCH.items())
            )
        if arch is not None and _normalise_arch(arch) != found:
            raise ValueError(f"arch={arch!r} but the pipeline's transformer is {type(transformer).__name__} ({found})")
        if lora is not None:
            fuse_lora(pipeline, lora, scale=lora_scale, weight_name=lora_weight_name)
        return _ARCH_CLASSES[found](pipeline, **options)

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | Path,
        *,
        arch: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        lora: str | Path | Mapping[str, torch.Tensor] | None = None,
        lora_scale: float = 1.0,
        lora_weight_name: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        local_files_only: bool = False,
        cache_dir: str | Path | None = None,
        torch_dtype: torch.dtype | str | None = None,
        **options: Any,
    ) -> DiffusersBackbone:
        """Load a pipeline (hub id or local folder) with ``from_pretrained`` and wrap it.

        ``device`` defaults to CUDA when available; ``dtype`` to bf16 on a GPU and float32 on the CPU.
        ``arch`` (flux | sd3 | qwen-image) picks the pipeline class; without it a local folder's
        ``model_index.json`` decides, and a hub id goes through ``DiffusionPipeline.from_pretrained``.
        ``revision``, ``variant``, ``local_files_only`` and ``cache_dir`` go to ``from_pretrained``;
        ``torch_dtype`` is accepted as diffusers' older name for ``dtype``.
        """
        import diffusers

        if torch_dtype is not None:
            if dtype is not None:
                raise ValueError("pass dtype or torch_dtype, not both")
            dtype = torch_dtype

        if not isinstance(id_or_path, (str, Path)) or not str(id_or_path).strip():
            raise TypeError(f"id_or_path must be a hub id or a local path, got {id_or_path!r}")
        source = str(id_or_path).strip()
        device = torch.device(device) if device is not None else default_device()
        dtype = parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        arch = _normalise_arch(arch) if arch is not None else None
        local = Path(source).expanduser()
        if local.exists():
            index = local / "model_index.json"
            if not index.is_file():
                raise ValueError(f"{source!r} is not a diffusers pipeline folder (it has no model_index.json)")
            try:
                class_name = json.loads(index.read_text()).get("_class_name")
            except (json.JSONDecodeError, AttributeError) as exc:
                raise ValueError(f"{index} is not valid JSON: {exc}") from exc
            if arch is not None and PIPELINE_ARCH.get(class_name, arch) != arch:
                raise ValueError(f"arch={arch!r} but {source!r} holds a {class_name} ({PIPELINE_ARCH[class_name]})")
            if arch is None:
                if class_name not in PIPELINE_ARCH:
                    raise ValueError(
                        f"{source!r} holds a {class_name}; supported pipelines: {', '.join(PIPELINE_ARCH)} "
                        "(pass arch= if it is a compatible subclass)"
                    )
                arch = PIPELINE_ARCH[class_name]
            source = str(local)
        elif _looks_like_path(source):
            raise FileNotFoundError(f"checkpoint folder {source!r} does not exist")
        pipeline_cls = getattr(diffusers, ARCH_PIPELINE[arch]) if arch else diffusers.DiffusionPipeline
        if lora is not None:
            lora = _lora_source(lora)
        kwargs: dict[str, Any] = {
            k: v for k, v in (("revision", revision), ("variant", variant), ("cache_dir", cache_dir)) if v is not None
        }
        if local_files_only:
            kwargs["local_files_only"] = True
        kwargs.update(_dtype_kwarg(dtype))
        try:
            pipeline = pipeline_cls.from_pretrained(source, **kwargs)
        except OSError as exc:
            raise OSError(
                f"could not load the diffusers pipeline {source!r}: {exc} "
                "(a hub id needs network access or a local Hugging Face cache; a folder needs model_index.json "
                "and its component folders)"
            ) from exc
        options.setdefault("name", Path(source).name)  # folder name, or the name part of owner/name
        backbone = cls.from_pipeline(
            pipeline,
            arch=arch,
            lora=lora,
            lora_scale=lora_scale,
            lora_weight_name=lora_weight_name,
            device=device,
            **options,
        )
        backbone.source = {
            "source": source,
            "revision": revision,
            "variant": variant,
            "lora": None if lora is None or isinstance(lora, Mapping) else str(lora),
            "lora_scale": lora_scale,
        }
        return backbone

    # -- properties ------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    def latent_size(self, resolution: tuple[int, int] | None = None) -> tuple[int, int]:
        height, width = resolution or self.resolution
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def image_seq_len(self, resolution: tuple[int, int] | None = None) -> int:
        h, w = self.latent_size(resolution or self.resolution)
        return (h // self.token_patch) * (w // self.token_patch)

    def sigma_shift(self, resolution: tuple[int, int] | None = None) -> float:
        """The shift passed to ``euler_sample`` at this resolution (from the pipeline's scheduler config)."""
        return scheduler_shift(self.pipeline.scheduler.config, self.image_seq_len(resolution), self.max_shift_default)

    def __repr__(self) -> str:
        h, w = self.resolution
        return (
            f"{type(self).__name__}(name={self.name!r}, {h}x{w}, steps={self.default_steps}, "
            f"guidance={self.default_guidance}, cfg={self.uses_cfg}, device={self.device}, dtype={self.dtype})"
        )

    # -- prompts ---------------------------------------------------------------------------------

    def _torch_components(self) -> list[torch.nn.Module]:
        """Every torch module of the pipeline: transformer, VAE, text encoders (and any other)."""
        found = [self.transformer, self.vae, *self._text_encoders()]
        found += [m for m in getattr(self.pipeline, "components", {}).values() if isinstance(m, torch.nn.Module)]
        unique: dict[int, torch.nn.Module] = {}
        for module in found:
            unique.setdefault(id(module), module)
        return list(unique.values())

    def _text_encoders(self) -> list[torch.nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipeline, n, None) for n in names) if isinstance(m, torch.nn.Module)]

    def cache_prompt_embeddings(self, text: str, embeddings: Mapping[str, torch.Tensor]) -> None:
        """Store precomputed conditioning for ``text`` (batch 1, keys as :meth:`encode` returns them).

        Lets a pipeline without text encoders (e.g. a random-init speed benchmark) run, and lets callers
        reuse embeddings computed elsewhere.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        missing = set(self._cond_keys()) - set(embeddings)
        if missing:
            raise ValueError(
                f"{self.arch} conditioning needs keys {sorted(self._cond_keys())}; missing {sorted(missing)}"
            )
        entry = {}
        for key in self._cond_keys():
            value = torch.as_tensor(embeddings[key])
            if value.ndim < 1 or value.shape[0] != 1:
                raise ValueError(f"embeddings[{key!r}] must have batch size 1, got shape {tuple(value.shape)}")
            entry[key] = value.detach().cpu()
        self._remember(text, entry)

    def _remember(self, text: str, entry: dict[str, torch.Tensor]) -> None:
        self._prompt_cache[text] = entry
        self._prompt_cache.move_to_end(text)
        while len(self._prompt_cache) > self.prompt_cache_size:
            self._prompt_cache.popitem(last=False)

    def embedding(self, text: str) -> dict[str, torch.Tensor]:
        """The conditioning of one prompt (batch 1, CPU): from the cache, or encoded by the pipeline now."""
        entry = self._prompt_cache.get(text)
        if entry is not None:
            self._prompt_cache.move_to_end(text)
            return entry
        if not self._text_encoders():
            raise ValueError(
                f"this {self.arch} pipeline has no text encoders and the prompt {text!r} has no cached "
                "embeddings; call cache_prompt_embeddings(text, ...) first"
            )
        with torch.no_grad():
            entry = {k: v.detach().cpu() for k, v in self._encode_one(text).items()}
        self._remember(text, entry)
        return entry

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Conditioning for ``texts`` as one batch on the model's device (padded to a common length if needed)."""
        return {k: v.to(self.device) for k, v in self._collate([self.embedding(t) for t in texts]).items()}

    def _cond_keys(self) -> tuple[str, ...]:
        return ("states", "pooled")

    def _collate(self, items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.cat([item[key] for item in items]) for key in items[0]}

    # -- noise and geometry ----------------------------------------------------------------------

    def _check_resolution(self, resolution: int | Sequence[int]) -> tuple[int, int]:
        if isinstance(resolution, int) and not isinstance(resolution, bool):
            height = width = resolution
        elif (
            isinstance(resolution, Sequence)
            and len(resolution) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in resolution)
        ):
            height, width = resolution
        else:
            raise ValueError(f"resolution must be an int or (height, width), got {resolution!r}")
        multiple = self.vae_scale_factor * self.token_patch
        if height < multiple or width < multiple or height % multiple or width % multiple:
            raise ValueError(
                f"{self.arch} resolution must be a positive multiple of {multiple} "
                f"(VAE factor {self.vae_scale_factor} x patch {self.token_patch}), got {height}x{width}"
            )
        return int(height), int(width)

    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    def initial_noise(self, seeds: Sequence[int], resolution: tuple[int, int] | None = None) -> torch.Tensor:
        """Unpacked latent noise ``[N, C, h, w]``: one float32 draw per seed from its own CPU generator."""
        return seeded_noise(seeds, (self.latent_channels(), *self.latent_size(resolution)))

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack_2x2(latents)

    def unpack(self, x: torch.Tensor, resolution: tuple[int, int] | None = None) -> torch.Tensor:
        return unpack_2x2(x, *self.latent_size(resolution))

    # -- per-architecture pieces (subclasses) ----------------------------------------------------

    def _encode_one(self, text: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def model_fn(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        *,
        guidance: float | None,
        resolution: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The raw transformer velocity for packed latents ``x`` at noise levels ``sigma`` ``[M]``: the stock
        transformer called with the architecture's inputs (:meth:`transformer_inputs`)."""
        latent_size = self.latent_size(resolution or self.resolution)
        inputs = self.transformer_inputs(x.to(self.dtype), sigma, cond, guidance=guidance, latent_size=latent_size)
        return self.transformer(**inputs, return_dict=False)[0].to(x.dtype)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The ``timestep`` this architecture's transformer takes at noise level ``sigma`` (as its pipeline passes it)."""
        raise NotImplementedError

    @classmethod
    def sigma_of_timestep(cls, timestep: torch.Tensor | float) -> float:
        """The noise level of a ``timestep`` the stock pipeline passed its transformer (first row)."""
        t = timestep.flatten()[0] if isinstance(timestep, torch.Tensor) else timestep
        return float(t) / cls.timestep_scale

    def transformer_inputs(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        *,
        guidance: float | None,
        latent_size: tuple[int, int],
    ) -> dict[str, Any]:
        """The transformer's keyword arguments for state ``x`` (already in the model's dtype)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked latents ``[N, C, h, w]`` -> images ``[N, 3, H, W]`` in ``[-1, 1]`` (VAE dtype)."""
        raise NotImplementedError

    def conditioning(self, texts: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """Batched ``cond`` for ``texts`` and the negative prompt's ``uncond`` (batch 1; None without CFG).

        Both come from one collation, so variable-length text (Qwen-Image) shares one padding length.
        """
        negative = [self.negative_prompt] if self.uses_cfg else []
        batch = self.encode(list(texts) + negative)
        n = len(texts)
        cond = {k: v[:n] for k, v in batch.items()}
        uncond = {k: v[n:] for k, v in batch.items()} if self.uses_cfg else None
        return cond, uncond

    def wrap_velocity(self, velocity):
        return velocity

    # -- sampling (the loop is Backbone.sample) --------------------------------------------

    def image_shape(self) -> tuple[int, int, int]:
        return (3, *self.resolution)

    def identity(self) -> dict[str, Any]:
        if getattr(self, "_identity", None) is None:
            self._identity = {
                "arch": self.arch,
                "source": getattr(self, "source", None),
                "transformer": weights_fingerprint(self.transformer),
                "vae": weights_fingerprint(self.vae),
                "text_encoders": [weights_fingerprint(m) for m in self._text_encoders()],
                "dtype": str(self.dtype),
                "device": self.device.type,
                "resolution": list(self.resolution),
                "max_sequence_length": self.max_sequence_length,
                "shift": self.sigma_shift(),
                "negative_prompt": self.negative_prompt,
                **self._identity_extra(),
            }
        return self._identity

    def _identity_extra(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        images = []
        for start in range(0, latents.shape[0], self.vae_batch):
            decoded = self.decode(latents[start : start + self.vae_batch])
            images.append(((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu())
        return torch.cat(images)

    def _warn_unsupported_schedule(self) -> None:
        config = self.pipeline.scheduler.config
        used = {k: config.get(k) for k in _UNSUPPORTED_SCHEDULE if config.get(k)}
        if used:
            log.warning(
                "%s: the scheduler config sets %s, which euler_sample's flow_sigmas(steps, shift=%.4g) does not "
                "reproduce; images differ slightly from the stock pipeline's schedule",
                self.name,
                used,
                self.sigma_shift(),
            )


def _normalise_arch(arch: str) -> str:
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a str, got {type(arch).__name__}")
    key = arch.strip().lower().replace("_", "-")
    key = {"qwen": "qwen-image", "qwenimage": "qwen-image", "sd3.5": "sd3", "sd-3.5": "sd3"}.get(key, key)
    if key not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return key


# --------------------------------------------------------------------------------------------
# FLUX.1 (guidance-distilled MM-DiT: 19 double + 38 single blocks)
# --------------------------------------------------------------------------------------------


def flux_image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """RoPE ids ``[h*w, 3]`` of packed latent tokens: (0, row, column), as ``_prepare_latent_image_ids``."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device)


class FluxBackbone(DiffusersBackbone):
    """FLUX.1: packed 2x2 latent tokens with RoPE ids; guidance is an embedding input (no second pass)."""

    arch = "flux"
    uses_cfg = False  # FLUX.1-dev is guidance-distilled: guidance is an input, not a second pass
    negative_prompt = None
    defaults = ArchDefaults(steps=30, guidance=3.5, resolution=512, max_sequence_length=512)

    def _encode_one(self, text: str) -> dict[str, torch.Tensor]:
        states, pooled, _ = self.pipeline.encode_prompt(
            prompt=[text], prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"states": states, "pooled": pooled}

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.to(self.dtype)  # FluxPipeline passes t / 1000; the transformer scales by 1000 itself

    def transformer_inputs(self, x, sigma, cond, *, guidance, latent_size):
        dtype, (h, w) = self.dtype, latent_size
        distilled = bool(self.transformer.config.guidance_embeds)
        return dict(
            hidden_states=x,
            timestep=self.timestep(sigma),
            guidance=torch.full((x.shape[0],), guidance, device=x.device, dtype=torch.float32) if distilled else None,
            pooled_projections=cond["pooled"].to(dtype),
            encoder_hidden_states=cond["states"].to(dtype),
            txt_ids=torch.zeros(cond["states"].shape[1], 3, device=x.device, dtype=dtype),
            img_ids=flux_image_ids(h // 2, w // 2, x.device).to(dtype),
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        z = latents / config.scaling_factor + (config.shift_factor or 0.0)
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]


# --------------------------------------------------------------------------------------------
# Stable Diffusion 3 / 3.5 (MM-DiT with CFG; SD-3.5 adds dual attention and qk-norm)
# --------------------------------------------------------------------------------------------


class SD3Backbone(DiffusersBackbone):
    """SD-3 / 3.5: true CFG with the empty negative prompt; the transformer patches the latents itself."""

    arch = "sd3"
    uses_cfg = True
    timestep_scale = 1000.0
    negative_prompt = ""  # the pipeline's default negative prompt
    defaults = ArchDefaults(steps=40, guidance=4.5, resolution=512, max_sequence_length=256)
    max_shift_default = 1.16  # StableDiffusion3Pipeline's fallback when the config has no max_shift

    @property
    def token_patch(self) -> int:  # type: ignore[override]
        return int(self.transformer.config.patch_size)

    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents  # the transformer patches the latents itself

    def unpack(self, x: torch.Tensor, resolution: tuple[int, int] | None = None) -> torch.Tensor:
        return x

    def _encode_one(self, text: str) -> dict[str, torch.Tensor]:
        states, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=[text],
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"states": states, "pooled": pooled}

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.float() * self.timestep_scale  # StableDiffusion3Pipeline passes t in [0, 1000]

    def transformer_inputs(self, x, sigma, cond, *, guidance, latent_size):
        return dict(
            hidden_states=x,
            timestep=self.timestep(sigma),
            encoder_hidden_states=cond["states"].to(self.dtype),
            pooled_projections=cond["pooled"].to(self.dtype),
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        z = latents / config.scaling_factor + (config.shift_factor or 0.0)
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]


# --------------------------------------------------------------------------------------------
# Qwen-Image (60-block MM-DiT, Qwen2.5-VL text encoder, true CFG with norm rescaling)
# --------------------------------------------------------------------------------------------


def rescale_to_conditional_norm(velocity: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
    """QwenImagePipeline's true-CFG rescaling: ``comb * ||cond|| / ||comb||``, norms over the channels of each token."""
    return velocity * (conditional.norm(dim=-1, keepdim=True) / velocity.norm(dim=-1, keepdim=True))


class _ConditionalNorm:
    """Remembers the conditional pass's velocity of the latest step (for Qwen-Image's CFG rescaling).

    ``make_velocity_fn`` mixes the passes itself; the conditioning carries an ``is_cond`` flag per row so
    the model function can keep the conditional rows aside without knowing the ensemble's layout.
    """

    def __init__(self) -> None:
        self.velocity: torch.Tensor | None = None

    def wrap(self, velocity):
        def rescaled(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            self.velocity = None
            v = velocity(x, sigma)
            if self.velocity is None or self.velocity.shape[1:] != v.shape[1:]:
                raise RuntimeError(
                    "the conditional velocity of this step was not recorded (one conditional pass per image expected)"
                )
            # several conditional members (skip-layer guidance): the first block of rows is member 1's
            if self.velocity.shape[0] % v.shape[0]:
                raise RuntimeError("the conditional velocity of this step does not match the batch")
            v_cond, self.velocity = self.velocity[: v.shape[0]], None
            return rescale_to_conditional_norm(v, v_cond)

        return rescaled


class QwenImageBackbone(DiffusersBackbone):
    """Qwen-Image: true CFG whose guided velocity is rescaled per token to the conditional one's norm.

    ``cfg_renorm=False`` drops the rescaling (plain CFG). With it on, a common factor on the Calibri
    ensemble weights cancels: only their ratio (and the members' coefficients) changes the image.
    """

    arch = "qwen-image"
    uses_cfg = True
    negative_prompt = " "  # Qwen-Image's documented way to enable true CFG
    defaults = ArchDefaults(steps=50, guidance=4.0, resolution=512, max_sequence_length=512)

    def __init__(self, pipeline: Any, *, cfg_renorm: bool = True, **options: Any) -> None:
        super().__init__(pipeline, **options)
        if self.transformer.config.guidance_embeds:
            raise ValueError("guidance-distilled Qwen-Image variants (guidance_embeds=True) are not supported")
        self.cfg_renorm = bool(cfg_renorm)
        self._conditional = _ConditionalNorm()

    def _cond_keys(self) -> tuple[str, ...]:
        return ("states", "mask")

    def _encode_one(self, text: str) -> dict[str, torch.Tensor]:
        states, mask = self.pipeline.encode_prompt(
            prompt=[text], device=self.device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        return {"states": states, "mask": mask}

    def _collate(self, items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # prompts of different lengths: zero-pad to the longest and mask the padding, as the pipeline does
        length = max(item["states"].shape[1] for item in items)
        states, masks = [], []
        for item in items:
            pad = length - item["states"].shape[1]
            states.append(torch.nn.functional.pad(item["states"], (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(item["mask"], (0, pad)))
        return {"states": torch.cat(states), "mask": torch.cat(masks)}

    def conditioning(self, texts: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        cond, uncond = super().conditioning(texts)
        if self.cfg_renorm:
            # flag the conditional rows, so model_fn can keep their velocity for the rescaling
            device = cond["states"].device
            cond["is_cond"] = torch.ones(len(texts), device=device)
            uncond["is_cond"] = torch.zeros(1, device=device)
        return cond, uncond

    def wrap_velocity(self, velocity):
        return self._conditional.wrap(velocity) if self.cfg_renorm else velocity

    def _identity_extra(self) -> dict[str, Any]:
        return {"cfg_renorm": self.cfg_renorm}

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.to(self.dtype)  # QwenImagePipeline passes t / 1000; scaled by 1000 inside the time embedding

    def transformer_inputs(self, x, sigma, cond, *, guidance, latent_size):
        (h, w), mask = latent_size, cond["mask"]
        return dict(
            hidden_states=x,
            timestep=self.timestep(sigma),
            encoder_hidden_states=cond["states"].to(self.dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0],
        )

    def model_fn(self, x, sigma, cond, *, guidance, resolution=None):
        out = super().model_fn(x, sigma, cond, guidance=guidance, resolution=resolution)
        if "is_cond" in cond:  # the conditional rows' velocity, for the rescaling around the mixed one
            self._conditional.velocity = out[cond["is_cond"].bool()]
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        z = latents.unsqueeze(2).to(self.vae.dtype)  # one video frame: [N, C, 1, h, w]
        mean = torch.tensor(config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return self.vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]


_ARCH_CLASSES: dict[str, type[DiffusersBackbone]] = {
    "flux": FluxBackbone,
    "sd3": SD3Backbone,
    "qwen-image": QwenImageBackbone,
}

__all__ = [
    "ARCHS",
    "ArchDefaults",
    "DiffusersBackbone",
    "FluxBackbone",
    "SD3Backbone",
    "QwenImageBackbone",
    "fuse_lora",
    "pack_2x2",
    "unpack_2x2",
    "scheduler_shift",
    "parse_dtype",
    "realign_cpu_weights",
]
