"""Where artifact files are kept: a content-addressed store chosen by URL (a directory, or `s3://bucket/prefix`).

One interface, one implementation per kind of store (the way LoRAX's adapter sources are), both through fsspec:

- `LocalArtifactStore`: a directory (ADAPTSERVE_ARTIFACTS_URL unset: `$ADAPTSERVE_HOME/artifacts`).
- `S3ArtifactStore`: any S3-compatible store through s3fs; endpoint, credentials and region come from the standard
  AWS_* variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), nothing custom.

Invariants:
- An object's key is its sha256 (`sha256/<first two hex>/<digest>`), so an object never changes once stored and
  storing the same bytes twice is a no-op.
- An object is never visible half-written: it is uploaded to a temporary key, read back and verified (size and
  sha256), then moved or copied to its final key in one step.
- Nothing corrupt is served: every fetch hashes the bytes it hands out; a mismatch is an ArtifactError naming the
  digest, and the destination is left untouched.
- With a cache directory (each replica's own, for remote stores), a fetch reads the store once per digest; the
  cached copy is verified on every fetch, like the store's.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from typing import IO

import fsspec

from models import settings
from models.files import CHUNK, atomic_dir, ensure_dir, file_sha256, fsync_dir

_DIGEST = re.compile(r"[0-9a-f]{64}")
Manifest = dict[str, str]  # POSIX relative path -> sha256 of the file's bytes


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt or could not be stored; the message names its digest or path."""


def artifacts_url(config: settings.Settings | None = None) -> str:
    """ADAPTSERVE_ARTIFACTS_URL, else the directory `artifacts` under ADAPTSERVE_HOME."""
    config = config or settings.load()
    return config.artifacts_url or str(config.home.resolve() / "artifacts")


def open_store(url: str, cache_dir: Path | None = None) -> ArtifactStore:
    """The store a URL names: `s3://bucket/prefix`, or a directory (a path or `file://` URL)."""
    if url.startswith("s3://"):
        return S3ArtifactStore(url, cache_dir)
    if url.startswith("file://"):
        return LocalArtifactStore(Path(url[len("file://"):]), cache_dir)
    if "://" in url:
        raise ArtifactError(f"{settings.env_name('artifacts_url')}={url!r}: unsupported store; use a directory or "
                            "s3://BUCKET/PREFIX")
    return LocalArtifactStore(Path(url), cache_dir)


def from_settings(config: settings.Settings | None = None) -> ArtifactStore:
    """The store ADAPTSERVE_ARTIFACTS_URL names; a remote one caches under `$ADAPTSERVE_HOME/cache/artifacts`."""
    config = config or settings.load()
    url = artifacts_url(config)
    remote = "://" in url and not url.startswith("file://")
    return open_store(url, config.home.resolve() / "cache" / "artifacts" if remote else None)


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r} (64 lowercase hex characters)")
    return digest


def check_relpath(relpath: str) -> PurePosixPath:
    """A manifest path that stays inside the tree it is unpacked into."""
    parts = relpath.split("/")
    if "\\" in relpath or relpath.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"manifest path {relpath!r} is not a plain relative path inside the tree")
    return PurePosixPath(relpath)


def _digest_key(digest: str) -> str:
    return f"sha256/{digest[:2]}/{digest}"


class ArtifactStore(ABC):
    """put/get of immutable, content-addressed files; subclasses say how a verified upload becomes visible."""

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem, root: str, cache_dir: Path | None) -> None:
        self.url, self.fs, self.root = url, fs, root.rstrip("/")
        self.cache_dir = cache_dir

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def key(self, digest: str) -> str:
        """The fsspec path of an object."""
        return f"{self.root}/{_digest_key(check_digest(digest))}"

    def exists(self, digest: str) -> bool:
        return bool(self.fs.exists(self.key(digest)))

    # ------------------------------------------------------------------------------------------------------- put

    def put_file(self, path: str | Path) -> str:
        """Store a file's bytes; its sha256. A digest already stored is not uploaded again."""
        path = Path(path)
        digest = file_sha256(path)
        if self.exists(digest):
            return digest
        tmp = f"{self.root}/tmp/{uuid.uuid4().hex}"
        try:
            self._upload(path, tmp)
            actual = self._hash(tmp)
            if actual != digest:  # the file changed while it was read, or the upload was damaged
                raise ArtifactError(f"upload of {path} to {self.url} did not verify: the stored bytes hash to "
                                    f"sha256:{actual}, not sha256:{digest}; nothing was stored")
            self._publish(tmp, self.key(digest))
        finally:
            self._discard(tmp)
        return digest

    def put_tree(self, directory: str | Path) -> Manifest:
        """Store every regular file under `directory`; {relative POSIX path: sha256}, sorted. Refuses symlinks (a
        link could point anywhere on this machine)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactError(f"{directory} is not a directory")
        manifest: Manifest = {}
        for path in sorted(directory.rglob("*")):
            rel = path.relative_to(directory).as_posix()
            if path.is_symlink():
                raise ArtifactError(f"{directory}: {rel} is a symlink; only regular files are stored")
            if path.is_file():
                manifest[rel] = self.put_file(path)
        return manifest

    # ------------------------------------------------------------------------------------------------------- get

    def get_file(self, digest: str, dest: str | Path) -> Path:
        """Write the object's verified bytes to `dest` (atomically: a reader sees all of it or no file)."""
        check_digest(digest)
        dest = Path(dest)
        if self.cache_dir is None:
            self._fetch(digest, dest)
            return dest
        cached = self.cache_dir / _digest_key(digest)
        if not cached.exists():
            self._fetch(digest, cached)
        with open(cached, "rb") as src:
            actual = _copy_verified(src, dest, digest)
        if actual != digest:
            cached.unlink(missing_ok=True)
            raise ArtifactError(f"cached copy of artifact sha256:{digest} at {cached} is corrupt: its bytes hash to "
                                f"sha256:{actual}; removed it (the next fetch downloads it again)")
        return dest

    def get_tree(self, manifest: Manifest, dest: str | Path) -> Path:
        """Materialize a manifest as the directory `dest`, replacing it atomically once every file is verified."""
        paths = {check_relpath(rel): check_digest(digest) for rel, digest in manifest.items()}
        with atomic_dir(dest) as tmp:
            for rel, digest in sorted(paths.items()):
                target = tmp.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                self.get_file(digest, target)
        return Path(dest)

    def _fetch(self, digest: str, dest: Path) -> None:
        """The store's object, verified, to `dest`; a missing or corrupt object never reaches it."""
        try:
            src = self.fs.open(self.key(digest), "rb")
        except FileNotFoundError:
            raise ArtifactError(f"no artifact sha256:{digest} in {self.url}") from None
        with src:
            actual = _copy_verified(src, dest, digest)
        if actual != digest:
            raise ArtifactError(f"artifact sha256:{digest} in {self.url} is corrupt: its bytes hash to "
                                f"sha256:{actual}; not served")

    def _hash(self, key: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(key, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    # ---------------------------------------------------------------------------------------- per kind of store

    @abstractmethod
    def _upload(self, path: Path, tmp: str) -> None:
        """Copy a local file to the temporary key `tmp` (durably, where the store has such a thing)."""

    @abstractmethod
    def _publish(self, tmp: str, key: str) -> None:
        """Make the verified object at `tmp` visible at `key` in one step."""

    @abstractmethod
    def _discard(self, tmp: str) -> None:
        """Remove the temporary key if it is still there."""


def _copy_verified(src: IO[bytes], dest: Path, digest: str) -> str:
    """Stream `src` to `dest` through a temporary sibling, hashing as it goes; the sha256 of what was read.

    `dest` is replaced only when that sha256 is `digest`; otherwise the temporary file is removed."""
    ensure_dir(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() == digest:
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return h.hexdigest()


class LocalArtifactStore(ArtifactStore):
    """A directory: uploads are fsynced copies, published by rename (atomic on one filesystem) and made read-only."""

    def __init__(self, root: Path, cache_dir: Path | None = None) -> None:
        root = root.absolute()
        super().__init__(str(root), fsspec.filesystem("file"), str(root), cache_dir)

    def _upload(self, path: Path, tmp: str) -> None:
        ensure_dir(Path(tmp).parent)
        with open(path, "rb") as src, open(tmp, "xb") as out:
            shutil.copyfileobj(src, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())

    def _publish(self, tmp: str, key: str) -> None:
        os.chmod(tmp, 0o444)  # immutable by intent: a stray write fails instead of silently changing an object
        ensure_dir(Path(key).parent)
        os.replace(tmp, key)  # a concurrent put of the same digest renames identical bytes: harmless
        fsync_dir(Path(key).parent)

    def _discard(self, tmp: str) -> None:
        Path(tmp).unlink(missing_ok=True)


class S3ArtifactStore(ArtifactStore):
    """`s3://bucket/prefix` on any S3-compatible server, configured only by the standard AWS_* variables."""

    def __init__(self, url: str, cache_dir: Path | None = None) -> None:
        import s3fs  # heavy (aiobotocore, botocore): only for stores that need it

        bucket_prefix = url[len("s3://"):].strip("/")
        if not bucket_prefix:
            raise ArtifactError(f"{settings.env_name('artifacts_url')}={url!r} names no bucket: use "
                                "s3://BUCKET/PREFIX")
        # no instance or listings cache: another replica's put must be visible to exists() at once
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        super().__init__(f"s3://{bucket_prefix}", fs, bucket_prefix, cache_dir)

    def _upload(self, path: Path, tmp: str) -> None:
        self.fs.put_file(str(path), tmp)

    def _publish(self, tmp: str, key: str) -> None:
        self.fs.copy(tmp, key)  # server-side CopyObject: the final key appears whole or not at all

    def _discard(self, tmp: str) -> None:
        try:
            self.fs.rm(tmp)  # rm, not rm_file: s3fs implements only the former
        except FileNotFoundError:
            pass
