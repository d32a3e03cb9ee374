"""Calibri Ensemble (paper §3.4): n calibrated copies of one denoiser mixed with learned weights.

A Calibri *search vector* holds ``n_models`` blocks of ``size`` coefficients followed by
``n_models`` ensemble weights::

    [c_1 (size) | c_2 (size) | ... | c_n (size) | w_1 ... w_n]        len = n * size + n

How the members are run depends on the backbone:

- ``"single"`` (n = 1): one member. If the model uses classifier-free guidance, the member *is* the
  guided denoiser: conditional and unconditional passes share ``c_1`` and are mixed with the
  pipeline's fixed guidance ``g``; ``w_1`` scales the result (x0: 1).
- ``"cfg"`` (n >= 2 on a CFG model): the paper's CFG case. Member 1 is the conditional pass with
  ``c_1``, member 2 the unconditional pass with ``c_2``; the weights replace the guidance mix
  (x0: ``g`` and ``1 - g``, which is exactly standard CFG). Members 3.. are further conditional
  passes with their own coefficients, starting at weight 0: skip-layer guidance is the point
  ``c_3`` = 0 on the skipped blocks with weights ``g + s, 1 - g, -s``.
- ``"ensemble"`` (n >= 2 on a model without CFG, e.g. guidance-distilled FLUX): every member sees
  the prompt, each with its own coefficients (x0: ``1/n`` each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

MODES = ("single", "cfg", "ensemble")


@dataclass(frozen=True)
class EnsembleLayout:
    size: int
    n_models: int = 1
    cfg: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        if not isinstance(self.n_models, int) or self.n_models < 1:
            raise ValueError(f"n_models must be a positive int, got {self.n_models!r}")

    @property
    def mode(self) -> str:
        if self.n_models == 1:
            return "single"
        return "cfg" if self.cfg else "ensemble"

    def member_kinds(self) -> list[str]:
        """The conditioning of each member's pass (``cond`` / ``uncond``; a guided single model: ``guided``)."""
        if self.mode == "single":
            return ["guided" if self.cfg else "cond"]
        if self.mode == "cfg":
            return ["cond", "uncond"] + ["cond"] * (self.n_models - 2)
        return ["cond"] * self.n_models

    @property
    def search_size(self) -> int:
        return self.n_models * self.size + self.n_models

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [P, search_size]`` (or ``[search_size]``) -> coefficients ``[P, n, size]``, weights ``[P, n]``."""
        x = torch.as_tensor(x)
        if x.ndim == 1:
            x = x.unsqueeze(0)
        if x.ndim != 2 or x.shape[1] != self.search_size:
            raise ValueError(
                f"Calibri vectors must have shape [P, {self.search_size}] "
                f"({self.n_models} x {self.size} coefficients + {self.n_models} weights), got {tuple(x.shape)}"
            )
        n, s = self.n_models, self.size
        return x[:, : n * s].reshape(-1, n, s), x[:, n * s :]

    def join(self, coefficients: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split` for a single vector: ``[n, size]`` + ``[n]`` -> ``[search_size]``."""
        coefficients = torch.as_tensor(coefficients, dtype=torch.float64).reshape(self.n_models, self.size)
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(self.n_models)
        return torch.cat([coefficients.reshape(-1), weights])

    def initial_weights(self, guidance: float | None = None) -> list[float]:
        if self.mode == "single":
            return [1.0]
        if self.mode == "cfg":
            if guidance is None:
                raise ValueError("the CFG ensemble starts from the pipeline's guidance g: pass guidance")
            return [float(guidance), 1.0 - float(guidance)] + [0.0] * (self.n_models - 2)
        return [1.0 / self.n_models] * self.n_models

    def initial(self, guidance: float | None = None) -> torch.Tensor:
        """x0 of the search: all-ones coefficients and the weights that reproduce the base model."""
        return self.join(torch.ones(self.n_models, self.size), torch.tensor(self.initial_weights(guidance)))

    def bounds(
        self,
        coefficient_bounds: Sequence[float] = (-1.0, 2.0),
        weight_bounds: Sequence[float] = (-10.0, 10.0),
    ) -> tuple[list[float], list[float]]:
        """Per-coordinate lower and upper bounds, in the vector's layout."""
        (cl, cu), (wl, wu) = coefficient_bounds, weight_bounds
        if not (cl < cu and wl < wu):
            raise ValueError(f"bounds must be (low, high) with low < high, got {coefficient_bounds}, {weight_bounds}")
        n_coef = self.n_models * self.size
        lower = [float(cl)] * n_coef + [float(wl)] * self.n_models
        upper = [float(cu)] * n_coef + [float(wu)] * self.n_models
        return lower, upper

    def names(self, coefficient_names: Sequence[str]) -> list[str]:
        """Human-readable name of every coordinate of the search vector."""
        if len(coefficient_names) != self.size:
            raise ValueError(f"expected {self.size} coefficient names, got {len(coefficient_names)}")
        out = [f"model{m}/{name}" for m in range(self.n_models) for name in coefficient_names]
        return out + [f"weight{m}" for m in range(self.n_models)]

    def passes(self, vectors: torch.Tensor, guidance: float | None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """The denoiser passes one step needs: ``(conditioning, coefficients [N, size], mix weight [N])``.

        ``conditioning`` is ``"cond"`` or ``"uncond"``; the velocity is the weighted sum of the passes.
        """
        coefficients, weights = self.split(vectors)
        if self.mode == "single":
            if self.cfg:
                if guidance is None:
                    raise ValueError("a guided single model needs the guidance scale")
                w = weights[:, 0]
                return [
                    ("cond", coefficients[:, 0], w * guidance),
                    ("uncond", coefficients[:, 0], w * (1.0 - guidance)),
                ]
            return [("cond", coefficients[:, 0], weights[:, 0])]
        if self.mode == "cfg":
            kinds = ["cond", "uncond"] + ["cond"] * (self.n_models - 2)
            return [(kind, coefficients[:, m], weights[:, m]) for m, kind in enumerate(kinds)]
        return [("cond", coefficients[:, m], weights[:, m]) for m in range(self.n_models)]


class GuidanceCoordinates:
    """Search coordinates for the CFG ensemble: its weight pair as guidance x overall scale.

    The paper's layout stores ``w_cond, w_uncond`` (x0: ``g, 1 - g``). A guidance change moves both
    weights together while keeping their sum, so independent steps on the two mostly change the
    overall scale of the velocity, which a few-step sampler punishes. The search therefore moves
    ``g = w_cond / (w_cond + w_uncond)`` and ``s = w_cond + w_uncond`` instead (x0: ``g``, 1), and
    every vector it hands out or stores is in the paper's layout (:meth:`decode`).
    """

    def __init__(self, layout: EnsembleLayout, n_segments: int = 1) -> None:
        if layout.mode != "cfg":
            raise ValueError(f"guidance coordinates need the CFG ensemble layout, got mode {layout.mode!r}")
        self.layout = layout
        self.n_segments = int(n_segments)
        self._d = layout.search_size
        # where w_cond sits in each part of the schedule; w_uncond follows
        self._w = [j * self._d + layout.n_models * layout.size for j in range(self.n_segments)]

    def encode(self, vector: Sequence[float]) -> list[float]:
        x = [float(v) for v in vector]
        for w in self._w:
            total = x[w] + x[w + 1]
            if total == 0:
                raise ValueError("the CFG weights sum to 0: guidance x scale coordinates are undefined there")
            x[w], x[w + 1] = x[w] / total, total
        return x

    def decode(self, point: Sequence[float]) -> list[float]:
        z = [float(v) for v in point]
        for w in self._w:
            g, scale = z[w], z[w + 1]
            z[w], z[w + 1] = scale * g, scale * (1.0 - g)
        return z

    def names(self, coefficient_names: Sequence[str]) -> list[str]:
        per = self.layout.names(coefficient_names)
        w = self.layout.n_models * self.layout.size
        per = per[:w] + ["guidance", "scale"] + per[w + 2 :]
        if self.n_segments == 1:
            return per
        return [f"t{j}/{n}" for j in range(self.n_segments) for n in per]

    #: the search keeps the overall scale within these (a few-step sampler cannot take much more)
    SCALE_BOUNDS = (0.25, 4.0)

    def bounds(self, lower: Sequence[float], upper: Sequence[float]) -> tuple[list[float], list[float]]:
        """Paper-layout bounds -> search-coordinate bounds: guidance in [0, the weight bound], scale in SCALE_BOUNDS."""
        lo, hi = list(lower), list(upper)
        for w in self._w:
            lo[w], hi[w] = 0.0, float(upper[w])
            lo[w + 1], hi[w + 1] = self.SCALE_BOUNDS
        return lo, hi
