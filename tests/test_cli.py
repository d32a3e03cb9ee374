"""Every `calibri` command's target imports and answers --help (a broken entry cannot hide)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from calibri_pipeline.cli import COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_target_imports_and_prints_help(name: str, capsys: pytest.CaptureFixture) -> None:
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    with pytest.raises(SystemExit) as exit_info:
        func(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out.lower() and name in out


def test_the_calibri_command_lists_every_command_and_refuses_unknown_ones() -> None:
    listed = subprocess.run([sys.executable, "-m", "calibri_pipeline.cli", "--help"], capture_output=True, text=True)
    assert listed.returncode == 0 and all(name in listed.stdout for name in COMMANDS)
    unknown = subprocess.run([sys.executable, "-m", "calibri_pipeline.cli", "calibrat"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command 'calibrat'" in unknown.stderr


def test_calibrate_refuses_bad_settings_in_one_line(tmp_path) -> None:
    from calibri_pipeline.calibrate_cli import main

    code = main(["--out", str(tmp_path / "out"), "--home", str(tmp_path / "home"), "--set", "scaling=magic"])
    assert code == 2 and not (tmp_path / "out").exists() and not (tmp_path / "home").exists()
