"""The one error map (service/errors.py): each error class's status, the response shape, the two entry points."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from models.registry import AdapterNotFoundError, ChampionDeleteError, CorruptAdapterError, InvalidVersionError
from monitoring.errors import NotEnoughRecordsError
from monitoring.errors import UnknownAdapterError as MonitorUnknownAdapter
from service import errors
from service.decode import InputError


@pytest.mark.parametrize(
    "exc, status, message",
    [
        (errors.OverloadedError("server overloaded"), 503, "server overloaded"),
        (InputError("too big", status=413, index=2), 413, "images[2]: too big"),
        (AdapterNotFoundError("adapter 'x' not found"), 404, "adapter 'x' not found"),
        (CorruptAdapterError("a", 2, [("f", "1", "2")]), 409, "adapter 'a' version 2 is corrupt: file 'f': expected "
                                                               "sha256 1, actual 2"),
        (ChampionDeleteError("it is the champion"), 409, "it is the champion"),
        (InvalidVersionError("out of range"), 400, "out of range"),
        (MonitorUnknownAdapter("no adapter 'q'"), 404, "no adapter 'q'"),
        (NotEnoughRecordsError("need 20 records"), 409, "need 20 records"),
        (OverflowError("Python int too large to convert to SQLite INTEGER"), 400, "Python int too large"),
        (ValueError("bad cron"), 400, "bad cron"),
        (KeyError("no job 'j'"), 404, "no job 'j'"),
        (errors.UnauthorizedError("no token"), 401, "no token"),
        (errors.ForbiddenError("weak role"), 403, "weak role"),
    ],
    ids=["overload", "input-413", "registry-404", "corrupt-409", "champion-delete-409", "version-range", "monitor-404",
         "records-409", "sqlite-overflow", "value-error", "key-error", "unauthorized", "forbidden"],
)
def test_every_error_class_carries_its_status(exc: Exception, status: int, message: str) -> None:
    r = errors.response_for(exc)
    assert r.status_code == status
    assert json.loads(r.body)["error"].startswith(message)


def test_overload_says_when_to_retry() -> None:
    r = errors.response_for(errors.OverloadedError("server overloaded"))
    assert (r.status_code, r.headers["retry-after"]) == (503, "1")


def test_an_unmapped_error_is_a_500_that_does_not_leak_its_message() -> None:
    r = errors.response_for(RuntimeError("/secret/path/in/a/traceback"))
    assert r.status_code == 500
    assert json.loads(r.body) == {"error": "internal server error; see the service log"}


def test_mapped_turns_exceptions_of_a_bentoml_api_method_into_responses() -> None:
    @errors.mapped
    async def api(x: int) -> dict:
        if x < 0:
            raise errors.OverloadedError("busy")
        return {"x": x}

    assert asyncio.run(api(1)) == {"x": 1}
    assert asyncio.run(api(-1)).status_code == 503
    assert api.__wrapped__.__annotations__ == {"x": "int", "return": "dict"}  # BentoML reads the signature


def test_the_fastapi_app_answers_every_error_in_one_shape() -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    app = FastAPI()
    app.add_middleware(errors.ErrorMiddleware)
    app.add_exception_handler(RequestValidationError, errors.handle_validation)
    app.add_exception_handler(HTTPException, errors.handle_http)

    @app.get("/v/{version}")
    def version(version: int) -> dict:
        raise CorruptAdapterError("a", version, [])

    @app.get("/boom")
    def boom() -> dict:
        raise RuntimeError("bug")

    client = TestClient(app, raise_server_exceptions=False)
    r = client.get("/v/3")
    assert (r.status_code, r.json()) == (409, {"error": "adapter 'a' version 3 is corrupt:"})
    bad = client.get("/v/abc")
    assert bad.status_code == 400 and bad.json()["error"].startswith("invalid request: path.version: ")
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.get("/boom").status_code == 500
