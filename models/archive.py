"""Unpacking an uploaded adapter archive (zip or tar) without trusting it.

The whole archive is checked before one byte is written: member count and declared sizes against ArchiveLimits,
and every member must be a regular file or directory with a relative name that stays inside the destination.
Files are then written one by one (never extractall) through a byte counter, so an archive whose headers lie
about its sizes is still stopped at the limits. Any failure, including every error a damaged archive raises in
zipfile, tarfile or a decompressor, becomes an ArchiveError (HTTP 400) or ArchiveTooLargeError (413), and what was
written under the destination is removed again.

A real adapter (adapter_config.json, adapter_model.safetensors, metadata.json, samples/*.npz, a png or two) is a
few MB in under 20 files, so the defaults leave a margin of about a hundred times.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from itertools import zip_longest
from pathlib import Path
from typing import IO, Any

from models import settings
from models.metadata import ADAPTER_FILES, ArtifactError

_MIB = 1 << 20
_CHUNK = _MIB
_MAX_HEADER_BYTES = _MIB  # pax and GNU long-name headers: tarfile reads each whole into memory
_ZIP_METHODS = {zipfile.ZIP_STORED: "none", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
                zipfile.ZIP_LZMA: "lzma"}
_COMPRESSED_TAR = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
# What zipfile, tarfile and the decompressors raise on a damaged archive (a truncated gzip stream is an OSError
# or EOFError, an encrypted zip a RuntimeError, an unknown compression NotImplementedError).
_DAMAGED = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, OSError, RuntimeError,
            NotImplementedError, ValueError, struct.error)
_MODE_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
               stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket"}
_NEITHER = "upload is neither a zip nor a tar archive of the adapter directory"


@dataclass(frozen=True)
class ArchiveLimits:
    """How much an uploaded adapter archive may unpack to (settings archive_max_*); from_env() reads them."""

    max_total_bytes: int = settings.default("archive_max_total_bytes")
    max_file_bytes: int = settings.default("archive_max_file_bytes")
    max_files: int = settings.default("archive_max_files")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ArchiveLimits.{f.name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ArchiveLimits:
        """The ADAPTSERVE_ARCHIVE_* settings (os.environ by default); a bad value raises SettingsError naming it."""
        s = settings.load(environ)
        return cls(s.archive_max_total_bytes, s.archive_max_file_bytes, s.archive_max_files)


def _env(name: str) -> str:
    return settings.env_name(f"archive_{name}")


class ArchiveError(ArtifactError):
    """The upload is not an archive we unpack: damaged, or holding a member that is not a plain file or directory
    inside the archive."""

    status_code = 400


class ArchiveTooLargeError(ArchiveError):
    """The archive holds more members or unpacks to more bytes than ArchiveLimits allows."""

    status_code = 413


@dataclass(frozen=True)
class _Member:
    name: str  # as stored, for messages
    parts: tuple[str, ...]  # the relative path it is written to
    is_dir: bool
    size: int  # declared
    ref: Any  # its ZipInfo or TarInfo


# --------------------------------------------------------------------------------------------- checks


def _parts(name: str, is_dir: bool) -> tuple[str, ...]:
    """The relative path of a member; refuses NULs, absolute paths and '..' (backslashes count as separators)."""
    if "\x00" in name:
        raise ArchiveError(f"archive member {name!r} has a NUL byte in its name")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise ArchiveError(f"archive member {name!r} has an absolute path")
    parts = tuple(p for p in re.split(r"[/\\]", name) if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"archive member {name!r} has a '..' component")
    if not parts and not is_dir:
        raise ArchiveError(f"archive member {name!r} has an empty name")
    return parts


class _Census:
    """The members seen so far; admit() refuses the first one over a limit, a duplicate, or a file used as a dir."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits, self.count, self.total = limits, 0, 0
        self.seen: dict[tuple[str, ...], bool] = {}  # parts -> is_dir
        self.parents: set[tuple[str, ...]] = set()

    def admit(self, m: _Member) -> _Member:
        self.count += 1
        if self.count > self.limits.max_files:
            raise ArchiveTooLargeError(f"archive member {m.name!r} is past the limit of {self.limits.max_files} "
                                       f"members ({_env('max_files')})")
        if not m.is_dir:
            self.total += m.size
            _check_size(m.name, m.size, self.total, self.limits)
        if m.parts in self.seen:
            raise ArchiveError(f"archive member {m.name!r} appears twice")
        prefixes = [m.parts[:i] for i in range(1, len(m.parts))]
        if (not m.is_dir and m.parts in self.parents) or any(self.seen.get(p) is False for p in prefixes):
            raise ArchiveError(f"archive member {m.name!r} is both a file and a directory")
        self.seen[m.parts] = m.is_dir
        self.parents.update(prefixes)
        return m


def _check_size(name: str, size: int, total: int, limits: ArchiveLimits) -> None:
    if size > limits.max_file_bytes:
        raise ArchiveTooLargeError(f"archive member {name!r} is larger than {limits.max_file_bytes} bytes "
                                   f"({_env('max_file_bytes')})")
    if total > limits.max_total_bytes:
        raise ArchiveTooLargeError(f"archive member {name!r} takes the unpacked archive over "
                                   f"{limits.max_total_bytes} bytes ({_env('max_total_bytes')})")


@contextmanager
def _reading(kind: str) -> Iterator[None]:
    """Library errors while reading the archive become one ArchiveError (ours pass through)."""
    try:
        yield
    except ArchiveError:
        raise
    except _DAMAGED as err:
        raise _damaged(kind) from err


def _damaged(kind: str) -> ArchiveError:
    return ArchiveError(f"upload is a damaged or truncated {kind} archive")


# --------------------------------------------------------------------------------------------- writing


class _Writer:
    """Writes members under `root` (created files only, O_EXCL), counting real bytes against the limits and
    recording every path it creates so a failure can remove them."""

    def __init__(self, root: Path, limits: ArchiveLimits, kind: str, created: list[Path]) -> None:
        self.root, self.limits, self.kind, self.created, self.total = root.resolve(), limits, kind, created, 0

    def _inside(self, m: _Member) -> Path:
        path = self.root.joinpath(*m.parts)
        if not path.resolve().is_relative_to(self.root):
            raise ArchiveError(f"archive member {m.name!r} resolves outside the destination directory")
        return path

    def _mkdirs(self, path: Path) -> None:
        for d in [*reversed(path.relative_to(self.root).parents), path.relative_to(self.root)]:
            full = self.root / d
            if not full.is_dir():
                full.mkdir(mode=0o755)
                self.created.append(full)

    def directory(self, m: _Member) -> None:
        self._mkdirs(self._inside(m))

    def file(self, m: _Member, stream: IO[bytes]) -> None:
        path = self._inside(m)
        self._mkdirs(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        self.created.append(path)
        size = 0
        with os.fdopen(fd, "wb") as out:
            while True:
                with _reading(self.kind):
                    chunk = stream.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                _check_size(m.name, size, self.total + size, self.limits)  # before writing: never over on disk
                out.write(chunk)
        self.total += size


def _remove(created: list[Path]) -> None:
    for path in reversed(created):  # children were created after their parents
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------- zip


def _zip_member(info: zipfile.ZipInfo) -> _Member:
    name = info.orig_filename  # ZipInfo.filename is cut at a NUL byte
    mode = info.external_attr >> 16 if info.create_system == 3 else 0  # unix mode bits only from unix zips
    kind = stat.S_IFMT(mode)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        what = _MODE_KINDS.get(kind, f"of unix file type {kind:#o}")
        raise ArchiveError(f"archive member {name!r} is {what}, not a regular file or directory")
    if info.flag_bits & 0x1:
        raise ArchiveError(f"archive member {name!r} is encrypted; upload an unencrypted archive")
    if info.compress_type not in _ZIP_METHODS:
        raise ArchiveError(f"archive member {name!r} uses zip compression method {info.compress_type}, which is "
                           f"not supported (use {', '.join(_ZIP_METHODS.values())})")
    is_dir = info.is_dir() or kind == stat.S_IFDIR
    return _Member(name, _parts(name, is_dir), is_dir, info.file_size, info)


def _extract_zip(archive: Path, dest: Path, limits: ArchiveLimits, created: list[Path]) -> None:
    with _reading("zip"):
        z = zipfile.ZipFile(archive)
    with z:
        census = _Census(limits)
        members = [census.admit(_zip_member(info)) for info in z.infolist()]
        writer = _Writer(dest, limits, "zip", created)
        for m in members:
            if m.is_dir:
                writer.directory(m)
                continue
            with _reading("zip"):
                stream = z.open(m.ref)
            with stream:
                writer.file(m, stream)


# --------------------------------------------------------------------------------------------- tar


class _Metered:
    """The (decompressed) tar stream, counting what tarfile reads; refuses to read past `cap` when one is set."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source, self.pos, self.after = source, 0, ""
        self.cap: int | None = _MAX_HEADER_BYTES + tarfile.RECORDSIZE  # the first header (tarfile.open reads it)

    def read(self, n: int) -> bytes:
        data = self.source.read(n)
        self.pos += len(data)
        if self.cap is not None and self.pos > self.cap:
            where = f"after member {self.after!r}" if self.after else "before its first member"
            raise ArchiveError(f"tar archive has more than {_MAX_HEADER_BYTES} bytes of headers or trailing data "
                               f"{where}")
        return data


@contextmanager
def _tar_stream(archive: Path, head: bytes) -> Iterator[tuple[tarfile.TarFile, _Metered]]:
    """One sequential pass over the tar (decompressing it ourselves so _Metered sees the real bytes)."""
    opener = next((o for magic, o in _COMPRESSED_TAR.items() if head.startswith(magic)), None)
    with open(archive, "rb") as raw, opener(raw) if opener else nullcontext(raw) as source:
        meter = _Metered(source)
        with _reading("tar"):
            t = tarfile.open(fileobj=meter, mode="r|")
        with t:
            yield t, meter


def _tar_next(t: tarfile.TarFile) -> tarfile.TarInfo | None:
    with _reading("tar"):
        return t.next()


def _tar_member(info: tarfile.TarInfo) -> _Member:
    kinds = [(info.issym, "a symbolic link"), (info.islnk, "a hard link"), (info.ischr, "a character device"),
             (info.isblk, "a block device"), (info.isfifo, "a fifo")]
    what = next((w for test, w in kinds if test()), None)
    if what is None and not (info.isreg() or info.isdir()):
        what = f"of tar type {info.type!r}"
    if what is not None:
        raise ArchiveError(f"archive member {info.name!r} is {what}, not a regular file or directory")
    return _Member(info.name, _parts(info.name, info.isdir()), info.isdir(), info.size, info)


def _scan_tar(archive: Path, head: bytes, limits: ArchiveLimits) -> list[_Member]:
    """First pass: every header, refusing at the first bad one, before the data behind it is decompressed; then
    the rest of the stream, so that a gzip/bz2/xz checksum is verified (tarfile stops at the end-of-archive
    marker, before the gzip trailer, and would take a flipped byte in a member for data)."""
    census, members = _Census(limits), []
    with _tar_stream(archive, head) as (t, meter):
        while (info := _tar_next(t)) is not None:
            members.append(census.admit(_tar_member(info)))
            meter.cap, meter.after = t.offset + _MAX_HEADER_BYTES + tarfile.RECORDSIZE, info.name
        with _reading("tar"):
            while meter.read(_CHUNK):
                pass
    return members


def _extract_tar(archive: Path, head: bytes, dest: Path, limits: ArchiveLimits, created: list[Path]) -> None:
    members = _scan_tar(archive, head, limits)
    writer = _Writer(dest, limits, "tar", created)
    with _tar_stream(archive, head) as (t, meter):
        meter.cap = None  # the first pass bounded every header
        for m, info in zip_longest(members, iter(lambda: _tar_next(t), None)):
            if m is None or info is None or (info.name, info.size) != (m.ref.name, m.ref.size):
                raise _damaged("tar")
            if m.is_dir:
                writer.directory(m)
                continue
            with _reading("tar"):
                stream = t.extractfile(info)
            with stream:
                writer.file(m, stream)


# --------------------------------------------------------------------------------------------- entry point


def _adapter_dir(dest: Path) -> Path:
    dirs = sorted((d for d in dest.rglob("*") if d.is_dir()), key=lambda d: (len(d.parts), str(d)))
    for d in [dest, *dirs]:
        if all((d / f).is_file() for f in ADAPTER_FILES):
            return d
    raise ArchiveError(f"archive holds no directory with {', '.join(ADAPTER_FILES)}")


def extract(archive: Path, dest: Path, limits: ArchiveLimits) -> Path:
    """Unpack the zip or tar (plain, gz, bz2, xz; told apart by content) at `archive` under `dest`, and return the
    directory there that holds ADAPTER_FILES. Raises ArchiveError (status_code 400) or ArchiveTooLargeError (413)
    and leaves nothing under `dest` on any failure."""
    archive, dest = Path(archive), Path(dest)
    with open(archive, "rb") as f:
        head = f.read(512)
    created: list[Path] = []
    try:
        if not dest.is_dir():
            dest.mkdir(parents=True)
            created.append(dest)
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, limits, created)
        elif head.startswith(tuple(_COMPRESSED_TAR)) or head[257:262] == b"ustar" or _is_plain_tar(archive):
            _extract_tar(archive, head, dest, limits, created)
        else:
            raise ArchiveError(_NEITHER)
        return _adapter_dir(dest)
    except BaseException:
        _remove(created)
        raise


def _is_plain_tar(archive: Path) -> bool:
    """A pre-POSIX tar (no 'ustar' magic) still has a valid header checksum; tarfile knows how to check it."""
    try:
        return tarfile.is_tarfile(archive)
    except _DAMAGED:
        return False
