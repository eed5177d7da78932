"""CLI for the state database: `adaptserve db upgrade`, `adaptserve db current`.

Registered by pipelines/cli.py. Both act on the database ADAPTSERVE_DATABASE_URL names (default: SQLite under
ADAPTSERVE_HOME); a URL is printed with its password replaced by ***.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from models import migrations, settings
from models.db import Database, DatabaseError, redact

app = typer.Typer(help="The state database (ADAPTSERVE_DATABASE_URL): schema migrations.", no_args_is_help=True)
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
