"""Ready-made configurations: the paper's experiments and the embedded default.

A preset fixes what a calibration needs besides the model and the reward (which are the asset
partitions): granularity, ensemble size, step counts, search sizes and the prompt sets. Asset
configs start from the preset named by the model partition (or by ``preset=`` in the launchpad)
and override single fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

T2I_COMPBENCH_TRAIN = "t2i_compbench_train.txt"
T2I_COMPBENCH_VAL = "t2i_compbench_val_random_crop.txt"


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # backbone key understood by calibri_pipeline.backbones.registry.load_backbone
    reward: str  # reward optimised (the partition's reward wins when they differ)
    granularity: str = "block"
    n_models: int = 1
    calibration_steps: int = 15  # the paper calibrates at 15 steps
    default_steps: int = 30  # the baseline's usual step count
    guidance: float | None = None  # None: the backbone's default
    eval_rewards: tuple[str, ...] = ()
    nfe_list: tuple[int, ...] = (4, 8, 15, 30)
    # prompts
    prompt_source: str = "world"  # "world" | "t2i-compbench" | a file path (txt/jsonl) | "hpdv3:<test.json>"
    n_train: int = 400
    n_val: int = 64
    n_test: int = 128
    seeds: tuple[int, ...] = (0, 1)  # seeds per test prompt (diversity needs >= 2)
    # search (the paper: sigma0 0.25, pycma's default population, bucket 16)
    generations: int = 200
    popsize: int | None = None
    bucket_size: int = 16
    val_every: int = 5
    patience: int | None = 8
    # analyses
    ablation_prompts: int = 32
    ablation_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    sweep_alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    max_batch: int | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def with_overrides(self, **overrides: Any) -> "Preset":
        clean = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(clean) - set(asdict(self)))
        if unknown:
            raise ValueError(f"unknown preset fields {unknown}")
        for key in ("seeds", "eval_rewards", "nfe_list", "ablation_seeds", "sweep_alphas"):
            if key in clean:
                clean[key] = tuple(clean[key])
        return replace(self, **clean)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


WORLD_REWARDS = ("world_score", "world_alignment", "world_accuracy", "world_quality")
PAPER_REWARDS = ("hpsv3", "imagereward", "qalign")

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="embedded-default",
            model="toy",
            reward="world_score",
            granularity="block",
            n_models=1,
            calibration_steps=4,
            default_steps=30,
            eval_rewards=WORLD_REWARDS,
            nfe_list=(1, 2, 4, 8, 30),
            n_train=400,
            n_val=48,
            n_test=64,
            seeds=(0, 1),
            generations=16,  # 24 took the demo to 16.4 min on 2 quiet cores; 16 keeps it under 15
            bucket_size=16,
            val_every=4,
            patience=4,
            ablation_prompts=16,
            ablation_seeds=(0, 1),
            sweep_alphas=(0.0, 0.5, 1.0, 1.5, 2.0),
            notes="the tiny toy DiT on the procedural world, calibrated at 4 steps; minutes on a laptop CPU",
        ),
        Preset(
            name="embedded-gate-cfg",
            model="toy",
            reward="world_score",
            granularity="gate",
            n_models=2,
            calibration_steps=4,
            default_steps=30,
            eval_rewards=WORLD_REWARDS,
            nfe_list=(1, 2, 4, 8, 15, 30),
            n_train=400,
            n_val=48,
            n_test=96,
            generations=30,
            val_every=5,
            patience=4,
            ablation_prompts=24,
            ablation_seeds=(0, 1),
            sweep_alphas=(0.0, 0.5, 1.0, 1.5, 2.0),
            notes="gate scaling with the CFG ensemble (n=2): conditional and unconditional passes calibrated apart",
        ),
        Preset(
            name="flux-block-hpsv3",
            model="flux",
            reward="hpsv3",
            granularity="block",
            calibration_steps=15,
            default_steps=30,
            eval_rewards=PAPER_REWARDS,
            prompt_source="t2i-compbench",
            generations=200,
            notes="paper Table 1: FLUX.1-dev, block scaling (57), 200 iterations, ~32 H100-hours",
        ),
        Preset(
            name="flux-layer-hpsv3",
            model="flux",
            reward="hpsv3",
            granularity="layer",
            calibration_steps=15,
            default_steps=30,
            eval_rewards=PAPER_REWARDS,
            prompt_source="t2i-compbench",
            generations=410,
            notes="paper Table 1: FLUX.1-dev, layer scaling (76), 410 iterations",
        ),
        Preset(
            name="flux-gate-hpsv3",
            model="flux",
            reward="hpsv3",
            granularity="gate",
            calibration_steps=15,
            default_steps=30,
            eval_rewards=PAPER_REWARDS,
            prompt_source="t2i-compbench",
            generations=960,
            notes="paper Table 1: FLUX.1-dev, gate scaling (114), 960 iterations",
        ),
        Preset(
            name="sd35m-gate-cfg-hpsv3",
            model="sd3",
            reward="hpsv3",
            granularity="gate",
            n_models=2,
            calibration_steps=15,
            default_steps=80,
            eval_rewards=PAPER_REWARDS,
            prompt_source="t2i-compbench",
            generations=2280,
            notes="paper Table 5: SD-3.5 Medium, gate scaling with standard CFG as an ensemble of 2 (216)",
        ),
        Preset(
            name="qwen-image-gate-cfg-hpsv3",
            model="qwen-image",
            reward="hpsv3",
            granularity="gate",
            n_models=2,
            calibration_steps=15,
            default_steps=100,
            eval_rewards=PAPER_REWARDS,
            prompt_source="t2i-compbench",
            generations=630,
            notes="paper Table 5: Qwen-Image, gate scaling with true CFG as an ensemble of 2 (482)",
        ),
    ]
}

DEFAULT_PRESET = "embedded-default"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def default_preset_for_model(model_kind: str) -> Preset:
    """The first preset for a backbone kind (partition keys of checkpoints map to their kind)."""
    for preset in PRESETS.values():
        if preset.model == model_kind:
            return preset
    raise ValueError(f"no preset for model kind {model_kind!r}; known kinds: {sorted({p.model for p in PRESETS.values()})}")
