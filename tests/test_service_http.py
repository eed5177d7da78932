"""The HTTP layer through BentoML's ASGI app (`to_asgi()`), no server process."""

import base64
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient

from pipelines.data import digits_splits

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(service_home: Path, source_model: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ADAPTSERVE_BASE_MODEL", str(source_model))
    monkeypatch.setenv("ADAPTSERVE_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("ADAPTSERVE_MAX_BODY_BYTES", str(2 * 2**20))
    monkeypatch.setenv("ADAPTSERVE_MAX_IMAGES", "8")
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
def test_bad_input_gets_a_4xx_naming_the_problem(client: TestClient, body: dict, status: int, message: str) -> None:
    body = {
        **body,
        "images": [_png() if i == "PNG" else i for i in body["images"]]
        if isinstance(body["images"], list)
        else body["images"],
    }
    r = client.post("/predict", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert client.post("/predict", json={"images": [_png()]}).status_code == 200  # still serving


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
def test_admin_routes_need_the_token(client: TestClient, method: str, path: str, kwargs: dict, headers: dict) -> None:
    r = getattr(client, method)(path, headers=headers, **kwargs)
    assert r.status_code == 401
    assert r.json()["error"].startswith("missing or wrong admin token")
    assert client.get("/adapters").json()["adapters"][0]["champion"] == 1  # nothing changed


def test_promote_rollback_and_delete(client: TestClient) -> None:
    r = client.post("/adapters/promote", json={"name": "site-a", "version": 2}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert client.post("/predict", json={"images": [_png()], "adapter": "site-a"}).json()["version"] == 2
    r = client.delete("/adapters/site-a/versions/2", headers=AUTH)
    assert r.status_code == 400 and "champion" in r.json()["error"]
    assert client.post("/adapters/rollback", json={"name": "site-a"}, headers=AUTH).status_code == 200
    assert client.post("/predict", json={"images": [_png()], "adapter": "site-a"}).json()["version"] == 1
    assert client.delete("/adapters/site-a/versions/2", headers=AUTH).status_code == 200
    r = client.post("/adapters/promote", json={"name": "site-a", "version": 7}, headers=AUTH)
    assert r.status_code == 404


def test_register_an_uploaded_adapter_archive(
    client: TestClient, service_home: Path, source_model: Path, tmp_path: Path
) -> None:
    from models.publish import make_random_adapter

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
    from models.publish import make_random_adapter

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
