"""What the side-by-side benchmarks share: Prefect's own ECS worker in a
virtualenv of its own, and a bench "stack" (an embedded Prefect server, moto,
an `ecs:push` pool for pushpool and an `ecs` worker pool for the worker, each
with its own moto cluster).

prefect-aws depends on aiobotocore, which pins botocore: installing it into the
project's venv would change what the dispatcher is tested with, so the worker
gets `.venv/bench-worker`, created on first use (pip's cache makes that ~1 min):

    python -m bench.worker_env          # create it (if missing) and print its versions
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_VENV = REPO_ROOT / ".venv" / "bench-worker"
# Where the JSON results go (and bench.chart reads them); the smoke tests point it elsewhere.
OUT_DIR = Path(os.environ.get("PUSHPOOL_BENCH_OUT") or REPO_ROOT / "bench" / ".out")
WORKER_REQUIREMENTS = ["prefect==3.8.8", "prefect-aws", "fastapi<0.151", "sqlalchemy[asyncio]<2.1"]
ECS_QUEUE = "prefect-ecs-tasks-events"
FLOW_IMAGE = "repo/flows:bench"

class WorkerEnvError(RuntimeError):
    pass

def worker_python(create: bool = True, timeout: float = 900) -> Path:
    """The bench-worker venv's python, creating the venv if it is missing."""
    python = WORKER_VENV / "bin" / "python"
    marker = WORKER_VENV / ".installed"
    if marker.exists() and python.exists():
        return python
    if not create:
        raise WorkerEnvError(f"{WORKER_VENV} does not exist (python -m bench.worker_env creates it)")
    started = time.monotonic()
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(WORKER_VENV)], check=True, capture_output=True, timeout=120)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *WORKER_REQUIREMENTS],
            check=True, capture_output=True, text=True, timeout=timeout,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        raise WorkerEnvError(f"could not create {WORKER_VENV}: {exc}\n{str(detail)[-2000:]}") from None
    marker.write_text(f"created in {time.monotonic() - started:.1f} s\n")
    return python

def chart_python() -> Path:
    """The bench-worker venv's python, with matplotlib (for bench.chart)."""
    python = worker_python()
    if subprocess.run([str(python), "-c", "import matplotlib"], capture_output=True).returncode != 0:
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "matplotlib>=3.8"],
            check=True, capture_output=True, timeout=600,
        )
    return python

def worker_versions(python: Path) -> str:
    code = "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in ('prefect','prefect-aws','boto3','aiobotocore')))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()

def machine_header(command: str, extra: str = "") -> str:
    import importlib.metadata as m

    def version(name: str) -> str:
        try:
            return m.version(name)
        except m.PackageNotFoundError:
            return "–"

    line = (
        f"Machine: {os.cpu_count()} cores, {platform.system()} {platform.release()} {platform.machine()}, "
        f"Python {platform.python_version()}; pushpool venv: prefect {version('prefect')} (server), "
        f"boto3 {version('boto3')}, moto {version('moto')}, httpx {version('httpx')}"
    )
    if extra:
        line += f"; worker venv: {extra}"
    return f"{line}\n\nCommand: `{command}`\n"

def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "max": float("nan")}
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"n": len(ordered), "p50": statistics.median(ordered), "p95": p95, "max": ordered[-1]}

def write_json(name: str, data: dict[str, Any]) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path

def command_line() -> str:
    return "python -m " + " ".join([sys.modules["__main__"].__spec__.name, *sys.argv[1:]]) if getattr(
        sys.modules["__main__"], "__spec__", None) else " ".join(sys.argv)

# --- the stack ---------------------------------------------------------------------

@dataclass
class Stack:
    api_url: str
    home: Path
    moto: Any  # tests.support.moto_server.MotoServer
    extra: dict[str, Any] = field(default_factory=dict)

    def base_env(self) -> dict[str, str]:
        """An environment for pushpool processes: this server, nothing inherited that points elsewhere."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PUSHPOOL_", "AWS_"))}
        env.update(
            PREFECT_API_URL=self.api_url,
            PREFECT_HOME=str(self.home / "client-home"),
            PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        return env

    def worker_env(self) -> dict[str, str]:
        env = self.base_env()
        env.pop("PYTHONPATH", None)
        env.update(
            PREFECT_HOME=str(self.home / "worker-home"),
            AWS_ENDPOINT_URL=self.moto.endpoint_url,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_REGION="us-east-1",
            PREFECT_LOGGING_LEVEL="WARNING",
        )
        return env

@contextmanager
def bench_stack(moto_url: Optional[str] = None) -> Iterator[Stack]:
    """An embedded Prefect server (fresh SQLite) and moto with ECS tasks frozen."""
    from dispatcher.embedded_server import start_embedded_server
    from tests.support.moto_server import MotoServer, run_moto_server

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="pushpool-bench-") as home_dir:
        home = Path(home_dir)
        moto = MotoServer(moto_url) if moto_url else stack.enter_context(run_moto_server())
        moto.freeze_ecs_tasks(times=10**6)
        # The late-runs service would mark every backfilled run (schedule_runs, in the past)
        # "Late", 1,000 state writes fighting the claims for SQLite's lock: off, for both systems.
        server = start_embedded_server(home / "server", extra_env={
            "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
        })
        stack.callback(server.stop)
        yield Stack(api_url=server.api_url, home=home, moto=moto)

def default_vpc(moto: Any) -> tuple[str, list[str]]:
    ec2 = moto.client("ec2")
    [vpc] = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])["Subnets"]
    return vpc["VpcId"], [s["SubnetId"] for s in subnets]

async def make_push_pool(stack: Stack, name: str, *, aws_endpoint: Optional[str] = None):
    """An `ecs:push` pool on its own moto cluster, and a deployment on it."""
    from dispatcher.prefect_client import PrefectClient
    from dispatcher.settings import Settings
    from tests.support.ecs import ecs_template, make_credentials_block
    from tests.support.factories import make_deployment, make_pool

    cluster = f"{name}-cluster"
    stack.moto.client("ecs").create_cluster(clusterName=cluster)
    async with PrefectClient(Settings(api_url=stack.api_url)) as client:
        block_id = await make_credentials_block(client, f"{name}-creds", aws_endpoint or stack.moto.endpoint_url)
        template = ecs_template(aws_credentials={"$ref": {"block_document_id": block_id}}, cluster=cluster)
        pool = await make_pool(client, name, "ecs:push", base_job_template=template)
        deployment = await make_deployment(client, name, name=name, flow_name=f"{name}-flow",
                                           job_variables={"image": FLOW_IMAGE})
    return pool, deployment, cluster

async def make_worker_pool(stack: Stack, name: str):
    """An `ecs` worker pool with Prefect's default ECS template (cluster and VPC set)."""
    from dispatcher.prefect_client import PrefectClient
    from dispatcher.settings import Settings
    from tests.support.factories import make_deployment

    python = worker_python()
    cluster = f"{name}-cluster"
    stack.moto.client("ecs").create_cluster(clusterName=cluster)
    stack.moto.client("sqs").create_queue(QueueName=ECS_QUEUE)
    template_file = stack.home / f"{name}-template.json"
    subprocess.run(
        [str(python), "-m", "prefect", "work-pool", "get-default-base-job-template", "--type", "ecs",
         "--file", str(template_file)],
        env=stack.worker_env(), check=True, capture_output=True, timeout=120,
    )
    template = json.loads(template_file.read_text())
    vpc_id, _ = default_vpc(stack.moto)
    template["variables"]["properties"]["cluster"]["default"] = cluster
    template["variables"]["properties"]["vpc_id"]["default"] = vpc_id
    # moto adds up container-level memory (None for a Fargate task definition
    # without it: a 500 on RunTask); pushpool's ECS provider sets it for the same
    # reason. The worker's own defaults (1024 CPU units, 2048 MiB) at container level:
    for container in template["job_configuration"]["task_definition"]["containerDefinitions"]:
        container.setdefault("cpu", 1024)
        container.setdefault("memory", 2048)
    async with PrefectClient(Settings(api_url=stack.api_url)) as client:
        pool = await client.create_work_pool(name, "ecs", template)
        deployment = await make_deployment(client, name, name=name, flow_name=f"{name}-flow",
                                           job_variables={"image": FLOW_IMAGE})
    return pool, deployment, cluster

@contextmanager
def running_worker(stack: Stack, pool: str, log_path: Path, extra_env: Optional[dict[str, str]] = None):
    """`prefect worker start --pool P --type ecs` at its defaults, from the bench-worker venv."""
    python = worker_python()
    env = stack.worker_env()
    env.update(extra_env or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(python), "-m", "prefect", "worker", "start", "--pool", pool, "--type", "ecs"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield process
    finally:
        stop_process(process)

def stop_process(process: subprocess.Popen, timeout: float = 15) -> None:
    import signal

    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()

CREATE_CONCURRENCY = 4  # more makes the SQLite server answer 503 (database locked) past the client's retries

async def create_runs(api_url: str, deployment_id: Any, count: int, *, body: Optional[dict[str, Any]] = None,
                      concurrency: int = CREATE_CONCURRENCY) -> tuple[list[Any], float]:
    """`POST /deployments/{id}/create_flow_run`, `concurrency` at once: (run ids, seconds).
    A request still failing with 503 after the client's own retries is tried again (the
    server rolled it back, so nothing is created twice)."""
    import asyncio

    from dispatcher.prefect_client import PrefectAPIError, PrefectClient
    from dispatcher.settings import Settings

    started = time.monotonic()
    semaphore = asyncio.Semaphore(concurrency)
    async with PrefectClient(Settings(api_url=api_url, max_concurrency=concurrency)) as client:
        async def one() -> Any:
            async with semaphore:
                for attempt in range(5):
                    try:
                        return (await client.create_flow_run_from_deployment(deployment_id, **(body or {}))).id
                    except PrefectAPIError as exc:
                        if exc.status_code != 503 or attempt == 4:
                            raise
                        await asyncio.sleep(1 + attempt)

        ids = await asyncio.gather(*(one() for _ in range(count)))
    return list(ids), time.monotonic() - started

async def schedule_runs(api_url: str, deployment_id: Any, count: int, first: datetime) -> float:
    """`count` SCHEDULED runs one second apart from `first` (in the past: all due now),
    made by the server in one transaction: a finite schedule on the deployment
    (`RRULE:FREQ=SECONDLY;COUNT=n`, so the scheduler service adds no more), then
    `POST /deployments/{id}/schedule` with that window (Prefect's backfill endpoint).
    ~0.3 s for 1,000 runs, where `create_flow_run` manages ~5 runs/s on this server."""
    from dispatcher.prefect_client import PrefectClient
    from dispatcher.settings import Settings

    first = first.astimezone(timezone.utc).replace(microsecond=0)
    started = time.monotonic()
    async with PrefectClient(Settings(api_url=api_url)) as client:
        for offset in range(0, count, SCHEDULE_CHUNK):  # a schedule yields at most ~1,000 dates per call
            n = min(SCHEDULE_CHUNK, count - offset)
            start = first + timedelta(seconds=offset)
            rrule = f"DTSTART:{start.strftime('%Y%m%dT%H%M%SZ')}\nRRULE:FREQ=SECONDLY;COUNT={n}"
            await client.request("POST", f"deployments/{deployment_id}/schedules",
                                 json=[{"schedule": {"rrule": rrule, "timezone": "UTC"}, "active": True}])
            await client.request("POST", f"deployments/{deployment_id}/schedule", json={
                "start_time": start.isoformat(), "end_time": (start + timedelta(seconds=n - 0.5)).isoformat(),
                "min_runs": n, "max_runs": n,
            })
    return time.monotonic() - started


SCHEDULE_CHUNK = 1000


def due_start(count: int) -> datetime:
    """The first run's time for `count` runs one second apart, all due now."""
    return datetime.now(timezone.utc) - timedelta(seconds=count + 5)


async def run_ids(api_url: str, deployment_id: Any) -> list[Any]:
    from dispatcher.prefect_client import PrefectClient
    from dispatcher.settings import Settings

    async with PrefectClient(Settings(api_url=api_url)) as client:
        runs = await client.read_flow_runs(deployments={"id": {"any_": [str(deployment_id)]}})
        return [run.id for run in runs]


async def wait_for_pids(api_url: str, run_ids: list[Any], timeout: float, interval: float = 0.5) -> dict[str, float]:
    """Poll until every run has an infrastructure_pid: {run id: monotonic time first seen}."""
    from dispatcher.prefect_client import PrefectClient
    from dispatcher.settings import Settings

    wanted = {str(r) for r in run_ids}
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    async with PrefectClient(Settings(api_url=api_url)) as client:
        while len(seen) < len(wanted) and time.monotonic() < deadline:
            missing = sorted(wanted - set(seen))
            for start in range(0, len(missing), 200):
                chunk = missing[start:start + 200]
                runs = await client.read_flow_runs(flow_runs={"id": {"any_": chunk}})
                now = time.monotonic()
                for run in runs:
                    if run.infrastructure_pid and str(run.id) not in seen:
                        seen[str(run.id)] = now
            if len(seen) < len(wanted):
                import asyncio

                await asyncio.sleep(interval)
    return seen

def main() -> None:
    started = time.monotonic()
    python = worker_python()
    print(f"{WORKER_VENV}: {worker_versions(python)} (ready in {time.monotonic() - started:.1f} s)")

if __name__ == "__main__":
    main()
