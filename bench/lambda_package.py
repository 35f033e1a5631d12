"""The Lambda zip: its size and file count with and without a bundled boto3,
and how long a fresh interpreter takes to import the handler from it.

    python -m bench.lambda_package [--runs 10]

Builds with `dispatcher.packaging` (what `pushpool package aws-lambda` runs) for
CPython 3.12 on x86_64, with and without boto3; then builds for 3.11 (this
machine's Python), unzips it and reports the median wall time, over fresh
isolated interpreters (`env -i python -I -S`, only the unzipped directory on
sys.path), of `import dispatcher.aws_lambda`, beside an empty interpreter.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import dispatcher
from dispatcher.packaging import LambdaBuild, LambdaBuildOptions, build_lambda_zip

HANDLER = "dispatcher.aws_lambda"


def timed_build(options: LambdaBuildOptions) -> tuple[LambdaBuild, float]:
    started = time.perf_counter()
    build = build_lambda_zip(options)
    return build, time.perf_counter() - started


def import_seconds(directory: Path, module: str | None) -> float:
    code = f"import sys; sys.path.insert(0, {str(directory)!r})" + (f"; import {module}" if module else "")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-I", "-S", "-B", "-c", code], env={}, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    handler_exists = (Path(dispatcher.__file__).parent / "aws_lambda.py").is_file()

    with tempfile.TemporaryDirectory(prefix="bench-lambda-") as scratch:
        root = Path(scratch)
        rows = []
        for include_boto3 in (True, False):
            options = LambdaBuildOptions(
                python_version="3.12", architecture="x86_64", include_boto3=include_boto3,
                output=root / f"py312-boto3-{include_boto3}.zip",
            )
            build, seconds = timed_build(options)
            rows.append(("3.12", "x86_64", "bundled" if include_boto3 else "runtime's", build, seconds))

        print(f"python {sys.version.split()[0]} (build machine); pip's wheel cache as it was")
        print()
        print("| python | arch | boto3 | zip (MiB) | zip (bytes) | files | build (s) |")
        print("|---|---|---|---|---|---|---|")
        for python, arch, boto3, build, seconds in rows:
            print(f"| {python} | {arch} | {boto3} | {build.size_mib:.2f} | {build.size_bytes:,} | "
                  f"{build.file_count:,} | {seconds:.1f} |")

        if not handler_exists:
            print(f"\n{HANDLER} is not in the tree yet: no import timing.")
            return
        options = LambdaBuildOptions(python_version="3.11", output=root / "py311.zip")
        build, _ = timed_build(options)
        unzipped = root / "py311"
        with zipfile.ZipFile(build.path) as archive:
            archive.extractall(unzipped)
        import_seconds(unzipped, HANDLER)  # warm the file cache, as a reused Lambda image would be
        empty = statistics.median(import_seconds(unzipped, None) for _ in range(args.runs))
        handler = statistics.median(import_seconds(unzipped, HANDLER) for _ in range(args.runs))
        print()
        print(f"| fresh isolated interpreter, 3.11 zip unzipped ({args.runs} runs) | median wall (s) |")
        print("|---|---|")
        print(f"| empty (`python -I -S -c pass`) | {empty:.3f} |")
        print(f"| `import {HANDLER}` | {handler:.3f} |")
        print(f"| the import alone (difference) | {handler - empty:.3f} |")


if __name__ == "__main__":
    main()
