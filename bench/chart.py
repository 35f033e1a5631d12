"""`bench/results.png` from the numbers the benchmarks wrote to `bench/.out/*.json`:
latency p50/p95 per system (bench.latency) and runs/s per system (bench.throughput).

matplotlib is not a dependency of pushpool: it is installed into the benchmark
venv (`.venv/bench-worker`, see bench/worker_env.py), and this module re-runs
itself with that venv's python when the current one has no matplotlib, so
`make test` and the project's venv are unaffected.

    python -m bench.chart [--out bench/results.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = Path(os.environ.get("PUSHPOOL_BENCH_OUT") or REPO_ROOT / "bench" / ".out")
DEFAULT_PNG = REPO_ROOT / "bench" / "results.png"
SHORT = {
    "webhook": "pushpool\nwebhook",
    "dispatch": "pushpool\ndispatch",
    "worker": "ECS worker\n(defaults)",
}


def load(name: str) -> dict | None:
    path = OUT_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def draw(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency, throughput = load("latency"), load("throughput")
    if latency is None and throughput is None:
        raise SystemExit(f"no results in {OUT_DIR}: run python -m bench.latency / bench.throughput first")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if latency:
        systems = list(latency["results"])
        p50 = [latency["results"][s]["p50"] for s in systems]
        p95 = [latency["results"][s]["p95"] for s in systems]
        xs = range(len(systems))
        left.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50", color="#1f77b4")
        left.bar([x + 0.2 for x in xs], p95, width=0.4, label="p95", color="#aec7e8")
        for x, a, b in zip(xs, p50, p95):
            left.text(x - 0.2, a, f"{a:.2f}", ha="center", va="bottom", fontsize=8)
            left.text(x + 0.2, b, f"{b:.2f}", ha="center", va="bottom", fontsize=8)
        left.set_xticks(list(xs), [SHORT.get(s, s) for s in systems])
        left.set_yscale("log")
        left.set_ylabel("seconds (log scale)")
        smoke = " (smoke size)" if latency.get("smoke") else ""
        left.set_title(f"run created → infrastructure_pid, {latency['runs']} runs{smoke}")
        left.legend()
    else:
        left.set_axis_off()
    if throughput:
        names = list(throughput["results"])
        rates = [throughput["results"][n]["runs_per_second"] for n in names]
        labels = ["ECS worker\n(defaults)" if n == "worker" else
                  f"pushpool sweep\nconcurrency {n.removeprefix('pushpool-c')}" for n in names]
        colors = ["#ff7f0e" if n == "worker" else "#2ca02c" for n in names]
        right.bar(range(len(names)), rates, color=colors)
        for x, rate in enumerate(rates):
            right.text(x, rate, f"{rate:.1f}", ha="center", va="bottom", fontsize=8)
        right.set_xticks(range(len(names)), labels)
        right.set_ylabel("runs/s (until every run has a pid)")
        smoke = " (smoke size)" if throughput.get("smoke") else ""
        right.set_title(f"{throughput['runs']:,} runs due at once{smoke}")
    else:
        right.set_axis_off()
    fig.suptitle("pushpool vs Prefect's ECS worker, same Prefect server and moto (2-core machine)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PNG)
    args = parser.parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if os.environ.get("PUSHPOOL_BENCH_CHART_REEXEC"):
            raise SystemExit("matplotlib is missing in the benchmark venv too")
        sys.path.insert(0, str(REPO_ROOT))
        from bench.worker_env import chart_python

        python = chart_python()
        env = {**os.environ, "PUSHPOOL_BENCH_CHART_REEXEC": "1", "PYTHONPATH": str(REPO_ROOT)}
        raise SystemExit(subprocess.call([str(python), "-m", "bench.chart", "--out", str(args.out)],
                                         env=env, cwd=REPO_ROOT))
    print(f"wrote {draw(args.out)}")


if __name__ == "__main__":
    main()
