"""What every CLI command shares: the console, errors, settings, async entry."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console

from dispatcher.prefect_client import PrefectAPIError, PrefectUnreachable
from dispatcher.settings import Settings

console = Console(highlight=False, soft_wrap=True)
error_console = Console(stderr=True, highlight=False, soft_wrap=True)
T = TypeVar("T")


def exit_with_error(message: str, code: int = 1) -> NoReturn:
    error_console.print(f"[red]{message}[/red]")
    raise typer.Exit(code)


def load_settings(require_api: bool = True) -> Settings:
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        exit_with_error(f"Invalid pushpool settings: {exc}")
    if require_api and not settings.api_url:
        exit_with_error(
            "PREFECT_API_URL is not set. Point it at your Prefect server, for example\n"
            "  export PREFECT_API_URL=http://127.0.0.1:4200/api\n"
            "or run `pushpool quickstart` to try pushpool on an embedded server."
        )
    return settings


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; turn API failures into one clear line."""
    try:
        return asyncio.run(coroutine)
    except PrefectUnreachable as exc:
        exit_with_error(f"Could not reach the Prefect API: {exc}")
    except PrefectAPIError as exc:
        exit_with_error(str(exc))
