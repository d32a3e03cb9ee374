"""The paper's code release (github.com/v-gen-ai/Calibri): its flat vectors and ``cmaes_step_*.json`` files.

Its flat vector is a sequence of sections, each model-major (all of member 0's entries, then member
1's), then one trailing number per member: FLUX's output scale, or SD-3's / Qwen-Image's CFG weights
``[w_cond, w_uncond]``. The sections per variant (the release's model files):

- FLUX gate (``flux_sg.py``): image-stream ``(attn, mlp)`` of every double block; text-stream
  ``(attn, mlp)`` of every double block; the fused gate of every single block (115 numbers for FLUX.1-dev);
- FLUX layer (``flux_sg_mlp_attn.py``): ``(attn, mlp)`` per double block, both streams alike; singles (77);
- FLUX block (``flux_sg_block.py``): one per double block; singles (58);
- SD-3 gate (``sd3_sg.py``): image-stream ``(attn, mlp)`` of every block; text-stream ``(attn, mlp)`` of
  the blocks that have it (not a ``context_pre_only`` last block); the second attention of the
  dual-attention blocks; ``[w_cond, w_uncond]`` (216 for SD-3.5 Medium with the CFG ensemble);
- Qwen-Image gate (``qwen_sg.py``): per block image attention, text attention, image MLP, text MLP.

Every section is spelled here in this project's coefficient names, found on the model by the same
discovery as :class:`~calibri_pipeline.method.space.CalibrationSpace`, never by counts; the mapping
is then a permutation, checked to cover every coefficient once. Each number scales the same
branch output in both codes (theirs multiplies the AdaLN gate, ours the branch's output projection:
``x + c * gate * branch`` either way). Their ``solution`` is the best training candidate, not the
CMA-ES mean. What their Qwen-Image hooks do differs from what their vector says: the MLP hook
returns early on a tensor output, so the two MLP entries of every block never act, and the CFG
start ignores the configured guidance (``cfg_scale`` 7 is a constructor default): an imported
Qwen-Image vector is taken as it reads, which is what the release *meant*; set its MLP entries to 1
to reproduce what it *did*.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from calibri_pipeline.method.space import CalibrationSpace

_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)")
_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)")


def _blocks(names: Sequence[str], pattern: re.Pattern) -> list[str]:
    """The block prefixes (``transformer_blocks.3``) present among ``names``, in forward order."""
    found = {m.group(0): int(m.group(1)) for n in names if (m := pattern.match(n))}
    return sorted(found, key=found.get)


def sections(space: CalibrationSpace) -> tuple[str, list[list[str]]]:
    """The release's variant for ``space`` and its sections, in our coefficient names (one model copy)."""
    names, cls, granularity = list(space.names), space.model_class, space.granularity
    have = set(names)
    doubles, singles = _blocks(names, _DOUBLE), _blocks(names, _SINGLE)
    if cls == "FluxTransformer2DModel":
        tail = [f"{b}.attn_mlp" + (".joint" if granularity == "gate" else "") for b in singles]
        if granularity == "block":
            tail = singles
            out = ("flux_block", [doubles, tail])
        elif granularity == "layer":
            out = ("flux_mlp_attn", [[f"{b}.{k}" for b in doubles for k in ("attn", "mlp")], tail])
        else:
            image = [f"{b}.{k}.image" for b in doubles for k in ("attn", "mlp")]
            text = [f"{b}.{k}.text" for b in doubles for k in ("attn", "mlp")]
            out = ("black-forest-labs/FLUX.1-dev", [image, text, tail])
    elif cls == "SD3Transformer2DModel" and granularity == "gate":
        image = [f"{b}.{k}.image" for b in doubles for k in ("attn", "mlp")]
        text = [f"{b}.{k}.text" for b in doubles if f"{b}.attn.text" in have for k in ("attn", "mlp")]
        second = [f"{b}.attn2.image" for b in doubles if f"{b}.attn2.image" in have]
        out = ("sd3", [image, text, second])
    elif cls == "QwenImageTransformer2DModel" and granularity == "gate":
        out = (
            "qwen-image",
            [[f"{b}.{k}" for b in doubles for k in ("attn.image", "attn.text", "mlp.image", "mlp.text")]],
        )
    else:
        raise ValueError(
            f"the official release has no {granularity} layout for {cls}: it has FLUX block / layer / gate, "
            "SD-3 gate and Qwen-Image gate"
        )
    variant, parts = out
    flat = [n for part in parts for n in part]
    if sorted(flat) != sorted(names):
        missing, extra = sorted(set(names) - set(flat)), sorted(set(flat) - set(names))
        raise ValueError(
            f"this {cls} does not match the official {variant} layout (missing {missing}, unknown {extra})"
        )
    return variant, parts


def shapes(space: CalibrationSpace, n_models: int) -> dict[str, int]:
    """The ``shapes`` record the release writes next to a solution."""
    variant, parts = sections(space)
    names = list(space.names)
    n_double, n_single = len(_blocks(names, _DOUBLE)), len(_blocks(names, _SINGLE))
    total = n_models * (sum(len(p) for p in parts) + 1)
    if variant.startswith("flux") or variant.startswith("black-forest-labs"):
        out = {"total": total, "n_models": n_models, "doubles_main": n_models * len(parts[0])}
        if len(parts) == 3:
            out["doubles_ctx"] = n_models * len(parts[1])
        return {**out, "singles": n_models * len(parts[-1]), "n_double": n_double, "n_single": n_single}
    if variant == "sd3":
        return {
            "total": total,
            "n_models": n_models,
            "main": n_models * len(parts[0]),
            "context": n_models * len(parts[1]),
            "attn2": n_models * len(parts[2]),
            "n_blocks": n_double,
            "n_context": len(parts[1]) // 2,
            "n_attn2": len(parts[2]),
        }
    return {"total": total, "n_models": n_models, "n_blocks": n_double}


def to_flat(vector: Sequence[float], n_models: int, space: CalibrationSpace) -> list[float]:
    """A constant vector in this project's layout as the release's flat vector."""
    _, parts = sections(space)
    index = {name: i for i, name in enumerate(space.names)}
    size = len(space.names)
    if len(vector) != n_models * (size + 1):
        raise ValueError(
            f"a constant vector of {n_models} model(s) has {n_models * (size + 1)} numbers, got {len(vector)}"
        )
    flat = [vector[m * size + index[name]] for part in parts for m in range(n_models) for name in part]
    return [float(v) for v in flat + list(vector[n_models * size :])]


def from_flat(flat: Sequence[float], space: CalibrationSpace, n_models: int) -> list[float]:
    """The release's flat vector in this project's layout (``n_models`` coefficient blocks, then the weights)."""
    _, parts = sections(space)
    size = len(space.names)
    if len(flat) != n_models * (size + 1):
        raise ValueError(
            f"an official {space.granularity} vector for {space.model_class} with {n_models} model(s) has "
            f"{n_models * (size + 1)} numbers, got {len(flat)}"
        )
    index = {name: i for i, name in enumerate(space.names)}
    ours = [0.0] * (n_models * size)
    k = 0
    for part in parts:
        for m in range(n_models):
            for name in part:
                ours[m * size + index[name]] = float(flat[k])
                k += 1
    return ours + [float(v) for v in flat[k:]]


def payload(vector: Sequence[float], n_models: int, space: CalibrationSpace, **known: Any) -> dict[str, Any]:
    """A ``cmaes_step_*.json`` record with the release's keys (its reader uses ``solution``); ``known``
    fills ``step`` / ``val`` / ... where the caller knows them."""
    record = {
        "step": 0,
        "train_best": None,
        "train_mean": None,
        "val": None,
        "solution": to_flat(vector, n_models, space),
        "shapes": shapes(space, n_models),
        "sigma": None,
        "timestamp": int(time.time()),
    }
    return {**record, **{k: v for k, v in known.items() if k in record and v is not None}}


def granularity_of(shapes: dict[str, Any], n_models: int) -> str:
    """The granularity a record's ``shapes`` imply (the release writes no variant name): FLUX gate has a
    text-stream section, SD-3 a ``main`` one, Qwen-Image only ``n_blocks`` (all gate); FLUX layer has two
    numbers per double block and model, FLUX block one."""
    if "doubles_ctx" in shapes or "main" in shapes or set(shapes) == {"total", "n_models", "n_blocks"}:
        return "gate"
    if shapes.get("doubles_main") == 2 * n_models * shapes.get("n_double", -1):
        return "layer"
    return "block"


def n_models_of(record: dict[str, Any]) -> int:
    """How many models an official record holds (its ``shapes``)."""
    found = (record.get("shapes") or {}).get("n_models")
    if not isinstance(found, int) or found < 1:
        raise ValueError("an official record needs shapes.n_models (a cmaes_step_*.json file)")
    return found


__all__ = ["from_flat", "granularity_of", "n_models_of", "payload", "sections", "shapes", "to_flat"]
