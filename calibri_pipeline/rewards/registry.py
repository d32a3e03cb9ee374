"""``make_reward(spec)``: one place that turns a reward name into a reward object.

Accepted specs:

- a known name: ``world_score``, ``world_alignment``, ``world_accuracy``, ``world_quality`` (the embedded
  world's exact rewards), ``hpsv3``, ``imagereward``, ``pickscore``, ``clipscore``, ``qalign``;
- ``http://host:port`` (or ``http:host:port``, ``http:http://host:port``): a reward served by
  :mod:`calibri_pipeline.rewards.server`, scored through :class:`~calibri_pipeline.rewards.client.HTTPReward`;
- ``package.module:attr``: a user's own reward class / factory (called with the keyword arguments) or
  reward instance;
- a weighted sum: ``"world_alignment*0.7+world_quality*0.3"`` or ``{"world_alignment": 0.7, ...}``
  (``0.7*name`` and a bare ``name`` = weight 1 work too), giving a :class:`WeightedReward`.

Every implementation is imported lazily, so asking for ``pickscore`` never imports the HPSv3 stack.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Mapping, Sequence

import torch

from calibri_pipeline.prompts.base import Prompt
from calibri_pipeline.rewards.base import Reward, check_scores
from calibri_pipeline.rewards.names import OPTIMISABLE_REWARDS, PAPER_EVAL_REWARDS, WORLD_REWARD_NAMES  # noqa: F401

#: name -> "module:attribute" of the class implementing it
KNOWN_REWARDS: dict[str, str] = {
    "world_score": "calibri_pipeline.rewards.world:WorldScore",
    "world_alignment": "calibri_pipeline.rewards.world:WorldAlignment",
    "world_accuracy": "calibri_pipeline.rewards.world:WorldAccuracy",
    "world_quality": "calibri_pipeline.rewards.world:WorldQuality",
    "hpsv3": "calibri_pipeline.rewards.hpsv3:HPSv3Reward",
    "imagereward": "calibri_pipeline.rewards.imagereward:ImageRewardReward",
    "pickscore": "calibri_pipeline.rewards.pickscore:PickScore",
    "clipscore": "calibri_pipeline.rewards.clipscore:CLIPScore",
    "qalign": "calibri_pipeline.rewards.qalign:QAlignReward",
}

_FORMS = (
    "'http://host:port' (a reward server), 'package.module:attr' (your own reward), "
    "or a weighted sum like 'world_alignment*0.7+world_quality*0.3'"
)


class WeightedReward:
    """``sum_i weight_i * reward_i(images, prompts)``; all parts must agree on higher-is-better."""

    def __init__(self, parts: Sequence[tuple[Reward, float]], name: str | None = None) -> None:
        if not parts:
            raise ValueError("a weighted reward needs at least one (reward, weight) part")
        for reward, weight in parts:
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise ValueError(
                    f"weight of {getattr(reward, 'name', reward)!r} must be a finite number, got {weight!r}"
                )
        directions = {bool(r.higher_is_better) for r, _ in parts}
        if len(directions) > 1:
            names = [f"{r.name} (higher_is_better={r.higher_is_better})" for r, _ in parts]
            raise ValueError(f"cannot add rewards that disagree on the direction of better: {names}")
        self.parts = [(r, float(w)) for r, w in parts]
        self.higher_is_better = directions.pop()
        self.name = name or "+".join(f"{r.name}*{_format_weight(w)}" for r, w in self.parts)

    @property
    def scale(self) -> tuple[float, float] | None:
        lo = hi = 0.0
        for reward, weight in self.parts:
            if reward.scale is None:
                return None
            a, b = weight * reward.scale[0], weight * reward.scale[1]
            lo, hi = lo + min(a, b), hi + max(a, b)
        return (lo, hi)

    def component_scores(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Each part's own (unweighted) scores, keyed by its name (for logging every part)."""
        out: dict[str, torch.Tensor] = {}
        for reward, _ in self.parts:
            out[reward.name] = check_scores(reward.name, reward(images, prompts), images.shape[0])
        return out

    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        total = torch.zeros(images.shape[0], dtype=torch.float32)
        for reward, weight in self.parts:
            total += weight * check_scores(reward.name, reward(images, prompts), images.shape[0])
        return check_scores(self.name, total, images.shape[0])


def _format_weight(weight: float) -> str:
    return f"{weight:g}"


def _import_attr(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward spec {target!r} must look like 'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if target in KNOWN_REWARDS.values() and exc.name == module_name:
            raise ImportError(f"reward implementation {module_name} is not available in this installation") from exc
        raise
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (reward spec {target!r})") from None


def _build(target: str, kwargs: Mapping[str, Any]) -> Reward:
    obj = _import_attr(target)
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Reward)):
        obj = obj(**kwargs)
    elif kwargs:
        raise TypeError(f"{target} is a reward instance; it takes no keyword arguments (got {sorted(kwargs)})")
    if not isinstance(obj, Reward):
        raise TypeError(
            f"{target} did not give a reward (needs name, higher_is_better, scale and __call__), "
            f"got {type(obj).__name__}"
        )
    return obj


def _http_url(spec: str) -> str | None:
    if spec.startswith(("http://", "https://")):
        return spec
    if spec.startswith("http:"):
        rest = spec[len("http:") :]
        return rest if rest.startswith(("http://", "https://")) else f"http://{rest}"
    return None


def parse_weighted(spec: str) -> list[tuple[str, float]]:
    """``"a*0.7+b*0.3"`` -> ``[("a", 0.7), ("b", 0.3)]`` (``0.7*a`` and bare ``a`` also accepted)."""
    parts: list[tuple[str, float]] = []
    for term in spec.split("+"):
        term = term.strip()
        if not term:
            raise ValueError(f"empty term in weighted reward spec {spec!r}")
        factors = [f.strip() for f in term.split("*")]
        if len(factors) == 1:
            name, weight = factors[0], 1.0
        elif len(factors) == 2:
            first, second = factors
            if _is_number(second):
                name, weight = first, float(second)
            elif _is_number(first):
                name, weight = second, float(first)
            else:
                raise ValueError(f"term {term!r} of {spec!r} needs a numeric weight: 'name*0.5'")
        else:
            raise ValueError(f"term {term!r} of {spec!r} must be 'name*weight'")
        if not name or _is_number(name):
            raise ValueError(f"term {term!r} of {spec!r} has no reward name")
        parts.append((name, weight))
    names = [n for n, _ in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"weighted reward spec {spec!r} names a reward twice")
    return parts


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def make_reward(
    spec: str | Mapping[str, float] | Reward,
    *,
    component_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> Reward:
    """Build a reward from a spec (see the module docstring). ``kwargs`` go to a single reward's
    constructor; for a weighted sum give per-part arguments as ``component_kwargs={name: {...}}``."""
    if isinstance(spec, Mapping):
        return _make_weighted(list(spec.items()), component_kwargs, kwargs)
    if not isinstance(spec, str):
        if isinstance(spec, Reward):
            if kwargs:
                raise TypeError(f"got a reward object and keyword arguments {sorted(kwargs)}")
            return spec
        raise TypeError(
            f"reward spec must be a name, a {{name: weight}} dict or a reward object, got {type(spec).__name__}"
        )
    spec = spec.strip()
    # weighted first: a part may itself be a server URL ("http://127.0.0.1:8001*0.5+world_quality*0.5")
    if "+" in spec or "*" in spec:
        return _make_weighted(parse_weighted(spec), component_kwargs, kwargs)
    if component_kwargs:
        raise TypeError("component_kwargs is for weighted sums; pass a single reward's arguments as keywords")
    url = _http_url(spec)
    if url is not None:
        from calibri_pipeline.rewards.client import HTTPReward

        return HTTPReward(url, **kwargs)
    if spec in KNOWN_REWARDS:
        return _build(KNOWN_REWARDS[spec], kwargs)
    module_part, colon, _ = spec.partition(":")
    if colon and all(piece.isidentifier() for piece in module_part.split(".")):
        return _build(spec, kwargs)
    raise ValueError(f"unknown reward {spec!r}; known rewards: {', '.join(KNOWN_REWARDS)}; or {_FORMS}")


def _make_weighted(
    items: list[tuple[str, float]],
    component_kwargs: Mapping[str, Mapping[str, Any]] | None,
    kwargs: Mapping[str, Any],
) -> WeightedReward:
    if kwargs:
        raise TypeError(
            f"keyword arguments {sorted(kwargs)} are ambiguous for a weighted reward; "
            "pass component_kwargs={'name': {...}} instead"
        )
    component_kwargs = dict(component_kwargs or {})
    unknown = set(component_kwargs) - {name for name, _ in items}
    if unknown:
        raise ValueError(f"component_kwargs names {sorted(unknown)}, which are not parts of the weighted reward")
    parts: list[tuple[Reward, float]] = []
    for name, weight in items:
        if not isinstance(name, str):
            raise TypeError(f"weighted reward part names must be strings, got {name!r}")
        parts.append((make_reward(name, **dict(component_kwargs.get(name, {}))), weight))
    canonical = "+".join(f"{name}*{_format_weight(float(w))}" for name, w in items)
    return WeightedReward(parts, name=canonical)
