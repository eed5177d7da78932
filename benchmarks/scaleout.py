"""`adaptserve bench serve --database URL --artifacts URL`: the run on shared stores (PostgreSQL + S3, say).

Every server the run starts keeps its state there instead of in its temporary home, the adapters are published
there, and one more phase runs: a second replica with a home of its own promotes while the load goes to the first,
so the swap latency is measured across replicas (`swap_cross_replica_p99_ms`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import typer
from rich.console import Console
from sqlalchemy import func, select

from benchmarks.hotswap import swap_phase
from benchmarks.loadgen import make_jpegs, predict_bodies
from benchmarks.serve_process import ServeProcess
from models import migrations, settings
from models.db import Database, redact
from models.registry_tables import registry_adapters


class SwapConfig(Protocol):
    """What the cross-replica phase reads of benchmarks.serve.BenchConfig."""

    clients: int
    seconds: float
    size: int
    per_request: int
    swap_every: float
    token: str


def shared_env(database: str | None, artifacts: str | None) -> dict[str, str]:
    """ADAPTSERVE_DATABASE_URL and ADAPTSERVE_ARTIFACTS_URL of --database / --artifacts (none: each home's own)."""
    if database is None or artifacts is None:
        return {}
    return {settings.env_name("database_url"): database, settings.env_name("artifacts_url"): artifacts}


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set, restored after (the stores of this process read their URLs from it)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_database(url: str, console: Console) -> None:
    """Migrate the bench's database and refuse one that already holds adapters (exit 2): a bench publishes random
    ones, and a production registry must not get them."""
    migrations.upgrade(url)
    database = Database(url)
    try:
        with database.read() as conn:
            held = conn.execute(select(func.count()).select_from(registry_adapters)).scalar()
    finally:
        database.dispose()
    if held:
        console.print(f"[red]error:[/red] --database {redact(url)} holds {held} adapter(s): give the bench an empty "
                      "database (it publishes random adapters)")
        raise typer.Exit(2)


def measure_cross_replica(
    cfg: SwapConfig, env: dict[str, str], workdir: Path, url: str, adapter: str, console: Console
) -> dict[str, Any]:
    """A second replica (a home of its own, one worker) on the same database and store; load on the first (`url`)
    while `adapter` is promoted through the second: how long until every worker of the first serves each promote."""
    other = {**env, settings.env_name("home"): str(workdir / "home-b"), settings.env_name("workers"): "1"}
    console.log("swap across replicas: promotes through a second replica (its own home), load on the first")
    with ServeProcess(other, workdir / "serve-replica-b", settle=cfg.seconds >= 10) as replica:
        bodies = predict_bodies(make_jpegs(8, cfg.size), [adapter], cfg.per_request)
        out = swap_phase(url, bodies, cfg.clients, cfg.seconds, adapter, cfg.swap_every, cfg.token,
                         promote_url=replica.url)
    console.log(f"  {out['swaps']} swaps, swap p99 {out['swap_p99_ms']} ms, errors {out['swap_errors']}")
    return out
