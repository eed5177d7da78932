"""The registry's errors: one family, so callers catch every registry failure with one except clause.

Each class carries the HTTP `status_code` the service answers with (service/errors.py maps them in one place);
messages name what was asked for and what exists, so a person can act on them.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class so callers can catch every registry failure with one except clause.

    `status_code` is the HTTP status a service answers with (service/errors.py reads it)."""

    status_code = 400


class InvalidNameError(RegistryError, ValueError):
    """Adapter name does not match NAME_PATTERN (names become directory names, so they must be safe)."""


class InvalidAdapterError(RegistryError, ValueError):
    """The directory handed to register() is not a complete, parseable PEFT adapter + metadata.json."""


class AdapterNotFoundError(RegistryError, KeyError):
    """Unknown adapter name or version; KeyError-like so ``except KeyError`` callers keep working."""

    status_code = 404

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""


class CorruptAdapterError(RegistryError):
    """Artifact files on disk are missing or no longer match the sha256 recorded at register time."""

    status_code = 409

    def __init__(self, name: str, version: int, problems: list[tuple[str, str, str]]) -> None:
        self.name, self.version, self.problems = name, version, problems
        details = "; ".join(f"file {f!r}: expected sha256 {exp}, actual {act}" for f, exp, act in problems)
        super().__init__(f"adapter {name!r} version {version} is corrupt: {details}")


class ChampionDeleteError(RegistryError):
    """Deleting the champion would leave serving workers pointing at nothing."""

    status_code = 409


class RollbackError(RegistryError):
    """rollback() found no earlier champion (still registered) to go back to."""

    status_code = 409


class InvalidVersionError(RegistryError, ValueError):
    """A version number outside 1..MAX_VERSION (no such version can exist)."""


class UnsupportedBackendError(RegistryError, ValueError):
    """open_registry() got a URL scheme with no backend implementation yet."""


class UnfetchableAdapterError(CorruptAdapterError):
    """This home has no copy of the version and the artifact store cannot hand out a verified one (an object is
    missing or its bytes do not match their sha256): as corrupt as a damaged local copy, so it never serves."""

    def __init__(self, name: str, version: int, reason: str) -> None:
        self.name, self.version, self.problems = name, version, []
        RegistryError.__init__(self, f"adapter {name!r} version {version} is corrupt: this home has no copy of it and "
                                     f"the artifact store refused it: {reason}")


class LegacyImportError(RegistryError):
    """A legacy registry.db cannot be imported as it is; nothing was imported and the file was left in place."""

    status_code = 500
