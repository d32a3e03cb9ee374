"""`calibri dev`: the Dagster UI over the demo's instance, stopped for good by Ctrl-C or SIGTERM.

Why a launcher: a shell starts a background job (``make dev &``, a non-interactive script) with
SIGINT ignored, and an ignored signal stays ignored across ``exec``. Python then installs no
KeyboardInterrupt handler, ``dagster dev`` maps SIGTERM onto SIGINT's handler (SIG_IGN, so SIGTERM
is ignored too), and its webserver and daemon, which stop by interrupting themselves with SIGINT
when dagster dev writes to their shutdown pipe, log a shutdown and keep running. ``dg dev`` runs
the same code in-process.

So this launcher does the least that fixes it:

- it installs its own SIGINT/SIGTERM handlers; handled signals are reset to SIG_DFL in a child at
  ``exec``, so ``dagster dev`` / ``dg dev`` starts with default handling and its own shutdown works;
- it starts the server in its own process group (stdin from /dev/null) and passes the first SIGINT
  or SIGTERM on to the server process alone, which then stops its webserver, daemon and code server
  through their shutdown pipes in a few seconds. Not to the whole group: a code server that gets the
  signal itself exits before dagster dev stops it, and dagster dev's proxy-server manager restarts it
  ("Code server process has exited with code 0. Restarting"), leaving a fresh one behind. That is
  also what Ctrl-C in a terminal does to a foreground ``dagster dev``; here the terminal's SIGINT
  reaches only ``make`` and this launcher, since the server's group is not the foreground one;
- it waits; whatever of the group still runs ``--grace`` seconds after the first signal (or after
  the server exited on its own), or at once on a second signal, is killed with SIGKILL.

The exit code is the server's (128 + N when it died of signal N). POSIX only.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

#: the checkout holding workspace.yaml and pyproject.toml ([tool.dg]) for an editable install
_CHECKOUT = Path(__file__).resolve().parents[1]
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _log(message: str) -> None:
    print(f"calibri dev: {message}", file=sys.stderr, flush=True)


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: ask the kernel whether anyone (zombies included) is left
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _signal_leader(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def supervise(
    command: Sequence[str],
    *,
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    grace: float = 20.0,
) -> int:
    """Run ``command`` in its own process group until it exits; SIGINT/SIGTERM stop all of it.

    The first SIGINT or SIGTERM sent to this process is passed on to the command's process (the
    group leader); a second one, or ``grace`` seconds, escalates to SIGKILL of the whole group.
    Returns the command's exit code.
    """
    stop: dict[str, float | int] = {}

    def _forward() -> None:
        stop["forwarded"] = 1
        _log(f"{signal.Signals(int(stop['signum'])).name} received, stopping the server (SIGKILL in {grace:g} s)")
        _signal_leader(int(stop["pgid"]), int(stop["signum"]))

    def on_signal(signum: int, _frame) -> None:
        if "at" not in stop:
            stop.update(at=time.monotonic(), signum=signum)
            if "pgid" in stop:
                _forward()
        elif "pgid" in stop:
            _log(f"second {signal.Signals(signum).name}: killing the server's process group")
            stop["kill"] = 1
            _signal_group(int(stop["pgid"]), signal.SIGKILL)

    # Installed before the child exists: no window in which a signal is ignored or kills only us.
    # These replace an inherited SIG_IGN, and the child starts with SIG_DFL (exec resets handlers).
    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        if "at" in stop:  # stopped before we started
            return 128 + int(stop["signum"])
        process = subprocess.Popen(list(command), cwd=cwd, env=env, stdin=subprocess.DEVNULL, process_group=0)
        pgid = process.pid
        stop["pgid"] = pgid
        if "at" in stop and "forwarded" not in stop:  # a signal arrived while Popen ran
            _forward()
        returncode = None
        while returncode is None:
            try:
                returncode = process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if "at" in stop and time.monotonic() - float(stop["at"]) > grace and "kill" not in stop:
                    _log(f"still running {grace:g} s after the signal: SIGKILL to its process group")
                    stop["kill"] = 1
                    _signal_group(pgid, signal.SIGKILL)
        # The server is gone; its webserver, daemon and code server may still be stopping.
        deadline = (float(stop["at"]) if "at" in stop else time.monotonic()) + grace
        if "at" not in stop and group_members(pgid):
            _signal_group(pgid, signal.SIGINT)  # it exited on its own: stop what it leaves behind
        while group_members(pgid) and time.monotonic() < deadline and "kill" not in stop:
            time.sleep(0.2)
        if group_members(pgid):
            _log(f"processes {group_members(pgid)} outlived the server: SIGKILL")
            _signal_group(pgid, signal.SIGKILL)
            while group_members(pgid) and time.monotonic() < deadline + 5:
                time.sleep(0.1)
        return returncode if returncode >= 0 else 128 - returncode
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def dg_available() -> bool:
    return importlib.util.find_spec("dagster_dg_cli") is not None


def server_command(cli: str, *, host: str, port: int, workspace: Path) -> list[str]:
    """``dg dev`` (reads [tool.dg] in the project's pyproject.toml) or ``dagster dev -w workspace.yaml``."""
    if cli == "dg":
        return [sys.executable, "-m", "dagster_dg_cli.cli", "dev", "--host", host, "--port", str(port)]
    return [sys.executable, "-m", "dagster", "dev", "-w", str(workspace), "--host", host, "--port", str(port)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="calibri dev",
        description="Serve the Dagster UI over the demo's instance (<home>/dagster_home) and catalog. "
        "Ctrl-C or SIGTERM stops it and every process it started.",
    )
    parser.add_argument(
        "--cli",
        choices=("auto", "dg", "dagster"),
        default="auto",
        help="`dg dev` or `dagster dev -w workspace.yaml`; auto: dg when dagster-dg-cli is installed",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the webserver binds (default: loopback only)")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument(
        "--home",
        default=os.environ.get("CALIBRI_HOME", ".calibri"),
        help="the demo's home: catalog, images and Dagster instance (default: $CALIBRI_HOME or .calibri)",
    )
    parser.add_argument(
        "--project-dir",
        default=None,
        help="folder with workspace.yaml and pyproject.toml (default: this checkout, else the current folder)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=20.0,
        help="seconds the server gets to stop after Ctrl-C/SIGTERM before SIGKILL (default 20)",
    )
    args = parser.parse_args(argv)

    project = (
        Path(args.project_dir)
        if args.project_dir
        else (_CHECKOUT if (_CHECKOUT / "workspace.yaml").is_file() else Path.cwd())
    )
    project = project.resolve()
    workspace = project / "workspace.yaml"
    cli = ("dg" if dg_available() else "dagster") if args.cli == "auto" else args.cli
    if cli == "dg" and not dg_available():
        parser.error("--cli dg: the dg CLI (dagster-dg-cli) is not installed in this environment")
    if cli == "dagster" and not workspace.is_file():
        parser.error(f"no workspace.yaml in {project} (give --project-dir)")

    from calibri_pipeline.demo import _setup_home

    dagster_home = _setup_home(Path(args.home).resolve())  # sets CALIBRI_HOME and DAGSTER_HOME here
    command = server_command(cli, host=args.host, port=args.port, workspace=workspace)
    _log(f"{cli} dev on http://{args.host}:{args.port} with DAGSTER_HOME={dagster_home}; Ctrl-C or SIGTERM stops it")
    return supervise(command, cwd=project, env=dict(os.environ), grace=args.grace)


if __name__ == "__main__":
    sys.exit(main())
