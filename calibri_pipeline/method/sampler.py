"""Rectified-flow Euler sampling with calibrated (and ensembled) denoisers.

Convention (as in FLUX / SD3): ``x_sigma = (1 - sigma) * x0 + sigma * noise`` with sigma going from
1 (pure noise) to 0 (image); the model predicts the velocity ``v = noise - x0``; an Euler step is
``x <- x + (sigma_next - sigma) * v``. Small pure functions over tensors; the backbone supplies
``model_fn`` (the raw transformer call with its own packing and conditioning).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from calibri_pipeline.method.ensemble import SearchSpace

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


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
        v_all = v_all.reshape(k, n, *x.shape[1:])
        shape = (n,) + (1,) * (x.ndim - 1)
        out = torch.zeros_like(x)
        for j, (_, _, weight) in enumerate(passes):
            out = out + weight.to(x.dtype).reshape(shape) * v_all[j]
        return out

    return velocity
