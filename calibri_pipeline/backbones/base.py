"""What every backbone adapter (toy, FLUX, SD-3.5, Qwen-Image) offers the engine and the pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch

    from calibri_pipeline.method.space import CalibrationSpace
    from calibri_pipeline.prompts.base import Prompt


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
    transformer: "torch.nn.Module"
    uses_cfg: bool
    default_steps: int
    default_guidance: float | None

    def generate(
        self,
        prompts: Sequence["Prompt"],
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        space: "CalibrationSpace | None" = None,
        vectors: "torch.Tensor | None" = None,
        n_models: int = 1,
        max_batch: int | None = None,
        progress: bool = False,
    ) -> "torch.Tensor":
        """Return images ``[N, 3, H, W]`` float32 in ``[0, 1]`` on the CPU."""
        ...
