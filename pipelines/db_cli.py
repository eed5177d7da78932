"""CLI for the state database: `adaptserve db upgrade`, `adaptserve db current`, `adaptserve db copy`.

Registered by pipelines/cli.py. `upgrade` and `current` act on the database ADAPTSERVE_DATABASE_URL names (default:
SQLite under ADAPTSERVE_HOME); `copy` moves a home's whole state to another database and artifact store (the logic is
models/state_copy.py). A URL is printed with its password replaced by ***.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from sqlalchemy.exc import DBAPIError

from models import migrations, settings
from models.artifact_store import ArtifactError, ArtifactStore, open_store
from models.db import Database, DatabaseError, parse_url, redact
from models.registry import open_registry
from models.state import open_state, state_url
from models.state_copy import BATCH_BYTES, BATCH_ROWS, CopyError, CopyReport, DestinationNotEmpty, copy_state

app = typer.Typer(help="The state database (ADAPTSERVE_DATABASE_URL): schema migrations, copying a home to a server.",
                  no_args_is_help=True)
console = Console(soft_wrap=True)  # a message with the command to run stays one copyable line


def _database() -> Database:
    try:
        return Database.from_settings(settings.load())
    except (settings.SettingsError, DatabaseError) as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None


@app.command("upgrade")
def upgrade_command() -> None:
    """Create the schema, or migrate it to the revision this adaptserve needs (a no-op when it is there)."""
    database = _database()
    try:
        before, after = migrations.upgrade(database)
    except migrations.SchemaError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(1) from None
    finally:
        database.dispose()
    where = escape(redact(database.url))
    if before == after:
        console.print(f"database {where} is at revision {after}: nothing to do")
    else:
        console.print(f"database {where} upgraded from revision {before or 'none (empty)'} to {after}")


@app.command("current")
def current_command() -> None:
    """Show the database's revision; exit 1 when it is not the one this adaptserve needs."""
    database = _database()
    try:
        revision = migrations.check(database)
        about = migrations.info(database)
    except migrations.SchemaError as err:
        console.print(f"[yellow]{escape(str(err))}[/yellow]")
        raise typer.Exit(1) from None
    finally:
        database.dispose()
    console.print(f"database {escape(redact(database.url))} is at revision {revision} (head)")
    if about:
        console.print(f"schema created {about.get('schema_created_at', '?')} by {about.get('schema_created_by', '?')}")


# ------------------------------------------------------------------------------------------------------ copy


def _open_home(home: Path, config: settings.Settings) -> Database:
    """Open every store of `home` as the service does, so each imports a legacy file it finds there (once; see each
    store) and every table module is imported (registered in models.db.metadata); the home's state database."""
    # lazy: the label store and the input cache import torch (seconds), and only `db copy` opens the stores; the
    # input cache is the service's (a layer up): the command line sits above every layer (pyproject.toml)
    from monitoring.capture import CaptureStore
    from monitoring.history import DriftHistory
    from monitoring.leases import DriftLeases  # noqa: F401 - drift_leases: its table, no legacy file
    from pipelines.jobs import JobStore
    from pipelines.labels import LabelStore
    from pipelines.schedules import ScheduleStore
    from service.inputs import InputCache

    JobStore(home, known_adapters=())
    ScheduleStore(home, known_adapters=())
    LabelStore(home)
    InputCache(home)
    CaptureStore(home).close()
    DriftHistory(home).close()
    open_registry(home)  # its legacy registry.db is imported on open
    return open_state(home, config)


def _fail(message: str, code: int) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


def _destination(to_database: str, to_artifacts: str) -> tuple[Database, ArtifactStore]:
    try:
        return Database(to_database), open_store(to_artifacts)
    except (DatabaseError, ArtifactError) as err:
        raise _fail(str(err).replace(settings.env_name("database_url"), "--to-database")
                    .replace(settings.env_name("artifacts_url"), "--to-artifacts"), 2) from None


class _Bars:
    """A rich progress bar per kind of work ("objects", "rows"), made on its first report; gone when done."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description:>7}"), BarColumn(), TextColumn("{task.completed}/"
                                 "{task.total}"), TimeElapsedColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)  # a log or a pipe gets the summary alone
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        if what not in self.tasks:
            self.tasks[what] = self.progress.add_task(what, total=total)
        self.progress.update(self.tasks[what], completed=done)


@app.command("copy")
def copy_command(
    to_database: Annotated[str, typer.Option(
        "--to-database", help="SQLAlchemy URL of the destination database, e.g. postgresql+psycopg://USER:PASSWORD@"
        "HOST/DB: upgraded to this adaptserve's schema, and it must hold no rows")],
    to_artifacts: Annotated[str, typer.Option(
        "--to-artifacts", help="the destination artifact store: s3://BUCKET/PREFIX (endpoint and credentials from the "
        "standard AWS_* variables) or a directory")],
    home: Annotated[Path | None, typer.Option(
        help="the home to copy [default: $ADAPTSERVE_HOME, else ./.adaptserve]")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="print what would be copied and whether the destination is empty; write nothing")] = False,
    batch_rows: Annotated[int, typer.Option(
        min=1, help=f"rows per insert (a batch also ends at {BATCH_BYTES // 2**20} MiB)")] = BATCH_ROWS,
) -> None:
    """Copy a home's whole state (every row of its database, every artifact object) to a PostgreSQL database and an
    S3-compatible store that replicas can share. Stop the service first. The source is what the stores of that home
    use (ADAPTSERVE_DATABASE_URL, else <home>/state.db; ADAPTSERVE_ARTIFACTS_URL, else <home>/artifacts) and is only
    read, apart from the one-time import of legacy files that opening any store does. Objects go first (a rerun skips
    those already there), then every row in one transaction: a copy that stops part-way leaves no rows behind."""
    try:
        config = settings.load()
    except settings.SettingsError as err:
        raise _fail(str(err), 2) from None
    home = (home or config.home).expanduser().resolve()
    dest, dest_store = _destination(to_database, to_artifacts)
    try:
        if parse_url(state_url(home, config)) == dest.url:  # before opening: a store would check its schema
            raise CopyError(f"the destination is this home's own database ({redact(dest.url)}): unset "
                            f"{settings.env_name('database_url')} to copy the embedded home at {home}")
        if not home.is_dir():  # opening the stores would create an empty home, and the copy would copy nothing
            raise _fail(f"no home at {home}: name the state directory to copy with --home or ADAPTSERVE_HOME", 2)
        source = _open_home(home, config)
        source_store = open_store(config.artifacts_url or str(home / "artifacts"))
        with (bars := _Bars()).progress:
            report = copy_state(source, source_store, dest, dest_store, batch_rows=batch_rows, dry_run=dry_run,
                                progress=bars)
    except (CopyError, DatabaseError, ArtifactError, OSError) as err:
        raise _fail(str(err), 1) from None
    except DBAPIError as err:  # str(err) would hold the statement and its parameters: a batch of PNGs
        raise _fail(f"{redact(dest.url)}: {err.orig}", 1) from None
    finally:
        dest.dispose()
    _print_report(report, home, source_store, dest, dest_store)
    if report.occupied:
        raise _fail(str(DestinationNotEmpty(dest, report.occupied)), 1)


def _print_report(report: CopyReport, home: Path, source_store: ArtifactStore, dest: Database,
                  dest_store: ArtifactStore) -> None:
    verb = "would copy" if report.dry_run else "copied"
    table = Table("table", Column("rows", justify="right"), title=f"{verb} from {home} to {redact(dest.url)}",
                  title_justify="left")
    for name, n in report.rows.items():
        table.add_row(name, str(n))
    table.add_row("[bold]total[/bold]", f"[bold]{sum(report.rows.values())}[/bold]")
    console.print(table)
    console.print(f"objects: {report.objects} in {escape(source_store.url)}; {verb} {report.objects_copied} "
                  f"({decimal(report.bytes_copied)}) to {escape(dest_store.url)}, "
                  f"{report.objects - report.objects_copied} already there")
    revision = report.destination_revision or "none (empty)"
    if report.dry_run:
        console.print(f"destination schema: revision {revision}; a copy upgrades it to {migrations.head()} first")
        console.print(f"dry run: nothing written ({report.seconds:.1f} s)")
        return
    if report.sequences:
        console.print("sequences: " + ", ".join(f"{name} next {n}" for name, n in report.sequences.items()))
    secret = " (put the real password where *** is)" if dest.url.password else ""
    console.print(f"done in {report.seconds:.1f} s (destination schema was at revision {revision}, now "
                  f"{migrations.head()}). Point every replica at it{secret}:")
    console.print(f"  {settings.env_name('database_url')}={escape(redact(dest.url))}")
    console.print(f"  {settings.env_name('artifacts_url')}={escape(dest_store.url)}")
