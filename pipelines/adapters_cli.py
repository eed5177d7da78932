"""CLI for the adapter registry: `adaptserve adapters list|register|promote|rollback|delete`.

Registered by pipelines/cli.py. Every command works on the registry under ADAPTSERVE_HOME directly, so it works
while a service runs on the same home (its workers see a change within ADAPTSERVE_POLL_S).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from models import paths
from models.artifacts import ArtifactError
from models.registry import RegistryError, open_registry
from pipelines.cli_support import base_model, console, fail, make_app

adapters_app = make_app("The adapter registry: list, register, promote, rollback, delete.")


def _registry():
    return open_registry(paths.home())


@adapters_app.command("list")
def adapters_list() -> None:
    """Every adapter with its versions and champion."""
    table = Table("adapter", "version", "champion", "created", "target acc")
    for info in _registry().list_adapters():
        for v in info.versions:
            acc = v.meta.scores("target_test").get("accuracy")
            table.add_row(
                info.name,
                str(v.version),
                "*" if v.is_champion else "",
                str(v.created_at),
                "" if acc is None else f"{acc:.3f}",
            )
    console.print(table)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM handler: leave through SystemExit(128 + 15), so `with` and `finally` blocks clean up (the default
    action ends the process on the spot and leaves its staging dir to the next sweep)."""
    raise SystemExit(128 + signum)


@adapters_app.command("register")
def adapters_register(
    name: Annotated[str, typer.Argument(help="adapter name: [a-z0-9][a-z0-9-_]{0,63}")],
    src: Annotated[
        Path,
        typer.Argument(
            help="PEFT adapter dir (adapter_config.json, adapter_model.safetensors, metadata.json), e.g. the run "
            "dir `adaptserve train` printed: $ADAPTSERVE_HOME/runs/lora-<time>"
        ),
    ],
    base: Annotated[
        Path | None,
        typer.Option(help="base model dir the adapter was trained on [default: $ADAPTSERVE_BASE_MODEL or embedded]"),
    ] = None,
    promote: Annotated[bool, typer.Option(help="make it the champion right away")] = False,
) -> None:
    """Check an adapter against the base, build its verified ONNX model, and register it as a new version."""
    from pipelines.release import publish  # torch and onnx: only registering pays for importing them

    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        v = publish(_registry(), name, src, base_model(base), promote)
    except (ArtifactError, RegistryError, ValueError) as err:
        fail(str(err))
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print(f"registered {name} v{v.version}" + (" (champion)" if v.is_champion else ""))


@adapters_app.command("promote")
def adapters_promote(name: str, version: int) -> None:
    """Make VERSION the champion of NAME (running services swap it in within a second)."""
    try:
        _registry().promote(name, version)
    except RegistryError as err:
        fail(str(err))
    console.print(f"{name}: champion is now v{version}")


@adapters_app.command("rollback")
def adapters_rollback(name: str) -> None:
    """Make the previous champion of NAME the champion again."""
    try:
        v = _registry().rollback(name)
    except RegistryError as err:
        fail(str(err))
    console.print(f"{name}: rolled back to v{v.version}")


@adapters_app.command("delete")
def adapters_delete(name: str, version: int) -> None:
    """Delete a version (never the champion)."""
    try:
        _registry().delete(name, version)
    except RegistryError as err:
        fail(str(err))
    console.print(f"deleted {name} v{version}")
