"""models.archive: an uploaded adapter archive is checked whole before anything is written, written through a
byte counter, and every refusal (hostile member, damaged archive, over a limit) is an ArchiveError with its HTTP
status that leaves nothing behind; publish stages under the registry home, so a killed publish is swept."""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from models.archive import ArchiveError, ArchiveLimits, ArchiveTooLargeError, _Member, _Writer, extract
from models.artifacts import ADAPTER_FILES, ArtifactError
from models.registry import AdapterRegistry, AdapterVersion, open_registry

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
GIB = 1 << 30
ADAPTER = {
    "adapter/adapter_config.json": b'{"peft_type": "LORA", "r": 4}',
    "adapter/adapter_model.safetensors": random.Random(0).randbytes(64 * 1024),  # incompressible: cuts land in it
    "adapter/metadata.json": b'{"backbone": "resnet18"}',
}
DAMAGED_ZIP = "upload is a damaged or truncated zip archive"
DAMAGED_TAR = "upload is a damaged or truncated tar archive"
NEITHER = "upload is neither a zip nor a tar archive of the adapter directory"
SMALL = ArchiveLimits(max_total_bytes=MIB, max_file_bytes=MIB, max_files=4)

Build = Callable[[Path], None]


# --------------------------------------------------------------------------------------------- archive builders


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "",
            **pax: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.pax_headers = kind, link, len(data), pax
    return info, data


def tar_of(*extra: tuple[tarfile.TarInfo, bytes], mode: str = "w:gz") -> Build:
    """The three adapter files, then `extra`: a refusal must come before the valid files are written, too."""

    def build(path: Path) -> None:
        with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as t:
            for info, data in [*(_member(n, d) for n, d in ADAPTER.items()), *extra]:
                t.addfile(info, io.BytesIO(data) if data else None)

    return build


def zip_of(*extra: tuple[str | zipfile.ZipInfo, bytes], replace: tuple[bytes, bytes] = (b"", b"")) -> Build:
    def build(path: Path) -> None:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in [*ADAPTER.items(), *extra]:
                z.writestr(name, data)
        if replace[0]:
            path.write_bytes(path.read_bytes().replace(*replace))

    return build


def _zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16  # how `zip --symlinks` stores one
    return info, target.encode()


def _patch_headers(path: Path, name: str, central: dict[int, int], local: dict[int, int], fmt: str = "<H") -> None:
    """Overwrite fields (by byte offset) of `name`'s central-directory and local headers."""
    data = bytearray(path.read_bytes())
    for signature, name_at, fields in ((b"PK\x01\x02", 46, central), (b"PK\x03\x04", 30, local)):
        at = next(i for i in range(len(data)) if data[i:i + 4] == signature
                  and data[i + name_at:i + name_at + len(name)] == name.encode())
        for offset, value in fields.items():
            struct.pack_into(fmt, data, at + offset, value)
    path.write_bytes(bytes(data))


def patched_zip(central: dict[int, int], local: dict[int, int], fmt: str = "<H") -> Build:
    def build(path: Path) -> None:
        zip_of()(path)
        _patch_headers(path, "adapter/metadata.json", central, local, fmt)

    return build


def cut(build: Build, keep: float) -> Build:
    def truncated(path: Path) -> None:
        build(path)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return truncated


def flipped(build: Build, at: float) -> Build:
    def corrupt(path: Path) -> None:
        build(path)
        data = bytearray(path.read_bytes())
        data[int(len(data) * at)] ^= 0xFF
        path.write_bytes(bytes(data))

    return corrupt


def gzipped(build: Build, trailing: bytes) -> Build:
    def compress(path: Path) -> None:
        build(path)
        path.write_bytes(gzip.compress(path.read_bytes() + trailing))

    return compress


def raw(data: bytes) -> Build:
    return lambda path: path.write_bytes(data)


def _zeros_deflated(mib: int) -> bytes:
    """A raw deflate stream of `mib` MiB of zeros in milliseconds: after a sync flush every further MiB of zeros
    compresses to the same ~1 KB, so it is written once and repeated (zlib itself takes ~5 s for 1 GiB)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(MIB)
    first, steady = (c.compress(chunk) + c.flush(zlib.Z_SYNC_FLUSH) for _ in range(2))
    return first + steady * (mib - 1) + c.flush()


def zip_bomb(path: Path, mib: int = 1024, declared: int | None = None) -> None:
    """A one-member zip of `mib` MiB of zeros written by hand (zipfile cannot store pre-compressed data); its
    headers declare `declared` bytes (default: the truth) with the true CRC."""
    data, name = _zeros_deflated(mib), b"adapter/bomb.bin"
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(bytes(MIB), crc)
    size = mib * MIB if declared is None else declared
    local = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(data), size, len(name), 0) + name
    central = struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(data), size, len(name),
                          0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    path.write_bytes(local + data + central + end)


def _adapter_tree(root: Path) -> Path:
    for name, data in ADAPTER.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root / "adapter"


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the members extract() starts to write, in order."""
    names: list[str] = []
    for method in ("file", "directory"):
        original = getattr(_Writer, method)

        def spy(self: _Writer, m: _Member, *rest: object, _original: Callable[..., None] = original) -> None:
            names.append(m.name)
            _original(self, m, *rest)

        monkeypatch.setattr(_Writer, method, spy)
    return names


def _refuse(tmp_path: Path, dest: Path, build: Build, limits: ArchiveLimits) -> ArchiveError:
    archive = tmp_path / "upload"
    build(archive)
    with pytest.raises(ArchiveError) as info:
        extract(archive, dest, limits)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [], "a refusal must leave nothing"
    return info.value


# --------------------------------------------------------------------------------------------- refusals

HOSTILE = [
    pytest.param(tar_of(_member("adapter/link", kind=tarfile.SYMTYPE, link="/etc/passwd")),
                 "archive member 'adapter/link' is a symbolic link, not a regular file or directory",
                 id="tar-absolute-symlink"),
    pytest.param(tar_of(_member("adapter/up", kind=tarfile.SYMTYPE, link="../../etc/passwd")),
                 "archive member 'adapter/up' is a symbolic link, not a regular file or directory",
                 id="tar-escaping-symlink"),
    pytest.param(tar_of(_member("adapter/hard", kind=tarfile.LNKTYPE, link="/etc/passwd")),
                 "archive member 'adapter/hard' is a hard link, not a regular file or directory", id="tar-hardlink"),
    pytest.param(tar_of(_member("adapter/pipe", kind=tarfile.FIFOTYPE)),
                 "archive member 'adapter/pipe' is a fifo, not a regular file or directory", id="tar-fifo"),
    pytest.param(tar_of(_member("adapter/null", kind=tarfile.CHRTYPE)),
                 "archive member 'adapter/null' is a character device, not a regular file or directory",
                 id="tar-char-device"),
    pytest.param(tar_of(_member("adapter/sda", kind=tarfile.BLKTYPE)),
                 "archive member 'adapter/sda' is a block device, not a regular file or directory",
                 id="tar-block-device"),
    pytest.param(tar_of(_member("adapter/vol", kind=b"V")),
                 "archive member 'adapter/vol' is of tar type b'V', not a regular file or directory",
                 id="tar-volume-header"),
    pytest.param(tar_of(_member("adapter/../../evil.txt", b"x")),
                 "archive member 'adapter/../../evil.txt' has a '..' component", id="tar-dotdot"),
    pytest.param(tar_of(_member("/tmp/evil.txt", b"x")), "archive member '/tmp/evil.txt' has an absolute path",
                 id="tar-absolute"),
    pytest.param(tar_of(_member("adapter/ab", b"x", path="adapter/a\x00b")),
                 "archive member 'adapter/a\\x00b' has a NUL byte in its name", id="tar-nul-in-pax-path"),
    pytest.param(tar_of(_member("adapter/metadata.json", b"{}")),
                 "archive member 'adapter/metadata.json' appears twice", id="tar-duplicate"),
    pytest.param(tar_of(_member("adapter/x", b"1"), _member("adapter/x/y", b"2")),
                 "archive member 'adapter/x/y' is both a file and a directory", id="tar-file-as-dir"),
    pytest.param(tar_of(_member("adapter/note", b"x", comment="x" * (2 * MIB))),
                 "tar archive has more than 1048576 bytes of headers or trailing data after member "
                 "'adapter/metadata.json'",
                 id="tar-pax-header-bomb"),
    pytest.param(zip_of(_zip_symlink("adapter/link", "/etc/passwd")),
                 "archive member 'adapter/link' is a symbolic link, not a regular file or directory",
                 id="zip-symlink"),
    pytest.param(zip_of(("../evil.txt", b"x")), "archive member '../evil.txt' has a '..' component",
                 id="zip-dotdot"),
    pytest.param(zip_of(("adapter\\..\\..\\evil.txt", b"x")),
                 "archive member 'adapter\\\\..\\\\..\\\\evil.txt' has a '..' component", id="zip-backslash-dotdot"),
    pytest.param(zip_of(("/etc/evil.txt", b"x")), "archive member '/etc/evil.txt' has an absolute path",
                 id="zip-absolute"),
    pytest.param(zip_of(("C:/evil.txt", b"x")), "archive member 'C:/evil.txt' has an absolute path",
                 id="zip-drive-letter"),
    pytest.param(zip_of(("adapter/aXb", b"x"), replace=(b"adapter/aXb", b"adapter/a\x00b")),
                 "archive member 'adapter/a\\x00b' has a NUL byte in its name", id="zip-nul"),
    pytest.param(zip_of(("adapter/metadata.json", b"{}")), "archive member 'adapter/metadata.json' appears twice",
                 id="zip-duplicate"),
    pytest.param(zip_of(("adapter/./metadata.json", b"{}")),
                 "archive member 'adapter/./metadata.json' appears twice", id="zip-duplicate-after-normalising"),
    pytest.param(patched_zip(central={8: 1}, local={6: 1}),
                 "archive member 'adapter/metadata.json' is encrypted; upload an unencrypted archive",
                 id="zip-encrypted"),
    pytest.param(patched_zip(central={10: 99}, local={8: 99}),
                 "archive member 'adapter/metadata.json' uses zip compression method 99, which is not supported "
                 "(use none, deflate, bzip2, lzma)", id="zip-aes-method"),
    pytest.param(gzipped(tar_of(mode="w"), trailing=bytes(2 * MIB)),
                 "tar archive has more than 1048576 bytes of headers or trailing data after member "
                 "'adapter/metadata.json'", id="tar.gz-with-2MiB-after-the-end-marker"),
]


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")
@pytest.mark.parametrize(("build", "message"), HOSTILE)
def test_hostile_archive_is_refused_before_writing(
    tmp_path: Path, dest: Path, written: list[str], build: Build, message: str
) -> None:
    err = _refuse(tmp_path, dest, build, ArchiveLimits())
    assert (type(err), str(err), err.status_code, written) == (ArchiveError, message, 400, [])


DAMAGED = [
    pytest.param(cut(zip_of(), 0.5), DAMAGED_ZIP, id="truncated-zip"),
    pytest.param(cut(zip_of(), 0.99), DAMAGED_ZIP, id="zip-missing-its-end-record"),
    pytest.param(flipped(zip_of(), 0.6), DAMAGED_ZIP, id="zip-flipped-byte"),
    pytest.param(cut(tar_of(), 0.5), DAMAGED_TAR, id="truncated-tar.gz"),
    pytest.param(cut(tar_of(mode="w:bz2"), 0.5), DAMAGED_TAR, id="truncated-tar.bz2"),
    pytest.param(cut(tar_of(mode="w:xz"), 0.5), DAMAGED_TAR, id="truncated-tar.xz"),
    pytest.param(cut(tar_of(mode="w"), 0.5), DAMAGED_TAR, id="truncated-tar"),
    pytest.param(flipped(tar_of(), 0.5), DAMAGED_TAR, id="tar.gz-flipped-byte"),
    pytest.param(raw(b"\x1f\x8b" + random.Random(1).randbytes(4096)), DAMAGED_TAR, id="gzip-magic-then-garbage"),
    pytest.param(raw(random.Random(2).randbytes(4096)), NEITHER, id="garbage"),
    pytest.param(raw(b"adapter_config.json\n"), NEITHER, id="text"),
    pytest.param(raw(b""), NEITHER, id="empty"),
    pytest.param(zip_of(replace=(b"adapter/metadata.json", b"adapter/metadata.yaml")),
                 "archive holds no directory with " + ", ".join(ADAPTER_FILES), id="zip-without-metadata.json"),
]


@pytest.mark.parametrize(("build", "message"), DAMAGED)
def test_damaged_archive_is_refused_and_what_was_written_removed(
    tmp_path: Path, dest: Path, build: Build, message: str
) -> None:
    err = _refuse(tmp_path, dest, build, ArchiveLimits())
    assert (type(err), str(err), err.status_code) == (ArchiveError, message, 400)


TOO_LARGE = [
    pytest.param(tar_of(_member("adapter/samples/a.npz", b"a"), _member("adapter/samples/b.npz", b"b")), SMALL,
                 "archive member 'adapter/samples/b.npz' is past the limit of 4 members "
                 "(ADAPTSERVE_ARCHIVE_MAX_FILES)", id="tar-too-many-files"),
    pytest.param(zip_of(("adapter/samples/a.npz", b"a"), ("adapter/samples/b.npz", b"b")), SMALL,
                 "archive member 'adapter/samples/b.npz' is past the limit of 4 members "
                 "(ADAPTSERVE_ARCHIVE_MAX_FILES)", id="zip-too-many-files"),
    pytest.param(tar_of(_member("adapter/big.bin", bytes(2 * MIB))), SMALL,
                 "archive member 'adapter/big.bin' is larger than 1048576 bytes (ADAPTSERVE_ARCHIVE_MAX_FILE_BYTES)",
                 id="tar.gz-bomb"),
    pytest.param(zip_of(("adapter/a.bin", bytes(600_000)), ("adapter/b.bin", bytes(600_000))),
                 ArchiveLimits(max_total_bytes=MIB),
                 "archive member 'adapter/b.bin' takes the unpacked archive over 1048576 bytes "
                 "(ADAPTSERVE_ARCHIVE_MAX_TOTAL_BYTES)", id="zip-over-total"),
    pytest.param(zip_bomb, ArchiveLimits(),
                 "archive member 'adapter/bomb.bin' is larger than 268435456 bytes "
                 "(ADAPTSERVE_ARCHIVE_MAX_FILE_BYTES)", id="zip-bomb-1GiB-honest-header"),
]


@pytest.mark.parametrize(("build", "limits", "message"), TOO_LARGE)
def test_archive_over_a_limit_is_refused_before_writing(
    tmp_path: Path, dest: Path, written: list[str], build: Build, limits: ArchiveLimits, message: str
) -> None:
    err = _refuse(tmp_path, dest, build, limits)
    assert (type(err), str(err), err.status_code, written) == (ArchiveTooLargeError, message, 413, [])


def test_zip_bomb_is_one_mib_expanding_to_one_gib(tmp_path: Path) -> None:
    """The bomb above is the real thing: ~1 MB on the wire, 1 GiB once inflated (checked on its first 64 MiB)."""
    zip_bomb(tmp_path / "bomb.zip")
    assert (tmp_path / "bomb.zip").stat().st_size < 1.1 * MIB
    with zipfile.ZipFile(tmp_path / "bomb.zip") as z, z.open("adapter/bomb.bin") as f:
        assert z.getinfo("adapter/bomb.bin").file_size == GIB
        assert f.read(64 * MIB) == bytes(64 * MIB)


def _disk_watch(monkeypatch: pytest.MonkeyPatch, dest: Path) -> list[int]:
    """Bytes on disk under `dest`, sampled before every read of a zip member."""
    samples: list[int] = []
    original = zipfile.ZipExtFile.read

    def read(self: zipfile.ZipExtFile, n: int = -1) -> bytes:
        samples.append(sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()))
        return original(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    return samples


def test_zip_whose_central_directory_lies_is_stopped_during_extraction(
    tmp_path: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The headers of the 1 GiB bomb patched to declare 1000 bytes pass the census; zipfile stops reading at the
    declared size and the CRC no longer matches, so nothing near the limit ever reaches the disk."""

    def lying(path: Path) -> None:
        zip_bomb(path)
        _patch_headers(path, "adapter/bomb.bin", central={24: 1000}, local={22: 1000}, fmt="<I")

    samples = _disk_watch(monkeypatch, dest)
    err = _refuse(tmp_path, dest, lying, SMALL)
    assert (type(err), str(err)) == (ArchiveError, DAMAGED_ZIP)
    assert samples and max(samples) <= 1000


@pytest.mark.parametrize(
    ("real_sizes", "limits", "message"),
    [
        pytest.param([4 * MIB], SMALL, "archive member 'adapter/m0' is larger than 1048576 bytes "
                     "(ADAPTSERVE_ARCHIVE_MAX_FILE_BYTES)", id="one-member-over-file-limit"),
        pytest.param([700_000, 700_000], SMALL, "archive member 'adapter/m1' takes the unpacked archive over "
                     "1048576 bytes (ADAPTSERVE_ARCHIVE_MAX_TOTAL_BYTES)", id="two-members-over-total"),
    ],
)
def test_members_larger_than_declared_are_stopped_at_the_limits(
    tmp_path: Path, dest: Path, monkeypatch: pytest.MonkeyPatch, real_sizes: list[int], limits: ArchiveLimits,
    message: str
) -> None:
    """Each member declares 10 bytes, but the member streams (a zip library that trusts the local data, say) yield
    `real_sizes`: the byte counter stops them before a chunk over the limit is written."""
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(len(real_sizes)):
            z.writestr(f"adapter/m{i}", bytes(10))
    streams = iter(real_sizes)
    on_disk: list[int] = []

    class Overlong(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            on_disk.append(sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()))
            return super().read(n)

    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, info: Overlong(bytes(next(streams))))
    with pytest.raises(ArchiveTooLargeError) as info:
        extract(archive, dest, limits)
    assert (str(info.value), info.value.status_code) == (message, 413)
    assert list(dest.iterdir()) == []
    assert max(on_disk) <= limits.max_total_bytes


def test_refusal_removes_a_dest_it_created_and_keeps_what_was_there(tmp_path: Path, dest: Path) -> None:
    (dest / "keep.txt").write_text("mine")
    tar_of(_member("adapter/link", kind=tarfile.SYMTYPE, link="/etc/passwd"))(tmp_path / "a.tgz")
    with pytest.raises(ArchiveError):
        extract(tmp_path / "a.tgz", dest / "new" / "x", ArchiveLimits())
    with pytest.raises(ArchiveError):
        extract(tmp_path / "a.tgz", dest, ArchiveLimits())
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["keep.txt", "new"]


# --------------------------------------------------------------------------------------------- valid archives


@pytest.mark.parametrize("fmt", ["zip", "tar", "gztar", "bztar", "xztar"])
@pytest.mark.parametrize(
    ("layout", "found"),
    [
        pytest.param("adapter", "adapter", id="adapter-dir"),
        pytest.param(".", ".", id="files-at-the-root"),
        pytest.param("outer", "outer/adapter", id="nested-with-samples"),
    ],
)
def test_valid_archive_extracts_to_the_adapter_dir(
    tmp_path: Path, dest: Path, fmt: str, layout: str, found: str
) -> None:
    """Archives as `zip -r` / `tar c[zjJ]f` make them (shutil.make_archive, directory entries included)."""
    src = tmp_path / "src"
    adapter = _adapter_tree(src / "outer" if layout == "outer" else src)
    (adapter / "samples").mkdir()
    (adapter / "samples" / "reference.npz").write_bytes(b"npz")
    root_dir = adapter if layout == "." else src
    archive = shutil.make_archive(str(tmp_path / "upload"), fmt, root_dir, "." if layout == "." else layout)
    got = extract(Path(archive), dest, ArchiveLimits())
    assert got == (dest / found if found != "." else dest)
    assert {f: (got / f).read_bytes() for f in ADAPTER_FILES} == {f: (adapter / f).read_bytes() for f in ADAPTER_FILES}
    assert (got / "samples" / "reference.npz").read_bytes() == b"npz"


def test_real_adapter_fits_the_default_limits_with_a_wide_margin(
    tmp_path: Path, dest: Path, source_model: Path
) -> None:
    from pipelines.release import make_random_adapter

    adapter = make_random_adapter(source_model, tmp_path / "src" / "adapter", seed=1)
    shutil.copytree(source_model / "samples", adapter / "samples")
    archive = shutil.make_archive(str(tmp_path / "upload"), "gztar", tmp_path / "src", "adapter")
    got = extract(Path(archive), dest, ArchiveLimits())
    files = [p for p in got.rglob("*") if p.is_file()]
    limits = ArchiveLimits()
    assert sum(p.stat().st_size for p in files) * 20 < limits.max_total_bytes
    assert len(files) * 10 < limits.max_files
    assert sorted(p.relative_to(got).as_posix() for p in files) == sorted(
        p.relative_to(adapter).as_posix() for p in adapter.rglob("*") if p.is_file()
    )


def test_publish_extract_archive_delegates_with_the_env_limits(
    tmp_path: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.release import extract_archive

    zip_of()(tmp_path / "upload.zip")
    assert extract_archive(tmp_path / "upload.zip", dest) == dest / "adapter"
    monkeypatch.setenv("ADAPTSERVE_ARCHIVE_MAX_FILES", "2")
    with pytest.raises(ArchiveTooLargeError, match=r"past the limit of 2 members \(ADAPTSERVE_ARCHIVE_MAX_FILES\)"):
        extract_archive(tmp_path / "upload.zip", tmp_path / "other")


# --------------------------------------------------------------------------------------------- limits and errors


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, ArchiveLimits(512 * MIB, 256 * MIB, 256), id="defaults"),
        pytest.param({"ADAPTSERVE_ARCHIVE_MAX_TOTAL_BYTES": "1000", "ADAPTSERVE_ARCHIVE_MAX_FILE_BYTES": " 10 ",
                      "ADAPTSERVE_ARCHIVE_MAX_FILES": "3"}, ArchiveLimits(1000, 10, 3), id="all-set"),
        pytest.param({"ADAPTSERVE_ARCHIVE_MAX_FILES": ""}, ArchiveLimits(), id="empty-is-default"),
    ],
)
def test_limits_from_env(env: dict[str, str], expected: ArchiveLimits) -> None:
    assert ArchiveLimits.from_env(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({"ADAPTSERVE_ARCHIVE_MAX_FILES": "0"},
                     "ADAPTSERVE_ARCHIVE_MAX_FILES='0' must be >= 1 (default 256)", id="zero"),
        pytest.param({"ADAPTSERVE_ARCHIVE_MAX_FILE_BYTES": "-5"},
                     "ADAPTSERVE_ARCHIVE_MAX_FILE_BYTES='-5' must be >= 1 (default 268435456)", id="negative"),
        pytest.param({"ADAPTSERVE_ARCHIVE_MAX_TOTAL_BYTES": "1.5e9"},
                     "ADAPTSERVE_ARCHIVE_MAX_TOTAL_BYTES='1.5e9' is not an integer (default 536870912)",
                     id="float"),
    ],
)
def test_limits_from_env_refuse_bad_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        ArchiveLimits.from_env(env)
    assert str(info.value) == message


def test_limits_metadata_and_errors() -> None:
    from dataclasses import fields

    from models import settings

    assert {f.name: settings.env_name(f"archive_{f.name}") for f in fields(ArchiveLimits)} == {
        "max_total_bytes": "ADAPTSERVE_ARCHIVE_MAX_TOTAL_BYTES",
        "max_file_bytes": "ADAPTSERVE_ARCHIVE_MAX_FILE_BYTES",
        "max_files": "ADAPTSERVE_ARCHIVE_MAX_FILES",
    }
    assert all(f.default == settings.default(f"archive_{f.name}") for f in fields(ArchiveLimits))
    assert all(settings.help_text(f"archive_{f.name}") for f in fields(ArchiveLimits))
    with pytest.raises(ValueError, match=r"^ArchiveLimits.max_files must be an integer >= 1, got 0$"):
        ArchiveLimits(max_files=0)
    assert issubclass(ArchiveTooLargeError, ArchiveError) and issubclass(ArchiveError, ArtifactError)
    assert issubclass(ArchiveError, ValueError)
    assert (ArchiveError.status_code, ArchiveTooLargeError.status_code) == (400, 413)


# --------------------------------------------------------------------------------------------- publish staging

_KILLED_STAGER = """
import os, sys
from models.registry import open_registry
with open_registry(sys.argv[1]).staging() as stage:
    (stage / "adapter").mkdir()
    (stage / "adapter" / "model.onnx").write_bytes(b"half an export")
    print(stage, flush=True)
    os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("sweeper", ["next-open", "next-staging"])
def test_staging_dir_of_a_sigkilled_owner_is_swept(tmp_path: Path, sweeper: str) -> None:
    home = tmp_path / "reg"
    registry = open_registry(home)
    proc = subprocess.run([sys.executable, "-c", _KILLED_STAGER, str(home)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    stage = Path(proc.stdout.strip())
    assert stage.parent == registry.tmp_dir and (stage / "adapter" / "model.onnx").is_file()
    if sweeper == "next-open":
        open_registry(home)
        assert list(registry.tmp_dir.iterdir()) == []
    else:
        with registry.staging() as live:
            assert sorted(p.name for p in registry.tmp_dir.iterdir()) == sorted([live.name, f"{live.name}.lock"])
        assert list(registry.tmp_dir.iterdir()) == []


def test_register_command_turns_sigterm_into_a_clean_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during `adaptserve adapters register` exits 143 through the staging dir's cleanup."""
    import time

    from typer.testing import CliRunner

    import pipelines.release
    from pipelines.cli import app

    stages: list[Path] = []

    def publish(registry: AdapterRegistry, name: str, src: Path, base: Path, promote: bool) -> None:
        with registry.staging() as stage:
            stages.append(stage)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

    monkeypatch.setattr(pipelines.release, "publish", publish)
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(app, ["adapters", "register", "site", str(tmp_path), "--base", str(tmp_path)])
    assert result.exit_code == 143
    assert len(stages) == 1 and not stages[0].exists()
    assert signal.getsignal(signal.SIGTERM) is before


def test_publish_stages_under_the_registry_home(
    tmp_path: Path, source_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.release import make_random_adapter, publish

    registry = open_registry(tmp_path / "reg")
    registered_from: list[Path] = []
    register = registry.register

    def spy(name: str, src: Path) -> AdapterVersion:
        registered_from.append(Path(src))
        return register(name, src)

    monkeypatch.setattr(registry, "register", spy)
    version = publish(registry, "site", make_random_adapter(source_model, tmp_path / "a", seed=2), source_model)
    assert version.version == 1
    assert registered_from[0].parent.parent == registry.tmp_dir
    assert list(registry.tmp_dir.iterdir()) == []
