"""The provider-neutral shape of provisioning: a `Plan` of `Step`s, shown as a
table before anything changes, then applied one step at a time with a
progress bar. A step that fails stops the run with a `ProvisioningError` that
lists what was done so far; every step is find-or-create (or find-and-delete),
so a re-run completes the job."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Union

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table


class ProvisioningError(Exception):
    """A clear, user-facing failure. `done` lists the steps that completed
    before it (what exists so far)."""

    def __init__(self, message: str, done: Optional[list["Step"]] = None):
        super().__init__(message)
        self.message = message
        self.done: list[Step] = list(done or [])


class Action(str, Enum):
    CREATE = "create"
    REUSE = "reuse"
    UPDATE = "update"
    DELETE = "delete"
    SKIP = "skip"

    @property
    def changes(self) -> bool:
        return self in (Action.CREATE, Action.UPDATE, Action.DELETE)


_ACTION_STYLE = {
    Action.CREATE: "green",
    Action.REUSE: "cyan",
    Action.UPDATE: "yellow",
    Action.DELETE: "red",
    Action.SKIP: "dim",
}

StepFunction = Callable[[], Union[None, Awaitable[None]]]


@dataclass
class Step:
    kind: str  # "IAM user", "ECS cluster", …
    name: str
    action: Action
    detail: str = ""
    run: Optional[StepFunction] = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        return f"{self.action.value} {self.kind} {self.name}"


@dataclass
class Plan:
    title: str
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, name: str, action: Action, detail: str = "", run: Optional[StepFunction] = None) -> Step:
        step = Step(kind, name, action, detail, run)
        self.steps.append(step)
        return step

    @property
    def changes(self) -> list[Step]:
        return [s for s in self.steps if s.action.changes]

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

    def table(self) -> Table:
        table = Table(title=self.title, title_justify="left")
        for column in ("Resource", "Name", "Action", "Detail"):
            table.add_column(column, overflow="fold")
        for step in self.steps:
            style = _ACTION_STYLE[step.action]
            table.add_row(step.kind, step.name, f"[{style}]{step.action.value}[/{style}]", step.detail)
        return table

    def render(self, console: Console) -> None:
        console.print(self.table())
        for note in self.notes:
            console.print(note)


async def apply(plan: Plan, console: Console, *, description: str = "Provisioning infrastructure") -> list[Step]:
    """Run every step that changes something, in order, with a progress bar.
    Returns the steps done; on failure raises `ProvisioningError` carrying them."""
    todo = [s for s in plan.steps if s.action.changes and s.run is not None]
    done: list[Step] = []
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=len(todo) or 1)
        for step in todo:
            progress.console.print(f"{step.action.value.capitalize()} {step.kind} {step.name}")
            try:
                result: Any = step.run()  # type: ignore[misc]
                if inspect.isawaitable(result):
                    await result
            except ProvisioningError as exc:
                raise ProvisioningError(f"Could not {step.describe()}: {exc.message}", done) from exc
            except Exception as exc:  # a cloud or API error: keep the message, never a secret
                raise ProvisioningError(f"Could not {step.describe()}: {describe_error(exc)}", done) from exc
            done.append(step)
            progress.advance(task)
        if not todo:
            progress.advance(task)
    return done


def describe_error(exc: BaseException) -> str:
    """One line for an SDK exception (botocore's ClientError carries code and message)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and isinstance(response.get("Error"), dict):
        error = response["Error"]
        code, message = error.get("Code", ""), error.get("Message", "")
        return f"{code}: {message}" if code and message else (message or code or str(exc))
    return str(exc) or type(exc).__name__
