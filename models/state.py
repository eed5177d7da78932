"""How a store opens the state database: one `Database` per URL per process, its schema checked once.

`open_state(home)` is the database of a state directory: ADAPTSERVE_DATABASE_URL when set (every home of every
replica shares it), else SQLite at `<home>/state.db`. The embedded SQLite default is upgraded in place the first time
a process opens it (nothing to start, nothing to run: `make serve` just works); a server database is only checked,
and a schema this adaptserve does not know stops the store with the command to run (`adaptserve db upgrade`).

Engines do not survive a fork (BentoML workers are forked): the cache is keyed by process id, so a child builds
its own engine on first use.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from models import migrations, settings
from models.db import Database, url_for_home

_lock = threading.Lock()
_open: dict[tuple[int, str], Database] = {}


def state_url(home: str | Path, config: settings.Settings | None = None) -> str:
    """ADAPTSERVE_DATABASE_URL, else the SQLite file of this home."""
    config = config or settings.load()
    return config.database_url or url_for_home(Path(home).expanduser().absolute())


def open_state(home: str | Path, config: settings.Settings | None = None) -> Database:
    """The state database for `home`, at the schema this adaptserve needs (SchemaError when a server's is not)."""
    url = state_url(home, config)
    key = (os.getpid(), url)
    with _lock:
        database = _open.get(key)
        if database is None:
            database = Database(url)
            if database.is_sqlite:
                Path(database.url.database or "").parent.mkdir(parents=True, exist_ok=True)
                migrations.upgrade(database)
            else:
                migrations.check(database)
            _open[key] = database
    return database


def close_all() -> None:
    """Dispose every database this process opened (tests; the end of a process)."""
    with _lock:
        for key, database in list(_open.items()):
            if key[0] == os.getpid():
                database.dispose()
        _open.clear()
