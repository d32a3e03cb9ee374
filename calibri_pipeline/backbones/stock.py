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

Not yet: FLUX ensembles of several conditional copies, CFG ensembles of more than two members, and
Qwen-Image (its pipeline calls the transformer twice per step and rescales the guided velocity to
the conditional one's norm); these raise NotImplementedError with the reason.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from calibri_pipeline.backbones.diffusers_dit import _ARCH_CLASSES, TRANSFORMER_ARCH
from calibri_pipeline.method.calibration import Calibration


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
        if arch == "qwen-image":
            raise NotImplementedError(
                "Qwen-Image: its pipeline runs the conditional and unconditional passes as two calls and rescales "
                "the guided velocity to the conditional one's norm; use DiffusersBackbone.generate for now"
            )
        self.pipe, self.transformer = pipe, transformer
        self.adapter = _ARCH_CLASSES[arch]
        self.search = calibration.search_space(transformer, cfg=self.adapter.uses_cfg)
        layout = self.search.layout
        if layout.mode == "ensemble" or layout.n_models > 2:
            raise NotImplementedError(
                f"a {layout.mode} calibration of {layout.n_models} models needs the batch repeated per member "
                "inside the transformer call; apply_calibration runs single models and the 2-member CFG ensemble"
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

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._scaled.close()  # a forward that raised left its coefficients on: take them off first
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        timestep = kwargs.get("timestep")
        if hidden is None or timestep is None:
            raise TypeError("apply_calibration reads hidden_states and timestep from the transformer's keywords")
        coefficients, weights = self.parts[self.search.segment_of(self.adapter.sigma_of_timestep(timestep))]
        coefficients, weights = coefficients[0], weights[0]  # [n_models, size], [n_models]
        n = hidden.shape[0]
        if self.search.layout.mode == "cfg":
            if n % 2:
                raise ValueError("the CFG ensemble needs the pipeline's CFG: call it with a guidance_scale > 1")
            g = float(self.pipe.guidance_scale)
            if g in (0.0, 1.0):
                raise ValueError(f"guidance_scale {g} cannot carry the ensemble's two weights: use another one")
            half = n // 2  # StableDiffusion3Pipeline stacks [unconditional, conditional]
            rows = torch.cat([coefficients[1].expand(half, -1), coefficients[0].expand(half, -1)])
            scales = torch.cat([(weights[1] / (1.0 - g)).expand(half), (weights[0] / g).expand(half)])
        else:
            rows = coefficients[0].expand(n, -1)
            scales = weights[0].expand(n)
        self._row_scales = None if bool((scales == 1).all()) else scales
        self._scaled.enter_context(self.search.space.scaled(module, rows.to(hidden.device, torch.float32)))

    def _after(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        self._scaled.close()
        if self._row_scales is None:
            return output
        first = output[0] if isinstance(output, tuple) else output.sample
        shape = (first.shape[0],) + (1,) * (first.ndim - 1)
        scaled = first * self._row_scales.to(first.device, first.dtype).reshape(shape)
        if isinstance(output, tuple):
            return (scaled, *output[1:])
        output.sample = scaled
        return output

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
    """Run ``calibration`` inside the stock ``pipe`` (FLUX / SD-3) with its one transformer.

    Use it as a context manager (``with apply_calibration(pipe, cal): pipe(...)``) or keep the handle
    and call ``.remove()``; either way the hooks are gone afterwards, also after an error.
    """
    return AppliedCalibration(pipe, calibration)


__all__ = ["AppliedCalibration", "apply_calibration"]
