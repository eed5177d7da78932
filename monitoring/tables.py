"""The monitoring tables of the state database (`models.db.metadata`): captured predictions, drift checks and the
per-adapter leases that decide which replica runs an adapter's scheduled check.

Revision 0004_monitoring (models/migrations/versions) creates them exactly as declared here; tests/test_monitor_db.py
checks that the two agree on SQLite and PostgreSQL. Times are epoch seconds as floats.

* capture_records (monitoring.capture): one row per sampled prediction; `prediction_id` is unique, so a retried
  batch inserts nothing twice; `seq` (BIGINT on PostgreSQL: every prediction of every replica takes one, and 2^31
  of them is weeks of traffic) breaks ties in time order. stats is float64 x len(STAT_NAMES) in STAT_NAMES order;
  emb_dtype ('f2' or 'f4', little-endian) says how `embedding` is packed.
* drift_checks (monitoring.history): one row per check; ids grow with time, so an adapter's latest check is its
  highest id. `features` is JSON text.
* drift_leases (monitoring.leases): (adapter, holder, until); the holder may run the adapter's check of the interval
  that ends at `until`. holder '' is a lease given back.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Connection, Float, Index, Integer, LargeBinary, String, Table, Text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

from models.db import metadata

CAPTURE_LOCK = "capture"  # the write lock (models.db) of capture_records: batches and pruning run one at a time
HISTORY_LOCK = "drift_checks"
LEASE_LOCK = "drift_leases"

# SQLite only aliases the rowid (cheap autoincrement, what capture.db had) for a column typed exactly INTEGER
_SEQ = BigInteger().with_variant(Integer(), "sqlite")

capture_records = Table(
    "capture_records", metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=True),
    Column("prediction_id", Text, nullable=False, unique=True),
    Column("adapter", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("predicted", Integer, nullable=False),
    Column("label", Text, nullable=False),
    Column("confidence", Float, nullable=False),
    Column("entropy", Float, nullable=False),
    Column("stats", LargeBinary, nullable=False),
    Column("emb_dtype", String(2), nullable=False),
    Column("embedding", LargeBinary, nullable=False),
    # top-1 minus top-2 probability, what label requests rank by (0008_capture_margin); NULL for older rows
    Column("margin", Float, nullable=True),
)
Index("ix_capture_records_adapter_time", capture_records.c.adapter, capture_records.c.created_at)

drift_checks = Table(
    "drift_checks", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("adapter", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("checked_at", Float, nullable=False),
    Column("drift", Boolean(create_constraint=False), nullable=False),
    Column("score", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("p_value", Float, nullable=False),
    Column("window_size", Integer, nullable=False),
    Column("features", Text, nullable=False),
    Column("report", Text, nullable=True),
    Column("mean_confidence", Float, nullable=True),
    # the report's object in the artifact store (sha256): any replica fetches it from there (0007_report_objects)
    Column("report_sha256", String(64), nullable=True),
    # the accuracy estimated without labels and what it came from, JSON (monitoring/accuracy.py; 0010_drift_estimate)
    Column("estimate", Text, nullable=True),
)
Index("ix_drift_checks_adapter_id", drift_checks.c.adapter, drift_checks.c.id)

drift_leases = Table(
    "drift_leases", metadata,
    Column("adapter", String(64), primary_key=True),  # models.registry.NAME_PATTERN: at most 64 characters
    Column("holder", Text, nullable=False),
    Column("until", Float, nullable=False),
)

TABLES = (capture_records, drift_checks, drift_leases)


def insert_new(conn: Connection, table: Table, key: str) -> Insert:
    """INSERT that skips a row whose `key` (a unique column) is already there, in the connection's dialect (both
    spell it ON CONFLICT DO NOTHING; SQLAlchemy has no portable construct for it)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=[table.c[key]])
