"""`process:push`: run each flow run as a process on the dispatcher's host.

The embedded default, for trying pushpool out and for end-to-end tests. A run
is started the way Prefect's process worker starts it — the configured
command (else `<dispatcher's python> -m prefect.engine`), the dispatcher's
environment overlaid with the configuration's `env`, in `working_dir` or a
fresh temporary directory — but under a small detached supervisor
(`providers/process_supervisor.py`), because the dispatcher is stateless and
may exit as soon as it has submitted.

State lives in `$PUSHPOOL_HOME/process` (see `default_state_dir`)::

    <state dir>/
      <flow run id>/
        lock            flock(2)ed while a submit decides and launches
        1/              one directory per launch ("attempt"), numbered from 1
          spec.json     what to run (argv, working dir, stream_output, run_count)
          pid           the supervisor's pid, start time and boot id (atomic, exclusive)
          child.json    the command's own pid and working directory
          output.log    the command's output, when stream_output is off
          cancel.json   written by `cancel` before it signals the process group
          exit.json     exit code and reason, once the command ended
        2/              only when Prefect re-ran the run after attempt 1 ended
      by-pid/<pid>      {"flow_run_id", "attempt"}: infrastructure pid -> attempt

POSIX only (it relies on fork, sessions and process groups).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from pydantic import field_validator

from dispatcher.models import FlowRun
from dispatcher.settings import pushpool_home
from providers import process_supervisor as supervisor
from providers.base import InfrastructureError, InfrastructureStatus, JobConfiguration, Provider

SUPERVISOR_SCRIPT = Path(supervisor.__file__).resolve()
FLOW_RUN_ID_ENV = "PREFECT__FLOW_RUN_ID"
CANCEL_GRACE_ENV = "PUSHPOOL_PROCESS_CANCEL_GRACE_SECONDS"
DEFAULT_CANCEL_GRACE_SECONDS = 10.0
#: dispatcher settings that a flow run process does not inherit
NOT_INHERITED = frozenset({"PUSHPOOL_WEBHOOK_SECRET"})
#: after SIGKILL, how long to wait for the process group to disappear
KILL_WAIT_SECONDS = 5.0


def default_state_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    """`$PUSHPOOL_HOME/process` (PUSHPOOL_HOME defaults to `$XDG_DATA_HOME/pushpool`
    or `~/.local/share/pushpool`)."""
    return pushpool_home(environ) / "process"


class ProcessJobConfiguration(JobConfiguration):
    stream_output: bool = True
    working_dir: Optional[Path] = None

    @field_validator("working_dir", mode="before")
    @classmethod
    def _blank_working_dir_is_unset(cls, value: Any) -> Any:
        return value or None


def parse_infrastructure_pid(infrastructure_pid: str) -> tuple[str, int]:
    """`"<hostname>:<pid>"` -> (hostname, pid)."""
    host, separator, pid = str(infrastructure_pid).rpartition(":")
    if not separator or not host or not pid.isdigit() or int(pid) <= 1:
        raise InfrastructureError(
            f"{infrastructure_pid!r} is not a process:push infrastructure pid (expected '<hostname>:<pid>')"
        )
    return host, int(pid)


class ProcessProvider(Provider):
    push_types: ClassVar[tuple[str, ...]] = ("process:push",)
    template_file: ClassVar[str] = "process.json"
    configuration_model: ClassVar[type[JobConfiguration]] = ProcessJobConfiguration
    #: Prefect's process worker's fallback: the engine, run by the dispatcher's own Python
    default_command: ClassVar[str] = shlex.join([sys.executable, "-m", "prefect.engine"])

    def __init__(
        self,
        state_dir: Union[str, Path, None] = None,
        *,
        cancel_grace_seconds: Optional[float] = None,
        start_timeout_seconds: float = 30.0,
        poll_interval_seconds: float = 0.02,
    ):
        self.state_dir = Path(state_dir).expanduser() if state_dir is not None else default_state_dir()
        if cancel_grace_seconds is None:
            configured = os.environ.get(CANCEL_GRACE_ENV) or DEFAULT_CANCEL_GRACE_SECONDS
            try:
                cancel_grace_seconds = float(configured)
            except ValueError:
                raise ValueError(f"{CANCEL_GRACE_ENV} must be a number of seconds, not {configured!r}") from None
        self.cancel_grace_seconds = cancel_grace_seconds
        self.start_timeout_seconds = start_timeout_seconds
        self.poll_interval_seconds = poll_interval_seconds
        self.hostname = socket.gethostname()

    # --- the Provider interface ------------------------------------------------------

    async def submit(self, configuration: JobConfiguration, flow_run: FlowRun) -> str:
        return await asyncio.to_thread(self._submit, self._coerce(configuration), flow_run)

    async def cancel(self, infrastructure_pid: str, configuration: JobConfiguration) -> None:
        pid = self._local_pid(infrastructure_pid, "cancel")
        found, attempt = await asyncio.to_thread(self._prepare_cancel, pid, configuration)
        if not found:
            return
        grace = self.cancel_grace_seconds
        await asyncio.to_thread(_signal_group, pid, signal.SIGTERM)
        killed = False
        if not await self._wait_until_group_gone(pid, grace):
            killed = True
            # SIGKILL everything but the supervisor, so it can still record the end...
            await asyncio.to_thread(_kill_members_except_leader, pid)
            if not await self._wait_until_group_gone(pid, 2.0):
                # ...and the supervisor too if it is stuck.
                await asyncio.to_thread(_signal_group, pid, signal.SIGKILL)
                if not await self._wait_until_group_gone(pid, KILL_WAIT_SECONDS):
                    raise InfrastructureError(
                        f"Process group {pid} on {self.hostname} did not stop after SIGKILL"
                    )
        if attempt is not None:
            await asyncio.to_thread(self._record_cancel_if_unrecorded, attempt, killed)

    async def status(self, infrastructure_pid: str, configuration: JobConfiguration) -> InfrastructureStatus:
        pid = self._local_pid(infrastructure_pid, "inspect")
        return await asyncio.to_thread(self._status, pid, configuration)

    # --- submit ----------------------------------------------------------------------

    def _submit(self, configuration: ProcessJobConfiguration, flow_run: FlowRun) -> str:
        run_dir = self.state_dir / str(flow_run.id)
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _exclusive_lock(run_dir / "lock"):
            attempts = _attempts(run_dir)
            if attempts:
                number, attempt = attempts[0]
                record = self._await_pid_record(attempt, launcher=None)
                if record is not None:
                    spec = supervisor.read_json(attempt / supervisor.SPEC_FILE) or {}
                    # A new attempt only when Prefect ran this one (run_count went up)
                    # and nothing of it is left running: never two at once.
                    relaunch = (
                        flow_run.run_count > int(spec.get("run_count", 0))
                        and not _supervisor_alive(record)
                        and not _group_alive(record["pid"])
                    )
                    if not relaunch:
                        return self._format_pid(record["pid"])
            else:
                number = 0
            return self._launch(configuration, flow_run, run_dir / str(number + 1))

    def _launch(self, configuration: ProcessJobConfiguration, flow_run: FlowRun, attempt: Path) -> str:
        env = self._environment(configuration)
        argv, working_dir = self._validate(configuration, env)
        attempt.mkdir(mode=0o700)
        spec = {
            "flow_run_id": str(flow_run.id),
            "flow_run_name": flow_run.name,
            "attempt": int(attempt.name),
            "run_count": flow_run.run_count,
            "argv": argv,
            "working_dir": str(working_dir) if working_dir else None,
            "stream_output": configuration.stream_output,
            "state_dir": str(self.state_dir),
            "host": self.hostname,
            "submitted_at": time.time(),
        }
        supervisor.write_json_atomic(attempt / supervisor.SPEC_FILE, spec)
        output = None
        if not configuration.stream_output:
            output = open(attempt / supervisor.OUTPUT_LOG, "ab")  # noqa: SIM115 - closed below
            os.chmod(attempt / supervisor.OUTPUT_LOG, 0o600)
        try:
            launcher = subprocess.Popen(
                [sys.executable, "-I", str(SUPERVISOR_SCRIPT), str(attempt)],
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                close_fds=True,
            )
        except OSError as exc:
            _abandon(attempt, f"could not start the supervisor: {exc}")
            raise InfrastructureError(
                f"Could not start the process:push supervisor with {sys.executable}: {exc.strerror or exc}"
            ) from exc
        finally:
            if output is not None:
                output.close()
        try:
            record = self._await_pid_record(attempt, launcher)
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(timeout=5)  # it exits right after the pid file appears
        if record is None:  # pragma: no cover - _await_pid_record raises for its own launcher
            raise InfrastructureError("The process:push supervisor did not start")
        return self._format_pid(record["pid"])

    def _await_pid_record(
        self, attempt: Path, launcher: Optional[subprocess.Popen[bytes]]
    ) -> Optional[dict[str, Any]]:
        """The supervisor's pid record, once published; None when the launch was
        abandoned (nothing ran). Without a launcher (another submit started it),
        a launch that never published within the timeout is abandoned here."""
        deadline = time.monotonic() + self.start_timeout_seconds
        while True:
            record = supervisor.read_json(attempt / supervisor.PID_FILE)
            if record is not None:
                return record if record.get("pid") else None
            failure = None
            if launcher is not None and launcher.poll() not in (None, 0):
                failure = f"The process:push supervisor failed to start (exit code {launcher.returncode})"
            elif time.monotonic() > deadline:
                failure = f"The process:push supervisor did not start within {self.start_timeout_seconds:g} s"
            if failure is not None:
                if _abandon(attempt, failure):
                    if launcher is None:
                        return None
                    raise InfrastructureError(failure + _output_tail(attempt))
                continue  # the supervisor published its pid just now
            time.sleep(self.poll_interval_seconds)

    def _environment(self, configuration: ProcessJobConfiguration) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in NOT_INHERITED}
        # As in Prefect, a null value means "not set by the configuration".
        env.update({key: value for key, value in configuration.env.items() if value is not None})
        return env

    def _validate(
        self, configuration: ProcessJobConfiguration, env: Mapping[str, str]
    ) -> tuple[list[str], Optional[Path]]:
        command = configuration.command or self.default_command
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise InfrastructureError(f"Command {command!r} could not be parsed: {exc}") from exc
        if not argv:
            raise InfrastructureError("The command to start the flow run is empty")

        working_dir = None
        if configuration.working_dir is not None:
            working_dir = configuration.working_dir.expanduser().absolute()
            if not working_dir.exists():
                raise InfrastructureError(f"Working directory {working_dir} does not exist on the dispatcher host")
            if not working_dir.is_dir():
                raise InfrastructureError(f"Working directory {working_dir} is not a directory")

        program = argv[0]
        if os.sep in program:
            path = Path(program).expanduser()
            if not path.is_absolute():
                path = (working_dir / path) if working_dir else None
            if path is None or not path.is_file():
                raise InfrastructureError(f"Command {program!r} not found on the dispatcher host")
            if not os.access(path, os.X_OK):
                raise InfrastructureError(f"Command {program!r} is not executable on the dispatcher host")
        elif shutil.which(program, path=env.get("PATH", os.defpath)) is None:
            raise InfrastructureError(f"Command {program!r} not found on the dispatcher host")
        return argv, working_dir

    # --- status ----------------------------------------------------------------------

    def _status(self, pid: int, configuration: Optional[JobConfiguration]) -> InfrastructureStatus:
        found = self._find_attempt(pid, configuration)
        if found is None:
            if _is_supervisor_process(pid):
                return InfrastructureStatus(state="running")
            return InfrastructureStatus(
                state="missing",
                reason=f"No flow run process with pid {pid} is running on {self.hostname}, "
                f"and none is recorded in {self.state_dir}",
            )
        attempt, record = found
        if _supervisor_alive(record):
            return InfrastructureStatus(state="running")
        ended = supervisor.read_json(attempt / supervisor.EXIT_FILE)
        if ended is not None:
            return InfrastructureStatus(state="exited", exit_code=ended.get("exit_code"), reason=ended.get("reason"))
        if (attempt / supervisor.CANCEL_FILE).exists():
            return InfrastructureStatus(state="exited", reason="terminated by pushpool cancel")
        return InfrastructureStatus(
            state="exited",
            reason=f"The flow run's supervisor (pid {pid}) ended without recording how the flow run "
            "process ended: it was killed (e.g. SIGKILL or out of memory) or the host restarted",
        )

    def _find_attempt(
        self, pid: int, configuration: Optional[JobConfiguration]
    ) -> Optional[tuple[Path, dict[str, Any]]]:
        """The attempt whose supervisor has this pid: looked up by the flow run id
        in the configuration's env when there is one (exact even if the pid was
        reused), else by the by-pid index (the latest launch with that pid)."""
        candidates: list[Path] = []
        env = getattr(configuration, "env", None) or {}
        run_id = _uuid_or_none(env.get(FLOW_RUN_ID_ENV))
        if run_id:
            candidates += [attempt for _, attempt in _attempts(self.state_dir / run_id)]
        index = supervisor.read_json(self.state_dir / supervisor.BY_PID_DIR / str(pid)) or {}
        run_id = _uuid_or_none(index.get("flow_run_id"))
        if run_id and isinstance(index.get("attempt"), int):
            candidates.append(self.state_dir / run_id / str(index["attempt"]))
        for attempt in candidates:
            record = supervisor.read_json(attempt / supervisor.PID_FILE)
            if record is not None and record.get("pid") == pid:
                return attempt, record
        return None

    # --- cancel ----------------------------------------------------------------------

    def _prepare_cancel(self, pid: int, configuration: Optional[JobConfiguration]) -> tuple[bool, Optional[Path]]:
        """(whether there is a process group of ours to stop, its attempt dir)."""
        if pid == os.getpgrp():
            raise InfrastructureError(f"Refusing to cancel pid {pid}: it is the dispatcher's own process group")
        found = self._find_attempt(pid, configuration)
        if found is None:
            # Not recorded here (another state dir?): stop it only if it is a pushpool supervisor.
            return _is_supervisor_process(pid), None
        attempt, record = found
        if not _supervisor_alive(record):
            # The supervisor is gone. While any process of its group lives, no other
            # process can have been given its pid, so a live process with that pid
            # means the group is gone too.
            stat = supervisor.proc_stat(pid)
            if (stat is not None and stat[0] not in "ZX") or not _group_alive(pid):
                return False, attempt
        supervisor.write_json_atomic(
            attempt / supervisor.CANCEL_FILE,
            {"requested_at": time.time(), "grace_seconds": self.cancel_grace_seconds, "host": self.hostname},
        )
        return True, attempt

    async def _wait_until_group_gone(self, pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while await asyncio.to_thread(_group_alive, pgid):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.poll_interval_seconds)
        return True

    def _record_cancel_if_unrecorded(self, attempt: Path, killed: bool) -> None:
        """The supervisor records how the run ended; if it was killed itself, say it here."""
        if supervisor.read_json(attempt / supervisor.EXIT_FILE) is not None:
            return
        reason = "terminated by pushpool cancel"
        if killed:
            reason += f" (killed with SIGKILL after the {self.cancel_grace_seconds:g} s grace period)"
        supervisor.write_json_exclusive(
            attempt / supervisor.EXIT_FILE,
            {
                "exit_code": -signal.SIGKILL if killed else None,
                "reason": reason,
                "cancelled": True,
                "recorded_by": "cancel",
                "ended_at": time.time(),
            },
        )
        child = supervisor.read_json(attempt / supervisor.CHILD_FILE) or {}
        if child.get("temporary_working_dir") and child.get("working_dir"):
            shutil.rmtree(child["working_dir"], ignore_errors=True)

    # --- helpers ---------------------------------------------------------------------

    def _coerce(self, configuration: JobConfiguration) -> ProcessJobConfiguration:
        if isinstance(configuration, ProcessJobConfiguration):
            return configuration
        return ProcessJobConfiguration.model_validate(configuration.model_dump())

    def _format_pid(self, pid: int) -> str:
        return f"{self.hostname}:{pid}"

    def _local_pid(self, infrastructure_pid: str, action: str) -> int:
        host, pid = parse_infrastructure_pid(infrastructure_pid)
        if host != self.hostname:
            raise InfrastructureError(
                f"Flow run process {infrastructure_pid} runs on host {host!r}, not on this dispatcher's "
                f"host {self.hostname!r}: {action} it from a dispatcher running on {host}"
            )
        return pid


# --- module helpers ----------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _attempts(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's attempt directories, latest first."""
    try:
        entries = [(int(entry.name), entry) for entry in run_dir.iterdir() if entry.name.isdigit()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(entries, reverse=True)


def _abandon(attempt: Path, reason: str) -> bool:
    """Give up on a launch whose supervisor has not published its pid; True if
    nothing will run (the supervisor, if it comes up later, finds the pid file
    taken and exits). False if the supervisor published just now."""
    return supervisor.write_json_exclusive(
        attempt / supervisor.PID_FILE, {"pid": None, "abandoned": True, "reason": reason, "at": time.time()}
    )


def _output_tail(attempt: Path, limit: int = 2000) -> str:
    try:
        text = (attempt / supervisor.OUTPUT_LOG).read_text(errors="replace")
    except OSError:
        return ""
    text = text.strip()
    return f":\n{text[-limit:]}" if text else ""


def _uuid_or_none(value: Any) -> Optional[str]:
    try:
        return str(uuid.UUID(str(value))) if value else None
    except ValueError:
        return None


_HAS_PROC = Path("/proc/self/stat").exists()


def _supervisor_alive(record: Mapping[str, Any]) -> bool:
    """Whether the supervisor of a pid record still runs: same pid, same boot,
    same start time (so a reused pid is not mistaken for it), not a zombie."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 1:
        return False
    recorded_boot, current_boot = record.get("boot_id"), supervisor.boot_id()
    if recorded_boot and current_boot and recorded_boot != current_boot:
        return False
    if not _HAS_PROC:  # pragma: no cover - macOS and friends: best effort
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = supervisor.proc_stat(pid)
    if stat is None:
        return False
    state, _, _, start_time = stat
    if state in "ZX":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return record.get("start_time") is None or record["start_time"] == start_time


def _is_supervisor_process(pid: int) -> bool:
    """A live pushpool supervisor with this pid, recorded or not (Linux only)."""
    stat = supervisor.proc_stat(pid)
    if stat is None or stat[0] in "ZX" or stat[1] != pid or stat[2] != pid:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(arg.endswith(b"process_supervisor.py") or arg == b"providers.process_supervisor" for arg in argv)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = supervisor.proc_stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] not in "ZX":
                members.append(int(entry.name))
    return members


def _group_alive(pgid: int) -> bool:
    if _HAS_PROC:
        return bool(_group_members(pgid))
    try:  # pragma: no cover - no /proc: zombies count as alive here
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, number)


def _kill_members_except_leader(pgid: int) -> None:
    if not _HAS_PROC:  # pragma: no cover
        _signal_group(pgid, signal.SIGKILL)
        return
    for member in _group_members(pgid):
        if member != pgid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
