"""The embedded default backbone: a tiny FLUX-class pixel-space DiT conditioned on frozen MiniLM.

The transformer is a stock diffusers :class:`~diffusers.FluxTransformer2DModel` (double-stream and
single-stream blocks like FLUX.1-dev), so every calibration code path that runs on FLUX runs here too.
It works directly on pixels (no VAE exists offline): a ``3 x 32 x 32`` image in ``[-1, 1]`` is cut into
``2 x 2`` patches, giving 256 image tokens of 12 channels. Text comes in as MiniLM per-token states
(``joint_attention_dim = 384``) and their masked mean (``pooled_projection_dim = 384``); there is no
guidance embedding, so classifier-free guidance is real two-pass CFG with the empty prompt.

The trained checkpoint ships in ``calibri_pipeline/backbones/toy_weights/`` (``config.json``,
``model.safetensors`` with the EMA weights, ``training_metrics.json``); :func:`load_toy_backbone` only
loads it, it never trains (``calibri train-toy`` does).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from calibri_pipeline.arguments import positive_int
from calibri_pipeline.method.sampler import Backbone, seeded_noise
from calibri_pipeline.tensors import weights_fingerprint

if TYPE_CHECKING:
    from calibri_pipeline.text_encoder import MiniLMTextEncoder

WEIGHTS_PACKAGE = "calibri_pipeline.backbones"
WEIGHTS_DIR_NAME = "toy_weights"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "training_metrics.json"
TEXT_DIM = 384  # MiniLM-L6 hidden size


@dataclass(frozen=True)
class ToyModelConfig:
    """Architecture of the toy DiT; everything else (diffusers' config) is derived from it."""

    image_size: int = 32
    patch_size: int = 2
    num_double_blocks: int = 4
    num_single_blocks: int = 4
    num_heads: int = 4
    head_dim: int = 32
    text_max_length: int = 32

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"ToyModelConfig.{f.name} must be an int, got {value!r}")
        if self.image_size < 2 or self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a positive multiple of patch_size ({self.patch_size})"
            )
        if (
            self.num_double_blocks < 0
            or self.num_single_blocks < 0
            or self.num_double_blocks + self.num_single_blocks < 1
        ):
            raise ValueError("the toy DiT needs at least one block (num_double_blocks + num_single_blocks >= 1)")
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.head_dim < 8 or self.head_dim % 4:
            raise ValueError(f"head_dim must be a multiple of 4 and >= 8 (rotary axes), got {self.head_dim}")
        if self.text_max_length < 2:
            raise ValueError(f"text_max_length must be >= 2, got {self.text_max_length}")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def grid(self) -> int:
        """Image tokens per side."""
        return self.image_size // self.patch_size

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Rotary dims per id axis (unused 0th axis, row, column); even and summing to head_dim."""
        first = 4 if self.head_dim >= 16 else 2
        rest = self.head_dim - first
        row = (rest // 2) - ((rest // 2) % 2)
        return (first, row, rest - row)

    def diffusers_config(self) -> dict[str, Any]:
        return {
            "patch_size": 1,  # patching is done by us (pack_pixels), exactly like FLUX packs latents
            "in_channels": 3 * self.patch_size * self.patch_size,
            "out_channels": None,
            "num_layers": self.num_double_blocks,
            "num_single_layers": self.num_single_blocks,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": TEXT_DIM,
            "pooled_projection_dim": TEXT_DIM,
            "guidance_embeds": False,
            "axes_dims_rope": list(self.rope_axes),
        }

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToyModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ToyModelConfig keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**dict(data))


def build_toy_transformer(config: ToyModelConfig, *, zero_init: bool = True) -> torch.nn.Module:
    """A freshly initialised FluxTransformer2DModel for ``config``.

    ``zero_init`` zeroes the output of every adaLN modulation linear and the final projection (the DiT
    trick): each residual branch starts closed and the model starts predicting zero velocity, which
    trains faster and more stably than the default init.
    """
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_config(config.diffusers_config())
    if zero_init:
        with torch.no_grad():
            for block in model.transformer_blocks:
                for lin in (block.norm1.linear, block.norm1_context.linear):
                    lin.weight.zero_()
                    lin.bias.zero_()
            for block in model.single_transformer_blocks:
                block.norm.linear.weight.zero_()
                block.norm.linear.bias.zero_()
            model.norm_out.linear.weight.zero_()
            model.norm_out.linear.bias.zero_()
            model.proj_out.weight.zero_()
            model.proj_out.bias.zero_()
    return model


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- pixels <-> tokens


def pack_pixels(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, (H/p)(W/p), C p p]`` (row-major patches, FLUX's latent packing)."""
    n, c, h, w = images.shape
    p = patch_size
    x = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpack_pixels(tokens: torch.Tensor, image_size: int, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`pack_pixels`."""
    n = tokens.shape[0]
    p, g = patch_size, image_size // patch_size
    x = tokens.reshape(n, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels, image_size, image_size)


def image_ids(grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rotary position ids ``[grid*grid, 3]``: (0, row, column), as FLUX's ``_prepare_latent_image_ids``."""
    ids = torch.zeros(grid, grid, 3)
    ids[..., 1] = torch.arange(grid)[:, None]
    ids[..., 2] = torch.arange(grid)[None, :]
    return ids.reshape(grid * grid, 3).to(device)


def text_ids(length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Text tokens all sit at position (0, 0, 0), as in FLUX."""
    return torch.zeros(length, 3, device=device)


def toy_forward(
    transformer: torch.nn.Module,
    config: ToyModelConfig,
    x: torch.Tensor,
    sigma: torch.Tensor,
    text_states: torch.Tensor,
    text_pooled: torch.Tensor,
) -> torch.Tensor:
    """Velocity ``[N, 3, H, W]`` for pixels ``x`` at noise level ``sigma`` (``[N]``, in [0, 1])."""
    dtype = next(transformer.parameters()).dtype
    device = x.device
    out = transformer(
        hidden_states=pack_pixels(x, config.patch_size).to(dtype),
        encoder_hidden_states=text_states.to(device=device, dtype=dtype),
        pooled_projections=text_pooled.to(device=device, dtype=dtype),
        timestep=sigma.to(device=device, dtype=dtype),  # FLUX multiplies by 1000 itself
        img_ids=image_ids(config.grid, device).to(dtype),
        txt_ids=text_ids(text_states.shape[1], device).to(dtype),
        return_dict=False,
    )[0]
    return unpack_pixels(out, config.image_size, config.patch_size).to(x.dtype)


# --------------------------------------------------------------------------- the backbone


@dataclass(frozen=True)
class ToySamplingDefaults:
    steps: int = 30
    guidance: float = 3.5
    shift: float = 1.0


class ToyBackbone(Backbone):
    """The embedded default: the parts of :class:`~calibri_pipeline.method.sampler.Backbone`."""

    name = "toy"
    uses_cfg = True

    def __init__(
        self,
        transformer: torch.nn.Module,
        config: ToyModelConfig,
        text_encoder: MiniLMTextEncoder | None = None,
        *,
        default_steps: int = 30,
        default_guidance: float = 3.5,
        shift: float = 1.0,
        default_max_batch: int = 32,
        device: torch.device | str = "cpu",
    ) -> None:
        positive_int("default_steps", default_steps)
        self.transformer = transformer.to(torch.device(device)).eval()
        self.transformer.requires_grad_(False)
        self.config = config
        self.default_steps = default_steps
        self.default_guidance = float(default_guidance)
        self.shift = float(shift)
        self.default_max_batch = int(default_max_batch)
        self._text_encoder = text_encoder
        self.image_size = config.image_size
        self._fingerprint: str | None = None

    @property
    def text_encoder(self) -> MiniLMTextEncoder:
        if self._text_encoder is None:
            from calibri_pipeline.text_encoder import MiniLMTextEncoder

            self._text_encoder = MiniLMTextEncoder(max_length=self.config.text_max_length)
        return self._text_encoder

    def identity(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.transformer)
        return {
            "kind": "toy",
            "config": self.config.to_dict(),
            "weights": self._fingerprint,
            "text_encoder": self.text_encoder.identity(),
            "dtype": str(self.dtype),
            "device": self.device.type,
            "shift": self.shift,
        }

    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.config.image_size, self.config.image_size)

    def model_fn(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor], *, guidance: float | None = None
    ) -> torch.Tensor:
        """The raw transformer call (guidance is real two-pass CFG here, not an input)."""
        return toy_forward(self.transformer, self.config, x, sigma, cond["states"], cond["pooled"])

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        emb = self.text_encoder.encode(texts, device=self.device)
        return {"states": emb.states, "pooled": emb.pooled}

    def prepare_texts(self, texts: Sequence[str]) -> None:
        self.text_encoder.precompute(dict.fromkeys(list(texts) + [""]))

    def conditioning(self, texts: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return self.encode(texts), self.encode([""])

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """One ``[3, H, W]`` standard normal draw per seed, each from its own generator (CPU, float32)."""
        return seeded_noise(seeds, self.image_shape())

    def sigma_shift(self) -> float:
        return self.shift

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- checkpoint I/O


def default_weights_dir() -> Path:
    """The checkpoint directory shipped inside the installed package."""
    from importlib import resources

    return Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(WEIGHTS_DIR_NAME)))


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"toy checkpoint config {cfg_file} is missing; a toy checkpoint directory holds {CONFIG_FILE}, "
            f"{WEIGHTS_FILE} and {METRICS_FILE} (train one with `calibri train-toy --out DIR`)"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"toy checkpoint config {cfg_file} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ValueError(f"toy checkpoint config {cfg_file} has no 'model' section")
    return cfg


def load_toy_backbone(
    path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder: MiniLMTextEncoder | None = None,
) -> ToyBackbone:
    """Load a trained toy checkpoint (default: the one shipped in the package). Never trains."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = default_weights_dir() if path is None else Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"toy checkpoint directory {path} does not exist")
    cfg = read_checkpoint_config(path)
    config = ToyModelConfig.from_dict(cfg["model"])
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"toy checkpoint weights {weights_file} are missing")
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"toy checkpoint weights {weights_file} are corrupt or unreadable: {exc}") from exc
    transformer = build_toy_transformer(config, zero_init=False)
    try:
        transformer.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"toy checkpoint weights {weights_file} do not match its config.json: {exc}") from exc
    transformer.to(device=device)
    if dtype != torch.float32:
        transformer.to(dtype=dtype)
    sampling = cfg.get("sampling", {})
    return ToyBackbone(
        transformer,
        config,
        text_encoder,
        default_steps=int(sampling.get("default_steps", ToySamplingDefaults.steps)),
        default_guidance=float(sampling.get("default_guidance", ToySamplingDefaults.guidance)),
        shift=float(sampling.get("shift", ToySamplingDefaults.shift)),
        device=device,
    )
