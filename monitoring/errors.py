"""The drift monitor's errors. Each carries the HTTP status a route answers with (service/errors.py reads
`status_code`), so no route needs its own try-block."""

from __future__ import annotations


class MonitorError(Exception):
    """Base class of the monitor's errors; `status` is the HTTP status a route should answer with."""

    status = 400

    @property
    def status_code(self) -> int:  # the name service/errors.py reads
        return self.status


class UnknownAdapterError(MonitorError, LookupError):
    """The adapter (or version) is not in the registry."""

    status = 404

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotEnoughRecordsError(MonitorError):
    """A check cannot run yet: too few captured records of the version (the message says how many are needed)."""

    status = 409


class NoReferenceError(NotEnoughRecordsError):
    """The version has no usable drift reference: nothing to compare with yet, so 409 like too few records."""
