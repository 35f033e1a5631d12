"""Build the AWS Lambda artifact: one deterministic zip for the Lambda Python
runtime, with the dispatcher's runtime code at its root and its third-party
dependencies installed by pip as manylinux wheels for the target architecture
and Python version (never the build machine's own wheels).

What goes in:
- `dispatcher/` without what only the command line needs (`cli/`,
  `quickstart/`, the embedded server, the long-running local dispatcher and its
  websocket event stream, this module);
- `providers/`: `__init__`, `base`, `registry`, and for each chosen provider its
  module, the `providers.*` modules it imports and its default template;
- the requirements of the installed `pushpool` distribution: the core ones
  without the CLI-only ones (typer, rich, websockets), plus the `aws` extra,
  with Powertools' `tracer` extra (its `Tracer` needs the X-Ray SDK, which the
  Lambda runtime does not have). boto3 and botocore are bundled by default, pinned
  by this build (the zip is then ~22 MiB, under the 25 MiB aimed at); without
  them (~5 MiB) the runtime's own SDK is used, and what only the SDK needed
  (urllib3, python-dateutil, six) is left out too.

Bytecode is compiled into the zip only when the build machine's Python is the
target's version (Lambda cannot write `__pycache__`, so without it every cold
start compiles every module it imports: about twice the import time; pass
`--python-version` matching the build machine, or build on the target's
Python, to get it). `tests/` folders of the dependencies and pip's `bin/` are dropped, `prefect` can never be in it, and
the bytes depend only on the inputs: entries sorted, timestamps and
permissions fixed.

This module runs on the build machine only; it is not in the zip.
"""

from __future__ import annotations

import ast
import enum
import hashlib
import importlib.metadata
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

import dispatcher
import providers
from providers.registry import BUILTIN_PROVIDERS, ProviderRegistry

DISTRIBUTION = "pushpool"
EXTRAS = ("aws",)
#: required by the CLI only; nothing the Lambda imports uses them
CLI_ONLY_REQUIREMENTS = frozenset({"typer", "rich", "websockets"})
#: extras the Lambda needs on top of what the distribution declares
LAMBDA_EXTRAS = {"aws-lambda-powertools": frozenset({"tracer"})}
#: the AWS SDK the Lambda Python runtime ships: left to the runtime without include_boto3
RUNTIME_SDK = frozenset({"boto3", "botocore", "s3transfer"})
#: must never reach the zip: the dispatcher does not import them at run time
FORBIDDEN_TOP_LEVEL = frozenset({"prefect", "typer", "rich", "websockets"})

#: `dispatcher/` entries only the command line (or the build machine) uses
DISPATCHER_EXCLUDED = frozenset(
    {"cli", "quickstart", "__main__.py", "embedded_server.py", "serve.py", "event_stream.py", "packaging.py"}
)
PROVIDERS_ALWAYS = ("__init__.py", "base.py", "registry.py")
FIRST_PARTY = ("dispatcher", "providers", "provisioning")

PLATFORM_TAGS = {"x86_64": "manylinux2014_x86_64", "arm64": "manylinux2014_aarch64"}
MACHINES = {"x86_64": "x86_64", "arm64": "aarch64"}
#: 1980-01-01, the earliest time a zip can hold
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o100644
#: what the zip is meant to stay under with the ECS provider (Lambda's direct-upload limit is 50 MB)
TARGET_SIZE_BYTES = 25 * 1024 * 1024
DIRECT_UPLOAD_LIMIT_BYTES = 50 * 1024 * 1024

ProgressCallback = Callable[[str], None]


class PackagingError(Exception):
    """The artifact could not be built; the message is one sentence for a person."""


class Architecture(str, enum.Enum):
    x86_64 = "x86_64"
    arm64 = "arm64"


def known_providers() -> list[str]:
    """The built-in providers by module name (`ecs`, `process`)."""
    return sorted(_provider_modules())


def _provider_modules() -> dict[str, str]:
    """module name -> push type, e.g. {"ecs": "ecs:push"}."""
    modules = {}
    for push_type, path in BUILTIN_PROVIDERS.items():
        module = path.partition(":")[0]
        if module.startswith("providers."):
            modules[module.removeprefix("providers.")] = push_type
    return modules


class LambdaBuildOptions(BaseModel):
    """What `pushpool package aws-lambda` builds."""

    model_config = ConfigDict(frozen=True)

    output: Path = Path("dist/pushpool-lambda.zip")
    providers: tuple[str, ...] = Field(("ecs",), min_length=1)
    architecture: Architecture = Architecture.x86_64
    python_version: str = "3.12"
    include_boto3: bool = True
    #: compile bytecode into the zip; None = when the build machine runs the target's Python version
    compile_bytecode: Optional[bool] = None

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        """Accept `ecs,process`, repeated names and push types (`ecs:push`)."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            return value
        push_types = {push_type: module for module, push_type in _provider_modules().items()}
        names: list[str] = []
        for item in value:
            for name in str(item).split(","):
                name = name.strip()
                name = push_types.get(name, name)
                if name and name not in names:
                    names.append(name)
        unknown = [name for name in names if name not in _provider_modules()]
        if unknown:
            raise ValueError(
                f"unknown provider {', '.join(map(repr, unknown))}; known providers: {', '.join(known_providers())}"
            )
        return tuple(sorted(names))

    @field_validator("output")
    @classmethod
    def _output_is_a_file(cls, value: Path) -> Path:
        if value.is_dir():
            raise ValueError(f"{value} is a directory; name the zip file to write")
        return value

    @field_validator("python_version")
    @classmethod
    def _python_version(cls, value: str) -> str:
        match = re.fullmatch(r"3\.(\d{1,2})", value.strip())
        if not match or int(match.group(1)) < 11:
            raise ValueError(f"the Python version must be 3.11 or newer, as MAJOR.MINOR (got {value!r})")
        return value.strip()

    @property
    def platform_tag(self) -> str:
        return PLATFORM_TAGS[self.architecture.value]

    @property
    def target(self) -> str:
        """The target in words: `CPython 3.12 on manylinux2014_x86_64`."""
        return f"CPython {self.python_version} on {self.platform_tag}"

    @property
    def host_is_target(self) -> bool:
        return self.python_version == f"{sys.version_info.major}.{sys.version_info.minor}"

    @property
    def bytecode(self) -> bool:
        if self.compile_bytecode is None:
            return self.host_is_target
        if self.compile_bytecode and not self.host_is_target:
            raise PackagingError(
                f"Bytecode for Python {self.python_version} can only be compiled by Python {self.python_version}; "
                f"this is {sys.version_info.major}.{sys.version_info.minor}"
            )
        return self.compile_bytecode


class LambdaBuild(BaseModel):
    """What was built."""

    bytecode: bool = False

    path: Path
    size_bytes: int
    file_count: int
    sha256: str
    requirements: list[str]
    #: distributions in the zip, `name==version`
    distributions: list[str]
    #: distributions pip installed that the target does not need (e.g. the SDK's own dependencies)
    pruned: list[str]

    @property
    def size_mib(self) -> float:
        return self.size_bytes / (1024 * 1024)


# --- requirements -----------------------------------------------------------


def _requirement_class():
    """`packaging`'s PEP 508 parser: the library when it is installed, else the
    copy every pip carries (pip is needed here anyway)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - depends on the environment
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    return Requirement


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_environment(options: LambdaBuildOptions, extra: str = "") -> dict[str, str]:
    """The PEP 508 marker environment of the Lambda runtime."""
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{options.python_version}.0",
        "os_name": "posix",
        "platform_machine": MACHINES[options.architecture.value],
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": f"{options.python_version}.0",
        "python_version": options.python_version,
        "sys_platform": "linux",
        "extra": extra,
    }


def lambda_requirements(options: LambdaBuildOptions) -> list[str]:
    """The requirements to install, read from the installed distribution's
    metadata, without markers (evaluated here for the target, not the host)."""
    Requirement = _requirement_class()
    try:
        declared = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise PackagingError(
            f"The {DISTRIBUTION!r} distribution is not installed here, so its requirements are unknown; "
            "install it first (pip install -e '.[aws]')."
        ) from None
    wanted: dict[str, object] = {}
    for line in declared:
        requirement = Requirement(line)
        name = normalize(requirement.name)
        if requirement.marker is not None and not any(
            requirement.marker.evaluate(target_environment(options, extra)) for extra in ("", *EXTRAS)
        ):
            continue
        if name in CLI_ONLY_REQUIREMENTS or (name in RUNTIME_SDK and not options.include_boto3):
            continue
        requirement.marker = None
        requirement.extras = set(requirement.extras) | LAMBDA_EXTRAS.get(name, frozenset())
        wanted[name] = requirement
    return [str(wanted[name]) for name in sorted(wanted)]


# --- pip ----------------------------------------------------------------------

_NETWORK_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "ConnectTimeoutError",
    "Read timed out",
    "ProxyError",
    "SSLError",
    "Network is unreachable",
    "Connection refused",
    "Could not fetch URL",
)
_NO_DISTRIBUTION = re.compile(r"No matching distribution found for (\S+)")
_NO_VERSION = re.compile(r"Could not find a version that satisfies the requirement (\S+)")
#: what pip's ResolutionImpossible report lists when a dependency has no usable wheel
_UNAVAILABLE = re.compile(r"no matching distributions available for your environment:\n((?:[ \t]+\S+\n?)+)")
_PIP_LINE = re.compile(r"^(Collecting|Downloading|Using cached|Installing collected packages|Successfully installed)")


def pip_failure(output: str, options: LambdaBuildOptions) -> str:
    """One sentence for a failed `pip install`, naming the package and the platform."""
    match = _NO_DISTRIBUTION.search(output) or _NO_VERSION.search(output)
    package = match.group(1) if match else None
    unavailable = _UNAVAILABLE.search(output)
    if package is None and unavailable:
        package = ", ".join(line.strip() for line in unavailable.group(1).splitlines() if line.strip())
    network = next((sign for sign in _NETWORK_SIGNS if sign in output), None)
    if network:
        what = f"to download {package}" if package else "to download the dependencies"
        return (
            f"pip could not reach the package index {what} for {options.target} "
            f"({network}); check the network or pip's index settings."
        )
    if package:
        return (
            f"No wheel of {package} for {options.target}: pip found no matching distribution in the "
            "configured package indexes (only binary wheels for the target platform are accepted)."
        )
    errors = [line.strip() for line in output.splitlines() if line.strip().startswith("ERROR:")]
    detail = errors[-1].removeprefix("ERROR:").strip() if errors else (output.strip().splitlines() or ["no output"])[-1]
    return f"pip could not install the dependencies for {options.target}: {detail}"


def pip_install(
    requirements: Iterable[str], target: Path, options: LambdaBuildOptions, progress: Optional[ProgressCallback] = None
) -> None:
    command = [
        sys.executable, "-m", "pip", "install",
        "--target", str(target),
        "--platform", options.platform_tag,
        "--implementation", "cp",
        "--python-version", options.python_version,
        "--only-binary=:all:",
        "--no-compile",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar", "off",
        *requirements,
    ]
    environment = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
        )
    except OSError as exc:  # pragma: no cover - sys.executable always exists
        raise PackagingError(f"Could not run pip: {exc}") from exc
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if progress is not None and _PIP_LINE.match(line.strip()):
            progress(line.strip())
    if process.wait() != 0:
        output = "".join(lines)
        if "No module named pip" in output:
            raise PackagingError(f"pip is not installed in {sys.executable}'s environment; it is needed to build.")
        raise PackagingError(pip_failure(output, options))


# --- what pip installed ---------------------------------------------------------


def _installed(site: Path) -> dict[str, tuple[importlib.metadata.Distribution, Path]]:
    """normalised name -> (distribution, its .dist-info folder), for what pip put in `site`."""
    installed = {}
    for info in sorted(site.glob("*.dist-info")):
        dist = importlib.metadata.PathDistribution(info)
        installed[normalize(dist.metadata["Name"])] = (dist, info)
    return installed


def prune(site: Path, requirements: Iterable[str], options: LambdaBuildOptions) -> list[str]:
    """Remove the distributions the target does not need: pip evaluates
    dependency markers for the host, and without include_boto3 the SDK (and what
    only it needs, such as urllib3) is left to the runtime. Returns what went."""
    Requirement = _requirement_class()
    installed = _installed(site)
    keep: set[str] = set()
    queue = [Requirement(line) for line in requirements]
    while queue:
        requirement = queue.pop()
        name = normalize(requirement.name)
        if name in keep or name not in installed or (name in RUNTIME_SDK and not options.include_boto3):
            continue
        keep.add(name)
        extras = set(requirement.extras)
        for line in installed[name][0].requires or []:
            dependency = Requirement(line)
            if dependency.marker is None or any(
                dependency.marker.evaluate(target_environment(options, extra)) for extra in extras or {""}
            ):
                queue.append(dependency)
    pruned = []
    for name in sorted(set(installed) - keep):
        dist, info = installed[name]
        pruned.append(f"{dist.metadata['Name']}=={dist.version}")
        for file in dist.files or []:
            path = Path(dist.locate_file(file)).resolve()
            if path.is_relative_to(site.resolve()) and path.is_file():
                path.unlink()
        shutil.rmtree(info, ignore_errors=True)
    _remove_empty_dirs(site)
    return pruned


def _remove_empty_dirs(root: Path) -> None:
    for directory, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
        path = Path(directory)
        if path != root and not any(path.iterdir()):
            path.rmdir()


# --- the project's own modules --------------------------------------------------


def _python_files(package_dir: Path) -> list[Path]:
    return sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)


def first_party_files(options: LambdaBuildOptions) -> dict[str, Path]:
    """arcname -> source for `dispatcher/` and `providers/`."""
    files: dict[str, Path] = {}
    dispatcher_dir = Path(dispatcher.__file__).parent
    for path in _python_files(dispatcher_dir):
        relative = path.relative_to(dispatcher_dir)
        if relative.parts[0] in DISPATCHER_EXCLUDED:
            continue
        files[f"dispatcher/{relative.as_posix()}"] = path

    providers_dir = Path(providers.__file__).parent
    modules = set(PROVIDERS_ALWAYS) | {f"{name}.py" for name in options.providers}
    pending = list(modules)
    while pending:  # and the providers.* modules they import (process -> process_supervisor)
        source = providers_dir / pending.pop()
        for imported in _imports(source):
            parts = imported.split(".")
            if parts[0] == "providers" and len(parts) > 1 and (providers_dir / f"{parts[1]}.py").is_file():
                if f"{parts[1]}.py" not in modules:
                    modules.add(f"{parts[1]}.py")
                    pending.append(f"{parts[1]}.py")
    for module in sorted(modules):
        files[f"providers/{module}"] = providers_dir / module

    registry = ProviderRegistry(load_entry_points=False)
    for name in options.providers:
        provider = registry.provider_class(_provider_modules()[name])
        template = providers_dir / "templates" / provider.template_file
        if not template.is_file():
            raise PackagingError(f"The template of the {name!r} provider is missing: {template}")
        files[f"providers/templates/{provider.template_file}"] = template
    return files


class _ImportCollector(ast.NodeVisitor):
    """Every module a file imports, except under `if TYPE_CHECKING:` and in
    `try: … except ImportError:` (optional by construction)."""

    def __init__(self, package: str):
        self.package = package
        self.modules: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        handled = {
            name.id if isinstance(name, ast.Name) else getattr(name, "attr", "")
            for handler in node.handlers
            for name in (handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type])
            if name is not None
        }
        if handled & {"ImportError", "ModuleNotFoundError"}:
            for child in (*node.handlers, *node.orelse, *node.finalbody):
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.modules.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            module = ".".join([*base, *([node.module] if node.module else [])])
        else:
            module = node.module or ""
        self.modules.add(module)
        self.modules.update(f"{module}.{alias.name}" for alias in node.names)


def _imports(path: Path, package: str = "providers") -> set[str]:
    collector = _ImportCollector(package)
    collector.visit(ast.parse(path.read_text(), filename=str(path)))
    return collector.modules


def _top_level_names(site: Path) -> set[str]:
    names = set()
    for entry in site.iterdir():
        if entry.is_dir() and not entry.name.endswith((".dist-info", ".data")):
            names.add(entry.name)
        elif entry.suffix in {".py", ".so", ".pyd"}:
            names.add(entry.name.split(".")[0])
    return names


def check_imports(files: dict[str, Path], site: Path, options: LambdaBuildOptions) -> None:
    """Every module the packaged code imports is in the zip (or the standard
    library, or the runtime's SDK); nothing imports the CLI-only packages."""
    available = _top_level_names(site) | set(sys.stdlib_module_names)
    if not options.include_boto3:
        available |= RUNTIME_SDK
    packaged = {arcname.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for arcname in files}
    problems = []
    for arcname, path in sorted(files.items()):
        if not arcname.endswith(".py"):
            continue
        package = arcname.removesuffix(".py").replace("/", ".")
        if not arcname.endswith("__init__.py"):
            package = package.rpartition(".")[0]
        for module in sorted(_imports(path, package)):
            top = module.split(".")[0]
            if top in FIRST_PARTY:
                # `from a.b import c`: a.b must be packaged; c may be a name in it, or a module
                exists = Path(dispatcher.__file__).parent.parent / module.replace(".", "/")
                if module not in packaged and (exists.with_suffix(".py").is_file() or exists.is_dir()):
                    problems.append(f"{arcname} imports {module}, which is not packaged")
            elif top in FORBIDDEN_TOP_LEVEL or top not in available:
                problems.append(f"{arcname} imports {top}, which is not in the zip")
    if problems:
        raise PackagingError("The Lambda code would not import: " + "; ".join(sorted(set(problems))) + ".")


# --- the zip ----------------------------------------------------------------------


def _dependency_files(site: Path) -> dict[str, Path]:
    files = {}
    for directory, subdirs, names in os.walk(site):
        relative = Path(directory).relative_to(site)
        if relative == Path("."):
            subdirs[:] = [d for d in subdirs if d != "bin"]  # console scripts for the host
        subdirs[:] = [d for d in subdirs if d not in {"__pycache__", "tests"}]
        for name in names:
            if name.endswith((".pyc", ".pyo")):
                continue
            path = Path(directory) / name
            files[(relative / name).as_posix()] = path
    return files


#: what a cold start and a first ECS submission import: only their bytecode is
#: worth its bytes (compiling everything would add ~5 MiB, mostly never imported)
PROBE_CODE = """
import sys
sys.path.insert(0, sys.argv[1])
import dispatcher.aws_lambda, dispatcher.triggers
for module in sys.argv[2].split(","):
    __import__(module)
if sys.argv[3] == "boto3":
    import boto3
    boto3.Session(region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y").client("ecs")
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None) or ""
    if path.startswith(sys.argv[1]):
        print(path[len(sys.argv[1]):].lstrip("/"))
"""


def cold_start_sources(files: dict[str, Path], site: Path, options: LambdaBuildOptions) -> set[str]:
    """The zip's `.py` entries a cold start imports, found by importing the
    handler (and a first AWS client) from the staged files in a fresh, isolated
    interpreter of the target's version."""
    probe = site.parent / "probe"
    for arcname, path in files.items():
        (probe / arcname).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, probe / arcname)  # the zip's tree, without copying 60 MB
        except OSError:
            shutil.copyfile(path, probe / arcname)
    providers = ",".join(f"providers.{name}" for name in options.providers)
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-B", "-c", PROBE_CODE, str(probe), providers,
         "boto3" if options.include_boto3 else "-"],
        env={}, capture_output=True, text=True, timeout=120,
    )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise PackagingError(f"The packaged handler does not import on {options.target}: {tail}")
    return {line.strip() for line in result.stdout.splitlines() if line.strip().endswith(".py")}


def compile_bytecode(files: dict[str, Path], into: Path) -> dict[str, Path]:
    """`__pycache__/*.pyc` entries for every `.py` in `files`, compiled by this
    interpreter with unchecked hashes (valid without timestamps, the same bytes
    for the same source)."""
    compiled: dict[str, Path] = {}
    tag = sys.implementation.cache_tag
    for arcname, source in files.items():
        if not arcname.endswith(".py"):
            continue
        folder, _, name = arcname.rpartition("/")
        target = f"{folder + '/' if folder else ''}__pycache__/{name[:-3]}.{tag}.pyc"
        output = into / target
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            py_compile.compile(
                str(source), cfile=str(output), dfile=arcname, doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        except py_compile.PyCompileError:
            continue  # a file the runtime never imports (templates of other versions, ...): left as source
        compiled[target] = output
    return compiled


def write_zip(files: dict[str, Path], output: Path) -> None:
    """Sorted entries, fixed timestamps and modes: the same inputs give the same bytes."""
    if output.is_dir():
        raise PackagingError(f"The output {output} is a directory; name the zip file to write.")
    partial = output.with_name(f".{output.name}.partial")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            for arcname in sorted(files):
                info = zipfile.ZipInfo(arcname, date_time=ZIP_EPOCH)
                info.external_attr = FILE_MODE << 16
                info.create_system = 3
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, files[arcname].read_bytes(), compresslevel=9)
        os.replace(partial, output)
    except OSError as exc:
        raise PackagingError(f"Could not write the zip {output}: {exc.strerror or exc}") from exc
    finally:
        partial.unlink(missing_ok=True)


def _assert_no_forbidden(files: dict[str, Path]) -> None:
    for arcname in files:
        top = arcname.split("/")[0]
        name = top.split("-")[0] if top.endswith(".dist-info") else top.split(".")[0]
        if normalize(name) == "prefect":
            raise PackagingError(f"prefect must never be in the Lambda zip, but {arcname} would be.")
        if "tests" in arcname.split("/")[:-1] or "__pycache__" in arcname.split("/"):
            raise PackagingError(f"{arcname} should have been left out of the Lambda zip.")


def build_lambda_zip(options: LambdaBuildOptions, progress: Optional[ProgressCallback] = None) -> LambdaBuild:
    """Build the zip described by `options`; raise PackagingError on failure."""
    requirements = lambda_requirements(options)
    with tempfile.TemporaryDirectory(prefix="pushpool-lambda-") as staging:
        site = Path(staging) / "site"
        if progress:
            progress(f"pip: installing {len(requirements)} requirements for {options.target}")
        pip_install(requirements, site, options, progress)
        pruned = prune(site, requirements, options)
        distributions = sorted(f"{d.metadata['Name']}=={d.version}" for d, _ in _installed(site).values())
        own = first_party_files(options)
        dependencies = _dependency_files(site)
        clash = sorted(own.keys() & dependencies.keys())
        if clash:
            raise PackagingError(f"A dependency installs files over pushpool's own: {', '.join(clash[:3])}")
        check_imports(own, site, options)
        files = {**dependencies, **own}
        _assert_no_forbidden(files)
        if options.bytecode:
            if progress:
                progress("compiling the bytecode a cold start imports")
            wanted = cold_start_sources(files, site, options)
            files.update(compile_bytecode({a: p for a, p in files.items() if a in wanted}, Path(staging) / "bytecode"))
        if progress:
            progress(f"writing {len(files)} files to {options.output}")
        write_zip(files, options.output)
    data = options.output.read_bytes()
    return LambdaBuild(
        path=options.output,
        size_bytes=len(data),
        file_count=len(files),
        sha256=hashlib.sha256(data).hexdigest(),
        requirements=requirements,
        distributions=distributions,
        pruned=pruned,
        bytecode=options.bytecode,
    )
