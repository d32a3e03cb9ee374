"""The paper's analyses (§3.2, Fig. 3; §4.1, Fig. 6) on any backbone, as tables and PNG plots.

- :func:`block_ablation`: each coefficient (a block, at ``block`` granularity) set to 0, i.e. the
  branch bypassed through its residual; reward change vs the unmodified model with paired bootstrap
  intervals over the prompt x seed cells (Fig. 3a).
- :func:`scale_sweep`: each coefficient set to every ``alpha`` of a grid (Fig. 3b heatmap).
- :func:`evaluate_settings` / :func:`nfe_study`: mean rewards of labelled settings (a vector or the
  unmodified model, at some step count) on the same cells, with intervals and paired differences to a
  reference; the NFE study is reward vs number of steps, one line per label (Fig. 6).

Every analysis takes a :class:`~calibri_pipeline.method.population.PopulationEvaluator` (backbone,
search space, rewards, sampling settings, image cache) and scores one big population through it. Plots use matplotlib's Agg canvas
directly (no pyplot, no global backend change) and come back as PNG bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from calibri_pipeline.method.labels import setting_label
from calibri_pipeline.method.stats import bootstrap_ci, paired_difference_ci

if TYPE_CHECKING:
    import polars as pl

    from calibri_pipeline.method.population import PopulationEvaluator
    from calibri_pipeline.method.space import CalibrationSpace, SearchSpace
    from calibri_pipeline.prompts.base import Prompt

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
DEFAULT_SEEDS = (0, 1, 2, 3, 4)  # the paper repeats every configuration with 5 seeds


@dataclass
class AnalysisResult:
    """A table (polars), the raw per-cell scores behind it and how to plot it."""

    kind: str  # "block_ablation" | "scale_sweep" | "settings" | "nfe"
    table: pl.DataFrame
    scores: dict[str, np.ndarray]  # reward -> [rows, cells] (row meaning depends on kind)
    cells: list[dict[str, Any]]  # prompt_id and seed of every column of the score matrices
    meta: dict[str, Any] = field(default_factory=dict)

    def plot(self) -> bytes:
        """The matching figure as PNG bytes."""
        if self.kind == "block_ablation":
            return plot_block_ablation(self.table, title=self.meta.get("title"))
        if self.kind == "scale_sweep":
            return plot_scale_sweep(self.table, title=self.meta.get("title"))
        if self.kind == "nfe":
            return plot_nfe(self.table, title=self.meta.get("title"))
        if self.kind == "settings":
            return plot_settings(self.table, title=self.meta.get("title"))
        raise ValueError(f"no plot for analysis kind {self.kind!r}")

    def markdown(self, digits: int = 4) -> str:
        return table_markdown(self.table, digits=digits)


# --------------------------------------------------------------------------------------------
# Cells and vectors
# --------------------------------------------------------------------------------------------


def _cells(prompts: Sequence[Prompt], seeds: Sequence[int]) -> tuple[list[Prompt], list[int], list[dict[str, Any]]]:
    if len(prompts) == 0:
        raise ValueError("the analysis needs at least one prompt")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("the analysis needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    cell_prompts = [p for p in prompts for _ in seeds]
    cell_seeds = [s for _ in prompts for s in seeds]
    cells = [{"prompt_id": p.prompt_id, "seed": s} for p, s in zip(cell_prompts, cell_seeds)]
    return cell_prompts, cell_seeds, cells


def infer_n_models(space: CalibrationSpace, vector: Any) -> int:
    """The ensemble size a search vector was made for (``len = n * (size + 1)``)."""
    length = int(torch.as_tensor(np.asarray(vector) if not isinstance(vector, torch.Tensor) else vector).numel())
    n, rest = divmod(length, space.size + 1)
    if rest or n < 1:
        raise ValueError(
            f"a Calibri vector for this space has n * {space.size + 1} entries (n models x ({space.size} "
            f"coefficients + 1 weight)); got {length}"
        )
    return n


def _one_model_block_search(evaluator: PopulationEvaluator, what: str) -> SearchSpace:
    search = evaluator.search
    if search is None or search.n_models != 1:
        raise ValueError(f"{what} needs an evaluator over one model's coefficients (SearchSpace with n_models=1)")
    if len(evaluator.rewards) != 1:
        raise ValueError(f"{what} takes one reward")
    return search


# --------------------------------------------------------------------------------------------
# Block ablation and scale sweep (Fig. 3)
# --------------------------------------------------------------------------------------------


def block_ablation(
    evaluator: PopulationEvaluator,
    prompts: Sequence[Prompt],
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    n_boot: int = 2000,
    level: float = 0.95,
    bootstrap_seed: int = 0,
    label: str = "block ablation",
) -> AnalysisResult:
    """Bypass each coefficient's branches in turn (coefficient 0) and measure the reward change.

    ``evaluator``: one model's coefficients (its search space, usually at block granularity), one
    reward and the sampling settings. Table columns: ``name, index, baseline_mean, ablated_mean,
    delta, delta_low, delta_high, n_cells``; ``delta`` is ablated - baseline, its interval a paired
    bootstrap over prompt x seed cells.
    """
    search = _one_model_block_search(evaluator, "block_ablation")
    space = search.space
    name = evaluator.rewards[0].name
    cell_prompts, cell_seeds, cells = _cells(prompts, seeds)
    base = search.x0(evaluator.sampling.guidance).to(torch.float32)
    population = base.repeat(space.size + 1, 1)
    for k in range(space.size):
        population[k + 1, k] = 0.0
    scores = evaluator(population, cell_prompts, cell_seeds, label=label).scores[name]
    rows = []
    for k in range(space.size):
        diff = paired_difference_ci(scores[k + 1], scores[0], n_boot=n_boot, level=level, seed=bootstrap_seed)
        rows.append(
            {
                "name": space.names[k],
                "index": k,
                "baseline_mean": float(scores[0].mean()),
                "ablated_mean": float(scores[k + 1].mean()),
                "delta": diff.mean,
                "delta_low": diff.low,
                "delta_high": diff.high,
                "n_cells": diff.n,
            }
        )
    import polars as pl

    return AnalysisResult(
        "block_ablation",
        pl.DataFrame(rows),
        {name: scores},
        cells,
        {
            "reward": name,
            "steps": evaluator.sampling.steps,
            "guidance": evaluator.sampling.guidance,
            "granularity": space.granularity,
            "level": level,
            "title": f"{name}: change when each {space.granularity} is bypassed ({int(level * 100)}% CI)",
        },
    )


def scale_sweep(
    evaluator: PopulationEvaluator,
    prompts: Sequence[Prompt],
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    n_boot: int = 2000,
    level: float = 0.95,
    bootstrap_seed: int = 0,
    label: str = "scale sweep",
) -> AnalysisResult:
    """Scale each coefficient to every ``alpha`` (the others stay 1): one population of size x alphas.

    Table columns: ``name, index, alpha, mean, delta, delta_low, delta_high, n_cells`` (delta vs the
    unmodified model, paired over cells; alpha = 1 *is* the unmodified model, delta 0).
    """
    search = _one_model_block_search(evaluator, "scale_sweep")
    space = search.space
    name = evaluator.rewards[0].name
    alphas = [float(a) for a in alphas]
    if not alphas or len(set(alphas)) != len(alphas) or not all(np.isfinite(alphas)):
        raise ValueError(f"alphas must be distinct finite numbers, got {alphas}")
    cell_prompts, cell_seeds, cells = _cells(prompts, seeds)
    base = search.x0(evaluator.sampling.guidance).to(torch.float32)
    grid = [(k, a) for k in range(space.size) for a in alphas if a != 1.0]
    population = base.repeat(len(grid) + 1, 1)
    for row, (k, a) in enumerate(grid, start=1):
        population[row, k] = a
    scores = evaluator(population, cell_prompts, cell_seeds, label=label).scores[name]
    row_of = {key: i for i, key in enumerate(grid, start=1)}
    rows = []
    for k in range(space.size):
        for a in alphas:
            r = 0 if a == 1.0 else row_of[(k, a)]
            diff = paired_difference_ci(scores[r], scores[0], n_boot=n_boot, level=level, seed=bootstrap_seed)
            rows.append(
                {
                    "name": space.names[k],
                    "index": k,
                    "alpha": a,
                    "mean": float(scores[r].mean()),
                    "delta": diff.mean,
                    "delta_low": diff.low,
                    "delta_high": diff.high,
                    "n_cells": diff.n,
                }
            )
    import polars as pl

    return AnalysisResult(
        "scale_sweep",
        pl.DataFrame(rows),
        {name: scores},
        cells,
        {
            "reward": name,
            "steps": evaluator.sampling.steps,
            "guidance": evaluator.sampling.guidance,
            "alphas": alphas,
            "granularity": space.granularity,
            "title": f"{name}: change vs unmodified, one {space.granularity} scaled by alpha",
        },
    )


# --------------------------------------------------------------------------------------------
# Settings comparison and NFE study (Fig. 6)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One way to sample: a Calibri vector (``None`` = the unmodified model) at a step count, guidance
    and sigma shift (``None``: the evaluator's).

    ``search`` is the vector's search space (None: the evaluator's own), so one comparison can hold
    vectors of different granularities and ensemble sizes (block calibration, the CFG ensemble,
    skip-layer guidance as a 3-member ensemble).
    """

    vector: Any = None
    steps: int | None = None
    guidance: float | None = None
    search: SearchSpace | None = None
    shift: float | None = None


def evaluate_settings(
    evaluator: PopulationEvaluator,
    settings: Mapping[str, Setting],
    prompts: Sequence[Prompt],
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    reference: str | None = None,
    references: Mapping[str, str] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    bootstrap_seed: int = 0,
    clusters: str = "cell",
) -> AnalysisResult:
    """Mean reward of each labelled setting on the same prompt x seed cells, with intervals.

    Settings sharing (steps, guidance, search space) are scored as one population. With a
    ``reference`` label, every row also gets the paired difference to it (``delta``, ``delta_low``,
    ``delta_high``); ``references`` (label -> reference label) adds the paired differences of
    every setting against each further reference to ``meta["comparisons"]``. ``clusters="prompt"``
    resamples whole prompts instead of cells.
    Table columns: ``label, steps, guidance, shift, n_models, reward, mean, ci_low, ci_high, n_cells[, delta, delta_low, delta_high]``.
    """
    if not settings:
        raise ValueError("no settings to evaluate")
    for ref in [reference, *(references or {}).values()]:
        if ref is not None and ref not in settings:
            raise ValueError(f"reference {ref!r} is not one of the settings {list(settings)}")
    if clusters not in ("cell", "prompt"):
        raise ValueError(f"clusters must be 'cell' or 'prompt', got {clusters!r}")
    reward_list = evaluator.rewards
    cell_prompts, cell_seeds, cells = _cells(prompts, seeds)
    cluster_ids = [c["prompt_id"] for c in cells] if clusters == "prompt" else None

    resolved: dict[str, tuple[int, float | None, Any, torch.Tensor | None, float]] = {}
    for label, setting in settings.items():
        if not isinstance(setting, Setting):
            raise TypeError(f"settings[{label!r}] must be a Setting, got {type(setting).__name__}")
        steps = setting.steps if setting.steps is not None else evaluator.sampling.steps
        guidance = setting.guidance if setting.guidance is not None else evaluator.sampling.guidance
        shift = float(setting.shift) if setting.shift is not None else evaluator.sampling.shift
        if setting.vector is None:
            resolved[label] = (steps, guidance, None, None, shift)
        else:
            search = setting.search if setting.search is not None else evaluator.search
            if search is None:
                raise ValueError(f"setting {label!r} has a Calibri vector: give its search space (Setting.search)")
            resolved[label] = (steps, guidance, search, search.check(setting.vector)[0], shift)

    per_label: dict[str, dict[str, np.ndarray]] = {}
    keys: dict[str, list[str]] = {}  # the image-cache key of every cell, per label
    groups: dict[tuple[int, float | None, int, float], list[str]] = {}
    for label, (steps, guidance, search, _, shift) in resolved.items():
        groups.setdefault((steps, guidance, id(search), shift), []).append(label)
    for (steps, guidance, _, shift), labels in groups.items():
        search = resolved[labels[0]][2]
        ev = evaluator.with_search(search).with_sampling(steps=steps, guidance=guidance, shift=shift)
        tag = f"{len(labels)} setting(s) at {steps} steps, guidance {guidance:g}" if guidance is not None else None
        if tag is not None and shift != 1.0:
            tag += f", shift {shift:g}"
        if search is None:  # the unmodified model: one evaluation serves every such label
            result = ev(None, cell_prompts, cell_seeds, label=tag)
            for label in labels:
                per_label[label] = {name: s[0] for name, s in result.scores.items()}
                keys[label] = result.keys[0]
        else:
            population = torch.stack([resolved[label][3] for label in labels])
            result = ev(population, cell_prompts, cell_seeds, label=tag)
            for i, label in enumerate(labels):
                per_label[label] = {name: s[i] for name, s in result.scores.items()}
                keys[label] = result.keys[i]

    def paired(label: str, ref: str, reward: str):
        return paired_difference_ci(
            per_label[label][reward],
            per_label[ref][reward],
            clusters=cluster_ids,
            n_boot=n_boot,
            level=level,
            seed=bootstrap_seed,
        )

    rows = []
    for label in settings:
        steps, guidance, search, _, shift = resolved[label]
        for r in reward_list:
            values = per_label[label][r.name]
            ci = bootstrap_ci(values, clusters=cluster_ids, n_boot=n_boot, level=level, seed=bootstrap_seed)
            row = {
                "label": label,
                "steps": steps,
                "guidance": guidance,
                "shift": shift,
                "n_models": 0 if search is None else search.n_models,
                "reward": r.name,
                "mean": ci.mean,
                "ci_low": ci.low,
                "ci_high": ci.high,
                "n_cells": ci.n,
            }
            if reference is not None:
                diff = paired(label, reference, r.name)
                row.update(delta=diff.mean, delta_low=diff.low, delta_high=diff.high)
            rows.append(row)
    comparisons = []
    for ref in dict.fromkeys([*([reference] if reference else []), *(references or {}).values()]):
        for label in settings:
            if label == ref:
                continue
            for r in reward_list:
                diff = paired(label, ref, r.name)
                comparisons.append(
                    {
                        "setting": label,
                        "reference": ref,
                        "reward": r.name,
                        "delta": diff.mean,
                        "ci_low": diff.low,
                        "ci_high": diff.high,
                        "n": diff.n,
                    }
                )
    import polars as pl

    matrix = {r.name: np.stack([per_label[label][r.name] for label in settings]) for r in reward_list}
    return AnalysisResult(
        "settings",
        pl.DataFrame(rows),
        matrix,
        cells,
        {
            "labels": list(settings),
            "reference": reference,
            "level": level,
            "clusters": clusters,
            "comparisons": comparisons,
            "keys": keys,
            "cell_prompts": cell_prompts,
            "cell_seeds": cell_seeds,
        },
    )


def nfe_study(
    evaluator: PopulationEvaluator,
    vectors: Mapping[str, Any],
    steps_list: Sequence[int],
    prompts: Sequence[Prompt],
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    searches: Mapping[str, SearchSpace] | None = None,
    guidance: float | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    bootstrap_seed: int = 0,
) -> AnalysisResult:
    """Reward vs number of sampling steps for each labelled vector (``None`` = the unmodified model).

    ``searches`` gives a label's search space when it is not the evaluator's. Table columns:
    ``label, steps, reward, mean, ci_low, ci_high, n_cells`` (one row per label x steps x reward);
    plot: one panel per reward, one line per label with its interval band.
    """
    steps_list = [int(s) for s in steps_list]
    if not steps_list or any(s < 1 for s in steps_list) or len(set(steps_list)) != len(steps_list):
        raise ValueError(f"steps_list must hold distinct positive step counts, got {steps_list}")
    if not vectors:
        raise ValueError("nfe_study needs at least one labelled vector")
    searches = dict(searches or {})
    settings = {
        setting_label(label, steps): Setting(vector=vector, steps=steps, guidance=guidance, search=searches.get(label))
        for label, vector in vectors.items()
        for steps in steps_list
    }
    result = evaluate_settings(
        evaluator, settings, prompts, seeds=seeds, n_boot=n_boot, level=level, bootstrap_seed=bootstrap_seed
    )
    import polars as pl

    label_of = {setting_label(label, steps): label for label in vectors for steps in steps_list}
    table = result.table.with_columns(pl.col("label").replace_strict(label_of).alias("label"))
    return AnalysisResult(
        "nfe",
        table.select(["label", "steps", "reward", "mean", "ci_low", "ci_high", "n_cells"]),
        result.scores,
        result.cells,
        {"labels": list(vectors), "steps": steps_list, "level": level, "title": "reward vs number of sampling steps"},
    )


# --------------------------------------------------------------------------------------------
# Output: markdown and plots
# --------------------------------------------------------------------------------------------


def table_markdown(table: pl.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table (floats rounded to ``digits``)."""

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v)

    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.iter_rows()]
    return "\n".join([header, rule, *body]) + "\n"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _short(name: str) -> str:
    """``single_transformer_blocks.3`` -> ``S3``; ``transformer_blocks.3.attn.image`` -> ``D3.attn.image``."""
    for prefix, tag in (("single_transformer_blocks.", "S"), ("transformer_blocks.", "D")):
        if name.startswith(prefix):
            return tag + name[len(prefix) :]
    return name


def plot_block_ablation(table: pl.DataFrame, title: str | None = None) -> bytes:
    """Fig. 3a: reward change per bypassed block, with interval whiskers."""
    names = [_short(n) for n in table["name"].to_list()]
    delta = np.array(table["delta"].to_list())
    low, high = np.array(table["delta_low"].to_list()), np.array(table["delta_high"].to_list())
    fig = _figure(max(6.0, 0.35 * len(names) + 2), 3.8)
    ax = fig.add_subplot()
    colors = ["tab:green" if d > 0 else "tab:red" for d in delta]
    x = np.arange(len(names))
    ax.bar(x, delta, color=colors, alpha=0.8)
    ax.errorbar(x, delta, yerr=[delta - low, high - delta], fmt="none", ecolor="black", capsize=2, linewidth=1)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, names, rotation=60 if len(names) > 12 else 0, fontsize=8)
    ax.set_ylabel("reward change (ablated - baseline)")
    ax.set_title(title or "block ablation", fontsize=10)
    return _png(fig)


def plot_scale_sweep(table: pl.DataFrame, title: str | None = None) -> bytes:
    """Fig. 3b: heatmap of the reward change, blocks x alpha, zero-centred diverging colours."""
    from matplotlib.colors import TwoSlopeNorm

    names = list(dict.fromkeys(table["name"].to_list()))
    alphas = sorted(set(table["alpha"].to_list()))
    grid = np.zeros((len(alphas), len(names)))
    lookup = {(r["name"], r["alpha"]): r["delta"] for r in table.iter_rows(named=True)}
    for i, a in enumerate(alphas):
        for j, n in enumerate(names):
            grid[i, j] = lookup[(n, a)]
    fig = _figure(max(6.0, 0.45 * len(names) + 2.5), 0.35 * len(alphas) + 2.2)
    ax = fig.add_subplot()
    bound = float(np.abs(grid).max()) or 1.0
    image = ax.imshow(grid, aspect="auto", cmap="RdBu", norm=TwoSlopeNorm(0.0, -bound, bound), origin="lower")
    best = grid.argmax(axis=0)
    ax.scatter(np.arange(len(names)), best, marker="*", color="black", s=30, label="best alpha")
    ax.set_xticks(np.arange(len(names)), [_short(n) for n in names], rotation=60 if len(names) > 12 else 0, fontsize=8)
    ax.set_yticks(np.arange(len(alphas)), [f"{a:g}" for a in alphas], fontsize=8)
    ax.set_ylabel("alpha (block output scale)")
    ax.set_title(title or "scale sweep", fontsize=10)
    ax.legend(loc="upper right", fontsize=7)
    fig.colorbar(image, ax=ax, label="reward change vs alpha = 1")
    return _png(fig)


def plot_nfe(table: pl.DataFrame, title: str | None = None) -> bytes:
    """Fig. 6: reward vs steps, one line per label with its interval band, one panel per reward."""
    rewards = list(dict.fromkeys(table["reward"].to_list()))
    labels = list(dict.fromkeys(table["label"].to_list()))
    fig = _figure(4.2 * len(rewards), 3.4)
    axes = fig.subplots(1, len(rewards), squeeze=False)[0]
    for ax, reward in zip(axes, rewards):
        for label in labels:
            rows = sorted(
                (r for r in table.iter_rows(named=True) if r["reward"] == reward and r["label"] == label),
                key=lambda r: r["steps"],
            )
            steps = [r["steps"] for r in rows]
            line = ax.plot(steps, [r["mean"] for r in rows], marker="o", markersize=3, label=label)[0]
            ax.fill_between(
                steps, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], color=line.get_color(), alpha=0.2
            )
        all_steps = sorted(set(table["steps"].to_list()))
        if len(all_steps) <= 12:
            ax.set_xticks(all_steps)
        ax.set_xlabel("sampling steps (NFE per guidance pass)")
        ax.set_title(reward, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean reward")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


def plot_settings(table: pl.DataFrame, title: str | None = None) -> bytes:
    """Mean reward per setting (point) with interval whiskers, one panel per reward."""
    rewards = list(dict.fromkeys(table["reward"].to_list()))
    fig = _figure(max(4.0, 3.6 * len(rewards)), 3.6)
    axes = fig.subplots(1, len(rewards), squeeze=False)[0]
    for ax, reward in zip(axes, rewards):
        rows = [r for r in table.iter_rows(named=True) if r["reward"] == reward]
        x = np.arange(len(rows))
        means = np.array([r["mean"] for r in rows])
        err = [means - np.array([r["ci_low"] for r in rows]), np.array([r["ci_high"] for r in rows]) - means]
        # points with whiskers, not bars: rewards rarely start at 0, and bars would exaggerate gaps
        ax.errorbar(x, means, yerr=err, fmt="o", color="tab:blue", ecolor="black", capsize=4)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xticks(x, [r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(reward, fontsize=10)
        lo = min(r["ci_low"] for r in rows)
        hi = max(r["ci_high"] for r in rows)
        pad = 0.15 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


def plot_search_history(generations: Sequence[Mapping[str, Any]], title: str | None = None) -> bytes:
    """Training curve of a CMA-ES run: bucket mean/best fitness and validation per generation, and sigma.

    ``generations`` are :attr:`SearchResult.generations` rows (or the catalog's copy of them).
    """
    if not generations:
        raise ValueError("no generations to plot")
    g = [r["generation"] for r in generations]
    fig = _figure(7.0, 4.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot(g, [r["train_mean"] for r in generations], color="tab:gray", linewidth=1, label="bucket mean (train)")
    top.plot(g, [r["train_best"] for r in generations], color="tab:blue", linewidth=1, label="bucket best (train)")
    val = [(r["generation"], r["val_score"]) for r in generations if r.get("val_score") is not None]
    if val:
        top.plot(
            [v[0] for v in val], [v[1] for v in val], color="tab:red", marker="o", markersize=3, label="validation"
        )
        top.axhline(val[0][1], color="tab:red", linestyle=":", linewidth=1, label="validation baseline (x0)")
        best = [(r["generation"], r["val_score"]) for r in generations if r.get("val_is_best")]
        top.scatter(
            [b[0] for b in best], [b[1] for b in best], marker="*", s=60, color="black", zorder=3, label="new best"
        )
    top.set_ylabel("fitness")
    top.legend(fontsize=7)
    top.grid(alpha=0.3)
    bottom.plot(g, [r["sigma"] for r in generations], color="tab:purple")
    bottom.set_ylabel("sigma")
    bottom.set_xlabel("generation")
    bottom.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


__all__ = [
    "AnalysisResult",
    "plot_search_history",
    "Setting",
    "block_ablation",
    "scale_sweep",
    "evaluate_settings",
    "nfe_study",
    "infer_n_models",
    "table_markdown",
    "plot_block_ablation",
    "plot_scale_sweep",
    "plot_nfe",
    "plot_settings",
    "DEFAULT_ALPHAS",
    "DEFAULT_SEEDS",
]
