"""The benchmarks' harness, run at a tiny size so it cannot rot (in its own
folder so it runs after the timing-sensitive integration tests). Numbers are
recorded by the benchmarks (bench/RESULTS.md), never asserted here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration


def test_the_scheduled_lateness_benchmark_runs_and_measures_every_run(api_env):
    result = subprocess.run(
        [sys.executable, "-m", "bench.scheduled_lateness", "--smoke"],
        cwd=REPO_ROOT, env=api_env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tick")]
    assert [row.split("|")[1].strip() for row in rows] == ["tick only", "tick + exact-time wake-ups"]
    for row in rows:
        assert row.rstrip().endswith("| 4 of 4 |"), row  # every run was claimed and measured


# --- the side-by-side benchmarks (bench.latency, .throughput, .scaling, .api_calls, .chart) ---------
# Each starts its own Prefect server and moto; Prefect's ECS worker comes from
# .venv/bench-worker (bench/worker_env.py creates it on first use: ~30 s with a
# warm pip cache). Only when that venv cannot be created do the worker parts skip.


def bench_env(tmp_path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PUSHPOOL_", "AWS_"))}
    env["PUSHPOOL_BENCH_OUT"] = str(tmp_path / "bench-out")  # never overwrite the real results
    return env


@pytest.fixture(scope="module")
def worker_venv_problem() -> str:
    """'' when the ECS worker's venv is ready, else why it is not."""
    from bench.worker_env import WorkerEnvError, worker_python

    try:
        worker_python()
    except WorkerEnvError as exc:
        return str(exc)
    return ""


def run_bench(tmp_path, *args: str, timeout: float = 150) -> str:
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, env=bench_env(tmp_path), capture_output=True, text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Machine:" in result.stdout and "Command: `python -m " in result.stdout
    return result.stdout


def table_rows(output: str, first_cell: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith(f"| {first_cell}")
    ]


def test_the_latency_benchmark_measures_every_run_of_every_system(tmp_path, worker_venv_problem):
    systems = "webhook,dispatch" if worker_venv_problem else "webhook,dispatch,worker"
    output = run_bench(tmp_path, "bench.latency", "--smoke", "--systems", systems)
    rows = table_rows(output, "pushpool") + table_rows(output, "Prefect ECS worker")
    assert len(rows) == len(systems.split(",")), output
    for row in rows:
        assert row[1] == "3 of 3", row
        assert all(float(cell) > 0 for cell in row[2:5]), row
    assert (tmp_path / "bench-out" / "latency.json").exists()
    if worker_venv_problem:
        pytest.skip(f"the ECS worker's part: {worker_venv_problem}")


def test_the_throughput_benchmark_gets_every_run_a_pid(tmp_path, worker_venv_problem):
    args = ["bench.throughput", "--smoke"] + (["--no-worker"] if worker_venv_problem else [])
    output = run_bench(tmp_path, *args)
    rows = table_rows(output, "pushpool, one sweep") + table_rows(output, "Prefect ECS worker")
    assert len(rows) == (2 if worker_venv_problem else 3), output
    for row in rows:
        assert row[1] == "10 of 10", row
    for row in rows[:2]:
        assert float(row[4]) > 0, row  # peak RSS measured
    assert (tmp_path / "bench-out" / "throughput.json").exists()
    if worker_venv_problem:
        pytest.skip(f"the ECS worker's part: {worker_venv_problem}")


def test_the_scaling_benchmark_sweeps_only_due_runs(tmp_path):
    output = run_bench(tmp_path, "bench.scaling", "--smoke")
    rows = [row for row in table_rows(output, "") if row[0] in ("10", "200")]
    assert [row[0] for row in rows] == ["10", "200"], output
    for row in rows:
        assert row[4] == "4 of 4", row
    assert "future runs still SCHEDULED: 200 of 200" in output, output


def test_the_api_calls_benchmark_counts_calls_and_profiles_a_sweep(tmp_path):
    output = run_bench(tmp_path, "bench.api_calls", "--smoke")
    assert "5 of 5 submitted" in output, output
    assert "`POST /api/flow_runs/{id}/set_state`" in output and "`ecs:RunTask`" in output, output
    assert "cumulative" in output or "cumtime" in output, output


def test_the_chart_is_drawn_from_the_results(tmp_path, worker_venv_problem):
    if worker_venv_problem:
        pytest.skip(f"matplotlib lives in the ECS worker's venv: {worker_venv_problem}")
    out = tmp_path / "bench-out"
    out.mkdir()
    (out / "latency.json").write_text(
        '{"runs": 3, "smoke": true, "results": {"webhook": {"p50": 0.4, "p95": 0.5}, "worker": {"p50": 8, "p95": 14}}}'
    )
    (out / "throughput.json").write_text(
        '{"runs": 20, "smoke": true, "results": {"pushpool-c8": {"runs_per_second": 30}, '
        '"worker": {"runs_per_second": 3}}}'
    )
    result = subprocess.run(
        [sys.executable, "-m", "bench.chart", "--out", str(tmp_path / "chart.png")], cwd=REPO_ROOT,
        env=bench_env(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
