"""What every backbone adapter (toy, FLUX, SD-3.5, Qwen-Image) offers the engine and the pipeline.

:class:`SamplingBackbone` holds the one sampling loop (:meth:`~SamplingBackbone.sample`): text ->
conditioning, per-seed noise, Euler steps of the (calibrated, ensembled, guided) velocity, decode.
An adapter supplies only what differs: how prompts are encoded, the noise's shape, how latents are
packed into tokens, the raw transformer call, the sigma shift and the decoder.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

if TYPE_CHECKING:
    from calibri_pipeline.method.ensemble import SearchSpace
    from calibri_pipeline.method.population import SamplingSettings
    from calibri_pipeline.method.space import CalibrationSpace
    from calibri_pipeline.prompts.base import Prompt

Conditioning = dict[str, torch.Tensor]


@runtime_checkable
class Backbone(Protocol):
    """A text-to-image DiT with a deterministic sampler that accepts per-image Calibri vectors.

    ``vectors`` is the Calibri search vector of each image: ``[N, space.search_size(n_models)]``
    (or one shared ``[search_size]``): ``n_models`` blocks of ``space.size`` coefficients followed by
    ``n_models`` ensemble weights (see :class:`calibri_pipeline.method.ensemble.EnsembleLayout`).
    ``vectors=None`` is the unmodified model. An image depends only on its (prompt, seed, vector),
    never on what else is in the batch, so a CMA-ES population runs as one batch: across batch
    compositions (batch mates, order, ``max_batch``) images are equal up to float rounding (CPU and
    GPU kernels pick their code path, and so their summation order, by batch shape), and the same
    call replayed gives bitwise identical images.
    """

    name: str
    transformer: torch.nn.Module
    uses_cfg: bool
    default_steps: int
    default_guidance: float | None

    def generate(
        self,
        prompts: Sequence[Prompt],
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        space: CalibrationSpace | None = None,
        vectors: torch.Tensor | None = None,
        n_models: int = 1,
        max_batch: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Return images ``[N, 3, H, W]`` float32 in ``[0, 1]`` on the CPU."""
        ...

    def sample(
        self,
        texts: Sequence[str],
        seeds: Sequence[int],
        settings: SamplingSettings,
        search: SearchSpace | None = None,
        vectors: torch.Tensor | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """:meth:`generate` for inputs already checked (vectors ``[N, D]`` from ``search.check``)."""
        ...

    def identity(self) -> dict[str, Any]:
        """What determines this backbone's images besides prompt, seed and vector (for image caches)."""
        ...


# --------------------------------------------------------------------------------------------
# Small shared helpers
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


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


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


class SamplingBackbone:
    """A backbone's sampler, written once: :meth:`generate` (checked, for people) over :meth:`sample`.

    Subclasses set ``name``, ``transformer``, ``uses_cfg``, ``default_steps``, ``default_guidance``,
    ``default_max_batch`` and implement the parts below :meth:`sample`.
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
        the schedule, see :class:`~calibri_pipeline.method.ensemble.SearchSpace`).
        """
        from calibri_pipeline.method.ensemble import SearchSpace
        from calibri_pipeline.method.population import SamplingSettings

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
        from calibri_pipeline.method.sampler import euler_sample, make_velocity_fn

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
    "SamplingBackbone",
    "Conditioning",
    "prompt_texts",
    "check_seeds",
    "positive_int",
    "seeded_noise",
]
