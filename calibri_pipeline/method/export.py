"""Export a calibration as plain diffusers transformers (no Calibri code needed to load them).

Each ensemble member becomes one transformer with its coefficients baked into the branch
projections and its ensemble weight folded into the final output projection (the velocity is
linear in it). How to combine the members is written to ``manifest.json``:

- ``single``: one transformer, used exactly like the original (same guidance).
- ``cfg`` (the CFG ensemble of two members): one transformer, ``model``, with the conditional pass's
  coefficients baked in, and ``calibration.json``: what is left for the stock pipeline's per-row hook
  (:func:`calibri_pipeline.backbones.stock.apply_calibration`): the unconditional pass's coefficients
  as ratios to the baked ones, and the two weights. One transformer in memory, not two copies. With
  more members (extra conditional passes) every member is its own transformer (``cond``, ``uncond``,
  ``cond2`` ...; velocity = the sum of their outputs, the weights folded in).
- ``ensemble``: ``model0 … model{n-1}``, all conditional; velocity = sum of their outputs.
- ``schedule``: a time-dependent calibration (coefficients per part of the noise schedule) cannot be
  baked into fixed weights; ``calibri_schedule.json`` holds the vector, its layout and the noise
  levels, and ``Backbone.generate(..., space=..., vectors=...)`` with that search space
  applies it (hooks, no extra cost).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from calibri_pipeline.method.ensemble import EnsembleLayout
from calibri_pipeline.method.space import CalibrationSpace


def fold_output_weight(transformer: torch.nn.Module, weight: float) -> None:
    """Multiply the transformer's output by ``weight`` by scaling its final ``proj_out`` in place."""
    if weight == 1.0:
        return
    proj = getattr(transformer, "proj_out", None)
    if not isinstance(proj, torch.nn.Linear):
        raise ValueError(
            f"cannot fold an ensemble weight into {type(transformer).__name__}: it has no final nn.Linear `proj_out`"
        )
    with torch.no_grad():
        proj.weight.mul_(weight)
        if proj.bias is not None:
            proj.bias.mul_(weight)


def baked_members(
    transformer: torch.nn.Module, space: CalibrationSpace, vector: Sequence[float], n_models: int, uses_cfg: bool
) -> tuple[str, dict[str, torch.nn.Module]]:
    """(mode, {member name: baked copy of the transformer})."""
    layout = EnsembleLayout(space.size, n_models, cfg=uses_cfg)
    coefficients, weights = layout.split(torch.as_tensor(list(vector), dtype=torch.float64))
    names = {
        "single": ["model"],
        "cfg": ["cond", "uncond"] + [f"cond{i}" for i in range(2, n_models)],
        "ensemble": [f"model{i}" for i in range(n_models)],
    }[layout.mode]
    members = {}
    for m, name in enumerate(names):
        member = copy.deepcopy(transformer)
        space.bake(member, coefficients[0, m])
        fold_output_weight(member, float(weights[0, m]))
        members[name] = member
    return layout.mode, members


def _baked_cfg_pair(transformer: torch.nn.Module, space: CalibrationSpace, vector: Sequence[float]):
    """The CFG ensemble of two as one transformer (the conditional coefficients baked in) and the
    Calibration the per-row hook applies on top of it (ratios for the unconditional pass, the weights)."""
    from calibri_pipeline.method.calibration import Calibration

    layout = EnsembleLayout(space.size, 2, cfg=True)
    coefficients, weights = layout.split(torch.as_tensor(list(vector), dtype=torch.float64))
    cond, uncond = coefficients[0, 0], coefficients[0, 1]
    stuck = [space.names[j] for j in range(space.size) if cond[j] == 0 and uncond[j] != 0]
    if stuck:
        raise ValueError(
            f"the conditional pass switches off {stuck} but the unconditional one keeps them: one baked transformer "
            "cannot hold both; export --format calibration and run it with apply_calibration on the original model"
        )
    ratios = torch.where(cond == 0, torch.ones_like(cond), uncond / cond)
    member = copy.deepcopy(transformer)
    space.bake(member, cond)
    residual = Calibration(
        space.granularity,
        space.names,
        2,
        [1.0] * space.size + ratios.tolist() + weights[0].tolist(),
        cfg=True,
        model_class=type(transformer).__name__,
        source={"baked": "the conditional coefficients are in the weights; these are what is left"},
    )
    return "cfg", {"model": member}, residual


def export_calibrated(
    backbone,
    granularity: str,
    vector: Sequence[float],
    n_models: int,
    store,
    prefix: str,
    extra: dict[str, Any] | None = None,
    segments: Sequence[float] = (),
) -> dict[str, Any]:
    """Bake, ``save_pretrained`` each member, upload to ``store`` under ``prefix``; returns the manifest.

    With ``segments`` (time-dependent coefficients) nothing can be baked: the coefficient schedule is
    written instead (manifest mode ``schedule``).
    """
    space = CalibrationSpace.from_transformer(backbone.transformer, granularity)
    if segments:
        layout = EnsembleLayout(space.size, n_models, cfg=bool(backbone.uses_cfg))
        if len(vector) != (len(segments) + 1) * layout.search_size:
            raise ValueError(
                f"a schedule of {len(segments) + 1} parts needs {(len(segments) + 1) * layout.search_size} "
                f"numbers, got {len(vector)}"
            )
        schedule = {
            "segments": [float(t) for t in segments],
            "vector": [float(v) for v in vector],
            "granularity": granularity,
            "n_models": n_models,
            "names": list(space.names),
            "class": type(backbone.transformer).__name__,
        }
        key = f"{prefix}/calibri_schedule.json"
        store.put_bytes(key, json.dumps(schedule, indent=2).encode())
        manifest = {
            "mode": "schedule",
            "members": [],
            "files": [key],
            "combine": "time-dependent coefficients: apply calibri_schedule.json with the sampler (SearchSpace segments)",
            **schedule,
            **(extra or {}),
        }
        store.put_bytes(f"{prefix}/manifest.json", json.dumps(manifest, indent=2).encode())
        return manifest
    residual = None
    if bool(backbone.uses_cfg) and n_models == 2:
        mode, members, residual = _baked_cfg_pair(backbone.transformer, space, vector)
    else:
        mode, members = baked_members(backbone.transformer, space, vector, n_models, bool(backbone.uses_cfg))
    files = []
    with tempfile.TemporaryDirectory() as tmp:
        if residual is not None:
            residual.save(str(Path(tmp) / "calibration.json"))
        for name, member in members.items():
            if not hasattr(member, "save_pretrained"):
                raise TypeError(
                    f"{type(member).__name__} has no save_pretrained: only diffusers models can be exported"
                )
            member.save_pretrained(Path(tmp) / name, safe_serialization=True)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(tmp).as_posix()}"
                store.put_bytes(key, path.read_bytes())
                files.append(key)
    manifest = {
        "mode": mode,
        "members": list(members),
        "combine": {
            "single": "use `model` like the original transformer",
            "cfg": "velocity = cond(x, prompt) + uncond(x, negative/empty prompt) (+ cond2 ... with the prompt)",
            "cfg-baked": "`model` as the pipeline's transformer, under apply_calibration(pipe, Calibration.load(this "
            "folder)): calibration.json holds the unconditional pass's ratios and the two weights",
            "ensemble": "velocity = sum of every member's output",
        }["cfg-baked" if residual is not None else mode],
        "class": type(backbone.transformer).__name__,
        "granularity": granularity,
        "names": list(space.names),
        "n_models": n_models,
        "vector": [float(v) for v in vector],
        "files": files,
        **(extra or {}),
    }
    store.put_bytes(f"{prefix}/manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest
