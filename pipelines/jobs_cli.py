"""CLI for retrain jobs and schedules: `adaptserve jobs ...`, `adaptserve schedules ...`, `adaptserve retrain`.

Registered by pipelines/cli.py; everything here only reads and writes the job store, except `jobs runner`, which is
the job runner itself.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from models import paths
from pipelines.cli_support import console, fail, load_settings, make_app
from pipelines.jobs import END_STATES, STATES, DuplicateJobError, Job, JobError, JobStore
from pipelines.runner import JobRunner
from pipelines.runner_lock import RunnerLockedError, runner_pid
from pipelines.schedules import ScheduleStore

jobs_app = make_app("Retrain jobs: run the job runner, list jobs, show one.")
schedules_app = make_app("Cron schedules that start retrain jobs (5-field crontab, UTC; the job runner fires them).")
EXIT_CODES = {"succeeded": 0, "rejected": 3, "failed": 1}
_COLORS = {"queued": "cyan", "running": "blue", "succeeded": "green", "rejected": "yellow", "failed": "red"}


def _state(state: str) -> str:
    return f"[{_COLORS.get(state, 'white')}]{state}[/]"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}s"


def _no_runner_note() -> None:
    if runner_pid(paths.home()) is None:
        console.print(
            f"[yellow]no job runner is running for {paths.home()}: the job stays queued until one starts "
            "(`adaptserve jobs runner`)[/yellow]"
        )


@jobs_app.command("runner")
def runner_command(
    base: Annotated[
        Path | None, typer.Option(help="base model dir for retraining [default: $ADAPTSERVE_BASE_MODEL or embedded]")
    ] = None,
    poll: Annotated[float, typer.Option(help="seconds between looks at the queue")] = 1.0,
    drift_interval: Annotated[float, typer.Option(help="seconds between drift-policy evaluations")] = 10.0,
    drift: Annotated[bool, typer.Option(help="start jobs when the drift policy says so")] = True,
    once: Annotated[bool, typer.Option(help="run the queued jobs, then exit (no schedules, no drift)")] = False,
    supervised: Annotated[
        bool,
        typer.Option(
            "--supervised",
            help="started by a service (its RunnerSupervisor does this): a service that finds this runner holding the "
            "lock stops it when the service stops. Leave it off when you start a runner yourself: then it is yours",
        ),
    ] = False,
) -> None:
    """Run the job runner in the foreground: schedules, drift policy, and queued jobs (one at a time, each in its
    own process). One runner per ADAPTSERVE_HOME; stop it with Ctrl-C or SIGTERM."""
    from rich.logging import RichHandler


    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    base = base or load_settings().base_model  # None: the runner resolves the embedded default itself
    runner = JobRunner(
        paths.home(),
        base_dir=base,
        poll_s=poll,
        policy_interval_s=drift_interval if drift else None,
        supervised=supervised,
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: runner.stop())
    try:
        if once:
            done = runner.run_pending()
            console.print(f"ran {len(done)} job(s): " + ", ".join(f"{j.id} {_state(j.state)}" for j in done))
        else:
            runner.run_forever()
    except RunnerLockedError as err:
        fail(str(err))


@jobs_app.command("list")
def jobs_list(
    adapter: Annotated[str | None, typer.Option(help="only this adapter's jobs")] = None,
    state: Annotated[str | None, typer.Option(help=f"only jobs in this state: {', '.join(STATES)}")] = None,
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 50,
) -> None:
    """Retrain jobs, newest first."""
    try:
        jobs = JobStore(paths.home()).list(adapter=adapter, state=state, limit=limit)
    except ValueError as err:
        fail(str(err))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=12)  # whole, so it can be copied into `jobs show`
    for column in ("adapter", "trigger", "state", "done", "created (UTC)", "ran"):
        table.add_column(column)
    table.add_column("message", ratio=1)
    for job in jobs:
        d = job.to_dict(include_log=False)
        table.add_row(
            job.id,
            job.adapter,
            job.trigger,
            _state(job.state),
            f"{job.progress:.0%}",
            str(d["created_at"])[5:19].replace("T", " "),
            _seconds(d["run_s"]),
            escape(job.message),
        )
    console.print(table)
    if not jobs:
        console.print("no jobs" + (" matching the filters" if adapter or state else ""))


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(help="job id (from `adaptserve jobs list` or the retrain command)")],
) -> None:
    """One job: state, progress, timings, result or error, and its log."""
    try:
        job = JobStore(paths.home()).get(job_id)
    except JobError as err:
        fail(str(err))
    console.print_json(json.dumps(job.to_dict(include_log=False)))
    console.rule("log")
    console.print(job.log, markup=False, highlight=False, end="")


@schedules_app.command("add")
def schedules_add(
    adapter: Annotated[str, typer.Argument(help="registered adapter name")],
    cron: Annotated[str, typer.Argument(help="5-field crontab in UTC, quoted: minute hour day month weekday")],
) -> None:
    """Retrain ADAPTER on a cron schedule, e.g. `adaptserve schedules add site-a "0 3 * * *"` (03:00 UTC daily)."""
    try:
        schedule = ScheduleStore(paths.home()).add(adapter, cron)
    except JobError as err:
        fail(str(err))
    next_run = schedule.to_dict()["next_run_at"]
    console.print(f"schedule {schedule.id}: retrain {adapter} at '{schedule.cron}' (UTC); next run {next_run}")


@schedules_app.command("list")
def schedules_list() -> None:
    """Every schedule with its last and next fire time."""
    table = Table("id", "adapter", "cron (UTC)", "last run", "next run")
    for s in ScheduleStore(paths.home()).list():
        d = s.to_dict()
        table.add_row(str(s.id), s.adapter, s.cron, str(d["last_run_at"] or ""), str(d["next_run_at"] or ""))
    console.print(table)


@schedules_app.command("delete")
def schedules_delete(schedule_id: Annotated[int, typer.Argument(help="schedule id (from `schedules list`)")]) -> None:
    """Remove a schedule (a job it already started keeps running)."""
    try:
        schedule = ScheduleStore(paths.home()).delete(schedule_id)
    except JobError as err:
        fail(str(err))
    console.print(f"deleted schedule {schedule.id} ({schedule.adapter}, '{schedule.cron}')")


def retrain_command(
    adapter: Annotated[str, typer.Option("--adapter", help="registered adapter to retrain")],
    wait: Annotated[
        bool,
        typer.Option(
            help="follow the job's progress until it ends (the adapter's manual job already queued, if it has "
            "one); exit 0 succeeded, 3 rejected, 1 failed"
        ),
    ] = False,
    poll: Annotated[float, typer.Option(help="--wait only: seconds between looks at the job")] = 0.5,
) -> None:
    """Queue a retrain job for ADAPTER (the job runner runs it: `adaptserve jobs runner`)."""
    try:
        job = JobStore(paths.home()).submit(adapter, "manual", "requested from the command line")
    except DuplicateJobError as err:
        if not wait:
            fail(str(err))
        job = err.existing  # a manual job already queued: it runs on the same labels, so it is the one to wait for
        console.print(f"{adapter} already has a {job.state} retrain job [bold]{job.id}[/bold]: following it")
    except JobError as err:
        fail(str(err))
    else:
        console.print(f"queued retrain job [bold]{job.id}[/bold] for {adapter}: {job.message} "
                      f"(`adaptserve jobs show {job.id}`)")
    if job.state == "queued":
        _no_runner_note()
    if wait:
        job = _follow(job, poll)
        _print_end(job)
        raise typer.Exit(EXIT_CODES[job.state])


def _print_end(job: Job) -> None:
    """How the job ended, and the gate's numbers behind a promotion or a rejection (the job's result.reason)."""
    console.print(f"job {job.id} {_state(job.state)}: {escape(job.error or job.message)}")
    reason = (job.result or {}).get("reason")
    if reason:
        console.print(f"  {escape(str(reason))}", highlight=False)


def _follow(job: Job, poll: float) -> Job:
    """Redraw a progress bar from the store until the job ends; Ctrl-C stops following, not the job."""
    store = JobStore(paths.home())
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"{job.adapter}: {job.state}", total=1.0)
        try:
            while job.state not in END_STATES:
                time.sleep(poll)
                job = store.get(job.id)
                bar.update(task, completed=job.progress, description=f"{job.adapter}: {job.state} {job.message}")
        except KeyboardInterrupt:
            console.print(f"stopped following; the job goes on: `adaptserve jobs show {job.id}`")
            raise typer.Exit(130) from None
        bar.update(task, completed=job.progress, description=f"{job.adapter}: {job.state}")
    return job


if __name__ == "__main__":
    jobs_app()
