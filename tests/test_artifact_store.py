"""The content-addressed artifact store on both kinds of store: a local directory and a real S3-compatible server
(moto's, over HTTP on loopback): put, get through the cache, verification, corrupt objects, manifests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from models import settings
from models.artifact_store import (
    ArtifactError,
    ArtifactStore,
    LocalArtifactStore,
    S3ArtifactStore,
    from_settings,
    open_store,
)
from models.files import hash_tree

DATA = b"adapter weights " * 4096  # 64 KiB
SHA = hashlib.sha256(DATA).hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    url = str(tmp_path / "store") if request.param == "local" else str(request.getfixturevalue("s3_url"))
    yield open_store(url, cache_dir=tmp_path / "cache")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(DATA)
    return path


def _objects(store: ArtifactStore) -> list[str]:
    """Every key under the store's root (temporary keys included)."""
    return sorted(store.fs.find(store.root))


def _overwrite(store: ArtifactStore, digest: str, data: bytes) -> None:
    """Damage a stored object behind the store's back (bit rot, a bad copy, a hand edit)."""
    if isinstance(store, LocalArtifactStore):
        os.chmod(store.key(digest), 0o644)
    store.fs.pipe_file(store.key(digest), data)


def test_put_file_stores_the_bytes_under_their_sha256(store: ArtifactStore, source: Path) -> None:
    assert not store.exists(SHA)
    assert store.put_file(source) == SHA
    assert store.key(SHA) == f"{store.root}/sha256/{SHA[:2]}/{SHA}"
    assert store.exists(SHA) and _objects(store) == [store.key(SHA)]  # no temporary key is left behind
    assert store.fs.cat_file(store.key(SHA)) == DATA


def test_putting_a_stored_digest_again_uploads_nothing(store: ArtifactStore, source: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store.put_file(source)

    def no_upload(path: Path, tmp: str) -> None:
        raise AssertionError("uploaded a digest the store already holds")

    monkeypatch.setattr(store, "_upload", no_upload)
    assert store.put_file(source) == SHA


def test_an_upload_that_does_not_verify_is_never_visible(store: ArtifactStore, source: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    upload, half = store._upload, tmp_path / "half"
    half.write_bytes(DATA[: len(DATA) // 2])
    monkeypatch.setattr(store, "_upload", lambda path, tmp: upload(half, tmp))  # the connection dropped half-way
    with pytest.raises(ArtifactError) as err:
        store.put_file(source)
    assert str(err.value) == (f"upload of {source} to {store.url} did not verify: the stored bytes hash to "
                              f"sha256:{_sha(DATA[: len(DATA) // 2])}, not sha256:{SHA}; nothing was stored")
    assert not store.exists(SHA) and _objects(store) == []


def test_get_file_through_the_cache_reads_the_store_once(store: ArtifactStore, source: Path, tmp_path: Path) -> None:
    store.put_file(source)
    assert store.get_file(SHA, tmp_path / "a" / "weights").read_bytes() == DATA
    assert store.cache_dir is not None
    assert (store.cache_dir / "sha256" / SHA[:2] / SHA).read_bytes() == DATA
    store.fs.rm(store.key(SHA))  # a second fetch that went to the store would now fail
    assert store.get_file(SHA, tmp_path / "b").read_bytes() == DATA


def test_without_a_cache_every_fetch_reads_the_store(store: ArtifactStore, source: Path, tmp_path: Path) -> None:
    direct = open_store(store.url, cache_dir=None)
    direct.put_file(source)
    assert direct.get_file(SHA, tmp_path / "a").read_bytes() == DATA
    direct.fs.rm(direct.key(SHA))
    with pytest.raises(ArtifactError) as err:
        direct.get_file(SHA, tmp_path / "b")
    assert str(err.value) == f"no artifact sha256:{SHA} in {store.url}"
    assert not (tmp_path / "b").exists()


def test_a_corrupt_stored_object_is_never_served(store: ArtifactStore, source: Path, tmp_path: Path) -> None:
    store.put_file(source)
    _overwrite(store, SHA, b"not the weights")
    with pytest.raises(ArtifactError) as err:
        store.get_file(SHA, tmp_path / "dest")
    assert str(err.value) == (f"artifact sha256:{SHA} in {store.url} is corrupt: its bytes hash to "
                              f"sha256:{_sha(b'not the weights')}; not served")
    assert not (tmp_path / "dest").exists()
    assert store.cache_dir is not None and list(store.cache_dir.rglob("*" + SHA + "*")) == []


def test_a_corrupt_cached_copy_is_refused_then_fetched_again(store: ArtifactStore, source: Path,
                                                             tmp_path: Path) -> None:
    store.put_file(source)
    store.get_file(SHA, tmp_path / "first")
    assert store.cache_dir is not None
    cached = store.cache_dir / "sha256" / SHA[:2] / SHA
    cached.write_bytes(b"bit rot")
    (tmp_path / "dest").write_bytes(b"the previous version")
    with pytest.raises(ArtifactError) as err:
        store.get_file(SHA, tmp_path / "dest")
    assert str(err.value) == (f"cached copy of artifact sha256:{SHA} at {cached} is corrupt: its bytes hash to "
                              f"sha256:{_sha(b'bit rot')}; removed it (the next fetch downloads it again)")
    assert (tmp_path / "dest").read_bytes() == b"the previous version" and not cached.exists()
    assert store.get_file(SHA, tmp_path / "dest").read_bytes() == DATA


def _tree(root: Path) -> Path:
    (root / "onnx").mkdir(parents=True)
    (root / "adapter_config.json").write_text('{"r": 8}')
    (root / "adapter_model.safetensors").write_bytes(DATA)
    (root / "onnx" / "model.onnx").write_bytes(b"onnx bytes")
    (root / "onnx" / "copy.safetensors").write_bytes(DATA)  # same bytes as another file: one object
    return root


def test_put_tree_and_get_tree_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    manifest = store.put_tree(src)
    assert manifest == hash_tree(src) and list(manifest) == sorted(manifest)
    assert _objects(store) == sorted(store.key(d) for d in set(manifest.values()))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "stale.txt").write_text("from an older version")
    assert store.get_tree(manifest, dest) == dest
    assert hash_tree(dest) == manifest  # replaced as a whole: the stale file is gone


def test_get_tree_with_a_missing_object_leaves_the_destination_alone(store: ArtifactStore, tmp_path: Path) -> None:
    manifest = store.put_tree(_tree(tmp_path / "src")) | {"extra.bin": "0" * 64}
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "kept.txt").write_text("still here")
    with pytest.raises(ArtifactError, match=f"^no artifact sha256:{'0' * 64} in "):
        store.get_tree(manifest, dest)
    assert hash_tree(dest) == {"kept.txt": _sha(b"still here")}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []


@pytest.mark.parametrize("relpath", ["../escape", "/etc/passwd", "a/../../b", "", "a\\b", "./a", "a//b"],
                         ids=["parent", "absolute", "climb", "empty", "backslash", "dot", "empty-part"])
def test_get_tree_refuses_paths_outside_the_tree(relpath: str, tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    with pytest.raises(ValueError) as err:
        store.get_tree({relpath: SHA}, tmp_path / "dest")
    assert str(err.value) == f"manifest path {relpath!r} is not a plain relative path inside the tree"
    assert not (tmp_path / "dest").exists()


def test_put_tree_refuses_symlinks(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    (src / "onnx" / "secrets").symlink_to("/etc/passwd")
    with pytest.raises(ArtifactError) as err:
        open_store(str(tmp_path / "store")).put_tree(src)
    assert str(err.value) == f"{src}: onnx/secrets is a symlink; only regular files are stored"


@pytest.mark.parametrize("digest", ["abc", SHA.upper(), SHA + "0", "g" * 64], ids=["short", "upper", "long", "hex"])
def test_digests_are_checked(digest: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        open_store(str(tmp_path / "store")).get_file(digest, tmp_path / "dest")
    assert str(err.value) == f"not a sha256 digest: {digest!r} (64 lowercase hex characters)"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("gs://bucket/prefix", "ADAPTSERVE_ARTIFACTS_URL='gs://bucket/prefix': unsupported store; use a directory or "
         "s3://BUCKET/PREFIX"),
        ("s3://", "ADAPTSERVE_ARTIFACTS_URL='s3://' names no bucket: use s3://BUCKET/PREFIX"),
    ],
    ids=["scheme", "no-bucket"],
)
def test_bad_store_urls_name_the_setting(url: str, message: str) -> None:
    with pytest.raises(ArtifactError) as err:
        open_store(url)
    assert str(err.value) == message


def test_the_store_is_chosen_by_url(tmp_path: Path) -> None:
    local = from_settings(settings.load({"ADAPTSERVE_HOME": str(tmp_path / "home")}))
    assert isinstance(local, LocalArtifactStore) and local.cache_dir is None  # a local store needs no cache
    assert local.url == str((tmp_path / "home" / "artifacts").resolve())
    assert open_store(f"file://{tmp_path}/store").url == str(tmp_path / "store")
    remote = from_settings(settings.load({"ADAPTSERVE_HOME": str(tmp_path / "home"),
                                          "ADAPTSERVE_ARTIFACTS_URL": "s3://models/adaptserve/"}))
    assert isinstance(remote, S3ArtifactStore) and (remote.url, remote.root) == ("s3://models/adaptserve",
                                                                                  "models/adaptserve")
    assert remote.cache_dir == (tmp_path / "home").resolve() / "cache" / "artifacts"
