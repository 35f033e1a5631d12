"""The supervisor of one `process:push` flow run: a tiny, detached parent.

The dispatcher may exit right after it submits a run (`pushpool dispatch
--once`), so the flow run process cannot be the dispatcher's child. The
provider starts this module instead::

    python -I .../providers/process_supervisor.py ATTEMPT_DIR

(`python -m providers.process_supervisor ATTEMPT_DIR` works too). It forks
once, so it is re-parented away from the dispatcher and never left as its
zombie, starts a new session (it is then the session and process-group leader;
its pid is the run's `infrastructure_pid`), publishes its pid file, runs the
command of `ATTEMPT_DIR/spec.json`, and records how the command ended.

Everything in `ATTEMPT_DIR` is written atomically and read by
`providers.process.ProcessProvider`:

``spec.json``   what to run (written by the provider before the launch)
``pid``         ``{"pid", "start_time", "boot_id", ...}`` of this supervisor;
                created exclusively: if the provider gave up waiting and
                wrote ``{"abandoned": ...}`` first, the supervisor runs nothing
``child.json``  the command's pid and working directory, once it started
``output.log``  the command's stdout and stderr, when ``stream_output`` is off
``cancel.json`` written by `ProcessProvider.cancel` before it signals the group
``exit.json``   ``{"exit_code", "reason", "cancelled", ...}`` once it ended

This file imports only the standard library (it runs with ``python -I``, so
nothing from the project's environment can shadow or break it, whatever the
flow run's working directory or ``PYTHONPATH`` is).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

SPEC_FILE = "spec.json"
PID_FILE = "pid"
CHILD_FILE = "child.json"
OUTPUT_LOG = "output.log"
CANCEL_FILE = "cancel.json"
EXIT_FILE = "exit.json"
BY_PID_DIR = "by-pid"

#: the signals that stop a run; each is passed on to the whole process group
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# --- small shared helpers (also used by the provider) -------------------------------------


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace `path` with `data`; readers see the old or the new file, never half of one."""
    temporary = _temporary_sibling(path)
    _write_private(temporary, json.dumps(data))
    os.replace(temporary, path)


def write_json_exclusive(path: Path, data: dict[str, Any]) -> bool:
    """Create `path` with `data` unless it exists; True if this call created it.
    Atomic both ways: one writer wins, and readers never see a partial file."""
    temporary = _temporary_sibling(path)
    _write_private(temporary, json.dumps(data))
    try:
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive create, then write
        try:
            _write_private(path, json.dumps(data))
            return True
        except FileExistsError:
            return False
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass


def read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def proc_stat(pid: int) -> Optional[tuple[str, int, int, int]]:
    """(state, process group, session, start time in clock ticks since boot) of a
    process from /proc, or None when there is no such process (or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 of proc(5): state; 5: pgrp; 6: session; 22: starttime
    return fields[0], int(fields[2]), int(fields[3]), int(fields[19])


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(exit_code: int) -> str:
    if exit_code < 0:
        return f"killed by signal {-exit_code} ({signal_name(-exit_code)})"
    return f"exited with code {exit_code}"


# --- the supervisor ---------------------------------------------------------------------


class Supervisor:
    def __init__(self, attempt_dir: Path):
        self.attempt_dir = attempt_dir
        self.spec: dict[str, Any] = json.loads((attempt_dir / SPEC_FILE).read_text())
        self.received_signal: Optional[int] = None
        self.child: Optional[subprocess.Popen[bytes]] = None

    def run(self) -> int:
        for number in FORWARDED_SIGNALS:
            signal.signal(number, self._on_signal)
        if not self._publish_pid():
            return 0  # the provider gave up on this launch before we were up: run nothing

        temporary_dir: Optional[str] = None
        working_dir = self.spec.get("working_dir")
        try:
            if not working_dir:
                temporary_dir = working_dir = tempfile.mkdtemp(prefix="pushpool-", suffix="-prefect")
            exit_code, reason = self._run_command(working_dir)
        finally:
            if temporary_dir:
                shutil.rmtree(temporary_dir, ignore_errors=True)

        cancel = read_json(self.attempt_dir / CANCEL_FILE)
        if cancel is not None:
            reason = "terminated by pushpool cancel"
            if exit_code == -signal.SIGKILL:
                reason += f" (killed with SIGKILL after the {cancel.get('grace_seconds', '?')} s grace period)"
        elif self.received_signal is not None and exit_code is not None:
            reason = f"{reason} after the supervisor received {signal_name(self.received_signal)}"
        write_json_exclusive(
            self.attempt_dir / EXIT_FILE,
            {
                "exit_code": exit_code,
                "reason": reason,
                "cancelled": cancel is not None,
                "child_pid": self.child.pid if self.child else None,
                "ended_at": time.time(),
            },
        )
        if exit_code is None:
            return 1
        return exit_code if exit_code >= 0 else 128 - exit_code

    def _publish_pid(self) -> bool:
        pid = os.getpid()
        stat = proc_stat(pid)
        record = {
            "pid": pid,
            "start_time": stat[3] if stat else None,
            "boot_id": boot_id(),
            "host": socket.gethostname(),
            "flow_run_id": self.spec["flow_run_id"],
            "attempt": self.spec["attempt"],
            "started_at": time.time(),
        }
        # The index first: once the pid file exists, everything a reader needs is in place.
        index = Path(self.spec["state_dir"]) / BY_PID_DIR
        index.mkdir(mode=0o700, exist_ok=True)
        write_json_atomic(
            index / str(pid),
            {"flow_run_id": self.spec["flow_run_id"], "attempt": self.spec["attempt"]},
        )
        return write_json_exclusive(self.attempt_dir / PID_FILE, record)

    def _run_command(self, working_dir: str) -> tuple[Optional[int], str]:
        argv: list[str] = self.spec["argv"]
        if self.received_signal is not None:
            return None, f"stopped by {signal_name(self.received_signal)} before the command started"
        try:
            self.child = subprocess.Popen(argv, cwd=working_dir, stdin=subprocess.DEVNULL)
        except FileNotFoundError as exc:
            if exc.filename == working_dir or not Path(working_dir).is_dir():
                return 127, f"Working directory {working_dir} does not exist"
            return 127, f"Command {argv[0]!r} not found on the dispatcher host"
        except PermissionError:
            return 126, f"Command {argv[0]!r} is not executable on the dispatcher host"
        except OSError as exc:
            return 126, f"Command {argv[0]!r} could not be started: {exc.strerror or exc}"
        write_json_atomic(
            self.attempt_dir / CHILD_FILE,
            {
                "pid": self.child.pid,
                "working_dir": working_dir,
                "temporary_working_dir": not self.spec.get("working_dir"),
                "started_at": time.time(),
            },
        )
        exit_code = self.child.wait()
        return exit_code, describe_exit(exit_code)

    def _on_signal(self, number: int, _frame: Any) -> None:
        if self.received_signal is not None:
            return  # our own forwarded copy, or a repeat
        self.received_signal = number
        if (self.attempt_dir / CANCEL_FILE).exists():
            return  # `cancel` signals the whole group itself
        try:
            os.killpg(os.getpid(), number)
        except ProcessLookupError:  # pragma: no cover - we are in the group
            pass


def detach(pid_file: Path) -> None:
    """Leave the launcher: fork, then lead a new session and process group,
    away from the dispatcher's terminal and signals. The first process waits
    until the second has published its pid file (exit 0) or died (its exit
    status), so the launcher learns of an early failure at once; then it
    exits, the launcher reaps it, and the supervisor is re-parented to init (or
    the nearest subreaper): never a zombie of a dispatcher that lives on."""
    supervisor_pid = os.fork()
    if supervisor_pid == 0:
        os.setsid()
        return
    status = 0
    while not pid_file.exists():
        finished, wait_status = os.waitpid(supervisor_pid, os.WNOHANG)
        if finished:
            status = 0 if pid_file.exists() else (os.waitstatus_to_exitcode(wait_status) or 1)
            break
        time.sleep(0.005)
    sys.stdout.flush()
    os._exit(status if status >= 0 else 128 - status)


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: process_supervisor ATTEMPT_DIR", file=sys.stderr)
        return 2
    attempt_dir = Path(args[0])
    supervisor = Supervisor(attempt_dir)  # read the spec before detaching: errors reach the launcher
    detach(attempt_dir / PID_FILE)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
