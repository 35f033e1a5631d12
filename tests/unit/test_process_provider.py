"""The `process:push` provider: real processes on this host, no Prefect server."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dispatcher.models import FlowRun
from dispatcher.run_policy import RunPolicy
from providers import process_supervisor as supervisor
from providers.base import InfrastructureError, InfrastructureStatus, JobConfiguration
from providers.process import ProcessJobConfiguration, ProcessProvider, default_state_dir
from providers.registry import ProviderRegistry

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- helpers ------------------------------------------------------------------------------


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def python(code: str) -> str:
    """A command string running `code` with this Python."""
    return shlex.join([sys.executable, "-c", textwrap.dedent(code)])


def new_run(run_count: int = 0) -> FlowRun:
    return FlowRun(id=uuid.uuid4(), name="x", flow_id=uuid.uuid4(), run_count=run_count)


def process_gone(pid: int) -> bool:
    stat = supervisor.proc_stat(pid)
    return stat is None or stat[0] in "ZX"


def status_of(
    provider: ProcessProvider, pid: str, configuration: JobConfiguration | None = None
) -> InfrastructureStatus:
    return run(provider.status(pid, configuration or ProcessJobConfiguration()))


def wait_for_exit(provider: ProcessProvider, pid: str, timeout: float = 15.0) -> InfrastructureStatus:
    return wait_until(
        lambda: (s := status_of(provider, pid)).state == "exited" and s, timeout=timeout
    )


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def provider(tmp_path: Path) -> ProcessProvider:
    return ProcessProvider(state_dir=tmp_path / "state", cancel_grace_seconds=5)


# --- the template and the configuration ---------------------------------------------------


def test_default_template_has_the_shape_of_prefects_process_worker():
    from prefect.workers.process import ProcessWorker

    prefect_template = ProcessWorker.get_default_base_job_template()
    if inspect.isawaitable(prefect_template):
        prefect_template = run(prefect_template)
    ours = ProcessProvider.default_base_job_template()

    assert ours["job_configuration"] == prefect_template["job_configuration"]
    theirs_vars, our_vars = prefect_template["variables"], ours["variables"]
    assert our_vars["type"] == theirs_vars["type"] == "object"
    # Prefect's variables, plus the dispatcher's own run policy (dispatcher/run_policy.py).
    assert set(our_vars["properties"]) == set(theirs_vars["properties"]) | set(RunPolicy.model_fields)
    for name, theirs in theirs_vars["properties"].items():
        mine = our_vars["properties"][name]
        for key in ("type", "anyOf", "default", "additionalProperties", "format", "title"):
            assert mine.get(key) == theirs.get(key), (name, key)
        assert mine["description"]
    assert our_vars.get("required", []) == theirs_vars.get("required", [])


def test_the_registry_serves_process_push():
    assert ProviderRegistry(load_entry_points=False).provider_class("process:push") is ProcessProvider
    assert ProcessProvider.push_types == ("process:push",)
    assert ProcessProvider.configuration_model is ProcessJobConfiguration


def test_default_command_is_the_engine_under_the_dispatchers_python():
    assert shlex.split(ProcessProvider.default_command) == [sys.executable, "-m", "prefect.engine"]


def test_configuration_fields_and_defaults():
    configuration = ProcessJobConfiguration.model_validate(
        {"command": "", "env": {"A": 1}, "working_dir": "", "stream_output": False, "extra": "ignored"}
    )
    assert configuration.command is None
    assert configuration.env == {"A": "1"}
    assert configuration.working_dir is None
    assert configuration.stream_output is False
    assert ProcessJobConfiguration().stream_output is True


def test_state_dir_is_under_pushpool_home():
    assert default_state_dir({"PUSHPOOL_HOME": "/srv/pp"}) == Path("/srv/pp/process")
    assert default_state_dir({"XDG_DATA_HOME": "/xdg"}) == Path("/xdg/pushpool/process")


# --- submit -------------------------------------------------------------------------------

DUMP_ENV_AND_CWD = """
    import json, os, sys
    with open(os.environ["DUMP_TO"], "w") as f:
        json.dump({"env": dict(os.environ), "cwd": os.getcwd()}, f)
"""


def test_env_is_the_dispatchers_overlaid_with_the_configuration_and_cwd_is_working_dir(
    provider, tmp_path, monkeypatch
):
    monkeypatch.setenv("FROM_DISPATCHER", "yes")
    monkeypatch.setenv("OVERRIDDEN", "dispatcher")
    monkeypatch.setenv("KEPT_WHEN_NULL", "dispatcher")
    monkeypatch.setenv("PUSHPOOL_WEBHOOK_SECRET", "hook-secret")
    dump, workdir = tmp_path / "dump.json", tmp_path / "work"
    workdir.mkdir()
    configuration = ProcessJobConfiguration(
        command=python(DUMP_ENV_AND_CWD),
        env={"DUMP_TO": str(dump), "OVERRIDDEN": "configuration", "KEPT_WHEN_NULL": None},
        working_dir=workdir,
    )
    pid = run(provider.submit(configuration, new_run()))

    host, _, number = pid.rpartition(":")
    assert host == os.uname().nodename and number.isdigit()
    assert wait_for_exit(provider, pid).exit_code == 0
    seen = json.loads(dump.read_text())
    assert seen["cwd"] == str(workdir)
    env = seen["env"]
    assert env["FROM_DISPATCHER"] == "yes" and env["PATH"] == os.environ["PATH"]
    assert env["OVERRIDDEN"] == "configuration"
    assert env["KEPT_WHEN_NULL"] == "dispatcher"  # null means "not set", as in Prefect
    assert "PUSHPOOL_WEBHOOK_SECRET" not in env


def test_without_working_dir_a_temporary_directory_is_used_and_removed(provider, tmp_path):
    dump = tmp_path / "dump.json"
    configuration = ProcessJobConfiguration(command=python(DUMP_ENV_AND_CWD), env={"DUMP_TO": str(dump)})
    pid = run(provider.submit(configuration, new_run()))
    assert wait_for_exit(provider, pid).exit_code == 0
    cwd = Path(json.loads(dump.read_text())["cwd"])
    assert cwd.name.startswith("pushpool-")
    assert not cwd.exists()


def test_output_goes_to_the_log_when_not_streamed(provider, tmp_path):
    flow_run = new_run()
    configuration = ProcessJobConfiguration(
        command=python("import sys; print('to stdout'); print('to stderr', file=sys.stderr)"),
        stream_output=False,
    )
    pid = run(provider.submit(configuration, flow_run))
    wait_for_exit(provider, pid)
    log = (provider.state_dir / str(flow_run.id) / "1" / "output.log").read_text()
    assert "to stdout" in log and "to stderr" in log


def test_streamed_output_goes_to_the_dispatchers_stdout(provider, capfd):
    configuration = ProcessJobConfiguration(command=python("print('streamed to the dispatcher')"))
    pid = run(provider.submit(configuration, new_run()))
    wait_for_exit(provider, pid)
    assert "streamed to the dispatcher" in capfd.readouterr().out


APPEND_AND_WAIT = """
    import os, sys, time
    with open(os.environ["COUNT_TO"], "a") as f:
        f.write("ran\\n")
    time.sleep(float(os.environ.get("HOLD", "0")))
"""


def test_a_second_submit_of_the_same_run_starts_nothing(provider, tmp_path):
    count = tmp_path / "count"
    configuration = ProcessJobConfiguration(
        command=python(APPEND_AND_WAIT), env={"COUNT_TO": str(count), "HOLD": "0.3"}
    )
    flow_run = new_run()
    first = run(provider.submit(configuration, flow_run))
    second = run(provider.submit(configuration, flow_run))
    assert first == second
    wait_for_exit(provider, first)
    third = run(provider.submit(configuration, flow_run))  # after it ended, too
    assert third == first
    assert lines(count) == ["ran"]


def test_concurrent_submits_in_one_dispatcher_start_one_process(provider, tmp_path):
    count = tmp_path / "count"
    configuration = ProcessJobConfiguration(command=python(APPEND_AND_WAIT), env={"COUNT_TO": str(count)})
    flow_run = new_run()

    async def submit_many():
        return await asyncio.gather(*(provider.submit(configuration, flow_run) for _ in range(5)))

    pids = run(submit_many())
    assert len(set(pids)) == 1
    wait_for_exit(provider, pids[0])
    assert lines(count) == ["ran"]


CONCURRENT_SUBMITTER = """
import asyncio, os, sys, time, uuid
from dispatcher.models import FlowRun
from providers.process import ProcessJobConfiguration, ProcessProvider

state_dir, run_id, command, go, ready = sys.argv[1:6]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
configuration = ProcessJobConfiguration(command=command)
flow_run = FlowRun(id=run_id, name="x", flow_id=uuid.uuid4())
print(asyncio.run(ProcessProvider(state_dir=state_dir).submit(configuration, flow_run)), flush=True)
"""


def test_concurrent_dispatcher_processes_start_one_process(provider, tmp_path):
    count, go = tmp_path / "count", tmp_path / "go"
    command = shlex.join([sys.executable, "-c", f"open({str(count)!r}, 'a').write('ran\\n')"])
    run_id = str(uuid.uuid4())
    submitters = [
        subprocess.Popen(
            [
                sys.executable, "-c", CONCURRENT_SUBMITTER,
                str(provider.state_dir), run_id, command, str(go), str(tmp_path / f"ready-{n}"),
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    wait_until(lambda: len(list(tmp_path.glob("ready-*"))) == 4, timeout=60)  # all at the starting line
    go.touch()
    pids = set()
    for submitter in submitters:
        out, err = submitter.communicate(timeout=60)
        assert submitter.returncode == 0, err
        pids.add(out.strip())
    assert len(pids) == 1
    wait_for_exit(provider, pids.pop())
    assert lines(count) == ["ran"]


def test_a_rerun_of_an_ended_run_is_launched_again(provider, tmp_path):
    """Prefect re-runs a flow run (UI "Retry") by scheduling it again under the
    same id; run_count tells that attempt apart from a retried submission."""
    count = tmp_path / "count"
    configuration = ProcessJobConfiguration(command=python(APPEND_AND_WAIT), env={"COUNT_TO": str(count)})
    flow_run = new_run(run_count=0)
    first = run(provider.submit(configuration, flow_run))
    wait_for_exit(provider, first)

    rerun = flow_run.model_copy(update={"run_count": 1})
    second = run(provider.submit(configuration, rerun))
    assert second != first
    assert run(provider.submit(configuration, rerun)) == second
    wait_for_exit(provider, second)
    assert lines(count) == ["ran", "ran"]
    assert status_of(provider, first).state == "exited"  # the first attempt's record is kept


def test_a_rerun_never_overlaps_a_running_attempt(provider, tmp_path):
    count = tmp_path / "count"
    configuration = ProcessJobConfiguration(
        command=python(APPEND_AND_WAIT), env={"COUNT_TO": str(count), "HOLD": "30"}
    )
    flow_run = new_run(run_count=0)
    first = run(provider.submit(configuration, flow_run))
    try:
        wait_until(lambda: lines(count))
        assert run(provider.submit(configuration, flow_run.model_copy(update={"run_count": 1}))) == first
    finally:
        run(provider.cancel(first, configuration))
    assert lines(count) == ["ran"]


def test_an_abandoned_launch_is_replaced(provider, tmp_path):
    """A launch whose supervisor never published its pid ran nothing; the next submit launches."""
    count = tmp_path / "count"
    flow_run = new_run()
    attempt = provider.state_dir / str(flow_run.id) / "1"
    attempt.mkdir(parents=True)
    assert supervisor.write_json_exclusive(attempt / "pid", {"pid": None, "abandoned": True})
    configuration = ProcessJobConfiguration(command=python(APPEND_AND_WAIT), env={"COUNT_TO": str(count)})
    pid = run(provider.submit(configuration, flow_run))
    wait_for_exit(provider, pid)
    assert lines(count) == ["ran"]
    assert (provider.state_dir / str(flow_run.id) / "2" / "pid").exists()


def test_a_launch_that_never_starts_is_abandoned_after_the_timeout(tmp_path):
    """A previous submitter died before its supervisor came up: the next one waits, then relaunches."""
    provider = ProcessProvider(state_dir=tmp_path / "state", start_timeout_seconds=0.3)
    flow_run = new_run()
    (provider.state_dir / str(flow_run.id) / "1").mkdir(parents=True)
    count = tmp_path / "count"
    configuration = ProcessJobConfiguration(command=python(APPEND_AND_WAIT), env={"COUNT_TO": str(count)})
    pid = run(provider.submit(configuration, flow_run))
    wait_for_exit(provider, pid)
    assert lines(count) == ["ran"]
    assert supervisor.read_json(provider.state_dir / str(flow_run.id) / "1" / "pid")["abandoned"] is True


def test_the_supervisor_runs_nothing_when_its_launch_was_abandoned(tmp_path):
    count = tmp_path / "count"
    attempt = tmp_path / "state" / "run" / "1"
    attempt.mkdir(parents=True)
    supervisor.write_json_atomic(
        attempt / "spec.json",
        {
            "flow_run_id": "run",
            "attempt": 1,
            "argv": [sys.executable, "-c", f"open({str(count)!r}, 'a').write('ran')"],
            "working_dir": None,
            "state_dir": str(tmp_path / "state"),
        },
    )
    assert supervisor.write_json_exclusive(attempt / "pid", {"pid": None, "abandoned": True})
    launcher = subprocess.run(
        [sys.executable, "-I", supervisor.__file__, str(attempt)], timeout=30, capture_output=True
    )
    assert launcher.returncode == 0, launcher.stderr
    time.sleep(0.2)
    assert not count.exists()


@pytest.mark.parametrize(
    "command, message",
    [
        ("pushpool-no-such-command --flag", "Command 'pushpool-no-such-command' not found on the dispatcher host"),
        ("./relative/nope", "Command './relative/nope' not found on the dispatcher host"),
        ("'unbalanced", "could not be parsed"),
    ],
)
def test_a_command_that_cannot_run_is_an_infrastructure_error(provider, command, message):
    flow_run = new_run()
    with pytest.raises(InfrastructureError, match=message):
        run(provider.submit(ProcessJobConfiguration(command=command), flow_run))
    assert not list((provider.state_dir / str(flow_run.id)).glob("[0-9]*"))  # nothing claimed


def test_a_non_executable_command_is_an_infrastructure_error(provider, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(InfrastructureError, match="is not executable on the dispatcher host"):
        run(provider.submit(ProcessJobConfiguration(command=str(script)), new_run()))


def test_a_missing_working_dir_is_an_infrastructure_error_and_a_fixed_config_then_runs(provider, tmp_path):
    flow_run = new_run()
    missing = tmp_path / "missing"
    configuration = ProcessJobConfiguration(command=python("pass"), working_dir=missing)
    with pytest.raises(InfrastructureError, match=f"Working directory {missing} does not exist"):
        run(provider.submit(configuration, flow_run))
    missing.mkdir()
    pid = run(provider.submit(configuration, flow_run))
    assert wait_for_exit(provider, pid).exit_code == 0


def test_the_command_is_found_on_the_configurations_path(provider, tmp_path):
    bin_dir, marker = tmp_path / "bin", tmp_path / "marker"
    bin_dir.mkdir()
    tool = bin_dir / "my-flow-tool"
    tool.write_text(f"#!/bin/sh\ntouch {shlex.quote(str(marker))}\n")
    tool.chmod(0o755)
    configuration = ProcessJobConfiguration(
        command="my-flow-tool", env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    )
    pid = run(provider.submit(configuration, new_run()))
    assert wait_for_exit(provider, pid).exit_code == 0
    assert marker.exists()


def test_a_base_job_configuration_is_accepted(provider, tmp_path):
    dump = tmp_path / "dump.json"
    configuration = JobConfiguration(command=python(DUMP_ENV_AND_CWD), env={"DUMP_TO": str(dump)})
    pid = run(provider.submit(configuration, new_run()))
    assert wait_for_exit(provider, pid).exit_code == 0


# --- status -------------------------------------------------------------------------------


def test_status_running_then_exited_with_code_and_reason(provider, tmp_path):
    release = tmp_path / "release"
    configuration = ProcessJobConfiguration(
        command=python(
            f"""
            import os, time
            while not os.path.exists({str(release)!r}):
                time.sleep(0.01)
            raise SystemExit(3)
            """
        )
    )
    pid = run(provider.submit(configuration, new_run()))
    assert status_of(provider, pid) == InfrastructureStatus(state="running")
    release.touch()
    ended = wait_for_exit(provider, pid)
    assert ended.exit_code == 3
    assert ended.reason == "exited with code 3"


def test_status_of_a_process_killed_by_a_signal(provider):
    configuration = ProcessJobConfiguration(command=python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    pid = run(provider.submit(configuration, new_run()))
    ended = wait_for_exit(provider, pid)
    assert ended.exit_code == -9
    assert ended.reason == "killed by signal 9 (SIGKILL)"


def test_status_of_a_supervisor_that_was_killed(provider, tmp_path):
    configuration = ProcessJobConfiguration(command=python("import time; time.sleep(30)"))
    pid = run(provider.submit(configuration, new_run()))
    os.killpg(int(pid.rpartition(":")[2]), signal.SIGKILL)
    ended = wait_for_exit(provider, pid)
    assert ended.exit_code is None
    assert "ended without recording" in ended.reason


def test_status_of_an_unknown_pid_is_missing(provider):
    unused = next(p for p in range(4_000_000, 4_100_000) if process_gone(p))
    hostname = os.uname().nodename
    missing = status_of(provider, f"{hostname}:{unused}")
    assert missing.state == "missing" and str(provider.state_dir) in missing.reason
    # a live process that pushpool did not start is not mistaken for a run
    assert status_of(provider, f"{hostname}:{os.getpid()}").state == "missing"


def test_status_survives_pid_reuse(provider, tmp_path):
    """The recorded start time tells a reused pid from the supervisor."""
    pid = run(provider.submit(ProcessJobConfiguration(command=python("pass")), new_run()))
    wait_for_exit(provider, pid)
    number = int(pid.rpartition(":")[2])
    [pid_file] = provider.state_dir.glob("*/1/pid")
    record = supervisor.read_json(pid_file)
    # pretend the supervisor were the test process: same pid number, another start time
    supervisor.write_json_atomic(pid_file, {**record, "pid": os.getpid()})
    index = provider.state_dir / "by-pid"
    supervisor.write_json_atomic(index / str(os.getpid()), supervisor.read_json(index / str(number)))
    assert status_of(provider, f"{os.uname().nodename}:{os.getpid()}").state == "exited"


def test_status_finds_the_run_by_flow_run_id_without_the_index(provider, tmp_path):
    flow_run = new_run()
    pid = run(provider.submit(ProcessJobConfiguration(command=python("raise SystemExit(4)")), flow_run))
    wait_for_exit(provider, pid)
    (provider.state_dir / "by-pid" / pid.rpartition(":")[2]).unlink()
    assert status_of(provider, pid).state == "missing"
    hinted = ProcessJobConfiguration(env={"PREFECT__FLOW_RUN_ID": str(flow_run.id)})
    assert status_of(provider, pid, hinted).exit_code == 4


@pytest.mark.parametrize("bad", ["12345", "host:", "host:abc", "host:1", "host:0"])
def test_a_malformed_pid_is_an_infrastructure_error(provider, bad):
    with pytest.raises(InfrastructureError, match="is not a process:push infrastructure pid"):
        status_of(provider, bad)
    with pytest.raises(InfrastructureError):
        run(provider.cancel(bad, ProcessJobConfiguration()))


def test_a_pid_on_another_host_is_an_infrastructure_error(provider):
    with pytest.raises(InfrastructureError, match="runs on host 'elsewhere', not on this dispatcher"):
        run(provider.cancel("elsewhere:1234", ProcessJobConfiguration()))
    with pytest.raises(InfrastructureError, match="runs on host 'elsewhere'"):
        status_of(provider, "elsewhere:1234")


# --- cancel -------------------------------------------------------------------------------

SPAWN_GRANDCHILD = """
    import os, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.environ["PIDS_TO"] + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {grandchild.pid}")
    os.replace(os.environ["PIDS_TO"] + ".tmp", os.environ["PIDS_TO"])
    time.sleep(60)
"""


def test_cancel_stops_the_whole_process_group_and_status_says_so(provider, tmp_path):
    pids_file = tmp_path / "pids"
    configuration = ProcessJobConfiguration(command=python(SPAWN_GRANDCHILD), env={"PIDS_TO": str(pids_file)})
    pid = run(provider.submit(configuration, new_run()))
    child, grandchild = map(int, wait_until(pids_file.exists) and pids_file.read_text().split())
    assert not process_gone(child) and not process_gone(grandchild)

    started = time.monotonic()
    run(provider.cancel(pid, configuration))
    assert time.monotonic() - started < 5  # SIGTERM was enough: no grace period spent
    assert process_gone(child) and process_gone(grandchild)
    assert process_gone(int(pid.rpartition(":")[2]))
    ended = status_of(provider, pid)
    assert ended.state == "exited"
    assert ended.reason == "terminated by pushpool cancel"
    assert ended.exit_code == -signal.SIGTERM


def test_cancel_escalates_to_sigkill_after_the_grace_period(tmp_path):
    provider = ProcessProvider(state_dir=tmp_path / "state", cancel_grace_seconds=0.5)
    ready = tmp_path / "ready"
    configuration = ProcessJobConfiguration(
        command=python(
            f"""
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open({str(ready)!r}, "w").close()
            time.sleep(60)
            """
        )
    )
    pid = run(provider.submit(configuration, new_run()))
    wait_until(ready.exists)
    run(provider.cancel(pid, configuration))
    ended = status_of(provider, pid)
    assert ended.state == "exited" and ended.exit_code == -signal.SIGKILL
    assert ended.reason.startswith("terminated by pushpool cancel") and "SIGKILL" in ended.reason


def test_cancelling_what_is_gone_is_not_an_error(provider):
    pid = run(provider.submit(ProcessJobConfiguration(command=python("pass")), new_run()))
    wait_for_exit(provider, pid)
    run(provider.cancel(pid, ProcessJobConfiguration()))
    assert status_of(provider, pid).reason == "exited with code 0"  # not rewritten as cancelled
    run(provider.cancel(f"{os.uname().nodename}:{os.getpid()}", ProcessJobConfiguration()))  # not ours: untouched


def test_sigterm_to_the_supervisor_is_forwarded_to_the_flow_process(provider, tmp_path):
    ready = tmp_path / "ready"
    configuration = ProcessJobConfiguration(
        command=python(f"import time; open({str(ready)!r}, 'w').close(); time.sleep(60)")
    )
    pid = run(provider.submit(configuration, new_run()))
    wait_until(ready.exists)
    os.kill(int(pid.rpartition(":")[2]), signal.SIGTERM)
    ended = wait_for_exit(provider, pid)
    assert ended.exit_code == -signal.SIGTERM
    assert ended.reason == "killed by signal 15 (SIGTERM) after the supervisor received SIGTERM"


# --- detachment ---------------------------------------------------------------------------

LAUNCHER = """
import asyncio, os, shlex, signal, sys, time, uuid
from dispatcher.models import FlowRun
from providers.process import ProcessJobConfiguration, ProcessProvider

state_dir, done, then = sys.argv[1:4]
command = shlex.join([sys.executable, "-c",
    f"import time; time.sleep(1); open({done!r}, 'w').write('finished')"])
flow_run = FlowRun(id=uuid.uuid4(), name="x", flow_id=uuid.uuid4())
pid = asyncio.run(ProcessProvider(state_dir=state_dir).submit(ProcessJobConfiguration(command=command), flow_run))
print(pid, flush=True)
if then == "killed-with-its-group":
    time.sleep(60)
"""


@pytest.mark.parametrize("then", ["exits", "killed-with-its-group"])
def test_the_flow_process_outlives_the_dispatcher(provider, tmp_path, then):
    done = tmp_path / "done"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(provider.state_dir), str(done), then],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # like a dispatcher started from a terminal: its own group
    )
    pid = launcher.stdout.readline().strip()
    assert pid, "the launcher printed no pid"
    if then == "killed-with-its-group":
        os.killpg(launcher.pid, signal.SIGKILL)  # Ctrl-C / terminal closed / container stop
    launcher.wait(timeout=30)
    launcher.stdout.close()
    assert not done.exists()
    assert status_of(provider, pid).state == "running"
    wait_until(done.exists)
    assert wait_for_exit(provider, pid).exit_code == 0
