"""The reward names the pipeline knows, without importing any reward (cheap to import anywhere)."""

#: the embedded world's exact rewards, the headline score first; all are evaluated, world_accuracy
#: (0 or 1 per image) is reported but not optimised
WORLD_REWARD_NAMES = ("world_score", "world_alignment", "world_accuracy", "world_quality")
#: the rewards a calibration can optimise (the ``reward`` partition keys)
OPTIMISABLE_REWARDS = (
    "world_score",
    "world_alignment",
    "world_quality",
    "hpsv3",
    "pickscore",
    "imagereward",
    "qalign",
    "clipscore",
)
#: what the paper evaluates real models with
PAPER_EVAL_REWARDS = ("hpsv3", "imagereward", "qalign")
#: real-model rewards, in the order tables show them after the world's
REAL_REWARD_NAMES = ("hpsv3", "imagereward", "qalign", "pickscore", "clipscore")
