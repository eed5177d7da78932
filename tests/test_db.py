"""The state database on both backends (a SQLite file, a real PostgreSQL server): transactions, concurrency, kill -9,
schema migrations and `adaptserve db`.

Run as a script, this file is the child process of the multi-process tests:
    python tests/test_db.py increment URL N     (after a line on stdin: N read-modify-write increments)
    python tests/test_db.py die-mid-write URL   (inserts a row inside write(), then SIGKILLs itself)
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Connection, Integer, MetaData, String, Table, insert, inspect, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from typer.testing import CliRunner

from models import migrations, settings
from models.db import Database, DatabaseBusy, DatabaseError, database_url, redact, url_for_home
from pipelines import db_cli

ROOT = Path(__file__).resolve().parents[1]
HEAD = "0003_labels"

# A table of the tests' own (not models.db.metadata, which belongs to the stores and their migrations)
counters = Table("counters", MetaData(), Column("name", String(32), primary_key=True),
                 Column("n", Integer, nullable=False))


def _open(url: str, **kwargs: Any) -> Database:
    database = Database(url, **kwargs)
    counters.metadata.create_all(database.engine)
    return database


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = _open(db_url, timeout_s=20)
    yield database
    database.dispose()


def _value(db: Database, name: str = "c") -> int | None:
    with db.read() as conn:
        return conn.execute(select(counters.c.n).where(counters.c.name == name)).scalar_one_or_none()


def _bump(conn: Connection, name: str = "c") -> None:
    """Read, then write what was read plus one: loses updates unless writers are serialized."""
    n = conn.execute(select(counters.c.n).where(counters.c.name == name)).scalar_one_or_none()
    if n is None:
        conn.execute(insert(counters).values(name=name, n=1))
    else:
        conn.execute(update(counters).where(counters.c.name == name).values(n=n + 1))


def _increment(db: Database, times: int) -> None:
    for _ in range(times):
        with db.write() as conn:
            _bump(conn)


# ------------------------------------------------------------------------------------------------ URLs, settings


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://app:s3cret@db.internal:5432/state", "postgresql+psycopg://app:***@db.internal:5432/state"),
        ("postgresql+psycopg://app@db.internal/state", "postgresql+psycopg://app@db.internal/state"),
        ("sqlite:////srv/adaptserve/state.db", "sqlite:////srv/adaptserve/state.db"),
        ("no url at all", "<unparseable URL>"),
    ],
    ids=["password", "no-password", "sqlite", "unparseable"],
)
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_default_url_is_sqlite_under_home() -> None:
    assert url_for_home(Path("/srv/a")) == "sqlite:////srv/a/state.db"
    assert database_url(settings.load({"ADAPTSERVE_HOME": "/srv/a"})) == "sqlite:////srv/a/state.db"
    url = "postgresql+psycopg://app@db/state"
    assert database_url(settings.load({"ADAPTSERVE_HOME": "/srv/a", "ADAPTSERVE_DATABASE_URL": url})) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://app:pw@db/state", "ADAPTSERVE_DATABASE_URL='mysql://app:***@db/state': unsupported backend 'mysql'; "
         "use sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB"),
        ("db.internal:5432", "ADAPTSERVE_DATABASE_URL='<unparseable URL>' is not an SQLAlchemy URL: use "
         "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB"),
        ("sqlite://", "ADAPTSERVE_DATABASE_URL='sqlite://': an in-memory SQLite database is private to one "
         "connection; use sqlite:///PATH"),
    ],
    ids=["backend", "unparseable", "memory"],
)
def test_bad_urls_name_the_setting(url: str, message: str) -> None:
    with pytest.raises(DatabaseError) as err:
        Database(url)
    assert str(err.value) == message


def test_bare_postgresql_means_psycopg3() -> None:
    database = Database("postgresql://app:pw@db.internal/state")  # the engine connects lazily: no server needed
    assert database.url.drivername == "postgresql+psycopg"
    assert repr(database) == "Database('postgresql+psycopg://app:***@db.internal/state')"


def test_sqlite_connections_are_wal_full_and_busy_wait(tmp_path: Path) -> None:
    database = Database(url_for_home(tmp_path), timeout_s=7)
    with database.write() as conn:
        pragmas = [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "synchronous",
                                                                          "busy_timeout", "foreign_keys")]
    assert pragmas == ["wal", 2, 7000, 1]  # synchronous 2 = FULL
    with database.write(durable=False) as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    database.dispose()


# -------------------------------------------------------------------------------------------------- transactions


def test_write_is_all_or_nothing(db: Database) -> None:
    with pytest.raises(RuntimeError, match="^half-way$"):
        with db.write() as conn:
            conn.execute(insert(counters).values(name="a", n=1))
            conn.execute(insert(counters).values(name="b", n=1))
            raise RuntimeError("half-way")
    assert (_value(db, "a"), _value(db, "b")) == (None, None)
    with db.write() as conn:
        conn.execute(insert(counters).values(name="a", n=1))
        conn.execute(insert(counters).values(name="b", n=2))
    assert (_value(db, "a"), _value(db, "b")) == (1, 2)


def test_read_is_one_snapshot_and_refuses_writes(db: Database) -> None:
    _increment(db, 1)
    with db.read() as conn:
        first = conn.execute(select(counters.c.n)).scalar_one()
        _increment(db, 1)  # a writer on another connection commits meanwhile: the reader neither blocks it nor sees it
        again = conn.execute(select(counters.c.n)).scalar_one()
    assert (first, again, _value(db)) == (1, 1, 2)
    with pytest.raises(DBAPIError, match="read-only|readonly"):
        with db.read() as conn:
            conn.execute(insert(counters).values(name="x", n=1))
    assert _value(db, "x") is None


def test_writers_in_threads_lose_no_update(db: Database) -> None:
    threads = [threading.Thread(target=_increment, args=(db, 25)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _value(db) == 100


def _child(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, __file__, *args], env=env, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_writers_in_two_processes_lose_no_update(db: Database, db_url: str) -> None:
    children = [_child("increment", db_url, "100") for _ in range(2)]
    for child in children:  # both have imported and connected: the increments overlap
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    for child in children:  # go at once: communicate() would wait for the first to finish before starting the next
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    assert _value(db) == 200


def test_kill_9_in_the_middle_of_a_write_leaves_nothing(db: Database, db_url: str) -> None:
    child = _child("die-mid-write", db_url)
    out, err = child.communicate(timeout=120)
    assert (child.returncode, out) == (-signal.SIGKILL, "inserted\n"), err
    assert _value(db, "doomed") is None
    start = time.monotonic()
    _increment(db, 1)  # the dead writer's lock is gone: the next write goes through at once
    assert _value(db) == 1 and time.monotonic() - start < 5


def test_a_taken_write_lock_is_waited_for_then_reported(db: Database, db_url: str) -> None:
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with db.write() as conn:
            _bump(conn)
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(30)
    impatient, patient = Database(db_url, timeout_s=0.1, attempts=2), Database(db_url, timeout_s=0.2, attempts=50)
    try:
        with pytest.raises(DatabaseBusy) as busy:
            with impatient.write():
                pass
        assert str(busy.value) == (f"database {redact(db_url)}: the write lock 'adaptserve' stayed taken through "
                                   "2 attempts of 0.1 s each")
        threading.Timer(0.5, release.set).start()  # the holder lets go after a few of patient's attempts
        with patient.write() as conn:
            _bump(conn)
    finally:
        release.set()
        holder.join()
        impatient.dispose()
        patient.dispose()
    assert _value(db) == 2


def test_transact_reruns_a_deadlocked_body(db: Database) -> None:
    """Writers of different locks may deadlock on rows (PostgreSQL aborts one): transact() runs the victim again."""
    if db.is_sqlite:
        pytest.skip("SQLite serializes every writer on the file's lock: writers cannot deadlock")
    with db.write() as conn:
        conn.execute(insert(counters), [{"name": "x", "n": 0}, {"name": "y", "n": 0}])
    barrier, calls = threading.Barrier(2), []

    def work(first: str, second: str) -> None:
        def body(conn: Connection) -> None:
            calls.append(first)
            conn.execute(update(counters).where(counters.c.name == first).values(n=counters.c.n + 1))
            if calls.count(first) == 1:
                barrier.wait(10)  # both hold their first row: each now waits for the other's
            conn.execute(update(counters).where(counters.c.name == second).values(n=counters.c.n + 1))

        db.transact(body, lock=first)

    threads = [threading.Thread(target=work, args=pair) for pair in (("x", "y"), ("y", "x"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(calls), _value(db, "x"), _value(db, "y")) == (3, 2, 2)


def test_transact_does_not_rerun_other_errors(db: Database) -> None:
    calls = []

    def body(conn: Connection) -> None:
        calls.append(1)
        conn.execute(insert(counters), [{"name": "dup", "n": 1}, {"name": "dup", "n": 2}])

    with pytest.raises(IntegrityError):
        db.transact(body)
    assert calls == [1] and _value(db, "dup") is None


# ----------------------------------------------------------------------------------------------------- migrations


def test_upgrade_creates_the_schema_once(db_url: str) -> None:
    assert (migrations.head(), migrations.current(db_url), migrations.info(db_url)) == (HEAD, None, {})
    with pytest.raises(migrations.SchemaError) as err:
        migrations.check(db_url)
    assert str(err.value) == (f"database {redact(db_url)} is at revision none (empty); this adaptserve needs "
                              f"{HEAD}: run `adaptserve db upgrade`")
    assert migrations.upgrade(db_url) == (None, HEAD)
    assert (migrations.current(db_url), migrations.check(db_url)) == (HEAD, HEAD)
    about = migrations.info(db_url)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", about["schema_created_at"])
    assert about["schema_created_by"] == f"adaptserve {importlib.metadata.version('adaptserve')}"
    assert migrations.upgrade(db_url) == (HEAD, HEAD)
    assert migrations.info(db_url) == about


def test_two_processes_upgrading_at_once_run_one_after_the_other(db_url: str) -> None:
    results: list[tuple[str | None, str]] = []
    threads = [threading.Thread(target=lambda: results.append(migrations.upgrade(db_url))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=str) == [(HEAD, HEAD), (None, HEAD)]


def test_a_database_from_a_newer_adaptserve_is_refused(db_url: str) -> None:
    migrations.upgrade(db_url)
    database = Database(db_url)
    with database.write() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_future'"))
    database.dispose()
    message = (f"database {redact(db_url)} is at revision 0099_future, written by a newer adaptserve (this one knows "
               f"revisions up to {HEAD}): upgrade adaptserve, or point ADAPTSERVE_DATABASE_URL at another database")
    for action in (migrations.check, migrations.upgrade):
        with pytest.raises(migrations.SchemaError) as err:
            action(db_url)
        assert str(err.value) == message


REVISION_0002 = '''
import sqlalchemy as sa
from alembic import op

revision = "0002_test"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("widgets", sa.Column("id", sa.Integer, primary_key=True))
    if {fail!r}:
        raise RuntimeError("0002 failed half-way")


def downgrade() -> None:
    op.drop_table("widgets")
'''


def _newer_scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: bool) -> None:
    """This adaptserve's revisions plus a 0002 (the next adaptserve), as the script location."""
    scripts = tmp_path / "migrations"
    shutil.copytree(migrations.SCRIPT_LOCATION, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "0002_test.py").write_text(REVISION_0002.format(fail=fail, head=HEAD))
    monkeypatch.setattr(migrations, "SCRIPT_LOCATION", scripts)


def test_a_database_behind_head_is_refused_then_upgraded(db_url: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    migrations.upgrade(db_url)
    _newer_scripts(tmp_path, monkeypatch, fail=False)
    with pytest.raises(migrations.SchemaError) as err:
        migrations.check(db_url)
    assert str(err.value) == (f"database {redact(db_url)} is at revision {HEAD}; this adaptserve needs 0002_test: "
                              "run `adaptserve db upgrade`")
    assert migrations.upgrade(db_url) == (HEAD, "0002_test")
    assert migrations.check(db_url) == "0002_test"


def test_a_failed_upgrade_leaves_the_schema_where_it_was(db_url: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    migrations.upgrade(db_url)
    _newer_scripts(tmp_path, monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="^0002 failed half-way$"):
        migrations.upgrade(db_url)
    database = Database(db_url)
    assert (migrations.current(database), inspect(database.engine).has_table("widgets")) == (HEAD, False)
    database.dispose()


def test_schema_messages_never_show_the_password(postgres_url: str) -> None:
    url = make_url(postgres_url).set(password="s3cret").render_as_string(hide_password=False)  # trust auth ignores it
    with pytest.raises(migrations.SchemaError) as err:
        migrations.check(url)
    assert "s3cret" not in str(err.value) and ":***@127.0.0.1:" in str(err.value)


def test_db_cli_upgrade_and_current(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_DATABASE_URL", db_url)
    runner, shown = CliRunner(), redact(db_url)
    result = runner.invoke(db_cli.app, ["current"])
    assert (result.exit_code, result.output) == (1, f"database {shown} is at revision none (empty); this adaptserve "
                                                    f"needs {HEAD}: run `adaptserve db upgrade`\n")
    result = runner.invoke(db_cli.app, ["upgrade"])
    assert (result.exit_code, result.output) == (0, f"database {shown} upgraded from revision none (empty) to "
                                                    f"{HEAD}\n")
    result = runner.invoke(db_cli.app, ["upgrade"])
    assert (result.exit_code, result.output) == (0, f"database {shown} is at revision {HEAD}: nothing to do\n")
    result = runner.invoke(db_cli.app, ["current"])
    assert result.exit_code == 0
    assert re.fullmatch(rf"database {re.escape(shown)} is at revision {HEAD} \(head\)\n"
                        r"schema created \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ by adaptserve "
                        rf"{re.escape(importlib.metadata.version('adaptserve'))}\n", result.output)


def test_db_cli_bad_url_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_DATABASE_URL", "mysql://app@db/state")
    result = CliRunner().invoke(db_cli.app, ["upgrade"])
    assert (result.exit_code, result.output) == (2, "error: ADAPTSERVE_DATABASE_URL='mysql://app@db/state': "
                                                    "unsupported backend 'mysql'; use sqlite:///PATH or "
                                                    "postgresql+psycopg://USER:PASSWORD@HOST/DB\n")


# ------------------------------------------------------------------------------------------ child processes


def _main(argv: list[str]) -> int:
    role, url = argv[0], argv[1]
    database = _open(url, timeout_s=60)
    if role == "increment":
        print("ready", flush=True)
        sys.stdin.readline()
        _increment(database, int(argv[2]))
        return 0
    if role == "die-mid-write":
        with database.write() as conn:
            conn.execute(insert(counters).values(name="doomed", n=1))
            print("inserted", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
