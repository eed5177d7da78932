"""What every registry backend promises: the adapter names and version numbers it accepts, the records it
returns, and the abstract interface (`AdapterRegistry`) that models/registry.py implements on the state database and
the artifact store.

Invariants every backend keeps: versions of a name are numbered 1, 2, ... and a number is never reused (not even
after a delete); a name has at most one champion; every change bumps `generation()`; a record is a snapshot.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.metadata import ADAPTER_META, AdapterMeta
from models.registry_errors import InvalidNameError, InvalidVersionError

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
MAX_VERSION = 2**63 - 1  # SQLite's INTEGER range: a larger client number must be refused before a query


def check_name(name: object) -> str:
    """Names become directory names and URL segments, so only a conservative charset is allowed."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid adapter name {name!r}: must match {NAME_PATTERN} "
            "(lowercase letters, digits, '_' and '-', starting with a letter or digit, at most 64 characters)"
        )
    return name


def check_version(version: object) -> int:
    """SQLite would happily compare '1' with 1, so reject non-ints before they reach a query; and it raises
    OverflowError on integers past 64 bits, so range-check them first."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"adapter version must be an int, got {version!r}")
    if not -MAX_VERSION - 1 <= version <= MAX_VERSION:
        raise InvalidVersionError(f"adapter version {version} is out of range: no version can be past {MAX_VERSION}")
    return version


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class AdapterVersion:
    """One registered version; a snapshot (is_champion is as of the read that produced it)."""

    name: str
    version: int
    path: Path
    metadata: dict[str, Any]
    sha256: dict[str, str]
    created_at: str
    is_champion: bool

    @property
    def meta(self) -> AdapterMeta:
        """`metadata` typed (models/metadata.py); ArtifactError when it lacks a key every adapter has."""
        return AdapterMeta.from_dict(self.metadata, source=self.path / ADAPTER_META)


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter name with all its live versions (ascending) and its champion version, if any."""

    name: str
    champion: int | None
    versions: list[AdapterVersion]


@dataclass(frozen=True)
class Promotion:
    """One champion change; ``previous`` is the champion it replaced, ``action`` is promote or rollback."""

    name: str
    version: int
    previous: int | None
    promoted_at: str
    action: str


# --------------------------------------------------------------------------------------------- interface


class AdapterRegistry(abc.ABC):
    """Backend-neutral registry interface: what every caller may rely on, whatever holds the rows and the files."""

    @abc.abstractmethod
    def register(self, name: str, src_dir: str | Path, *, metadata: Mapping[str, Any] | None = None) -> AdapterVersion:
        """Copy an adapter directory in as the next version of ``name``."""

    @abc.abstractmethod
    def promote(self, name: str, version: int, *, verify: bool = True) -> AdapterVersion:
        """Make ``version`` the champion of ``name`` (after re-hashing its files, unless `verify` is False)."""

    @abc.abstractmethod
    def rollback(self, name: str) -> AdapterVersion:
        """Go back to the champion before the current one, following promotion history."""

    @abc.abstractmethod
    def list_adapters(self) -> list[AdapterInfo]:
        """Every adapter with its versions, champion and metadata."""

    @abc.abstractmethod
    def get(self, name: str, version: int) -> AdapterVersion:
        """One version's record."""

    @abc.abstractmethod
    def champion(self, name: str) -> AdapterVersion | None:
        """The champion's record, or None if nothing was promoted yet."""

    @abc.abstractmethod
    def delete(self, name: str, version: int) -> None:
        """Remove a non-champion version; its number is never reused."""

    @abc.abstractmethod
    def path(self, name: str, version: int) -> Path:
        """Directory holding the version's artifacts on this machine (fetched first if it has no copy)."""

    @abc.abstractmethod
    def local(self, record: AdapterVersion) -> Path:
        """`record.path` with the version's files in it: fetched and verified first if this machine has no copy.

        Whoever reads files through a record (`record.path`) without verify() goes through this: a replica that never
        registered the version has no copy until something asks for one."""

    @abc.abstractmethod
    def generation(self) -> int:
        """Counter bumped by every change; cheap enough for serving workers to poll."""

    @abc.abstractmethod
    def verify(self, name: str, version: int) -> AdapterVersion:
        """Re-hash the artifacts; raise CorruptAdapterError on any missing or changed file."""

    @abc.abstractmethod
    def history(self, name: str) -> list[Promotion]:
        """Champion changes of ``name``, oldest first."""

    @abc.abstractmethod
    def staging(self) -> AbstractContextManager[Path]:
        """A private scratch dir for work that ends in register() (publish builds model.onnx there), removed on
        exit; if its owner is SIGKILLed, the next staging() or open removes it."""

    def load_check(self, name: str, version: int) -> AdapterVersion:
        """verify() under the name loaders use: call it right before loading weights from ``path``."""
        return self.verify(name, version)
