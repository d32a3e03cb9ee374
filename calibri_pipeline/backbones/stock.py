"""A calibration inside a stock diffusers pipeline: ``with apply_calibration(pipe, calibration): pipe(...)``.

Two hooks on the pipeline's one transformer do what this project's sampler does:

- before each forward, the noise level is read from the ``timestep`` the pipeline passes (each
  architecture's convention: :meth:`DiffusersBackbone.sigma_of_timestep`), the part of a
  time-dependent calibration it falls in is picked, and every row of the batch gets its member's
  coefficients (the calibration space's hooks, per sample);
- after it, each row's output is scaled so the pipeline's own guidance mix becomes the calibration's
  ensemble weights: for the CFG ensemble in ``StableDiffusion3Pipeline``'s batched CFG (rows: the
  unconditional half, then the conditional half) the outputs are scaled by ``w_uncond / (1 - g)`` and
  ``w_cond / g``, so ``u + g (c - u)`` becomes ``w_uncond u + w_cond c`` for whatever guidance ``g``
  the call uses (``g`` = 0 or 1 cannot carry two weights: refused); a single model's weight scales
  every row.

For Qwen-Image, whose pipeline calls the transformer twice per step (conditional, then
unconditional) and rescales the guided velocity to the conditional one's norm, the conditional
call's output is held and overwritten in place by the unconditional call with the sampler's final
velocity, which the pipeline's mix and rescaling then leave as it is (see :meth:`_sequential_output`).

A FLUX ensemble of conditional copies runs as one batched call per step: the batch is repeated
per member (each with its coefficients) and the members' outputs are summed with their weights.
Not yet: CFG ensembles of more than two members (a third pass the stock pipelines do not make).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from calibri_pipeline.backbones.diffusers_dit import _ARCH_CLASSES, TRANSFORMER_ARCH, rescale_to_conditional_norm
from calibri_pipeline.method.calibration import Calibration
from calibri_pipeline.method.sampler import mix_passes

#: FluxTransformer2DModel's inputs with one row per sample (img_ids / txt_ids are per token, shared)
_PER_SAMPLE = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")


def _repeat(value: Any, k: int) -> Any:
    """A per-sample input repeated for ``k`` ensemble members (``[n, ...]`` -> ``[k n, ...]``)."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1:
        return value.repeat(k, *([1] * (value.ndim - 1)))
    return value


class AppliedCalibration:
    """The hooks of one calibration on one pipeline: a context manager, or call :meth:`remove`."""

    def __init__(self, pipe: Any, calibration: Calibration) -> None:
        transformer = getattr(pipe, "transformer", None)
        arch = TRANSFORMER_ARCH.get(type(transformer).__name__)
        if arch is None:
            raise TypeError(
                f"apply_calibration needs a FluxPipeline, StableDiffusion3Pipeline or QwenImagePipeline; "
                f"got {type(pipe).__name__} with transformer {type(transformer).__name__}"
            )
        self.pipe, self.transformer = pipe, transformer
        self.sequential = arch == "qwen-image"  # two transformer calls per step: conditional, then unconditional
        self._previous: tuple[float, str] | None = None  # (timestep, role) of the latest call
        self._cond: torch.Tensor | None = None  # the conditional call's output and what the pipeline holds of it
        self._held: torch.Tensor | None = None
        self.adapter = _ARCH_CLASSES[arch]
        self.search = calibration.search_space(transformer, cfg=self.adapter.uses_cfg)
        layout = self.search.layout
        if layout.mode == "cfg" and layout.n_models > 2:
            raise NotImplementedError(
                f"a CFG ensemble of {layout.n_models} members (extra conditional passes, as in skip-layer guidance) "
                "needs a third pass the stock pipelines do not make; apply_calibration runs 2 members"
            )
        vector = self.search.check(list(calibration.vector))[0]
        self.parts = [layout.split(self.search.segment(vector, j)) for j in range(self.search.n_segments)]
        self._scaled = ExitStack()
        self._row_scales: torch.Tensor | None = None
        self._handles = [
            transformer.register_forward_pre_hook(self._before, with_kwargs=True),
            transformer.register_forward_hook(self._after, with_kwargs=True),
        ]

    # -- the hooks ---------------------------------------------------------------------------

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._scaled.close()  # a forward that raised left its coefficients on: take them off first
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        timestep = kwargs.get("timestep")
        if hidden is None or timestep is None:
            raise TypeError("apply_calibration reads hidden_states and timestep from the transformer's keywords")
        sigma = self.adapter.sigma_of_timestep(timestep)
        coefficients, weights = self.parts[self.search.segment_of(sigma)]
        coefficients, weights = coefficients[0], weights[0]  # [n_models, size], [n_models]
        n = hidden.shape[0]
        self._weights, scales = weights, None
        if self.sequential:
            self._role = self._sequential_role(sigma)
            member = 1 if self._role == "uncond" and self.search.layout.mode == "cfg" else 0
            rows = coefficients[member].expand(n, -1)
        elif self.search.layout.mode == "cfg":
            if n % 2:
                raise ValueError("the CFG ensemble needs the pipeline's CFG: call it with a guidance_scale > 1")
            g = float(self.pipe.guidance_scale)
            if g in (0.0, 1.0):
                raise ValueError(f"guidance_scale {g} cannot carry the ensemble's two weights: use another one")
            half = n // 2  # StableDiffusion3Pipeline stacks [unconditional, conditional]
            rows = torch.cat([coefficients[1].expand(half, -1), coefficients[0].expand(half, -1)])
            scales = torch.cat([(weights[1] / (1.0 - g)).expand(half), (weights[0] / g).expand(half)])
        elif self.search.layout.mode == "ensemble":  # every member sees the prompt: one batch of k x n rows
            k = self.search.layout.n_models
            kwargs = {key: _repeat(value, k) if key in _PER_SAMPLE else value for key, value in kwargs.items()}
            rows = torch.cat([coefficients[m].expand(n, -1) for m in range(k)])
        else:
            rows = coefficients[0].expand(n, -1)
            scales = weights[0].expand(n)
        # per-row output factors (None: the rows stay as the transformer made them)
        self._row_scales = None if scales is None or bool((scales == 1).all()) else scales
        self._scaled.enter_context(self.search.space.scaled(module, rows.to(hidden.device, torch.float32)))
        return args, kwargs

    def _after(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        self._scaled.close()
        first = output[0] if isinstance(output, tuple) else output.sample
        if self.sequential:
            replaced = self._sequential_output(first)
        elif self.search.layout.mode == "ensemble":  # the members' outputs, weighted and summed as the sampler does
            k = self.search.layout.n_models
            n = first.shape[0] // k
            members = first.reshape(k, n, *first.shape[1:])
            replaced = mix_passes(members, [self._weights[m].expand(n) for m in range(k)])
        elif self._row_scales is None:
            return output
        else:
            shape = (first.shape[0],) + (1,) * (first.ndim - 1)
            replaced = first * self._row_scales.to(first.device, first.dtype).reshape(shape)
        if isinstance(output, tuple):
            return (replaced, *output[1:])
        output.sample = replaced
        return output

    # -- Qwen-Image: the conditional and unconditional passes are two calls --------------------

    def _sequential_role(self, sigma: float) -> str:
        """``cond`` for a step's first call, ``uncond`` for its second (QwenImagePipeline's order)."""
        role = "uncond" if self._previous == (sigma, "cond") else "cond"
        if role == "cond" and self._held is not None and self.search.layout.mode == "cfg":
            self._held = self._cond = None
            raise ValueError(
                "the CFG ensemble needs the pipeline's true CFG: call it with a negative_prompt and true_cfg_scale > 1"
            )
        self._previous = (sigma, role)
        return role

    def _sequential_output(self, out: torch.Tensor) -> torch.Tensor:
        """What each call returns so that QwenImagePipeline's own mix and rescaling give the sampler's velocity.

        The sampler's velocity is ``X * |c| / |X|`` per token, ``X = w_cond c + w_uncond u`` (``c``, ``u``: the
        two passes with their members' coefficients). The conditional call's output is held; the
        unconditional call computes ``Y = X |c| / |X|`` and writes it into the held tensor too, so the
        pipeline's ``u + g (c - u)`` is ``Y`` for any ``g`` and its rescaling ``|Y| / |Y|`` is 1.
        A single model (both passes with its coefficients, the pipeline's guidance) needs only its
        weight's sign: a positive factor cancels in the rescaling.
        """
        w = self._weights
        if self.search.layout.mode != "cfg":
            return out if float(w[0]) > 0 else -out
        if self._role == "cond":
            self._cond, self._held = out, out.clone()
            return self._held
        cond, held = self._cond, self._held
        self._cond = self._held = None
        rescaled = rescale_to_conditional_norm(float(w[0]) * cond + float(w[1]) * out, cond)
        held.copy_(rescaled)
        return rescaled

    # -- lifetime ----------------------------------------------------------------------------

    def remove(self) -> None:
        """Take every hook off the transformer (idempotent)."""
        self._scaled.close()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> AppliedCalibration:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def apply_calibration(pipe: Any, calibration: Calibration) -> AppliedCalibration:
    """Run ``calibration`` inside the stock ``pipe`` (FLUX, SD-3, Qwen-Image) with its one transformer.

    Use it as a context manager (``with apply_calibration(pipe, cal): pipe(...)``) or keep the handle
    and call ``.remove()``; either way the hooks are gone afterwards, also after an error.
    """
    return AppliedCalibration(pipe, calibration)


__all__ = ["AppliedCalibration", "apply_calibration"]
