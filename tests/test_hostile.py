"""A hostile and an overloaded client against a real `adaptserve serve` process (issue: trust).

Each case replays a defect measured against the service and asserts the status code AND that nothing changed:
overload answers 503 with Retry-After (never 500, never a reset); no token, no feedback; no path outside the
state directory; huge integers, hostile archives and oversized bodies are 4xx; a corrupt version is never
promoted and a champion damaged later falls back to the last good one. Load is bounded in count and time.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import shutil
import socket
import tarfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.serve import ServeProcess
from models.registry import open_registry
from pipelines.data import digits_splits

pytestmark = pytest.mark.slow

TOKEN = "hostile-test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def home(_service_home_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("hostile") / "home"
    shutil.copytree(_service_home_template, home)
    return home


def _env(home: Path, source_model: Path, **extra: str) -> dict[str, str]:
    return {
        "ADAPTSERVE_HOME": str(home),
        "ADAPTSERVE_BASE_MODEL": str(source_model),
        "ADAPTSERVE_ADMIN_TOKEN": TOKEN,
        "ADAPTSERVE_THREADS": "1",
        "ADAPTSERVE_JOB_RUNNER": "0",
        "ADAPTSERVE_DRIFT_INTERVAL_S": "0",
        "ADAPTSERVE_MAX_BODY_BYTES": str(4 * 2**20),
        **extra,
    }


@pytest.fixture(scope="module")
def server(home: Path, source_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    work = tmp_path_factory.mktemp("hostile-serve")
    sentinel = work / "bentoml" / "prometheus_multiproc_dir" / "other-service.db"  # another service's metrics
    sentinel.parent.mkdir(parents=True)
    sentinel.write_text("x")
    proc = ServeProcess(_env(home, source_model, ADAPTSERVE_MAX_LATENCY_MS="50"), work, cli=True).start()
    try:
        proc.wait_ready(timeout=180)
        proc.sentinel = sentinel
        yield proc
    finally:
        proc.stop()


@functools.cache
def _png(i: int = 0) -> bytes:
    buf = io.BytesIO()
    digits_splits(32).test.images[i].save(buf, "PNG")
    return buf.getvalue()


def _b64(i: int = 0) -> str:
    return base64.b64encode(_png(i)).decode()


def _champions(home: Path) -> dict[str, int | None]:
    return {i.name: i.champion for i in open_registry(home).list_adapters()}


def _versions(home: Path) -> dict[str, list[int]]:
    return {i.name: [v.version for v in i.versions] for i in open_registry(home).list_adapters()}


# --- overload ------------------------------------------------------------------------------------------------


def _hammer(url: str, send, clients: int, per_client: int) -> tuple[Counter, list[str], int]:
    """`clients` threads x `per_client` requests; (status counts, errors, 503s without Retry-After)."""
    statuses: Counter = Counter()
    failures: list[str] = []
    no_retry_after = 0
    lock = threading.Lock()

    def run() -> None:
        nonlocal no_retry_after
        # a fresh connection per request, as many clients behind proxies do (and no idle keep-alive to race)
        with httpx.Client(base_url=url, timeout=60.0, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            for _ in range(per_client):
                try:
                    r = send(client)
                except httpx.HTTPError as err:  # a reset or a dropped connection: what a client must never see
                    with lock:
                        failures.append(repr(err))
                    continue
                with lock:
                    statuses[r.status_code] += 1
                    no_retry_after += r.status_code == 503 and "retry-after" not in r.headers

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return statuses, failures, no_retry_after


@pytest.mark.parametrize(
    "route",
    [
        lambda c: c.post("/predict", json={"images": [_b64(i) for i in range(4)], "adapter": "site-a"}),
        lambda c: c.post(
            "/predict/upload", files={"file": ("x.png", _png(), "image/png")}, params={"adapter": "site-a"}
        ),
    ],
    ids=["predict-json", "predict-upload"],
)
def test_overload_is_503_with_retry_after_never_500_or_a_reset(server: ServeProcess, route) -> None:
    statuses, failures, no_retry_after = _hammer(server.url, route, clients=48, per_client=3)
    assert failures == []
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] > 0 and statuses[200] > 0, statuses  # it was overloaded, and it kept serving
    assert no_retry_after == 0


# --- roles ---------------------------------------------------------------------------------------------------


def test_feedback_without_a_labeller_token_is_refused_and_stores_nothing(server: ServeProcess, home: Path) -> None:
    from pipelines.labels import LabelStore

    r = httpx.post(f"{server.url}/predict", json={"images": [_b64()], "adapter": "site-a"}, timeout=30)
    pid = r.json()["predictions"][0]["id"]
    for body in ({"id": pid, "label": "4"}, {"image": _b64(), "label": "4", "adapter": "site-a"}):
        for headers in ({}, AUTH | {"Authorization": TOKEN}):  # none, and the admin token without its scheme
            r = httpx.post(f"{server.url}/feedback", json=body, headers=headers, timeout=30)
            assert r.status_code == 401, r.text
    assert "feedback is closed: configure a labeller token" in httpx.post(
        f"{server.url}/feedback", json={"id": pid, "label": "4"}, timeout=30).json()["error"]
    assert LabelStore(home).count("site-a") == 0
    assert httpx.get(f"{server.url}/labels/conflicts", params={"adapter": "site-a"}).status_code == 401
    assert httpx.get(f"{server.url}/labels/requests", params={"adapter": "site-a"}).status_code == 401


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("post", "/adapters/promote", {"name": "site-a", "version": 2}),
        ("post", "/adapters/rollback", {"name": "site-a"}),
        ("delete", "/adapters/site-a/versions/2", None),
        ("post", "/retrain", {"adapter": "site-a"}),
        ("post", "/schedules", {"adapter": "site-a", "cron": "0 3 * * *"}),
        ("post", "/drift/check", {"adapter": "site-a"}),
    ],
    ids=["promote", "rollback", "delete", "retrain", "schedule", "drift-check"],
)
def test_a_bare_token_without_the_bearer_scheme_changes_nothing(
    server: ServeProcess, home: Path, method: str, path: str, body: dict | None
) -> None:
    before = (_champions(home), _versions(home))
    kwargs = {"json": body} if body is not None else {}
    r = httpx.request(method, f"{server.url}{path}", headers={"Authorization": TOKEN}, timeout=30, **kwargs)
    assert r.status_code == 401 and r.json()["error"].startswith("malformed Authorization header")
    assert (_champions(home), _versions(home)) == before


def test_a_job_log_needs_the_admin_token(server: ServeProcess, home: Path) -> None:
    from pipelines.jobs import JobStore

    job = JobStore(home).submit("site-b", "manual", "test")
    JobStore(home).append_log(job.id, "secret path /srv/data")
    anonymous = httpx.get(f"{server.url}/jobs/{job.id}", timeout=30).json()
    assert "log" not in anonymous and anonymous["state"] == "queued"
    assert "secret path" in httpx.get(f"{server.url}/jobs/{job.id}", headers=AUTH, timeout=30).json()["log"]


# --- paths and integers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["{outside}/secret", "../../outside/secret", "site-a/../../x"],
                         ids=["absolute", "dotdot", "nested"])
def test_the_drift_report_never_serves_a_file_outside_the_state_dir(
    server: ServeProcess, home: Path, tmp_path: Path, name: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.html").write_text("<p>secret</p>")
    (home / "reports" / "site-a").mkdir(parents=True, exist_ok=True)
    r = httpx.get(f"{server.url}/drift/report", params={"adapter": name.format(outside=outside)}, timeout=30)
    assert r.status_code == 400, r.text
    assert "secret" not in r.text and r.json()["error"].startswith("invalid request: query.adapter: ")


BIG = str(10**30)


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("post", "/adapters/promote", {"name": "site-a", "version": 10**30}, 400),
        ("delete", f"/schedules/{'9' * 26}", None, 400),
        ("delete", f"/adapters/site-a/versions/{'9' * 23}", None, 400),
        ("get", f"/jobs?limit={BIG}", None, 400),
        ("get", f"/dashboard?refresh_s={BIG}", None, 400),
        ("post", "/predict", {"images": ["x"], "top_k": 10**30}, 400),
        ("post", "/adapters/promote", {"name": "site-a", "version": -1}, 400),
        ("post", "/adapters/promote", {"name": "../x", "version": 1}, 400),
    ],
    ids=["promote-huge", "schedule-huge", "version-huge", "limit-huge", "refresh-huge", "top-k-huge",
         "promote-negative", "promote-bad-name"],
)
def test_client_integers_and_names_are_checked_before_they_reach_sqlite(
    server: ServeProcess, home: Path, method: str, path: str, body: dict | None, status: int
) -> None:
    before = _champions(home)
    kwargs = {"json": body} if body is not None else {}
    r = httpx.request(method, f"{server.url}{path}", headers=AUTH, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert "error" in r.json()
    assert _champions(home) == before


# --- archives and bodies -------------------------------------------------------------------------------------


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _zip_bomb() -> bytes:
    """~1 MB of zip expanding to 1 GiB of zeros (one member, declared sizes honest)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z, z.open("adapter/zeros.bin", "w") as f:
        chunk = b"\0" * 2**24
        for _ in range(64):
            f.write(chunk)
    return buf.getvalue()


def _truncated_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("adapter/metadata.json", "{}" * 1000)
    return buf.getvalue()[:-30]


ARCHIVES = {
    "absolute-symlink": (lambda: _tar([_link("adapter/metadata.json", "/etc/passwd", tarfile.SYMTYPE)]), 400),
    "escaping-symlink": (lambda: _tar([_link("adapter/x", "../../../etc/passwd", tarfile.SYMTYPE)]), 400),
    "hardlink": (lambda: _tar([_file("adapter/a", b"a"), _link("adapter/b", "adapter/a", tarfile.LNKTYPE)]), 400),
    "dotdot-member": (lambda: _tar([_file("../evil.txt", b"x")]), 400),
    "truncated-zip": (_truncated_zip, 400),
    "zip-bomb": (_zip_bomb, 413),
}


@pytest.mark.parametrize("kind", list(ARCHIVES), ids=list(ARCHIVES))
def test_hostile_archives_are_refused_and_nothing_is_stored(server: ServeProcess, home: Path, kind: str) -> None:
    make, status = ARCHIVES[kind]
    before, size = _versions(home), _size(home)
    r = httpx.post(f"{server.url}/adapters/register", params={"name": "evil"}, headers=AUTH, timeout=120,
                   files={"archive": ("a.bin", make())})
    assert r.status_code == status, r.text
    assert "error" in r.json()
    assert _versions(home) == before
    assert _size(home) - size < 16 * 2**20  # nothing expanded (the zip bomb would add 1 GiB)


def _size(home: Path) -> int:
    """Bytes of every file under the home (its artifact store and local copies each hold every version: ~270 MB)."""
    return sum(f.stat().st_size for f in home.rglob("*") if f.is_file())


def test_an_invalid_name_is_refused_before_the_archive_is_looked_at(server: ServeProcess) -> None:
    r = httpx.post(f"{server.url}/adapters/register", params={"name": "../Evil"}, headers=AUTH, timeout=30,
                   files={"archive": ("a.zip", b"not an archive")})
    assert r.status_code == 400 and r.json()["error"].startswith("invalid request: query.name: ")


def _chunked(total: int, chunk: int = 2**20) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"a" * chunk
        sent += chunk


def _parts(*blobs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]


@pytest.mark.parametrize(
    "send, status, message",
    [
        (lambda c: c.post("/predict/image", content=_png(), headers={"content-type": "application/json"}), 415,
         "Content-Type 'application/json': send image/jpeg"),
        (lambda c: c.post("/predict/image", content=_png()), 415, "Content-Type '(none)'"),
        (lambda c: c.post("/predict/image", content=b"", headers={"content-type": "image/png"}), 400,
         "empty upload"),
        (lambda c: c.post("/predict/image", content=b"\x89PNG\r\n\x1a\nnot", headers={"content-type": "image/png"}),
         400, "not an image Pillow can decode"),
        (lambda c: c.post("/predict/image?top_k=99999999999999999999", content=_png(),
                          headers={"content-type": "image/png"}), 400, "top_k"),
        (lambda c: c.post("/predict/upload", files=_parts(_png(), b"garbage")), 400,
         "file[1]: not an image Pillow can decode"),
        (lambda c: c.post("/predict/upload", files=_parts(*[_png()] * 33)), 400,
         "file: 33 images exceed the limit of 32 per request (ADAPTSERVE_MAX_IMAGES)"),
        (lambda c: c.post("/predict/upload", data={"other": "x"}, files=[("x", ("a", b"", "text/plain"))]), 400,
         "file"),
    ],
    ids=["json-type", "no-type", "empty", "truncated", "huge-top-k", "bad-part", "too-many-parts", "no-file-part"],
)
def test_raw_and_multipart_inputs_are_4xx_with_the_reason(server: ServeProcess, send, status, message) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = send(client)
        assert r.status_code == status, r.text
        assert message in r.json()["error"], r.json()
        ok = client.post("/predict/image?adapter=site-a&top_k=2", content=_png(), headers={"content-type": "image/x"})
        assert ok.status_code == 200 and len(ok.json()["predictions"][0]["top_k"]) == 2, ok.text
        many = client.post("/predict/upload", params={"adapter": "site-a"}, files=_parts(_png(0), _png(1), _png(2)))
        assert many.status_code == 200 and len(many.json()["predictions"]) == 3, many.text


@pytest.mark.parametrize("path", ["/predict", "/predict/upload", "/predict/image"], ids=["predict", "upload", "raw"])
def test_a_chunked_200_mb_body_is_a_413_read_by_the_client(server: ServeProcess, path: str) -> None:
    headers = {"/predict": "application/json", "/predict/upload": "multipart/form-data; boundary=x",
               "/predict/image": "image/jpeg"}
    headers = {"content-type": headers[path]}
    r = httpx.post(f"{server.url}{path}", content=_chunked(200 * 2**20), headers=headers, timeout=60)
    assert r.status_code == 413
    assert r.json()["error"] == (
        f"request body of more than {4 * 2**20} bytes exceeds the limit of {4 * 2**20} (ADAPTSERVE_MAX_BODY_BYTES)"
    )
    assert httpx.post(f"{server.url}/predict", json={"images": [_b64()]}, timeout=30).status_code == 200


# --- where it listens, whose metrics -------------------------------------------------------------------------


def test_it_listens_on_loopback_only(server: ServeProcess) -> None:
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.settimeout(5)
        s.connect(("127.0.0.2", server.port))  # loopback too, but not the address it was told to bind


def test_metrics_live_in_the_services_own_state_and_leave_others_alone(server: ServeProcess, home: Path) -> None:
    assert server.sentinel.exists()  # BentoML's shared dir (another service's files) was not wiped
    assert server.multiproc_dir.parent == home / "run" and any(server.multiproc_dir.glob("*.db"))
    httpx.post(f"{server.url}/predict", json={"images": [_b64()], "adapter": "site-b"}, timeout=30)
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert 'adaptserve_requests_total{adapter="site-b",status="ok",version="1"}' in text


# --- corrupt versions (last: it restarts the service) --------------------------------------------------------


def _damage(path: Path) -> bytes:
    original = path.read_bytes()
    path.write_bytes(original[:1024] + b"\0" * 4096 + original[1024 + 4096:])
    return original


def test_a_corrupt_version_is_not_promoted_and_a_champion_damaged_later_falls_back(
    server: ServeProcess, home: Path, source_model: Path, tmp_path: Path
) -> None:
    registry = open_registry(home)
    v2 = registry.path("site-a", 2)
    originals = {f: _damage(v2 / f) for f in ("adapter_model.safetensors", "model.onnx")}
    r = httpx.post(f"{server.url}/adapters/promote", json={"name": "site-a", "version": 2}, headers=AUTH, timeout=60)
    assert r.status_code == 409 and "adapter 'site-a' version 2 is corrupt" in r.json()["error"]
    assert _champions(home)["site-a"] == 1
    for f, data in originals.items():
        (v2 / f).write_bytes(data)
    r = httpx.post(f"{server.url}/adapters/promote", json={"name": "site-a", "version": 2}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    server.stop()

    _damage(v2 / "adapter_model.safetensors")  # files damaged after the promote, found at the next start
    site_b = registry.path("site-b", 1) / "adapter_model.safetensors"
    site_b_original = _damage(site_b)  # and an adapter with no earlier champion at all
    again = ServeProcess(_env(home, source_model), tmp_path / "serve", cli=True).start()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{again.url}/readyz", timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert ready.status_code == 503
        assert "no version of these adapters can serve: site-b: version 1 refused" in ready.json()["reason"]
        r = httpx.post(f"{again.url}/predict", json={"images": [_b64()], "adapter": "site-a"}, timeout=30)
        assert (r.status_code, r.json()["version"]) == (200, 1)  # the last good champion, not a 404
        site_a = next(a for a in httpx.get(f"{again.url}/adapters").json()["adapters"] if a["name"] == "site-a")
        assert (site_a["champion"], site_a["serving"], site_a["degraded"]["champion"]) == (2, 1, 2)
        metrics = httpx.get(f"{again.url}/metrics", timeout=30).text
        assert 'adaptserve_adapter_degraded{adapter="site-a"} 1.0' in metrics

        site_b.write_bytes(site_b_original)  # repaired: ready again without a restart or a promote
        deadline = time.monotonic() + 30
        while httpx.get(f"{again.url}/readyz", timeout=5).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        body = httpx.get(f"{again.url}/readyz", timeout=5).json()
        assert body["ready"] is True and list(body["degraded"]) == ["site-a"]
    finally:
        again.stop()
    assert json.dumps(_champions(home)) == json.dumps({"site-a": 2, "site-b": 1})
