"""CalibrationSpace: the residual branches of a DiT and the scalar coefficients that rescale them.

Every DiT block adds the outputs of a few *branches* (attention, MLP; per modality in MM-DiTs) to
its residual stream, usually through an adaLN gate: ``h = h + gate * branch(norm(h))``. Each branch
ends in a linear projection (``attn.to_out[0]``, ``attn.to_add_out``, the MLP's last ``Linear``, a
FLUX single block's ``proj_out``). Multiplying that projection's output by ``c`` multiplies the
whole branch contribution by ``c`` (the gate is a per-channel product), so one mechanism serves
every architecture:

- ``apply`` registers forward hooks on those projections that scale their output (one scalar, or
  one per sample for a batch of differently-calibrated images);
- ``bake`` folds the scalars into the projections' weights and biases, so a stock forward of the
  baked model equals the hooked forward.

An architecture differs only in how its blocks and branches are found (:data:`ADAPTERS`); the
generic structural discovery below finds them for FLUX, SD3/SD-3.5, Qwen-Image and other diffusers
DiTs whose blocks add their branch outputs residually.

Granularities (paper §3.3): ``block`` (one coefficient per block), ``layer`` (one per attention
branch and one per MLP branch of a block: a branch's image and text streams share it), ``gate``
(one per gated branch and modality).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from calibri_pipeline.method.ensemble import EnsembleLayout

GRANULARITIES = ("block", "layer", "gate")
_ACTIVE_ATTR = "_calibri_space_active"

# Child-module names that hold the text/context stream in MM-DiT blocks.
_TEXT_MARKERS = ("context", "txt", "text", "add_out")
# Child-module names of feed-forward branches (besides diffusers' FeedForward class).
_MLP_NAMES = ("ff", "ff_context", "mlp", "img_mlp", "txt_mlp", "ffn")


@dataclass(frozen=True)
class Branch:
    """One residual branch: the linear projection(s) whose output the block adds (gated) to its stream."""

    block: str  # module path of the block, e.g. "transformer_blocks.3"
    layer: str  # "attn", "attn2", "mlp" or "attn_mlp" (FLUX single blocks fuse both behind one gate)
    stream: str  # "image", "text" or "joint" (one gate over the concatenated sequence)
    target: str  # module path of the projection, relative to the transformer

    @property
    def gate_name(self) -> str:
        return f"{self.block}.{self.layer}.{self.stream}"

    @property
    def layer_name(self) -> str:
        return f"{self.block}.{self.layer}"


class CalibrationError(ValueError):
    """The model or the coefficients do not fit the calibration space."""


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def _last_linear(module: nn.Module) -> str | None:
    last = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            last = name
    return last


def _is_attention(module: nn.Module) -> bool:
    to_out = getattr(module, "to_out", None)
    if isinstance(to_out, nn.ModuleList) and len(to_out) > 0 and isinstance(to_out[0], nn.Linear):
        return True
    return isinstance(to_out, nn.Linear)


def _is_mlp(name: str, module: nn.Module) -> bool:
    if type(module).__name__ == "FeedForward":
        return True
    return name in _MLP_NAMES and _last_linear(module) is not None


def _stream_of(name: str) -> str:
    return "text" if any(marker in name for marker in _TEXT_MARKERS) else "image"


def block_branches(block_path: str, block: nn.Module) -> list[Branch]:
    """The residual branches of one block, in forward order, found from its module structure.

    - an attention child (``to_out``) gives an image branch ``<attn>.to_out.0`` and, in MM-DiT
      joint attention, a text branch ``<attn>.to_add_out`` (absent in a ``context_pre_only`` block);
    - a feed-forward child gives a branch through its last ``Linear`` (stream from its name:
      ``ff_context``/``txt_mlp`` are text);
    - a block whose attention has no output projection but which has ``proj_out`` (FLUX single
      blocks: attention and MLP concatenated behind one gate) gives one fused ``attn_mlp`` branch.
    """
    branches: list[Branch] = []
    fused_candidate = False
    for name, child in block.named_children():
        if child is None:
            continue
        if _is_attention(child):
            to_out = child.to_out
            target = f"{name}.to_out.0" if isinstance(to_out, nn.ModuleList) else f"{name}.to_out"
            layer = "attn" if name in ("attn", "attn1") else name
            branches.append(Branch(block_path, layer, "image", f"{block_path}.{target}"))
            if isinstance(getattr(child, "to_add_out", None), nn.Linear):
                branches.append(Branch(block_path, layer, "text", f"{block_path}.{name}.to_add_out"))
        elif hasattr(child, "to_q") and getattr(child, "to_out", None) is None:
            fused_candidate = True  # attention without its own output projection
        elif _is_mlp(name, child):
            last = _last_linear(child)
            if last is not None:
                branches.append(Branch(block_path, "mlp", _stream_of(name), f"{block_path}.{name}.{last}"))
    if fused_candidate and isinstance(getattr(block, "proj_out", None), nn.Linear):
        branches.append(Branch(block_path, "attn_mlp", "joint", f"{block_path}.proj_out"))
    return branches


def _generic_block_lists(transformer: nn.Module) -> list[str]:
    """Top-level ModuleLists whose items contain residual branches, in registration (= forward) order."""
    found = []
    for name, child in transformer.named_children():
        if isinstance(child, nn.ModuleList) and len(child) > 0:
            if all(block_branches(f"{name}.{i}", b) for i, b in enumerate(child)):
                found.append(name)
    return found


def _adapter(block_lists: Sequence[str]) -> Callable[[nn.Module], list[str]]:
    return lambda transformer: list(block_lists)


#: Architectures we know, by class name: the block lists in forward order. Branch discovery within a
#: block is shared. FLUX runs all double blocks, then all single blocks.
ADAPTERS: dict[str, Callable[[nn.Module], list[str]]] = {
    "FluxTransformer2DModel": _adapter(["transformer_blocks", "single_transformer_blocks"]),
    "SD3Transformer2DModel": _adapter(["transformer_blocks"]),
    "QwenImageTransformer2DModel": _adapter(["transformer_blocks"]),
}


def discover_branches(transformer: nn.Module) -> list[Branch]:
    if not isinstance(transformer, nn.Module):
        raise TypeError(f"expected a torch.nn.Module transformer, got {type(transformer).__name__}")
    cls = type(transformer).__name__
    lists = ADAPTERS[cls](transformer) if cls in ADAPTERS else _generic_block_lists(transformer)
    branches: list[Branch] = []
    for list_name in lists:
        blocks = getattr(transformer, list_name, None)
        if not isinstance(blocks, nn.ModuleList):
            raise CalibrationError(f"{cls} has no block list {list_name!r}")
        for i, block in enumerate(blocks):
            found = block_branches(f"{list_name}.{i}", block)
            if not found:
                raise CalibrationError(f"{cls}.{list_name}.{i} ({type(block).__name__}) has no residual branch")
            branches.extend(found)
    if not branches:
        raise CalibrationError(
            f"nothing to calibrate in {cls}: looked for nn.ModuleList children whose blocks hold "
            "attention modules with an output projection (`to_out`, `to_add_out`), feed-forward modules "
            "(FeedForward / ff / mlp with a final nn.Linear) or a fused `proj_out`; "
            "Calibri needs a Diffusion Transformer (UNets are not supported)"
        )
    return branches


# --------------------------------------------------------------------------------------------
# The space
# --------------------------------------------------------------------------------------------


class CalibrationSpace:
    """The calibration coefficients of one model copy, at one granularity.

    ``names[j]`` names coefficient ``j``; ``groups[j]`` lists the branches it multiplies.
    """

    def __init__(self, branches: Sequence[Branch], granularity: str, model_class: str = ""):
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        self.granularity = granularity
        self.model_class = model_class
        self.branches: tuple[Branch, ...] = tuple(branches)
        key: Callable[[Branch], str] = {
            "block": lambda b: b.block,
            "layer": lambda b: b.layer_name,
            "gate": lambda b: b.gate_name,
        }[granularity]
        names: list[str] = []
        groups: list[list[Branch]] = []
        index: dict[str, int] = {}
        for branch in self.branches:
            k = key(branch)
            if k not in index:
                index[k] = len(names)
                names.append(k)
                groups.append([])
            groups[index[k]].append(branch)
        self.names: list[str] = names
        self.groups: tuple[tuple[Branch, ...], ...] = tuple(tuple(g) for g in groups)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_transformer(cls, transformer: nn.Module, granularity: str = "block") -> CalibrationSpace:
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        return cls(discover_branches(transformer), granularity, type(transformer).__name__)

    # -- sizes -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.names)

    def search_size(self, n_models: int = 1) -> int:
        """Length of a Calibri search vector: ``n_models`` coefficient sets + ``n_models`` ensemble weights."""
        return EnsembleLayout(self.size, n_models).search_size

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"CalibrationSpace({self.model_class or 'model'}, granularity={self.granularity!r}, size={self.size})"

    def to_dict(self) -> dict:
        return {"granularity": self.granularity, "model_class": self.model_class, "names": list(self.names)}

    # -- checks ------------------------------------------------------------------------------

    def _targets(self, transformer: nn.Module) -> list[list[nn.Linear]]:
        modules = []
        for group in self.groups:
            mods = []
            for branch in group:
                try:
                    mod = transformer.get_submodule(branch.target)
                except AttributeError:
                    raise CalibrationError(
                        f"this model has no module {branch.target!r}: the space was built for a different "
                        f"architecture ({self.model_class})"
                    ) from None
                if not isinstance(mod, nn.Linear):
                    raise CalibrationError(f"{branch.target} is {type(mod).__name__}, expected nn.Linear")
                mods.append(mod)
            modules.append(mods)
        return modules

    def check_coefficients(self, coefficients, *, allow_batch: bool = True) -> torch.Tensor:
        """Validate and convert to a float tensor ``[size]`` or ``[batch, size]`` (any device)."""
        if isinstance(coefficients, torch.Tensor):
            t = coefficients.detach()
        else:
            try:
                t = torch.as_tensor(coefficients)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"coefficients must be a tensor or a sequence of numbers: {err}") from None
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"coefficients must be real numbers, got dtype {t.dtype}")
        if not t.is_floating_point():
            t = t.to(torch.float32)
        if t.ndim == 0 or t.ndim > 2 or (t.ndim == 2 and not allow_batch):
            allowed = f"[{self.size}]" + (f" or [batch, {self.size}]" if allow_batch else "")
            raise CalibrationError(f"coefficients must have shape {allowed}, got {tuple(t.shape)}")
        if t.shape[-1] != self.size:
            raise CalibrationError(
                f"expected {self.size} coefficients ({self.granularity} granularity of {self.model_class}), "
                f"got {t.shape[-1]}"
            )
        if t.ndim == 2 and t.shape[0] == 0:
            raise CalibrationError("per-sample coefficients need at least one row")
        if not torch.isfinite(t).all():
            raise CalibrationError("coefficients contain NaN or infinite values")
        return t

    # -- hooks -------------------------------------------------------------------------------

    @contextmanager
    def apply(self, transformer: nn.Module, coefficients) -> Iterator[nn.Module]:
        """Scale every branch by its coefficient while the context is open.

        ``coefficients`` is ``[size]`` (every sample alike) or ``[batch, size]`` (row ``i`` for sample
        ``i`` of every forward inside the context). Hooks are removed on exit, also on error.
        """
        with self.scaled(transformer, self.check_coefficients(coefficients)):
            yield transformer

    @contextmanager
    def scaled(self, transformer: nn.Module, coefficients: torch.Tensor) -> Iterator[nn.Module]:
        """:meth:`apply` for coefficients that were already checked (the sampler's hot path)."""
        targets = self._targets(transformer)
        if getattr(transformer, _ACTIVE_ATTR, False):
            raise RuntimeError(
                "CalibrationSpace.apply is already active on this model; close the other context first "
                "(two calibrations cannot be applied to one model at once)"
            )
        per_sample = coefficients.ndim == 2
        handles = []
        setattr(transformer, _ACTIVE_ATTR, True)
        try:
            for j, modules in enumerate(targets):
                column = coefficients[:, j] if per_sample else coefficients[j]
                if bool((column == 1).all()):
                    continue  # an exact identity: skip the hook (and its cost)
                hook = _make_scale_hook(column, per_sample, self.names[j])
                handles.extend(m.register_forward_hook(hook) for m in modules)
            yield transformer
        finally:
            for h in handles:
                h.remove()
            try:
                delattr(transformer, _ACTIVE_ATTR)
            except AttributeError:
                pass

    # -- baking ------------------------------------------------------------------------------

    @torch.no_grad()
    def bake(self, transformer: nn.Module, coefficients) -> nn.Module:
        """Fold ``[size]`` coefficients into the branch projections' weights, in place.

        A stock forward of the baked model equals the hooked forward, and ``save_pretrained`` of it
        loads with the stock ``from_pretrained``: only weights change, never the config.
        """
        coefficients = self.check_coefficients(coefficients, allow_batch=False)
        if getattr(transformer, _ACTIVE_ATTR, False):
            raise RuntimeError("cannot bake while CalibrationSpace.apply is active on this model")
        for j, modules in enumerate(self._targets(transformer)):
            c = float(coefficients[j])
            if c == 1.0:
                continue
            for m in modules:
                m.weight.mul_(c)
                if m.bias is not None:
                    m.bias.mul_(c)
        return transformer


def _make_scale_hook(column: torch.Tensor, per_sample: bool, name: str):
    cache: dict[tuple, torch.Tensor] = {}

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        key = (output.device, output.dtype)
        scale = cache.get(key)
        if scale is None:
            scale = column.to(device=output.device, dtype=output.dtype)
            cache[key] = scale
        if per_sample:
            if output.shape[0] != scale.shape[0]:
                raise CalibrationError(
                    f"per-sample coefficients were given for a batch of {scale.shape[0]}, but branch {name} "
                    f"ran on a batch of {output.shape[0]}"
                )
            scale = scale.reshape((scale.shape[0],) + (1,) * (output.ndim - 1))
        if torch.is_grad_enabled() and output.requires_grad:
            return output * scale
        return output.mul_(scale)  # in place: no extra allocation on the inference hot path

    return hook


@dataclass(frozen=True)
class SearchSpace:
    """What a Calibri search vector means for one model: its coefficients, its ensemble layout, and
    (optionally) the segments of the noise schedule that get coefficients of their own.

    Built once (:meth:`for_model`) and passed down instead of ``(space, n_models)``; every vector
    entering the sampler is checked here, once (:meth:`check`).

    Time-dependent calibration (beyond the paper): ``segments`` are noise levels (sigma in (0, 1),
    descending) that cut the schedule into ``len(segments) + 1`` parts; the vector then holds one
    paper-layout vector per part, highest noise first, and a denoising step at noise level sigma uses
    the part it falls in (``segments=(0.8,)`` at 4 steps: the first step, sigma = 1, vs the rest).
    Noise levels rather than step numbers, so the same coefficients mean the same thing at any NFE.
    Such a vector cannot be baked into one stock checkpoint (the weights would have to change
    between steps); it is exported as a coefficient schedule the sampler applies.
    """

    space: CalibrationSpace
    layout: EnsembleLayout
    segments: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        seg = tuple(float(t) for t in self.segments)
        if any(not 0.0 < t < 1.0 for t in seg) or list(seg) != sorted(set(seg), reverse=True):
            raise ValueError(f"segments must be distinct noise levels in (0, 1), descending, got {self.segments!r}")
        object.__setattr__(self, "segments", seg)

    @classmethod
    def for_model(
        cls, space: CalibrationSpace, n_models: int = 1, *, uses_cfg: bool, segments: Sequence[float] = ()
    ) -> SearchSpace:
        """The one place a layout is made from a calibration space and a backbone's guidance kind."""
        return cls(space, EnsembleLayout(space.size, n_models, cfg=bool(uses_cfg)), tuple(segments))

    @property
    def n_models(self) -> int:
        return self.layout.n_models

    @property
    def n_segments(self) -> int:
        return len(self.segments) + 1

    @property
    def dimension(self) -> int:
        return self.n_segments * self.layout.search_size

    @property
    def granularity(self) -> str:
        return self.space.granularity

    def names(self) -> list[str]:
        names = self.layout.names(self.space.names)
        if self.n_segments == 1:
            return names
        bounds = [1.0, *self.segments, 0.0]
        return [f"sigma{bounds[j]:g}-{bounds[j + 1]:g}/{n}" for j in range(self.n_segments) for n in names]

    def x0(self, guidance: float | None) -> torch.Tensor:
        """The search's start: the unmodified model (all-ones coefficients, weights that reproduce it)."""
        return self.layout.initial(guidance if self.layout.mode == "cfg" else None).repeat(self.n_segments)

    def segment_of(self, sigma: float) -> int:
        """The part of the schedule a step at noise level ``sigma`` falls in (0: the noisiest)."""
        return sum(1 for t in self.segments if sigma <= t)

    def segment(self, vectors: torch.Tensor, index: int) -> torch.Tensor:
        """The paper-layout vectors ``[N, layout.search_size]`` of one part of the schedule."""
        d = self.layout.search_size
        return vectors[..., index * d : (index + 1) * d]

    def effective_guidance(self, vector: Any) -> list[float] | None:
        """The guidance scale a CFG-ensemble vector carries, per part of the schedule: ``w_cond / (w_cond + w_uncond)``."""
        if self.layout.mode != "cfg":
            return None
        vec = torch.as_tensor(vector, dtype=torch.float64).reshape(-1)
        w = self.layout.n_models * self.layout.size
        out = []
        for j in range(self.n_segments):
            w_c, w_u = (float(v) for v in self.segment(vec, j)[w : w + 2])
            out.append(w_c / (w_c + w_u) if w_c + w_u else float("nan"))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The run record of a search space: what a vector means, without the model (see :meth:`from_dict`)."""
        return {
            "granularity": self.granularity,
            "names": list(self.space.names),
            "n_models": self.n_models,
            "cfg": self.layout.cfg,
            "segments": list(self.segments),
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], model: CalibrationSpace | nn.Module) -> SearchSpace:
        """The search space a record (:meth:`to_dict`, a catalog row, a Ray request) describes, on ``model``.

        ``model`` is the transformer (its calibration space is discovered at the record's granularity)
        or that space itself; a model whose space differs from the record's names is refused.
        """
        missing = sorted({"granularity", "names", "n_models", "cfg"} - set(record))
        if missing:
            raise ValueError(f"a search-space record needs {missing}, got keys {sorted(record)}")
        space = (
            model
            if isinstance(model, CalibrationSpace)
            else CalibrationSpace.from_transformer(model, record["granularity"])
        )
        if space.granularity != record["granularity"] or list(space.names) != list(record["names"]):
            raise ValueError(
                f"the record's {record['granularity']} calibration space ({len(record['names'])} coefficients) is not "
                f"this model's {space.granularity} space ({space.size}): it was made for another architecture"
            )
        segments = tuple(record.get("segments") or ())
        return cls.for_model(space, int(record["n_models"]), uses_cfg=bool(record["cfg"]), segments=segments)

    def check(self, vectors: Any, n: int | None = None) -> torch.Tensor:
        """``[D]`` or ``[N, D]`` numbers -> float32 ``[N, D]`` on the CPU; one clear error otherwise.

        A single ``[D]`` vector is shared by ``n`` images when ``n`` is given.
        """
        try:
            vec = torch.as_tensor(vectors.detach() if isinstance(vectors, torch.Tensor) else vectors)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"Calibri vectors must be a tensor or nested sequence of numbers: {exc}") from None
        vec = vec.to(device="cpu", dtype=torch.float32)
        d = self.dimension
        if vec.ndim == 1 and vec.shape[0] == d:
            vec = vec.unsqueeze(0) if n is None else vec.unsqueeze(0).expand(n, d)
        if vec.ndim != 2 or vec.shape[1] != d or vec.shape[0] < 1:
            parts = f"{self.n_segments} schedule parts x " if self.n_segments > 1 else ""
            raise ValueError(
                f"Calibri vectors must have shape [P, {d}] or [{d}] ({parts}space.search_size({self.n_models}): "
                f"{self.n_models} x {self.space.size} {self.space.granularity} coefficients + {self.n_models} weights), "
                f"got {tuple(vec.shape)}"
            )
        if n is not None and vec.shape[0] != n:
            raise ValueError(f"got {vec.shape[0]} Calibri vectors for {n} images")
        if not torch.isfinite(vec).all():
            raise ValueError("Calibri vectors contain NaN or infinite values")
        return vec


__all__ = [
    "CalibrationSpace",
    "SearchSpace",
    "CalibrationError",
    "Branch",
    "GRANULARITIES",
    "ADAPTERS",
    "discover_branches",
]
