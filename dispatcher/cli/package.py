"""`pushpool package …`: build the deployable artifacts of the dispatcher."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.markup import escape

from dispatcher.cli.console import console, exit_with_error
from dispatcher.packaging import (
    DIRECT_UPLOAD_LIMIT_BYTES,
    Architecture,
    LambdaBuildOptions,
    PackagingError,
    build_lambda_zip,
)

app = typer.Typer(name="package", help="Build deployable artifacts of the dispatcher.", no_args_is_help=True)


def _options(**values: object) -> LambdaBuildOptions:
    try:
        return LambdaBuildOptions(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        exit_with_error(escape(f"Invalid --{field.replace('_', '-')}: {first['msg'].removeprefix('Value error, ')}"))


@app.command("aws-lambda")
def aws_lambda(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write the zip")
    ] = Path("dist/pushpool-lambda.zip"),
    providers: Annotated[
        Optional[list[str]],
        typer.Option("--providers", help="Providers to include (repeatable or comma-separated): ecs, process"),
    ] = None,
    architecture: Annotated[
        Architecture, typer.Option("--architecture", help="The Lambda function's architecture")
    ] = Architecture.x86_64,
    python_version: Annotated[
        str, typer.Option("--python-version", help="The Lambda Python runtime, e.g. 3.12")
    ] = "3.12",
    include_boto3: Annotated[
        bool,
        typer.Option(
            "--include-boto3/--no-include-boto3",
            help="Bundle a pinned boto3/botocore (default), or use the Lambda runtime's own",
        ),
    ] = True,
    compile_bytecode: Annotated[
        Optional[bool],
        typer.Option(
            "--compile/--no-compile",
            help="Compile bytecode into the zip (halves the cold import); default: when this Python is the "
            "target's version",
        ),
    ] = None,
) -> None:
    """Build the AWS Lambda zip (handler: dispatcher.aws_lambda.handler)."""
    options = _options(
        output=output,
        providers=providers,
        architecture=architecture,
        python_version=python_version,
        include_boto3=include_boto3,
        compile_bytecode=compile_bytecode,
    )
    try:
        options.bytecode  # noqa: B018 - refuses --compile for another Python version before pip runs
        with console.status(f"Installing the dependencies for {options.target} with pip…") as status:
            build = build_lambda_zip(options, progress=lambda line: status.update(escape(line)))
    except PackagingError as exc:
        exit_with_error(escape(str(exc)))

    boto3 = "bundled" if options.include_boto3 else "the runtime's own"
    console.print(
        f"Built {escape(str(build.path))}: {build.size_mib:.2f} MiB ({build.size_bytes:,} bytes), "
        f"{build.file_count:,} files, for {options.target}; providers: {', '.join(options.providers)}; "
        f"boto3: {boto3}; bytecode: {'compiled' if build.bytecode else 'none (compiled at each cold start)'}."
    )
    console.print(f"sha256 {build.sha256}")
    if build.size_bytes > DIRECT_UPLOAD_LIMIT_BYTES:
        console.print(
            "[yellow]Over the 50 MiB Lambda direct-upload limit: upload it to S3 and deploy from there.[/yellow]"
        )
