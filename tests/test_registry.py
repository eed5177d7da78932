"""Tests for models.registry: names, versions, champions, validation, integrity, cross-process visibility
and crash consistency (a child process SIGKILLs itself at each registry phase), on SQLite and PostgreSQL (`db_url`)
and, where the files matter, on a local artifact directory and S3 (`artifacts`). Two homes sharing one database and
store, and the legacy registry.db import: tests/test_registry_db.py, tests/test_registry_legacy.py."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest
from test_registry_legacy import LEGACY_CRASH_PHASES

from models.registry import (
    CRASH_ENV,
    CRASH_PHASES,
    AdapterInfo,
    AdapterNotFoundError,
    AdapterRegistry,
    AdapterVersion,
    ChampionDeleteError,
    CorruptAdapterError,
    InvalidAdapterError,
    InvalidNameError,
    Registry,
    RegistryError,
    RollbackError,
    UnsupportedBackendError,
    open_registry,
)
from models.staging import staging_dir

HELPER = Path(__file__).with_name("registry_crash_helper.py")
CONFIG = {"peft_type": "LORA", "r": 4}
METADATA = {"backbone": "resnet18", "classes": ["0", "1"], "metrics": {"accuracy": 0.9}}
REQUIRED = ("adapter_config.json", "adapter_model.safetensors", "metadata.json")
NAME_MESSAGE = (
    "invalid adapter name {!r}: must match ^[a-z0-9][a-z0-9_-]{{0,63}}$ "
    "(lowercase letters, digits, '_' and '-', starting with a letter or digit, at most 64 characters)"
)

MakeAdapter = Callable[..., Path]


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def safetensors_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Built once per session: importing torch costs seconds on the shared CI box."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "adapter_model.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(path))
    return path.read_bytes()


@pytest.fixture
def make_adapter(tmp_path: Path, safetensors_bytes: bytes) -> MakeAdapter:
    """Factory for PEFT-style source dirs; ``overrides`` maps file name to bytes/str, or None to leave it out."""
    counter = itertools.count()

    def make(metadata: dict[str, Any] | None = None, **overrides: bytes | str | None) -> Path:
        src = tmp_path / f"src{next(counter)}"
        src.mkdir()
        files: dict[str, bytes | str | None] = {
            "adapter_config.json": json.dumps(CONFIG),
            "adapter_model.safetensors": safetensors_bytes,
            "metadata.json": json.dumps(metadata if metadata is not None else METADATA),
        }
        files.update({k.replace("__", "."): v for k, v in overrides.items()})
        for fname, content in files.items():
            if content is not None:
                data = content.encode() if isinstance(content, str) else content
                (src / fname).write_bytes(data)
        return src

    return make


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def registry(home: Path, backend: str, request: pytest.FixtureRequest) -> Registry:
    if "artifacts" in request.fixturenames:  # the store is chosen before the registry opens it
        request.getfixturevalue("artifacts")
    return Registry(home)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def version_dirs(home: Path, name: str) -> set[int]:
    root = home / "adapters" / name
    return {int(p.name) for p in root.iterdir()} if root.is_dir() else set()


def versions_of(reg: AdapterRegistry, name: str) -> list[int]:
    return [v.version for info in reg.list_adapters() if info.name == name for v in info.versions]


# --------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a", "0", "cam-1", "site_a", "customer-42_b", "a" * 64], ids=str)
def test_valid_names_are_accepted(registry: Registry, make_adapter: MakeAdapter, name: str) -> None:
    record = registry.register(name, make_adapter())
    assert (record.name, record.version) == (name, 1)
    assert record.path == registry.home / "adapters" / name / "1"
    assert registry.get(name, 1) == record


BAD_NAMES = [
    pytest.param("", id="empty"),
    pytest.param("Cam", id="uppercase"),
    pytest.param("-cam", id="leading-dash"),
    pytest.param("_cam", id="leading-underscore"),
    pytest.param("a" * 65, id="65-chars"),
    pytest.param("cam 1", id="space"),
    pytest.param("cam.1", id="dot"),
    pytest.param("cam/1", id="slash"),
    pytest.param("../etc", id="traversal"),
    pytest.param("cam\n", id="trailing-newline"),
    pytest.param("café", id="non-ascii"),
    pytest.param(None, id="not-a-string"),
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_refused_with_exact_message(
    registry: Registry, make_adapter: MakeAdapter, name: Any
) -> None:
    with pytest.raises(InvalidNameError) as exc:
        registry.register(name, make_adapter())
    assert str(exc.value) == NAME_MESSAGE.format(name)
    assert isinstance(exc.value, ValueError)
    assert registry.list_adapters() == []
    assert registry.generation() == 0


@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(lambda r: r.get("../x", 1), id="get"),
        pytest.param(lambda r: r.promote("../x", 1), id="promote"),
        pytest.param(lambda r: r.rollback("../x"), id="rollback"),
        pytest.param(lambda r: r.champion("../x"), id="champion"),
        pytest.param(lambda r: r.delete("../x", 1), id="delete"),
        pytest.param(lambda r: r.path("../x", 1), id="path"),
        pytest.param(lambda r: r.verify("../x", 1), id="verify"),
        pytest.param(lambda r: r.history("../x"), id="history"),
    ],
)
def test_every_operation_validates_the_name(registry: Registry, operation: Callable[[Any], Any]) -> None:
    with pytest.raises(InvalidNameError, match=r"^invalid adapter name '\.\./x'"):
        operation(registry)


# --------------------------------------------------------------------------------------------- register / read


def test_register_assigns_versions_and_copies_files(
    registry: Registry, make_adapter: MakeAdapter, artifacts: str
) -> None:
    src = make_adapter(README__md="notes")
    first = registry.register("cam", src)
    second = registry.register("cam", make_adapter())
    assert [first.version, second.version] == [1, 2]
    assert sorted(first.sha256) == ["README.md", *REQUIRED]
    for fname, digest in first.sha256.items():
        assert (first.path / fname).read_bytes() == (src / fname).read_bytes()
        assert digest == sha256(src / fname)
        assert registry.store.exists(digest), f"{fname} is in the artifact store"
    assert registry.store.url == (str(registry.home / "artifacts") if artifacts == "dir" else artifacts)
    assert list(registry.tmp_dir.iterdir()) == [], "the staged dir became the local copy"
    assert first.metadata == METADATA and first.is_champion is False
    assert registry.list_adapters() == [AdapterInfo("cam", None, [registry.get("cam", 1), registry.get("cam", 2)])]
    assert registry.champion("cam") is None
    assert registry.path("cam", 2) == second.path == registry.home / "adapters" / "cam" / "2"


def test_metadata_argument_is_merged_over_metadata_json(registry: Registry, make_adapter: MakeAdapter) -> None:
    extra = {"metrics": {"accuracy": 0.95, "f1": 0.9}, "parent": "cam/1", "data_fingerprint": "abc"}
    record = registry.register("cam", make_adapter(), metadata=extra)
    expected = {**METADATA, **extra}
    assert record.metadata == expected
    assert json.loads((record.path / "metadata.json").read_text()) == expected
    [info] = registry.list_adapters()
    assert info.versions[0].metadata["metrics"] == {"accuracy": 0.95, "f1": 0.9}
    assert registry.verify("cam", 1) == record


def test_records_are_frozen(registry: Registry, make_adapter: MakeAdapter) -> None:
    record = registry.register("cam", make_adapter())
    with pytest.raises(FrozenInstanceError):
        record.version = 2  # type: ignore[misc]
    assert isinstance(record, AdapterVersion)


NOT_FOUND_CASES = [
    pytest.param(lambda r: r.get("nope", 1), "adapter 'nope' not found; existing adapters: ['cam']", id="name"),
    pytest.param(lambda r: r.get("cam", 7), "adapter 'cam' has no version 7; existing versions: [1, 2]", id="version"),
    pytest.param(lambda r: r.path("cam", 0), "adapter 'cam' has no version 0; existing versions: [1, 2]", id="path"),
    pytest.param(
        lambda r: r.promote("cam", 3), "adapter 'cam' has no version 3; existing versions: [1, 2]", id="promote"
    ),
    pytest.param(lambda r: r.champion("nope"), "adapter 'nope' not found; existing adapters: ['cam']", id="champion"),
]


@pytest.mark.parametrize(("operation", "message"), NOT_FOUND_CASES)
def test_not_found_errors_name_what_is_missing_and_what_exists(
    registry: Registry, make_adapter: MakeAdapter, operation: Callable[[Any], Any], message: str
) -> None:
    registry.register("cam", make_adapter())
    registry.register("cam", make_adapter())
    with pytest.raises(AdapterNotFoundError) as exc:
        operation(registry)
    assert str(exc.value) == message
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, RegistryError)


def test_version_must_be_an_int(registry: Registry, make_adapter: MakeAdapter) -> None:
    registry.register("cam", make_adapter())
    with pytest.raises(TypeError, match="adapter version must be an int, got '1'"):
        registry.get("cam", "1")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- register refusals


def _refusal_cases() -> list[Any]:
    missing = [
        pytest.param(
            {f.replace(".", "__"): None},
            f"is missing required file {f!r} (needs adapter_config.json, adapter_model.safetensors, metadata.json)",
            id=f"missing-{f}",
        )
        for f in REQUIRED
    ]
    return [
        *missing,
        pytest.param({"metadata__json": "{not json"}, "metadata.json is not valid JSON: ", id="bad-json-metadata"),
        pytest.param(
            {"adapter_config__json": '{"r": 4'}, "adapter_config.json is not valid JSON: ", id="bad-json-config"
        ),
        pytest.param({"metadata__json": b"\xff\xfe"}, "metadata.json is not valid JSON: ", id="metadata-not-utf8"),
        pytest.param(
            {"metadata__json": "[1, 2]"}, "metadata.json must contain a JSON object, got list", id="metadata-list"
        ),
        pytest.param(
            {"adapter_model__safetensors": b"\x00" * 16},
            "adapter_model.safetensors is not a valid safetensors file: ",
            id="bad-safetensors",
        ),
    ]


@pytest.mark.parametrize(("overrides", "message"), _refusal_cases())
def test_register_refuses_incomplete_or_unparseable_dirs(
    registry: Registry, make_adapter: MakeAdapter, overrides: dict[str, Any], message: str
) -> None:
    src = make_adapter(**overrides)
    with pytest.raises(InvalidAdapterError) as exc:
        registry.register("cam", src)
    text = str(exc.value)
    assert text.startswith(f"adapter directory {src} ") or text.startswith(f"{src}/"), text
    assert message in text
    assert registry.list_adapters() == [] and registry.generation() == 0
    assert list(registry.tmp_dir.iterdir()) == [], "staging dir left behind after a refused register"
    assert not (registry.home / "adapters" / "cam").exists()


def test_register_refuses_a_missing_directory(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapterError) as exc:
        registry.register("cam", tmp_path / "nowhere")
    assert str(exc.value) == f"adapter directory {tmp_path / 'nowhere'} does not exist or is not a directory"


def test_register_refuses_unserializable_metadata(registry: Registry, make_adapter: MakeAdapter) -> None:
    with pytest.raises(InvalidAdapterError, match="^metadata argument is not JSON-serializable"):
        registry.register("cam", make_adapter(), metadata={"when": object()})
    assert registry.list_adapters() == []


# --------------------------------------------------------------------------------------------- champions


def _steps(*tokens: str) -> list[tuple[str, int | None]]:
    """'p2' = promote(2), 'd2' = delete(2), 'rb' = rollback()."""
    return [("rollback", None) if t == "rb" else ({"p": "promote", "d": "delete"}[t[0]], int(t[1:])) for t in tokens]


def _apply(registry: AdapterRegistry, step: tuple[str, int | None]) -> None:
    op, version = step
    if op == "rollback":
        registry.rollback("cam")
    else:
        getattr(registry, op)("cam", version)


CHAMPION_SCENARIOS = [
    pytest.param(_steps("p1"), [1], id="promote"),
    pytest.param(_steps("p1", "p2", "rb"), [1, 2, 1], id="rollback"),
    pytest.param(_steps("p1", "p2", "p3", "rb", "rb"), [1, 2, 3, 2, 1], id="rollbacks-walk-back"),
    pytest.param(_steps("p1", "p2", "p1", "rb", "rb"), [1, 2, 1, 2, 1], id="repromote-older"),
    pytest.param(_steps("p1", "p2", "rb", "p3", "rb"), [1, 2, 1, 3, 1], id="promote-after-rollback"),
    pytest.param(_steps("p1", "p1", "p2", "rb"), [1, 1, 2, 1], id="repromote-champion-is-noop"),
    pytest.param(_steps("p1", "p2", "p3", "d2", "rb"), [1, 2, 3, 3, 1], id="rollback-skips-deleted"),
]


@pytest.mark.parametrize(("steps", "champions"), CHAMPION_SCENARIOS)
def test_promote_and_rollback_follow_history(
    registry: Registry, make_adapter: MakeAdapter, steps: list[tuple[str, int | None]], champions: list[int]
) -> None:
    for _ in range(3):
        registry.register("cam", make_adapter())
    for step, expected in zip(steps, champions, strict=True):
        _apply(registry, step)
        champion = registry.champion("cam")
        assert champion is not None and champion.version == expected, (step, champion)
        [info] = registry.list_adapters()
        assert info.champion == expected
        assert [v.version for v in info.versions if v.is_champion] == [expected]


ROLLBACK_ERRORS = [
    pytest.param([], "cannot roll back adapter 'cam': it has no champion", id="no-champion"),
    pytest.param(_steps("p1"), "no earlier champion before version 1 in its history", id="single-promotion"),
    pytest.param(_steps("p1", "p2", "rb"), "no earlier champion before version 1 in its history", id="exhausted"),
    pytest.param(_steps("p1", "p2", "d1"), "no earlier champion before version 2 in its history", id="only-deleted"),
]


@pytest.mark.parametrize(("steps", "message"), ROLLBACK_ERRORS)
def test_rollback_without_earlier_champion_fails_and_changes_nothing(
    registry: Registry, make_adapter: MakeAdapter, steps: list[tuple[str, int | None]], message: str
) -> None:
    for _ in range(2):
        registry.register("cam", make_adapter())
    for step in steps:
        _apply(registry, step)
    before = (registry.champion("cam"), registry.generation(), registry.history("cam"))
    with pytest.raises(RollbackError) as exc:
        registry.rollback("cam")
    assert message in str(exc.value)
    assert (registry.champion("cam"), registry.generation(), registry.history("cam")) == before


def test_history_records_promotions_and_rollbacks(registry: Registry, make_adapter: MakeAdapter) -> None:
    for _ in range(2):
        registry.register("cam", make_adapter())
    registry.promote("cam", 1)
    registry.promote("cam", 2)
    assert registry.rollback("cam").version == 1
    history = [(h.version, h.previous, h.action) for h in registry.history("cam")]
    assert history == [(1, None, "promote"), (2, 1, "promote"), (1, 2, "rollback")]


# --------------------------------------------------------------------------------------------- delete


def test_delete_refuses_the_champion(registry: Registry, make_adapter: MakeAdapter) -> None:
    registry.register("cam", make_adapter())
    registry.promote("cam", 1)
    with pytest.raises(ChampionDeleteError) as exc:
        registry.delete("cam", 1)
    assert str(exc.value) == (
        "cannot delete adapter 'cam' version 1: it is the current champion; "
        "promote another version (or roll back) first"
    )
    assert registry.verify("cam", 1).is_champion
    assert versions_of(registry, "cam") == [1]


@pytest.mark.parametrize(
    ("deleted", "remaining"),
    [([1], [2, 3]), ([3], [1, 2]), ([1, 2, 3], [])],
    ids=["oldest", "latest", "all"],
)
def test_delete_removes_version_and_numbers_are_never_reused(
    registry: Registry, make_adapter: MakeAdapter, deleted: list[int], remaining: list[int]
) -> None:
    for _ in range(3):
        registry.register("cam", make_adapter())
    for version in deleted:
        registry.delete("cam", version)
        with pytest.raises(AdapterNotFoundError):
            registry.get("cam", version)
    assert versions_of(registry, "cam") == remaining
    assert version_dirs(registry.home, "cam") == set(remaining)
    assert registry.register("cam", make_adapter()).version == 4


# --------------------------------------------------------------------------------------------- integrity


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = [
    pytest.param("adapter_model.safetensors", _flip_last_byte, id="flip-byte-weights"),
    pytest.param("adapter_model.safetensors", lambda p: p.write_bytes(p.read_bytes() + b"x"), id="append-weights"),
    pytest.param("adapter_config.json", lambda p: p.write_text('{"peft_type": "LORA", "r": 8}'), id="edit-config"),
    pytest.param("metadata.json", Path.unlink, id="delete-metadata"),
]


@pytest.mark.parametrize(("fname", "corrupt"), CORRUPTIONS)
def test_verify_detects_corruption(
    registry: Registry, make_adapter: MakeAdapter, fname: str, corrupt: Callable[[Path], Any], artifacts: str
) -> None:
    record = registry.register("cam", make_adapter())
    registry.register("cam", make_adapter())
    assert registry.verify("cam", 1) == record
    corrupt(record.path / fname)
    actual = sha256(record.path / fname) if (record.path / fname).exists() else "<missing>"
    for check in (registry.verify, registry.load_check):
        with pytest.raises(CorruptAdapterError) as exc:
            check("cam", 1)
        assert type(exc.value) is CorruptAdapterError
        assert str(exc.value) == (
            f"adapter 'cam' version 1 is corrupt: "
            f"file {fname!r}: expected sha256 {record.sha256[fname]}, actual {actual}"
        )
    assert registry.verify("cam", 2).version == 2, "corruption of v1 must not taint v2"
    shutil.rmtree(record.path)  # the repair: without a local copy, the next verify fetches the store's
    assert registry.verify("cam", 1) == record
    assert (record.path / "adapter_config.json").read_text() == json.dumps(CONFIG)


# --------------------------------------------------------------------------------------------- generation


def _gen_case(op: Callable[[Registry, MakeAdapter], Any], delta: int, error: type | None, case_id: str) -> Any:
    return pytest.param(op, delta, error, id=case_id)


GENERATION_CASES = [
    _gen_case(lambda r, m: r.register("cam", m()), 1, None, "register"),
    _gen_case(lambda r, m: r.register("other", m()), 1, None, "register-new-name"),
    _gen_case(lambda r, m: r.promote("cam", 3), 1, None, "promote"),
    _gen_case(lambda r, m: r.rollback("cam"), 1, None, "rollback"),
    _gen_case(lambda r, m: r.delete("cam", 3), 1, None, "delete"),
    _gen_case(lambda r, m: r.promote("cam", 2), 0, None, "repromote-champion"),
    _gen_case(lambda r, m: r.delete("cam", 2), 0, ChampionDeleteError, "refused-delete"),
    _gen_case(lambda r, m: r.promote("cam", 9), 0, AdapterNotFoundError, "refused-promote"),
    _gen_case(lambda r, m: r.register("cam", m(metadata__json="[")), 0, InvalidAdapterError, "refused-register"),
    _gen_case(
        lambda r, m: (r.list_adapters(), r.get("cam", 1), r.verify("cam", 1), r.history("cam")), 0, None, "reads"
    ),
]


@pytest.mark.parametrize(("operation", "delta", "error"), GENERATION_CASES)
def test_generation_bumps_once_per_change(
    registry: Registry,
    make_adapter: MakeAdapter,
    operation: Callable[[Registry, MakeAdapter], Any],
    delta: int,
    error: type[Exception] | None,
) -> None:
    for _ in range(3):
        registry.register("cam", make_adapter())
    registry.promote("cam", 1)
    registry.promote("cam", 2)
    before = registry.generation()
    assert before == 5
    if error is None:
        operation(registry, make_adapter)
    else:
        with pytest.raises(error):
            operation(registry, make_adapter)
    assert registry.generation() == before + delta
    assert Registry(registry.home).generation() == before + delta, "generation must persist across opens"


# --------------------------------------------------------------------------------------------- multi-process / threads


def test_two_registries_on_one_home_see_each_others_changes(
    home: Path, make_adapter: MakeAdapter, backend: str, artifacts: str
) -> None:
    first, second = Registry(home), open_registry(f"sqlite:///{home}")
    first.register("cam", make_adapter())
    first.register("cam", make_adapter())
    second.promote("cam", 2)
    champion = first.champion("cam")
    assert champion is not None and champion.version == 2
    assert first.generation() == second.generation() == 3
    first.promote("cam", 1)
    assert second.rollback("cam").version == 2
    assert [h.action for h in first.history("cam")] == ["promote", "promote", "rollback"]
    second.delete("cam", 1)
    assert versions_of(first, "cam") == [2]


def test_concurrent_registers_get_distinct_versions(home: Path, make_adapter: MakeAdapter, backend: str) -> None:
    sources = [make_adapter(metadata={**METADATA, "i": i}) for i in range(6)]
    registries = [Registry(home), Registry(home)]
    results: list[AdapterVersion] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results.append(registries[i % 2].register("cam", sources[i]))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(r.version for r in results) == [1, 2, 3, 4, 5, 6]
    for r in results:
        assert registries[0].verify("cam", r.version).metadata == r.metadata


# --------------------------------------------------------------------------------------------- crash consistency


def _run_helper(home: Path, *args: str, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    cmd = [sys.executable, str(HELPER), str(home), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def seeded(registry: Registry, make_adapter: MakeAdapter) -> Registry:
    """Versions 1-3 of 'cam', champion 2 (promoted after 1): every crash below must leave exactly this state."""
    for _ in range(3):
        registry.register("cam", make_adapter())
    registry.promote("cam", 1)
    registry.promote("cam", 2)
    return registry


REGISTER = ["register", "cam", "SRC"]
# (phase, helper args, glob proving the kill hit mid-operation, versions after reopen, generation delta)
CRASH_CASES = [
    pytest.param("after_stage", REGISTER, "tmp/*/adapter_model.safetensors", [1, 2, 3], 0, id="after_stage"),
    pytest.param("after_upload", REGISTER, "tmp/*/metadata.json", [1, 2, 3], 0, id="after_upload"),
    pytest.param("before_commit", REGISTER, "tmp/*/metadata.json", [1, 2, 3], 0, id="before_commit"),
    pytest.param("after_commit", REGISTER, "tmp/*/metadata.json", [1, 2, 3, 4], 1, id="after_commit"),
    pytest.param("promote_before_commit", ["promote", "cam", "3"], None, [1, 2, 3], 0, id="promote_before_commit"),
    pytest.param("rollback_before_commit", ["rollback", "cam"], None, [1, 2, 3], 0, id="rollback_before_commit"),
    pytest.param("delete_before_commit", ["delete", "cam", "3"], None, [1, 2, 3], 0, id="delete_before_commit"),
    pytest.param(
        "delete_after_commit", ["delete", "cam", "3"], "adapters/cam/3/metadata.json", [1, 2], 1,
        id="delete_after_commit",
    ),
]


def test_crash_cases_cover_every_crash_phase() -> None:
    """The legacy import's phases are covered by tests/test_registry_legacy.py."""
    assert {case.values[0] for case in CRASH_CASES} | set(LEGACY_CRASH_PHASES) == set(CRASH_PHASES)


@pytest.mark.parametrize(("phase", "args", "mid_state", "versions", "gen_delta"), CRASH_CASES)
def test_sigkill_mid_operation_leaves_registry_consistent(
    seeded: Registry,
    make_adapter: MakeAdapter,
    artifacts: str,
    phase: str,
    args: list[str],
    mid_state: str | None,
    versions: list[int],
    gen_delta: int,
) -> None:
    home, before_gen, before_history = seeded.home, seeded.generation(), seeded.history("cam")
    src = make_adapter(metadata={**METADATA, "crash": phase})  # a metadata.json no earlier version has
    new_object = sha256(src / "metadata.json")
    proc = _run_helper(home, *[str(src) if a == "SRC" else a for a in args], crash_at=phase)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == ""
    if mid_state is not None:
        assert list(home.glob(mid_state)), f"kill at {phase} should have left {mid_state} for recovery"
    assert not (home / "adapters" / "cam" / "4").exists(), "no local copy before the row commits"

    reopened = Registry(home)
    assert versions_of(reopened, "cam") == versions
    assert list(reopened.tmp_dir.iterdir()) == [], "staging leftovers must be swept on open"
    champion = reopened.champion("cam")
    assert champion is not None and champion.version == 2
    assert reopened.history("cam") == before_history
    assert reopened.generation() == before_gen + gen_delta
    if args == REGISTER:  # every object is in the store before the row can commit
        assert reopened.store.exists(new_object) is (phase != "after_stage")
    for version in versions:  # a committed version whose copy the kill kept from this home is fetched here
        reopened.verify("cam", version)
    assert version_dirs(home, "cam") == set(versions), "orphan artifact dirs must be swept on open"
    expected = max(versions) + 1 if phase == "after_commit" else 4  # a number is never reused
    assert reopened.register("cam", make_adapter()).version == expected, "registry must stay usable after the crash"


def test_helper_without_crash_completes(seeded: Registry, make_adapter: MakeAdapter) -> None:
    """Control for the crash tests: the same child, unkilled, really performs the operation."""
    proc = _run_helper(seeded.home, "register", "cam", str(make_adapter()))
    assert (proc.returncode, proc.stdout.strip()) == (0, "4"), proc.stderr
    proc = _run_helper(seeded.home, "promote", "cam", "4")
    assert proc.returncode == 0, proc.stderr
    assert seeded.verify("cam", 4).is_champion


def test_open_sweeps_dead_staging_but_not_live_staging(home: Path, registry: Registry) -> None:
    """A serving worker opening the registry must not delete a staging dir another process is still filling."""
    registry.tmp_dir.mkdir(parents=True, exist_ok=True)
    (registry.tmp_dir / "dead-no-lock").mkdir()
    (registry.tmp_dir / "dead-unheld.lock").touch()
    (registry.tmp_dir / "dead-unheld").mkdir()
    orphan = home / "adapters" / "cam" / "7"
    orphan.mkdir(parents=True)
    dead_fetch = home / "adapters" / "cam" / ".8.tmp-k1ll3d"  # models.files.atomic_dir's name for a fetch
    dead_fetch.mkdir()
    with staging_dir(registry.tmp_dir) as live:
        (live / "partial").write_bytes(b"x")
        Registry(home)
        assert (live / "partial").exists()
        assert sorted(p.name for p in registry.tmp_dir.iterdir()) == sorted([live.name, f"{live.name}.lock"])
        assert not orphan.exists() and not dead_fetch.exists()
    assert list(registry.tmp_dir.iterdir()) == []


# --------------------------------------------------------------------------------------------- factory


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(lambda tmp: str(tmp / "h"), "h", id="str-path"),
        pytest.param(lambda tmp: tmp / "h", "h", id="pathlib"),
        pytest.param(lambda tmp: f"sqlite:///{tmp}/h", "h", id="sqlite-absolute"),
        pytest.param(lambda tmp: "sqlite:///rel/h", "rel/h", id="sqlite-relative"),
        pytest.param(lambda tmp: None, "env-home", id="env-default"),
    ],
)
def test_open_registry_accepts_paths_and_sqlite_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: Callable[[Path], Any], expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPTSERVE_HOME", str(tmp_path / "env-home"))
    reg = open_registry(spec(tmp_path))
    assert isinstance(reg, Registry)
    assert reg.home == tmp_path / expected
    assert (tmp_path / expected / "state.db").is_file()


def test_default_home_is_dot_adaptserve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTSERVE_HOME", raising=False)
    assert open_registry(None).home == tmp_path / ".adaptserve"


@pytest.mark.parametrize("url", ["postgresql://db/registry", "s3://bucket/registry", "http://x"], ids=str)
def test_open_registry_rejects_unsupported_schemes(url: str) -> None:
    scheme = url.split(":")[0]
    with pytest.raises(UnsupportedBackendError) as exc:
        open_registry(url)
    assert str(exc.value).startswith(f"registry backend {scheme!r} is not supported yet")


def test_registry_is_an_abstract_interface() -> None:
    with pytest.raises(TypeError):
        AdapterRegistry()  # type: ignore[abstract]
    assert issubclass(Registry, AdapterRegistry)
