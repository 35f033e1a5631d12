"""`pushpool package aws-lambda`: the Lambda zip, built by the real command
(pip installing manylinux wheels from the package index), then unzipped and
imported by a fresh, isolated interpreter the way the Lambda runtime would."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import dispatcher

pytestmark = pytest.mark.integration

HANDLER_EXISTS = (Path(dispatcher.__file__).parent / "aws_lambda.py").is_file()
needs_handler = pytest.mark.skipif(
    not HANDLER_EXISTS, reason="dispatcher/aws_lambda.py (the Lambda handler) is not in the tree yet"
)
# The host is CPython 3.11 on x86_64, so it can import what is built for that target.
TARGET = ("--python-version", "3.11", "--architecture", "x86_64")


@dataclass
class Built:
    path: Path
    stdout: str
    seconds: float

    @property
    def names(self) -> list[str]:
        with zipfile.ZipFile(self.path) as archive:
            return archive.namelist()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def package(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", "package", "aws-lambda", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
    )


def build(directory: Path, *args: str) -> Built:
    directory.mkdir(parents=True, exist_ok=True)
    output = directory / "pushpool-lambda.zip"
    started = time.perf_counter()
    result = package(*TARGET, *args, "-o", str(output), cwd=directory)
    assert result.returncode == 0, result.stdout + result.stderr
    return Built(output, result.stdout, time.perf_counter() - started)


@pytest.fixture(scope="session")
def lambda_zip(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The default build (boto3 bundled), once per session: pip takes a while."""
    return build(tmp_path_factory.mktemp("lambda-zip"))


@pytest.fixture(scope="session")
def unzipped(lambda_zip: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("lambda-unzipped")
    with zipfile.ZipFile(lambda_zip.path) as archive:
        archive.extractall(target)
    return target


def tops(names: list[str]) -> set[str]:
    return {name.split("/")[0] for name in names}


def test_the_command_prints_the_size_and_the_file_count(lambda_zip):
    match = re.search(r"Built .+: ([\d.]+) MiB \(([\d,]+) bytes\), ([\d,]+) files", lambda_zip.stdout)
    assert match, lambda_zip.stdout
    assert int(match.group(2).replace(",", "")) == lambda_zip.path.stat().st_size
    assert float(match.group(1)) == pytest.approx(lambda_zip.path.stat().st_size / 2**20, abs=0.01)
    assert int(match.group(3).replace(",", "")) == len(lambda_zip.names)
    assert "CPython 3.11 on manylinux2014_x86_64" in lambda_zip.stdout
    # ECS's target: a zip of at most 25 MB, even with boto3 and bytecode bundled
    assert lambda_zip.path.stat().st_size <= 25 * 10**6
    assert "bytecode: compiled" in lambda_zip.stdout


def test_the_zip_holds_the_runtime_code_and_its_dependencies_only(lambda_zip):
    names = lambda_zip.names
    top = tops(names)
    for wanted in ("providers/ecs.py", "providers/templates/ecs.json", "providers/base.py",
                   "providers/registry.py", "providers/__init__.py", "dispatcher/__init__.py",
                   "dispatcher/dispatch.py", "boto3/__init__.py", "botocore/__init__.py"):
        assert wanted in names, wanted
    for package_name in ("pydantic_core", "pydantic", "httpx", "aws_lambda_powertools", "aws_xray_sdk", "jsonschema"):
        assert package_name in top, package_name
    assert any(n.startswith("pydantic_core/_pydantic_core.cpython-311-x86_64-linux-gnu") for n in names)

    assert not {"prefect", "typer", "rich", "websockets", "provisioning", "tests", "bin"} & top
    assert not [n for n in top if re.match(r"(prefect|typer|rich|websockets)-.*\.dist-info$", n)]
    assert not [n for n in names if "/tests/" in f"/{n}"]
    # Bytecode (built on 3.11 for 3.11): exactly what a cold start imports, for this Python only.
    compiled = [n for n in names if n.endswith(".pyc")]
    assert all("/__pycache__/" in f"/{n}" and n.endswith(".cpython-311.pyc") for n in compiled)
    for wanted in ("dispatcher/__pycache__/aws_lambda.cpython-311.pyc", "providers/__pycache__/ecs.cpython-311.pyc",
                   "pydantic/__pycache__/main.cpython-311.pyc", "botocore/__pycache__/client.cpython-311.pyc"):
        assert wanted in compiled, wanted
    assert "aws_lambda_powertools/event_handler/__pycache__/api_gateway.cpython-311.pyc" not in compiled
    sources = {n.replace("__pycache__/", "").replace(".cpython-311.pyc", ".py") for n in compiled}
    assert sources <= set(names)
    assert not [n for n in names if n.startswith(("dispatcher/cli/", "dispatcher/quickstart/"))]
    for left_out in ("dispatcher/embedded_server.py", "dispatcher/serve.py", "dispatcher/event_stream.py",
                     "dispatcher/__main__.py", "dispatcher/packaging.py", "providers/process.py",
                     "providers/process_supervisor.py", "providers/templates/process.json"):
        assert left_out not in names, left_out
    # every runtime module of the dispatcher is there
    source = Path(dispatcher.__file__).parent
    excluded = {"__main__.py", "embedded_server.py", "serve.py", "event_stream.py", "packaging.py"}
    for module in source.glob("*.py"):
        if module.name not in excluded:
            assert f"dispatcher/{module.name}" in names, module.name


@needs_handler
def test_the_zip_holds_the_handler(lambda_zip):
    assert "dispatcher/aws_lambda.py" in lambda_zip.names


def test_the_zip_is_deterministic(lambda_zip, tmp_path):
    with zipfile.ZipFile(lambda_zip.path) as archive:
        infos = archive.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {i.external_attr >> 16 for i in infos} == {0o100644}

    again = build(tmp_path)  # pip's wheel cache makes the second install quick
    if again.sha256 != lambda_zip.sha256:
        with zipfile.ZipFile(lambda_zip.path) as first, zipfile.ZipFile(again.path) as second:
            differing = [n for n in first.namelist() if n not in second.namelist() or first.read(n) != second.read(n)]
        pytest.fail(f"two builds of the same inputs differ in {differing[:10]}")


def isolated_python(code: str, path: Path) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter with nothing of this machine's: no environment
    (`env -i`), no site-packages (`-S`), no user site or PYTHON* variables (`-I`);
    only the unzipped directory on sys.path, as the Lambda runtime has it."""
    prelude = f"import sys; sys.path.insert(0, {str(path)!r}); sys.dont_write_bytecode = True\n"
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + code], env={}, capture_output=True, text=True, timeout=60
    )


def test_the_unzipped_code_imports_with_nothing_else(unzipped):
    handler = "import dispatcher.aws_lambda; assert callable(dispatcher.aws_lambda.handler)\n" if HANDLER_EXISTS else ""
    result = isolated_python(
        "import importlib.util\n"
        "assert not [p for p in sys.path if 'site-packages' in p], sys.path\n"
        "import providers.ecs, dispatcher.dispatch, pydantic, httpx, boto3\n"
        f"{handler}"
        "from providers.registry import ProviderRegistry\n"
        "assert ProviderRegistry().provider_class('ecs:push').default_base_job_template()['job_configuration']\n"
        f"assert pydantic.__file__.startswith({str(unzipped)!r}), pydantic.__file__\n"
        f"assert boto3.__file__.startswith({str(unzipped)!r}), boto3.__file__\n"
        "assert importlib.util.find_spec('prefect') is None\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('prefect', 'typer', 'rich', 'websockets')]\n"
        "print('ok')\n",
        unzipped,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_without_boto3_the_runtimes_sdk_is_left_out(lambda_zip, tmp_path):
    lean = build(tmp_path, "--no-include-boto3")
    top = tops(lean.names)
    # boto3, botocore and what only they need come from the Lambda runtime
    assert not {"boto3", "botocore", "s3transfer", "urllib3", "dateutil"} & top
    assert {"aws_lambda_powertools", "aws_xray_sdk", "jmespath", "pydantic_core", "httpx", "dispatcher"} <= top
    assert "boto3: the runtime" in lean.stdout
    assert lean.path.stat().st_size < lambda_zip.path.stat().st_size / 2


def test_an_unknown_provider_gets_the_known_ones(tmp_path):
    result = package("--providers", "ecs,kubernetes", "-o", str(tmp_path / "x.zip"), cwd=tmp_path)
    assert result.returncode == 1
    assert "unknown provider 'kubernetes'" in result.stderr
    assert "known providers: ecs, process" in result.stderr
    assert not (tmp_path / "x.zip").exists()


def test_no_wheel_for_the_platform_is_one_clear_line(tmp_path):
    result = package("--python-version", "3.30", "-o", str(tmp_path / "x.zip"), cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith("No wheel of "), message
    assert "CPython 3.30 on manylinux2014_x86_64" in message
    assert re.search(r"pydantic[-_]core|rpds[-_]py", message), message
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "x.zip").exists()


def test_an_unreachable_index_is_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="1")
    result = package("--architecture", "arm64", "-o", str(tmp_path / "x.zip"), cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stdout
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith("pip could not reach the package index"), message
    assert "manylinux2014_aarch64" in message
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(tmp_path.iterdir())
