"""Sampling: the one loop every backbone runs, with calibrated (and ensembled) denoisers.

Convention (as in FLUX / SD3): ``x_sigma = (1 - sigma) * x0 + sigma * noise`` with sigma going from
1 (pure noise) to 0 (image); the model predicts the velocity ``v = noise - x0``; an Euler step is
``x <- x + (sigma_next - sigma) * v``. Small pure functions over tensors; the backbone supplies
``model_fn`` (the raw transformer call with its own packing and conditioning).

:class:`Backbone` holds the loop (:meth:`Backbone.sample`): text -> conditioning, per-seed noise, Euler
steps of the (calibrated, ensembled, guided) velocity, decode. An adapter in
``calibri_pipeline.backbones`` supplies only what differs between architectures (encode, noise
shape, packing, the raw transformer call, the sigma shift, the decoder) and imports this module;
nothing here imports an adapter. :class:`SamplingSettings` says how images are sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from calibri_pipeline.arguments import positive_int
from calibri_pipeline.method.space import SearchSpace

if TYPE_CHECKING:
    from calibri_pipeline.method.space import CalibrationSpace
    from calibri_pipeline.prompts.base import Prompt

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
Conditioning = dict[str, torch.Tensor]


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` noise levels from 1 to 0; ``shift > 1`` spends more steps at high noise (SD3)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift != 1.0:
        sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    return sigmas.to(torch.float32)


@torch.no_grad()
def euler_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    steps: int,
    shift: float = 1.0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` (sigma = 1) to an image (sigma = 0) in ``steps`` Euler steps."""
    sigmas = flow_sigmas(steps, shift).to(noise.device)
    x = noise
    for i in range(steps):
        sigma = sigmas[i].expand(x.shape[0]).to(x.dtype)
        v = velocity_fn(x, sigma)
        x = x + (sigmas[i + 1] - sigmas[i]).to(x.dtype) * v
        if callback is not None:
            callback(i, x)
    return x


def _expand_batch(cond: Mapping[str, torch.Tensor], n: int, what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in cond.items():
        if value.shape[0] == n:
            out[key] = value
        elif value.shape[0] == 1:
            out[key] = value.expand(n, *value.shape[1:])
        else:
            raise ValueError(f"{what}[{key!r}] has batch {value.shape[0]}, expected {n} or 1")
    return out


def make_velocity_fn(
    model_fn: ModelFn,
    cond: Mapping[str, torch.Tensor],
    uncond: Mapping[str, torch.Tensor] | None = None,
    guidance: float | None = None,
    *,
    search: SearchSpace | None = None,
    transformer: torch.nn.Module | None = None,
    vectors: torch.Tensor | None = None,
) -> VelocityFn:
    """The velocity of a (calibrated, ensembled, guided) denoiser as one batched transformer call.

    ``vectors=None`` is the unmodified model (standard CFG with ``guidance`` when ``uncond`` is
    given). Otherwise ``vectors`` holds each image's Calibri vector in ``search``'s layout (``[N, D]``,
    or one ``[D]`` shared by the batch), already checked by :meth:`SearchSpace.check`; every pass of
    every image goes through the transformer in a single forward with per-sample coefficients, so a
    whole CMA-ES population costs one batch.
    """
    if uncond is not None and guidance is None:
        raise ValueError("classifier-free guidance needs a guidance scale")
    if vectors is not None:
        if search is None or transformer is None:
            raise ValueError("calibrated sampling needs the vectors' search space and the transformer")
        if search.layout.cfg != (uncond is not None):
            raise ValueError(
                f"the search space was laid out {'with' if search.layout.cfg else 'without'} classifier-free "
                f"guidance, but the sampler {'has' if uncond is not None else 'has no'} unconditional input"
            )
    layout = search.layout if search is not None else None

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        conds = {"cond": _expand_batch(cond, n, "cond")}
        if uncond is not None:
            conds["uncond"] = _expand_batch(uncond, n, "uncond")

        if vectors is None:
            if uncond is None:
                return model_fn(x, sigma, conds["cond"])
            both = {k: torch.cat([conds["cond"][k], conds["uncond"][k]]) for k in conds["cond"]}
            v = model_fn(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
            v_cond, v_uncond = v.chunk(2)
            # written as the ensemble's weighted sum, so x0 of a search reproduces it bit for bit
            return guidance * v_cond + (1.0 - guidance) * v_uncond

        vec = vectors.to(device=x.device, dtype=torch.float32)
        if vec.ndim == 1:
            vec = vec.unsqueeze(0).expand(n, -1)
        if vec.shape[0] != n:
            raise ValueError(f"got {vec.shape[0]} Calibri vectors for a batch of {n} images")
        if search.n_segments > 1:  # time-dependent: the part of the schedule this step's noise level is in
            vec = search.segment(vec, search.segment_of(float(sigma[0])))
        passes = layout.passes(vec, guidance)
        batch_cond = {key: torch.cat([conds[kind][key] for kind, _, _ in passes]) for key in conds["cond"]}
        coefficients = torch.cat([c for _, c, _ in passes])
        k = len(passes)
        with search.space.scaled(transformer, coefficients):
            v_all = model_fn(x.repeat(k, *([1] * (x.ndim - 1))), sigma.repeat(k), batch_cond)
        return mix_passes(v_all.reshape(k, n, *x.shape[1:]), [weight for _, _, weight in passes])

    return velocity


def mix_passes(outputs: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ensemble's velocity: ``sum_j weights[j] * outputs[j]`` for outputs ``[k, n, ...]`` and per-image
    weights ``[n]`` each, summed in pass order (the stock-pipeline hook sums in the same order)."""
    shape = (outputs.shape[1],) + (1,) * (outputs.ndim - 2)
    out = torch.zeros_like(outputs[0])
    for j, weight in enumerate(weights):
        out = out + weight.to(outputs.dtype).reshape(shape) * outputs[j]
    return out


# --------------------------------------------------------------------------------------------
# How images are sampled
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingSettings:
    """How images are sampled: ``steps``, ``guidance`` and the sigma ``shift`` of the flow schedule
    (None: the backbone's defaults), and batching.

    ``max_batch`` images per transformer forward (None: derived from ``memory_budget_mb`` when given,
    else the backbone's default); ``chunk_images`` caps how many images are held in memory at once
    (generate + score chunk by chunk; None: all at once).
    """

    steps: int | None = None
    guidance: float | None = None
    max_batch: int | None = None
    memory_budget_mb: float | None = None
    chunk_images: int | None = None
    shift: float | None = None  # flow_sigmas' shift (> 1: more of the steps at high noise)

    def __post_init__(self) -> None:
        positive_int("steps", self.steps, allow_none=True)
        positive_int("max_batch", self.max_batch, allow_none=True)
        positive_int("chunk_images", self.chunk_images, allow_none=True)
        if self.guidance is not None and not math.isfinite(float(self.guidance)):
            raise ValueError(f"guidance must be a finite number or None, got {self.guidance!r}")
        if self.shift is not None and not (math.isfinite(float(self.shift)) and float(self.shift) > 0):
            raise ValueError(f"shift must be a finite number > 0 or None, got {self.shift!r}")
        if self.memory_budget_mb is not None and not (self.memory_budget_mb > 0):
            raise ValueError(f"memory_budget_mb must be > 0, got {self.memory_budget_mb!r}")

    def resolved(self, backbone: Backbone) -> SamplingSettings:
        """Steps, guidance and shift filled in from the backbone's defaults."""
        return replace(
            self,
            steps=self.steps if self.steps is not None else backbone.default_steps,
            guidance=self.guidance if self.guidance is not None else backbone.default_guidance,
            shift=float(self.shift) if self.shift is not None else backbone_shift(backbone),
        )

    def with_(self, **changes: Any) -> SamplingSettings:
        return replace(self, **changes)


def backbone_shift(backbone: Backbone) -> float:
    """The sigma shift a backbone samples with by default (1: none)."""
    shift = getattr(backbone, "sigma_shift", None)
    return float(shift()) if callable(shift) else 1.0


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def prompt_texts(prompts: Sequence[Prompt | str]) -> list[str]:
    """The texts of Prompt records (or strings); a clear error for anything else."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of Prompt records (or strings), not a single string")
    texts = []
    for p in prompts:
        if isinstance(p, str):
            texts.append(p)
        elif isinstance(getattr(p, "text", None), str):
            texts.append(p.text)
        else:
            raise TypeError(f"each prompt must be a Prompt or a str, got {type(p).__name__}")
    return texts


def check_seeds(seeds: Sequence[int], n: int) -> list[int]:
    """One int seed in ``[0, 2**63)`` per prompt."""
    seeds = list(seeds)
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts: pass one seed per prompt")
    out = []
    for s in seeds:
        if isinstance(s, bool) or not hasattr(s, "__index__"):
            raise TypeError(f"seeds must be ints, got {s!r}")
        s = int(s)
        if not 0 <= s < 2**63:
            raise ValueError(f"seeds must be in [0, 2**63), got {s}")
        out.append(s)
    return out


def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """``[N, *shape]`` float32 standard normal, each row from its own CPU generator seeded with its seed.

    Drawn on the CPU and only then moved, so an image never depends on its batch mates or the device.
    """
    out = torch.empty(len(seeds), *shape)
    for i, seed in enumerate(seeds):
        out[i] = torch.randn(*shape, generator=torch.Generator().manual_seed(int(seed)))
    return out


# --------------------------------------------------------------------------------------------
# The one sampling loop
# --------------------------------------------------------------------------------------------


class Backbone:
    """A text-to-image DiT with a deterministic sampler that accepts per-image Calibri vectors.

    ``vectors`` is the Calibri search vector of each image: ``[N, space.search_size(n_models)]``
    (or one shared ``[search_size]``): ``n_models`` blocks of ``space.size`` coefficients followed by
    ``n_models`` ensemble weights (see :class:`calibri_pipeline.method.ensemble.EnsembleLayout`).
    ``vectors=None`` is the unmodified model. An image depends only on its (prompt, seed, vector),
    never on what else is in the batch, so a CMA-ES population runs as one batch: across batch
    compositions (batch mates, order, ``max_batch``) images are equal up to float rounding (CPU and
    GPU kernels pick their code path, and so their summation order, by batch shape), and the same
    call replayed gives bitwise identical images.

    The sampler is written once, here: :meth:`generate` (checked, for people) over :meth:`sample` (the
    loop, for the engine). An adapter (``calibri_pipeline.backbones``) sets ``name``, ``transformer``,
    ``uses_cfg``, ``default_steps``, ``default_guidance``, ``default_max_batch`` and implements the
    parts below :meth:`sample`: encode, noise, pack, the model call, decode.
    """

    name: str
    transformer: torch.nn.Module
    uses_cfg: bool
    default_steps: int
    default_guidance: float | None
    default_max_batch: int

    # -- for people ------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Prompt | str],
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        space: CalibrationSpace | None = None,
        vectors: torch.Tensor | None = None,
        n_models: int = 1,
        max_batch: int | None = None,
        progress: bool = False,
        segments: Sequence[float] = (),
    ) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` float32 in ``[0, 1]`` on the CPU (see the Backbone protocol).

        ``segments``: the noise levels of a time-dependent vector (one part of the vector per part of
        the schedule, see :class:`~calibri_pipeline.method.space.SearchSpace`).
        """
        texts = prompt_texts(prompts)
        seeds = check_seeds(seeds, len(texts))
        steps = self.default_steps if steps is None else steps
        positive_int("steps", steps)
        guidance = self.default_guidance if guidance is None else guidance
        if guidance is None or not math.isfinite(float(guidance)):
            raise ValueError(f"guidance must be a finite float, got {guidance!r}")
        positive_int("max_batch", self.default_max_batch if max_batch is None else max_batch)
        search = checked = None
        if vectors is not None:
            if space is None:
                raise ValueError("calibrated generation needs `space` (the CalibrationSpace the vectors index)")
            search = SearchSpace.for_model(space, n_models, uses_cfg=self.uses_cfg, segments=segments)
            checked = search.check(vectors, len(texts))
        settings = SamplingSettings(steps=steps, guidance=float(guidance), max_batch=max_batch)
        bar = None
        if progress and texts:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc=f"{self.name} {steps} steps", unit="img")
        try:
            return self.sample(texts, seeds, settings, search, checked, progress=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()

    # -- for the engine --------------------------------------------------------------------------

    def sample(
        self,
        texts: Sequence[str],
        seeds: Sequence[int],
        settings: SamplingSettings,
        search: SearchSpace | None = None,
        vectors: torch.Tensor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """The sampling loop, for checked inputs: ``vectors [N, D]`` from ``search.check`` (or None).

        Micro-batches of ``max_batch`` images: encode, draw each image's noise from its seed, integrate
        the velocity with Euler steps, decode; ``progress(k)`` after every micro-batch of ``k`` images.
        """
        settings = settings.resolved(self)
        n = len(texts)
        if n == 0:
            return torch.zeros(0, *self.image_shape())
        max_batch = settings.max_batch or self.default_max_batch
        guidance = float(settings.guidance) if settings.guidance is not None else None
        noise = self.initial_noise(seeds)
        shift = settings.shift
        self.prepare_texts(texts)
        out = torch.empty(n, *self.image_shape())
        for start in range(0, n, max_batch):
            stop = min(start + max_batch, n)
            cond, uncond = self.conditioning(texts[start:stop])
            velocity = make_velocity_fn(
                lambda x, sigma, c: self.model_fn(x, sigma, c, guidance=guidance),
                cond,
                uncond,
                guidance if self.uses_cfg else None,
                search=search if vectors is not None else None,
                transformer=self.transformer if vectors is not None else None,
                vectors=vectors[start:stop] if vectors is not None else None,
            )
            velocity = self.wrap_velocity(velocity)
            with torch.no_grad():
                x = euler_sample(velocity, self.pack(noise[start:stop].to(self.device)), settings.steps, shift=shift)
                out[start:stop] = self.decode_images(self.unpack(x))
            if progress is not None:
                progress(stop - start)
        return out

    # -- what an adapter supplies ----------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def image_shape(self) -> tuple[int, int, int]:
        """``(3, H, W)`` of the images :meth:`sample` returns."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What determines this backbone's images besides prompt, seed and vector (see the protocol)."""
        raise NotImplementedError

    def prepare_texts(self, texts: Sequence[str]) -> None:
        """Called once per :meth:`sample` with all its texts (e.g. to encode them in one pass)."""

    def conditioning(self, texts: Sequence[str]) -> tuple[Conditioning, Conditioning | None]:
        """``cond`` for ``texts`` (batched, on the model's device) and ``uncond`` (batch 1; None without CFG)."""
        raise NotImplementedError

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Unpacked noise ``[N, ...]``, one float32 CPU draw per seed (:func:`seeded_noise`)."""
        raise NotImplementedError

    def pack(self, noise: torch.Tensor) -> torch.Tensor:
        """Unpacked noise/latents -> the state the transformer integrates (default: as they are)."""
        return noise

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack`."""
        return x

    def model_fn(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor], *, guidance: float | None
    ) -> torch.Tensor:
        """The raw transformer velocity of state ``x`` at noise levels ``sigma`` ``[M]``."""
        raise NotImplementedError

    def sigma_shift(self) -> float:
        """The SD3-style shift of the sampling schedule (1: none)."""
        return 1.0

    def wrap_velocity(self, velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        """A hook around the mixed velocity (Qwen-Image rescales it); default: unchanged."""
        return velocity

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked final latents -> images ``[N, 3, H, W]`` float32 in ``[0, 1]`` on the CPU."""
        raise NotImplementedError


__all__ = [
    "Backbone",
    "Conditioning",
    "SamplingSettings",
    "backbone_shift",
    "check_seeds",
    "euler_sample",
    "flow_sigmas",
    "make_velocity_fn",
    "mix_passes",
    "prompt_texts",
    "seeded_noise",
]
