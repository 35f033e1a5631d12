"""The benchmarks' harness, run at a tiny size so it cannot rot. Numbers are
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
