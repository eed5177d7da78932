"""The HTTP layer through BentoML's ASGI app (`to_asgi()`), no server process."""

import base64
import contextlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import text
from starlette.testclient import TestClient

from models import notify
from models.db import Database
from models.registry import open_registry
from models.state import state_url
from pipelines.data import digits_splits

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(service_home: Path, source_model: Path, monkeypatch: pytest.MonkeyPatch):
    with _started(monkeypatch, source_model) as c:
        yield c


@contextlib.contextmanager
def _started(mp: pytest.MonkeyPatch, source_model: Path) -> Iterator[TestClient]:
    """A TestClient on the service of ADAPTSERVE_HOME, with this module's settings set through `mp`."""
    mp.setenv("ADAPTSERVE_BASE_MODEL", str(source_model))
    mp.setenv("ADAPTSERVE_ADMIN_TOKEN", TOKEN)
    mp.setenv("ADAPTSERVE_MAX_BODY_BYTES", str(2 * 2**20))
    mp.setenv("ADAPTSERVE_MAX_IMAGES", "8")
    mp.setenv("ADAPTSERVE_JOB_RUNNER", "0")  # tests/test_jobs.py covers the runner
    mp.setenv("ADAPTSERVE_DRIFT_INTERVAL_S", "0")  # checks on demand only
    mp.setenv("ADAPTSERVE_DRIFT_MIN_RECORDS", "20")
    mp.setenv("ADAPTSERVE_REPORT_EVERY", "0")
    with TestClient(_asgi_app()) as c:  # lifespan start creates the service from this test's environment
        yield c


_APP = []


def _asgi_app():
    """One ASGI app per test process: BentoML registers its own Prometheus metrics when it builds one."""
    if not _APP:
        from service.app import AdaptServe

        _APP.append(AdaptServe.to_asgi())
    return _APP[0]


def _png(image: Image.Image | None = None) -> str:
    buf = io.BytesIO()
    (image or digits_splits(32).test.images[0]).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_predict_names_adapter_version_and_labels(client: TestClient) -> None:
    r = client.post("/predict", json={"images": [_png(), _png()], "adapter": "site-a", "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["adapter"], body["version"]) == ("site-a", 1)
    assert len(body["predictions"]) == 2 and len(body["predictions"][0]["top_k"]) == 3
    assert body["predictions"][0]["label"] in [str(i) for i in range(10)]


def test_any_pillow_format_is_accepted(client: TestClient) -> None:
    image = digits_splits(32).test.images[0]
    payloads = []
    for fmt, mode in [("JPEG", "CMYK"), ("TIFF", "RGB"), ("WEBP", "RGBA"), ("GIF", "P"), ("BMP", "L")]:
        buf = io.BytesIO()
        image.convert(mode).resize((300, 200)).save(buf, fmt)
        payloads.append(base64.b64encode(buf.getvalue()).decode())
    r = client.post("/predict", json={"images": payloads})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 5


def test_decompression_bomb_is_refused_with_413(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buf, "PNG")
    r = client.post("/predict", json={"images": [base64.b64encode(buf.getvalue()).decode()]})
    assert r.status_code == 413 and "pixels exceeds the limit of 40000000" in r.json()["error"]


def test_oversized_body_is_refused_with_413(client: TestClient) -> None:
    r = client.post("/predict", content=b"{" + b" " * (3 * 2**20) + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert "exceeds the limit of 2097152 (ADAPTSERVE_MAX_BODY_BYTES)" in r.json()["error"]


def test_multipart_upload_route(client: TestClient) -> None:
    buf = io.BytesIO()
    digits_splits(32).test.images[0].save(buf, "JPEG")
    r = client.post(
        "/predict/upload", files={"file": ("x.jpg", buf.getvalue(), "image/jpeg")}, params={"adapter": "site-b"}
    )
    assert r.status_code == 200, r.text
    assert (r.json()["adapter"], r.json()["version"]) == ("site-b", 1)


def test_promote_rollback_and_delete(client: TestClient) -> None:
    r = client.post("/adapters/promote", json={"name": "site-a", "version": 2}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert client.post("/predict", json={"images": [_png()], "adapter": "site-a"}).json()["version"] == 2
    r = client.delete("/adapters/site-a/versions/2", headers=AUTH)
    assert r.status_code == 409 and "champion" in r.json()["error"]
    assert client.post("/adapters/rollback", json={"name": "site-a"}, headers=AUTH).status_code == 200
    assert client.post("/predict", json={"images": [_png()], "adapter": "site-a"}).json()["version"] == 1
    assert client.delete("/adapters/site-a/versions/2", headers=AUTH).status_code == 200
    r = client.post("/adapters/promote", json={"name": "site-a", "version": 7}, headers=AUTH)
    assert r.status_code == 404


def test_register_an_uploaded_adapter_archive(
    client: TestClient, service_home: Path, source_model: Path, tmp_path: Path
) -> None:
    from pipelines.release import make_random_adapter

    src = make_random_adapter(source_model, tmp_path / "new", seed=9)
    archive = tmp_path / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src, arcname="adapter")
    r = client.post(
        "/adapters/register",
        params={"name": "site-c", "promote": "true"},
        files={"archive": ("adapter.tar.gz", archive.read_bytes())},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    assert client.post("/predict", json={"images": [_png()], "adapter": "site-c"}).json()["version"] == 1
    listed = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
    assert listed["site-c"]["champion"] == 1 and listed["site-c"]["serving"] == 1


def test_register_refuses_an_adapter_of_another_base(client: TestClient, tmp_path: Path, source_model: Path) -> None:
    from pipelines.release import make_random_adapter

    src = make_random_adapter(source_model, tmp_path / "new", seed=9)
    meta = json.loads((src / "metadata.json").read_text())
    (src / "metadata.json").write_text(json.dumps({**meta, "base_model": "resnet50@abc"}))
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src, arcname=".")
    r = client.post(
        "/adapters/register",
        params={"name": "site-c"},
        files={"archive": ("a.tgz", archive.read_bytes())},
        headers=AUTH,
    )
    assert r.status_code == 400
    assert "adapter was trained on base 'resnet50@abc'" in r.json()["error"]


def test_health_and_metrics(client: TestClient) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    client.post("/predict", json={"images": [_png()], "adapter": "site-a"})
    # BentoML's /metrics route needs its server's Prometheus set-up (it hangs under a bare to_asgi() app);
    # tests/test_serve_process.py reads it over HTTP from a real `bentoml serve`. Here: the same registry.
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    assert 'adaptserve_requests_total{adapter="site-a",status="ok",version="1"}' in text
    assert "adaptserve_request_latency_seconds_bucket" in text
    assert 'adaptserve_engine_info{engine="onnx"} 1.0' in text


def _predict_ids(client: TestClient, n: int, adapter: str = "site-a") -> list[str]:
    images = digits_splits(32).test.images
    ids = []
    for i in range(0, n, 8):
        body = {"images": [_png(im) for im in images[i : min(i + 8, n)]], "adapter": adapter}
        ids += [p["id"] for p in client.post("/predict", json=body).json()["predictions"]]
    return ids


def _eventually(fn, timeout: float = 15.0):
    import time

    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def test_feedback_labels_a_prediction_by_id_or_an_uploaded_image(client: TestClient) -> None:
    pid = _predict_ids(client, 1)[0]
    post = lambda body: client.post("/feedback", json=body, headers=AUTH)  # noqa: E731
    r = _eventually(lambda: (r := post({"id": pid, "label": "3"})).status_code == 201 and r)
    assert r and r.json()["adapter"] == "site-a" and r.json()["labels"] == 1, r
    r = post({"image": _png(), "label": "7", "adapter": "site-b"})
    assert r.status_code == 201 and r.json()["labels"] == 1, r.text


def test_retrain_jobs_and_schedules_routes(client: TestClient) -> None:
    assert client.post("/retrain", json={"adapter": "site-a"}).status_code == 401
    r = client.post("/retrain", json={"adapter": "site-a"}, headers=AUTH)
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    assert (job["adapter"], job["state"], job["trigger"]) == ("site-a", "queued", "manual")
    again = client.post("/retrain", json={"adapter": "site-a"}, headers=AUTH)
    assert again.status_code == 409 and job["id"] in again.json()["error"]
    assert client.post("/retrain", json={"adapter": "nope"}, headers=AUTH).status_code == 404
    assert [j["id"] for j in client.get("/jobs").json()["jobs"]] == [job["id"]]
    assert client.get(f"/jobs/{job['id']}").json()["state"] == "queued"
    assert client.get("/jobs/unknown").status_code == 404

    bad = client.post("/schedules", json={"adapter": "site-a", "cron": "every day"}, headers=AUTH)
    assert bad.status_code == 400 and "invalid cron expression 'every day'" in bad.json()["error"]
    r = client.post("/schedules", json={"adapter": "site-a", "cron": "0 3 * * *"}, headers=AUTH)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert [s["cron"] for s in client.get("/schedules").json()["schedules"]] == ["0 3 * * *"]
    assert client.delete(f"/schedules/{sid}").status_code == 401
    assert client.delete(f"/schedules/{sid}", headers=AUTH).status_code == 200
    assert client.get("/schedules").json()["schedules"] == []
    assert client.delete(f"/schedules/{sid}", headers=AUTH).status_code == 404


def test_a_manual_retrain_while_the_policys_job_runs_is_queued_behind_it(client: TestClient,
                                                                        service_home: Path) -> None:
    from pipelines.jobs import JobStore

    store = JobStore(service_home)
    policy = store.submit("site-a", "drift", "drift flagged, 50 labels")
    taken = client.post("/retrain", json={"adapter": "site-a"}, headers=AUTH)
    assert taken.status_code == 202 and taken.json()["job"]["id"] == policy.id, "not started: taken over"
    assert taken.json()["job"]["trigger"] == "manual"
    running = store.claim_next(os.getpid())
    r = client.post("/retrain", json={"adapter": "site-a"}, headers=AUTH)
    assert r.status_code == 202, r.text
    behind = r.json()["job"]
    assert behind["state"] == "queued" and behind["message"] == f"queued behind running job {running.id}"
    assert {j["state"] for j in client.get("/jobs").json()["jobs"]} == {"queued", "running"}


def test_drift_check_report_and_dashboard(client: TestClient) -> None:
    assert client.get("/drift", params={"adapter": "site-a"}).status_code == 404
    r = client.post("/drift/check", json={"adapter": "site-a"}, headers=AUTH)
    assert r.status_code == 409 and "ADAPTSERVE_DRIFT_MIN_RECORDS" in r.json()["error"]
    _predict_ids(client, 48)

    def check():
        r = client.post("/drift/check", json={"adapter": "site-a"}, headers=AUTH)
        return r if r.status_code == 200 else None

    r = _eventually(check)
    assert r is not None
    result = r.json()
    assert result["adapter"] == "site-a" and result["version"] == 1 and result["window_size"] >= 20
    assert {"embedding", "confidence", "predicted_class"} <= set(result["features"])
    latest = client.get("/drift", params={"adapter": "site-a"}).json()
    assert latest["checked_at"] == result["checked_at"]
    assert 0.0 <= latest["estimated_accuracy"] <= latest["accuracy_estimate"]["class_bound"] <= 1.0
    assert latest["measured_accuracy"] == {"accuracy": None, "labels": 0, "version": 1}
    # beside the estimate, what labels of served predictions measure: 3 of these 4 labels agree with the prediction
    served = client.post("/predict", json={"images": [_png(im) for im in digits_splits(32).val.images[:4]],
                                           "adapter": "site-a"}).json()["predictions"]
    for i, p in enumerate(served):
        label = p["label"] if i < 3 else str((int(p["label"]) + 1) % 10)
        assert client.post("/feedback", json={"id": p["id"], "label": label}, headers=AUTH).status_code == 201

    def measured():
        m = client.get("/drift", params={"adapter": "site-a"}).json()["measured_accuracy"]
        return m if m["labels"] == 4 else None  # the captures are written off the request path

    assert _eventually(measured) == {"accuracy": 0.75, "labels": 4, "version": 1}
    assert client.get("/drift", params={"adapter": "nope"}).status_code == 404
    assert client.get("/drift/report", params={"adapter": "site-a"}).status_code == 404  # REPORT_EVERY=0

    page = client.get("/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "site-a" in page.text and "/dashboard/data" in page.text
    data = client.get("/dashboard/data").json()
    site_a = next(a for a in data["adapters"] if a["name"] == "site-a")
    assert len(site_a["history"]) == 1 and site_a["status"]["checked_at"] == result["checked_at"]
    assert site_a["measured_accuracy"]["labels"] == 4 and site_a["status"]["estimated_accuracy"] is not None
    assert sum(site_a["class_counts"].values()) == site_a["records"] >= 20
    assert client.get("/dashboard", params={"refresh_s": -1}).status_code == 400


@pytest.fixture
def int8_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_ENGINE", "onnx-int8")


def test_the_int8_engine_shows_what_serves_each_version_and_its_measured_accuracy(int8_engine, client) -> None:
    listed = client.get("/adapters").json()
    assert listed["engine"] == "onnx-int8"
    base = listed["base_precision"]
    assert base["precision"] == "int8" and abs(base["int8"]["delta"]) <= 0.01
    site_a = next(a for a in listed["adapters"] if a["name"] == "site-a")["precision"]
    # a random adapter has no samples of its own: calibrated and measured on its base's; whether it is served in
    # int8 follows from what was measured (random LoRA noise on every layer can cost int8 more than a point)
    assert site_a["int8"]["eval_set"].endswith("samples/holdout.npz")
    within = site_a["int8"]["delta"] >= -0.01
    assert site_a["precision"] == ("int8" if within else "fp32")
    assert within or "beyond ADAPTSERVE_INT8_MAX_DROP=0.01" in site_a["reason"]
    r = client.post("/predict", json={"images": [_png()], "adapter": "site-a"})
    assert r.status_code == 200 and r.json()["version"] == 1
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    assert f'adaptserve_served_int8{{adapter="site-a",version="1"}} {float(within)}' in text
    assert 'adaptserve_served_int8{adapter="base",version="0"} 1.0' in text


LABELLERS = ("labeller-token-one-0123456789", "labeller-token-two-0123456789")
CONTRIBUTOR = "contributor-token-0123456789"


@pytest.fixture
def roles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_LABELLER_TOKENS", ",".join(LABELLERS))
    monkeypatch.setenv("ADAPTSERVE_CONTRIBUTOR_TOKENS", CONTRIBUTOR)


def _as(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_contradicting_labels_are_kept_as_conflicts_not_overwritten(roles, client: TestClient) -> None:
    image = _png(digits_splits(32).test.images[5])

    def label(token: str, value: str) -> dict:
        r = client.post("/feedback", json={"image": image, "label": value, "adapter": "site-a"}, headers=_as(token))
        assert r.status_code == 201, r.text
        return r.json()

    assert label(LABELLERS[0], "3")["outcome"] == "added"
    second = label(LABELLERS[1], "5")  # the same trust disagrees: neither wins, the image is set aside
    assert (second["outcome"], second["stored_label"], second["conflicted"]) == ("conflict", "3", True)
    untrusted = label(CONTRIBUTOR, "7")
    assert untrusted["outcome"] == "conflict" and "stored_label" not in untrusted  # told nothing it did not send
    pending = client.get("/labels/conflicts", params={"adapter": "site-a"}, headers=_as(LABELLERS[0])).json()
    shown = [(c["kept_label"], c["offered_label"], c["resolution"]) for c in pending["conflicts"]]
    assert shown == [("3", "5", "pending")]
    assert client.get("/labels/conflicts", params={"adapter": "site-a"}, headers=_as(CONTRIBUTOR)).status_code == 403
    assert label(TOKEN, "3")["outcome"] in ("same", "relabelled")  # an admin settles it
    after = client.get("/labels/conflicts", params={"adapter": "site-a"}, headers=AUTH).json()
    assert after["conflicts"] == [] and after["summary"]["conflicts"] == 0


@pytest.mark.parametrize("notify_on", [True, False], ids=["notified", "poll-only"])
def test_a_change_made_elsewhere_is_served_once_it_is_published(
    notify_on: bool, service_home: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A promote made outside this worker (as the CLI does) followed by a publish on the state database (what the
    registry's writes will do on it): with a 30 s poll only the notification can make the worker serve it at once."""
    monkeypatch.setenv("ADAPTSERVE_POLL_S", "30")
    monkeypatch.setenv("ADAPTSERVE_NOTIFY", "1" if notify_on else "0")
    monkeypatch.delenv("ADAPTSERVE_DATABASE_URL", raising=False)
    client = request.getfixturevalue("client")

    def served() -> int:
        return {a["name"]: a["serving"] for a in client.get("/adapters").json()["adapters"]}["site-a"]

    assert served() == 1
    time.sleep(0.5)  # the startup's connect wake-up and its refresh are over
    open_registry(service_home).promote("site-a", 2)
    database = Database(state_url(service_home))
    with database.write() as conn:
        conn.execute(text("SELECT 1"))
        notify.publish(conn, notify.REGISTRY)
    database.dispose()
    deadline = time.monotonic() + 1.0
    while served() != 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert served() == (2 if notify_on else 1)


# --- refusals: each leaves the service as it was, so the 26 cases share one client (one costs ~4 s to start).
# Keep them last: a module-scoped client lives until the module ends, and no other should start beside it.


@pytest.fixture(scope="module")
def shared(_service_home_template: Path, source_model: Path, tmp_path_factory: pytest.TempPathFactory):
    import shutil

    home = tmp_path_factory.mktemp("refusals") / "svc"
    shutil.copytree(_service_home_template, home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTSERVE_HOME", str(home))
        with _started(mp, source_model) as c:
            yield c


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"images": []}, 400, "images: empty list; send at least one image"),
        ({"images": ["not base64!"]}, 400, "images[0]: invalid base64"),
        ({"images": [base64.b64encode(b"hello").decode()]}, 400, "images[0]: not an image Pillow can decode"),
        ({"images": ["x"] * 9}, 400, "images: 9 images exceed the limit of 8 per request (ADAPTSERVE_MAX_IMAGES)"),
        ({"images": [1]}, 400, "images[0]: expected a base64 string, got int"),
        ({"images": "abc"}, 400, "validation error"),
        ({"images": ["PNG"], "adapter": "nope"}, 404, "unknown adapter 'nope'; serving: base, site-a, site-b"),
        ({"images": ["PNG"], "top_k": 0}, 400, "top_k must be between 1 and 10"),
    ],
    ids=["empty", "base64", "not-image", "too-many", "wrong-type", "not-a-list", "unknown-adapter", "top-k"],
)
def test_bad_input_gets_a_4xx_naming_the_problem(shared: TestClient, body: dict, status: int, message: str) -> None:
    body = {
        **body,
        "images": [_png() if i == "PNG" else i for i in body["images"]]
        if isinstance(body["images"], list)
        else body["images"],
    }
    r = shared.post("/predict", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert shared.post("/predict", json={"images": [_png()]}).status_code == 200  # still serving


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN + "x"}],
    ids=["none", "wrong", "malformed"],
)
@pytest.mark.parametrize(
    "method, path, kwargs",
    [
        ("post", "/adapters/promote", {"json": {"name": "site-a", "version": 2}}),
        ("post", "/adapters/rollback", {"json": {"name": "site-a"}}),
        ("delete", "/adapters/site-a/versions/2", {}),
        ("post", "/adapters/register?name=x", {"files": {"archive": ("a.tgz", b"x")}}),
    ],
    ids=["promote", "rollback", "delete", "register"],
)
def test_admin_routes_need_the_token(shared: TestClient, method: str, path: str, kwargs: dict, headers: dict) -> None:
    r = getattr(shared, method)(path, headers=headers, **kwargs)
    assert r.status_code == 401
    expected = {
        "none": "needs an admin token: send 'Authorization: Bearer <token>'",
        "wrong": "wrong token: it is not one of this service's tokens",
        "malformed": "malformed Authorization header: send 'Authorization: Bearer <token>'",
    }
    assert any(r.json()["error"].endswith(e) for e in expected.values()), r.json()
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert shared.get("/adapters").json()["adapters"][0]["champion"] == 1  # nothing changed


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"id": "nope", "label": "3"}, 404, "nope"),
        ({"image": "PNG", "label": "ten", "adapter": "site-a"}, 400, "ten"),
        ({"image": "PNG", "label": "3", "adapter": "site-x"}, 404, "unknown adapter 'site-x'"),
        ({"image": "PNG", "label": "3"}, 400, "'adapter' is required with 'image'"),
        ({"image": "!!", "label": "3", "adapter": "site-a"}, 400, "image: invalid base64"),
        ({"label": "3"}, 400, "send either 'id'"),
    ],
    ids=["unknown-id", "unknown-label", "unknown-adapter", "no-adapter", "bad-image", "neither"],
)
def test_feedback_refuses_bad_input(shared: TestClient, body: dict, status: int, message: str) -> None:
    body = {k: (_png() if v == "PNG" else v) for k, v in body.items()}
    r = shared.post("/feedback", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
