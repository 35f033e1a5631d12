"""The `pushpool` command line: `prefect work-pool`'s verbs for push pools,
plus running the dispatcher and the quickstart."""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated, Optional

import typer
from rich.table import Table

from dispatcher.cli import work_pool
from dispatcher.cli import connect
from dispatcher.cli import package
from dispatcher.cli.console import console, exit_with_error, load_settings, run
from dispatcher.dispatch import Dispatcher, RunOutcome, SweepSummary
from dispatcher.logs import Redactor, configure_logging
from dispatcher.prefect_client import PrefectClient
from dispatcher.reconcile import ReconcileSummary
from dispatcher.triggers import TriggerResult

app = typer.Typer(
    name="pushpool",
    help="Push work pools for self-hosted Prefect: flow runs go straight to serverless compute, no worker.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(work_pool.app)
app.command("connect")(connect.connect)
app.add_typer(package.app)


def _summary_line(summary: SweepSummary) -> str:
    return (
        f"claimed {summary.claimed}, submitted {summary.submitted}, "
        f"crashed {summary.crashed}, skipped {summary.skipped}"
    )


@app.command()
def dispatch(
    pool: Annotated[
        Optional[list[str]], typer.Option("--pool", "-p", help="A pool to serve (repeatable); default: every push pool")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Sweep once, print a summary and exit")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between sweeps", min=0.5)] = 10.0,
    events: Annotated[
        bool, typer.Option("--events/--no-events", help="Also sweep as soon as the server says a run was scheduled")
    ] = True,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log JSON lines instead of text")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR")] = "INFO",
) -> None:
    """Run the dispatcher here: claim due runs of push pools and submit them,
    cancel what is cancelling, and settle what crashed (the reconciler)."""
    settings = load_settings()
    pools = list(pool or settings.pools)
    configure_logging(Redactor(settings.secret_values()), level=log_level, json_lines=json_logs)

    if once:
        async def _once() -> tuple[SweepSummary, ReconcileSummary]:
            async with PrefectClient(settings) as client:
                dispatcher = Dispatcher(client, settings)
                return await dispatcher.sweep(pools), await dispatcher.reconcile(pools)

        summary, reconciled = run(_once())
        console.print(f"Swept {', '.join(summary.pools) or 'no push pools'}: {_summary_line(summary)}")
        for result in summary.runs + reconciled.runs:
            if result.reason:
                console.print(f"  {result.flow_run_id} {result.outcome.value}: {result.reason}")
        if reconciled.runs:
            console.print(
                f"Reconciled: resubmitted {reconciled.resubmitted}, crashed {reconciled.count(RunOutcome.CRASHED)}, "
                f"cancelled {reconciled.count(RunOutcome.CANCELLED)}"
            )
        return

    from dispatcher.serve import serve

    async def _serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        def report(result: TriggerResult) -> None:
            if result.claimed or result.crashed or result.cancelled or result.resubmitted or result.error:
                console.print(
                    f"{result.trigger}: claimed {result.claimed}, submitted {result.submitted}, "
                    f"crashed {result.crashed}, cancelled {result.cancelled}, resubmitted {result.resubmitted}"
                    + (f" — {result.error}" if result.error else "")
                )

        console.print(
            f"Dispatching {', '.join(pools) if pools else 'every push pool'} "
            f"(sweep every {interval:g} s{', and on events' if events else ''}); Ctrl-C to stop."
        )
        await serve(settings, pools=pools, interval=interval, stop=stop, use_events=events, on_trigger=report)

    run(_serve())


@app.command()
def quickstart(
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the run to complete")] = 120,
    keep_server: Annotated[
        bool, typer.Option("--keep-server", help="Keep the embedded server running afterwards to browse its UI")
    ] = False,
) -> None:
    """Deploy an example flow to a process:push pool and run it, no worker needed."""
    from dispatcher.embedded_server import EmbeddedServerError
    from dispatcher.quickstart import QuickstartFailed, run_quickstart

    try:
        result = run_quickstart(console, timeout=timeout, keep_server=keep_server)
    except (QuickstartFailed, EmbeddedServerError) as exc:
        exit_with_error(f"Quickstart failed: {exc}")

    table = Table(title=f"Flow run {result.flow_run_id}")
    table.add_column("State")
    table.add_column("Seconds after creation", justify="right")
    for index, entry in enumerate(result.timeline):
        label = "created (scheduled)" if index == 0 and entry.state == "scheduled" else entry.state
        table.add_row(label, f"{entry.seconds:.2f}")
    console.print(table)
    console.print(f"[green]Completed[/green] in {result.wall_seconds:.1f} s wall time. See it at {result.ui_url}")


def main() -> None:
    app()
