"""How a sampled setting is named (light: the report and ``calibri tables`` read it without torch)."""


def setting_label(name: str, steps: int) -> str:
    """How a sampled setting is named in evaluations and comparisons: ``calibri@4``, ``baseline@8``."""
    return f"{name}@{steps}"


__all__ = ["setting_label"]
