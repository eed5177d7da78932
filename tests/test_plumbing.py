"""Shared plumbing in models/: durable files, flock locks, the background worker."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from models import files, locks
from models.background import BackgroundWorker


def test_file_sha256_and_hash_tree(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * (files.CHUNK + 3))
    (tmp_path / "sub" / "b.txt").write_bytes(b"hello")
    assert files.file_sha256(tmp_path / "a.bin") == hashlib.sha256(b"x" * (files.CHUNK + 3)).hexdigest()
    assert files.hash_tree(tmp_path) == {"a.bin": files.file_sha256(tmp_path / "a.bin"),
                                         "sub/b.txt": hashlib.sha256(b"hello").hexdigest()}


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "d" / "f.json"
    files.write_atomic(target, b"one")
    files.write_atomic(target, b"two")
    assert target.read_bytes() == b"two" and sorted(p.name for p in target.parent.iterdir()) == ["f.json"]


def test_write_durable_exclusive_refuses_overwrite(tmp_path: Path) -> None:
    files.write_durable(tmp_path / "f", b"1", exclusive=True)
    with pytest.raises(FileExistsError):
        files.write_durable(tmp_path / "f", b"2", exclusive=True)


def test_atomic_dir_replaces_on_success_and_keeps_old_on_error(tmp_path: Path) -> None:
    target = tmp_path / "art"
    with files.atomic_dir(target) as tmp:
        (tmp / "f").write_text("v1")
    with pytest.raises(RuntimeError), files.atomic_dir(target) as tmp:
        (tmp / "f").write_text("v2")
        raise RuntimeError("boom")
    assert (target / "f").read_text() == "v1" and [p.name for p in tmp_path.iterdir()] == ["art"]


def test_copy_tree_durable(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    (src / "x" / "f").write_text("data")
    files.copy_tree_durable(src, tmp_path / "dst")
    assert files.hash_tree(tmp_path / "dst") == files.hash_tree(src)
    with pytest.raises(FileExistsError):
        files.copy_tree_durable(src, tmp_path / "dst")


def test_ensure_dir_creates_parents(tmp_path: Path) -> None:
    files.ensure_dir(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()


# ------------------------------------------------------------------------------------------------ locks

_HOLD = "import sys, time; from models import locks; fd = locks.try_lock(sys.argv[1]); print(fd is not None, " \
        "flush=True); time.sleep(60)"


def _holder(path: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "True"
    return proc


def test_lock_is_exclusive_across_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    proc = _holder(path)
    try:
        assert locks.is_locked(path)
        assert locks.try_lock(path) is None
        with pytest.raises(locks.LockHeldError, match="x.lock is locked by another process"):
            locks.acquire(path, wait_s=0.1)
    finally:
        proc.kill()  # kill -9: the kernel drops the flock
        proc.wait()
    assert not locks.is_locked(path)
    fd = locks.try_lock(path)
    assert fd is not None and locks.is_locked(path)
    locks.release(fd)
    assert not locks.is_locked(path)


def test_is_locked_on_missing_file(tmp_path: Path) -> None:
    assert not locks.is_locked(tmp_path / "nope.lock")
    with pytest.raises(FileNotFoundError):
        locks.try_lock(tmp_path / "nope.lock", create=False)


def test_create_locked_holds_a_new_file_and_refuses_an_existing_one(tmp_path: Path) -> None:
    path = tmp_path / "s.lock"
    fd = locks.create_locked(path)
    assert fd is not None and locks.is_locked(path) and (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        locks.create_locked(path)
    locks.release(fd)
    assert not locks.is_locked(path)


def _unlink_first(path: Path, recreate: bool):
    """An flock that lets a sweeper win the race first: it unlinks (and maybe re-creates) `path`, then locks."""
    real = locks.fcntl.flock

    def flock(fd: int, op: int) -> None:
        path.unlink()
        if recreate:
            path.touch()
        real(fd, op)

    return flock


@pytest.mark.parametrize("recreate", [False, True], ids=["unlinked", "replaced"])
def test_create_locked_notices_a_sweeper_between_create_and_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recreate: bool
) -> None:
    path = tmp_path / "s.lock"
    open_fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(locks.fcntl, "flock", _unlink_first(path, recreate))
    assert locks.create_locked(path) is None
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == open_fds, "the descriptor of the lost file must be closed"
    assert path.exists() == recreate and not locks.is_locked(path)


def test_locked_serialises_threads(tmp_path: Path) -> None:
    path, guard, inside, overlap = tmp_path / "t.lock", threading.Lock(), [], []

    def work() -> None:
        with locks.locked(path, thread_lock=guard):
            inside.append(1)
            overlap.append(len(inside))
            time.sleep(0.01)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == [1] * 5


# ------------------------------------------------------------------------------------------- background


def test_worker_batches_and_flushes_in_order() -> None:
    seen: list[list[int]] = []
    w: BackgroundWorker[int] = BackgroundWorker("t", seen.append, max_batch=4, linger_s=0.05)
    assert w.submit_many(range(10)) == 10
    assert w.flush(5)
    assert [i for b in seen for i in b] == list(range(10)) and max(len(b) for b in seen) <= 4
    assert (w.submitted, w.handled, w.dropped, w.failed) == (10, 10, 0, 0)
    w.close()


def test_worker_drops_when_full_and_counts() -> None:
    gate = threading.Event()
    w: BackgroundWorker[int] = BackgroundWorker("t", lambda b: gate.wait(5), maxsize=2)
    w.submit(0)
    time.sleep(0.05)  # the thread now blocks on item 0; the queue holds 2 more at most
    assert [w.submit(i) for i in (1, 2, 3)] == [True, True, False]
    assert w.dropped == 1
    gate.set()
    assert w.flush(5) and w.handled == 3
    w.close()


def test_worker_survives_a_failing_batch() -> None:
    seen: list[int] = []

    def handle(batch: list[int]) -> None:
        if 2 in batch:
            raise ValueError("bad")
        seen.extend(batch)

    w: BackgroundWorker[int] = BackgroundWorker("t", handle)
    w.submit_many([1, 2, 3])
    assert w.flush(5)
    assert seen == [1, 3] and w.failed == 1 and w.handled == 2
    w.close()


def test_worker_close_handles_queued_then_refuses() -> None:
    seen: list[int] = []
    w: BackgroundWorker[int] = BackgroundWorker("t", seen.extend, max_batch=100)
    w.submit_many(range(50))
    assert w.close() is True  # the thread stopped after handling all 50
    assert seen == list(range(50)) and not w.submit(99) and not w.flush(0.1)
    assert w.close() is True  # idempotent


def test_worker_unfinished_counts_the_batch_in_hand_and_flush_bounds_its_whole_wait() -> None:
    gate, inside = threading.Event(), threading.Event()

    def handle(batch: list[int]) -> None:
        inside.set()
        gate.wait(5)

    w: BackgroundWorker[int] = BackgroundWorker("t", handle, maxsize=1)
    w.submit(0)
    assert inside.wait(5)
    w.submit(1)  # the queue is now full behind the stalled batch
    assert (w.pending, w.unfinished) == (1, 2)
    start = time.monotonic()
    assert not w.flush(0.2)  # the barrier cannot even be queued: the timeout covers that wait too
    assert time.monotonic() - start < 1.0
    assert not w.close(0.2)  # still stalled: close gives up and says so
    gate.set()
    deadline = time.monotonic() + 5
    while w.unfinished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (w.unfinished, w.handled) == (0, 2)


def test_worker_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="need maxsize >= 1"):
        BackgroundWorker("t", print, maxsize=0)
