"""A calibration as a thing to keep and use: the vector, what it means, and where it came from.

:class:`Calibration` is the run record (:meth:`SearchSpace.to_dict <calibri_pipeline.method.space.SearchSpace.to_dict>`)
plus the vector and its provenance. It is written as one JSON file (:meth:`Calibration.save`) and read
back from that file, from the pipeline's exports (``calibri_schedule.json`` of a time-dependent
calibration, ``manifest.json`` of a baked one), from a catalog run (:meth:`Calibration.from_catalog`)
or from a finished :func:`~calibri_pipeline.method.calibrate.calibrate` (:meth:`Calibration.from_result`).
``calibri_pipeline.backbones.stock.apply_calibration`` runs it inside a stock diffusers pipeline.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from calibri_pipeline.arguments import positive_int

if TYPE_CHECKING:
    from torch import nn

    from calibri_pipeline.method.calibrate import CalibrationResult
    from calibri_pipeline.method.space import CalibrationSpace, SearchSpace

#: the ``format`` of a file :meth:`Calibration.save` writes
FORMAT = "calibri-calibration/1"
#: the files a folder is searched for, in this order
FILE_NAMES = ("calibration.json", "calibri_schedule.json", "manifest.json")


@dataclass(frozen=True)
class Calibration:
    """A Calibri vector and what it means for one model.

    ``vector``: ``len(segments) + 1`` parts, highest noise first, each in the paper's layout
    (``n_models`` blocks of ``len(names)`` coefficients, then ``n_models`` ensemble weights).
    ``names``: the coefficient names of one model copy (``CalibrationSpace.names``), which identify
    the architecture it was made for; ``cfg``: whether the ensemble's members are the conditional and
    unconditional passes (None: as the model it is applied to does, for records that do not say).
    """

    granularity: str
    names: tuple[str, ...]
    n_models: int
    vector: tuple[float, ...]
    segments: tuple[float, ...] = ()
    cfg: bool | None = None
    model_class: str | None = None
    source: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "vector", tuple(float(v) for v in self.vector))
        object.__setattr__(self, "segments", tuple(float(t) for t in self.segments))
        positive_int("n_models", self.n_models)
        per_part = self.n_models * len(self.names) + self.n_models
        if not self.names or len(self.vector) != (len(self.segments) + 1) * per_part:
            raise ValueError(
                f"a calibration of {len(self.segments) + 1} part(s) x {self.n_models} model(s) x {len(self.names)} "
                f"{self.granularity} coefficients (+ weights) has {(len(self.segments) + 1) * per_part} numbers, "
                f"got {len(self.vector)}"
            )
        if not all(math.isfinite(v) for v in self.vector):
            raise ValueError("the calibration vector contains NaN or infinite values")

    # -- meaning -----------------------------------------------------------------------------

    def record(self, cfg: bool | None = None) -> dict[str, Any]:
        """The run record (``SearchSpace.to_dict``) with ``cfg`` filled in where the calibration leaves it open."""
        if self.cfg is not None and cfg is not None and self.cfg != cfg:
            raise ValueError(
                f"this calibration was made {'with' if self.cfg else 'without'} classifier-free guidance; the "
                f"model it is applied to {'uses' if cfg else 'does not use'} it"
            )
        chosen = self.cfg if self.cfg is not None else cfg
        if chosen is None:
            raise ValueError("say whether the model uses classifier-free guidance (cfg=...)")
        return {
            "granularity": self.granularity,
            "names": list(self.names),
            "n_models": self.n_models,
            "cfg": bool(chosen),
            "segments": list(self.segments),
        }

    def search_space(self, model: CalibrationSpace | nn.Module, cfg: bool | None = None) -> SearchSpace:
        """The search space of this calibration on ``model`` (a transformer or its calibration space);
        refused when the model's coefficients are not the ones the calibration was made for."""
        from calibri_pipeline.method.space import SearchSpace

        return SearchSpace.from_dict(self.record(cfg), model)

    # -- reading and writing -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "granularity": self.granularity,
            "names": list(self.names),
            "n_models": self.n_models,
            "cfg": self.cfg,
            "segments": list(self.segments),
            "vector": list(self.vector),
            "class": self.model_class,
            "source": dict(self.source),
        }

    def save(self, path: str) -> str:
        """Write the calibration as one JSON file (a local path or an fsspec URI); returns where."""
        return _write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], source: Mapping[str, Any] | None = None) -> Calibration:
        """Our file (:meth:`to_dict`), a ``calibri_schedule.json`` or a baked export's ``manifest.json``."""
        missing = sorted({"granularity", "names", "n_models", "vector"} - set(record))
        if missing:
            raise ValueError(f"not a calibration record: it lacks {missing} (keys: {sorted(record)})")
        mode = record.get("mode")  # a manifest: "single" | "cfg" | "ensemble" | "schedule"
        cfg = record.get("cfg")
        if cfg is None and mode in ("cfg", "ensemble"):
            cfg = mode == "cfg"
        return cls(
            granularity=str(record["granularity"]),
            names=tuple(record["names"]),
            n_models=int(record["n_models"]),
            vector=tuple(record["vector"]),
            segments=tuple(record.get("segments") or ()),
            cfg=cfg,
            model_class=record.get("class"),
            source={**dict(record.get("source") or {}), **dict(source or {})},
        )

    @classmethod
    def load(cls, path_or_uri: str, model: CalibrationSpace | nn.Module | None = None) -> Calibration:
        """Read a calibration file, or a folder holding one (``calibration.json``, ``calibri_schedule.json``
        or ``manifest.json``, the first found), from a local path or an fsspec URI (``s3://...``).

        The official release's ``cmaes_step_*.json`` is read too, given the ``model`` it was made for
        (its transformer, or its calibration space): its file does not say which coefficient is which.
        """
        import fsspec

        fs, path = fsspec.core.url_to_fs(str(path_or_uri))
        if fs.isdir(path):
            found = [f"{path.rstrip('/')}/{name}" for name in FILE_NAMES if fs.exists(f"{path.rstrip('/')}/{name}")]
            if not found:
                raise FileNotFoundError(f"{path_or_uri}: no {', '.join(FILE_NAMES)} in this folder")
            path = found[0]
        elif not fs.exists(path):
            raise FileNotFoundError(f"{path_or_uri}: no such file or folder")
        try:
            record = json.loads(fs.cat_file(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path_or_uri}: not JSON ({error})") from None
        if "solution" in record and "shapes" in record:
            if model is None:
                raise ValueError(
                    f"{path_or_uri} is the official release's file: give the model it was made for, "
                    "Calibration.load(path, model=pipe.transformer)"
                )
            return cls.from_official(record, model, source={"file": str(path_or_uri)})
        return cls.from_dict(record, source={"file": str(path_or_uri)})

    # -- the official release's files ---------------------------------------------------------

    @classmethod
    def from_official(
        cls, record: Mapping[str, Any], model: CalibrationSpace | nn.Module, source: Mapping[str, Any] | None = None
    ) -> Calibration:
        """A ``cmaes_step_*.json`` record of the paper's code release, on the model it was made for
        (:mod:`calibri_pipeline.method.official` maps its order onto this project's)."""
        from calibri_pipeline.method import official
        from calibri_pipeline.method.space import CalibrationSpace

        n_models = official.n_models_of(dict(record))
        shapes = record["shapes"]
        if isinstance(model, CalibrationSpace):
            space = model
        else:
            space = CalibrationSpace.from_transformer(model, official.granularity_of(shapes, n_models))
        vector = official.from_flat(list(record["solution"]), space, n_models)
        variant, _ = official.sections(space)
        return cls(
            granularity=space.granularity,
            names=tuple(space.names),
            n_models=n_models,
            vector=tuple(vector),
            cfg=not variant.startswith(("flux", "black-forest-labs")),
            model_class=space.model_class,
            source={"official": variant, "step": record.get("step"), "val": record.get("val"), **dict(source or {})},
        )

    def to_official(self, path: str, model: CalibrationSpace | nn.Module) -> str:
        """Write this (constant) calibration as the release's ``cmaes_step_*.json`` for ``model``."""
        return _write_json(path, self.official_record(model))

    def official_record(self, model: CalibrationSpace | nn.Module) -> dict[str, Any]:
        """This (constant) calibration as the release's ``cmaes_step_*.json`` record for ``model``."""
        from calibri_pipeline.method import official
        from calibri_pipeline.method.space import CalibrationSpace

        space = (
            model if isinstance(model, CalibrationSpace) else CalibrationSpace.from_transformer(model, self.granularity)
        )
        if self.segments:
            raise ValueError(
                "a time-dependent calibration has no official form: the release calibrates one set per model"
            )
        self.search_space(space, cfg=self.cfg if self.cfg is not None else False)  # the model it was made for
        known = {"step": self.source.get("step"), "val": self.source.get("val")}
        return official.payload(list(self.vector), self.n_models, space, **known)

    @classmethod
    def from_catalog(cls, catalog: Any, run_id: str) -> Calibration:
        """A finished run of the catalog's ``calibration_runs`` (anything with ``query(sql, params)``)."""
        rows = catalog.query(
            "SELECT run_id, model, reward, granularity, names, n_models, segments, vector, status, config "
            "FROM calibration_runs WHERE run_id = ?",
            [run_id],
        )
        if rows.height == 0:
            raise ValueError(f"no calibration run {run_id!r} in the catalog")
        row = rows.row(0, named=True)
        if row["status"] != "finished" or row["vector"] is None:
            raise ValueError(f"calibration run {run_id!r} is {row['status']}: it has no selected vector yet")
        config = json.loads(row["config"]) if row["config"] else {}
        return cls(
            granularity=row["granularity"],
            names=tuple(row["names"]),
            n_models=int(row["n_models"]),
            vector=tuple(row["vector"]),
            segments=tuple(row["segments"] or ()),
            source={
                "run_id": row["run_id"],
                "model": row["model"],
                "reward": row["reward"],
                "guidance": config.get("guidance"),
                "shift": config.get("shift"),
            },
        )

    @classmethod
    def from_result(cls, result: CalibrationResult, **source: Any) -> Calibration:
        """The calibration a finished :func:`~calibri_pipeline.method.calibrate.calibrate` selected."""
        record = result.space.to_dict()
        return cls(
            granularity=record["granularity"],
            names=tuple(record["names"]),
            n_models=record["n_models"],
            vector=tuple(result.vector.tolist()),
            segments=tuple(record["segments"]),
            cfg=record["cfg"],
            model_class=result.space.space.model_class,
            source={"steps": result.steps, "guidance": result.guidance, "shift": result.shift, **source},
        )

    def parts(self) -> Sequence[tuple[float, ...]]:
        """The paper-layout vector of each part of the schedule, highest noise first."""
        d = len(self.vector) // (len(self.segments) + 1)
        return [self.vector[j * d : (j + 1) * d] for j in range(len(self.segments) + 1)]


def _write_json(path: str, record: dict[str, Any]) -> str:
    """One JSON file at a local path or an fsspec URI (indent 2, a final newline); returns where."""
    import fsspec

    with fsspec.open(path, "w") as f:
        f.write(json.dumps(record, indent=2) + "\n")
    return path


__all__ = ["Calibration", "FORMAT"]
