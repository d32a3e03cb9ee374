"""The `calibri` command. Each subcommand lives in its own module and is imported only when used,
so `calibri sql` answers without loading torch."""

from __future__ import annotations

import importlib
import sys

#: subcommand -> ("module:function", one-line help). Each function takes argv (list[str]) and
#: returns an exit code (or None for 0).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("calibri_pipeline.demo:main", "materialize the whole pipeline on the embedded default and print results"),
    "sql": ("calibri_pipeline.sql_cli:main", "run a read-only SQL query against the catalog"),
    "tables": ("calibri_pipeline.tables_cli:main", "print the paper's Tables 2, 6 and 7 from the catalog"),
    "train-toy": ("calibri_pipeline.training.toy_train:main", "train the embedded toy DiT on the procedural world"),
    "eval-toy": (
        "calibri_pipeline.training.evaluate_toy:main",
        "measure the toy model's accuracy per category and NFE",
    ),
    "calibrate": (
        "calibri_pipeline.calibrate_cli:main",
        "one calibration and its held-out comparison with the alternatives, without Dagster",
    ),
    "export": (
        "calibri_pipeline.export_cli:main",
        "a finished calibration as a Calibration file or baked diffusers checkpoints",
    ),
    "serve-reward": ("calibri_pipeline.rewards.server:main", "serve a reward over HTTP on loopback"),
    "reward-env": (
        "calibri_pipeline.rewards.envs:main",
        "build a virtualenv for one reward model (HPSv3, ImageReward, ...) and print how to serve it",
    ),
    "dev": (
        "calibri_pipeline.dev_server:main",
        "serve the Dagster UI over the demo's instance; Ctrl-C/SIGTERM stop all of it",
    ),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: calibri <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`calibri <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"calibri: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    code = func(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
