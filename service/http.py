"""ASGI pieces of the service, in front of BentoML and the FastAPI app.

* BodyLimitMiddleware: a request body over ADAPTSERVE_MAX_BODY_BYTES gets a JSON 413 on every route, whether it
  declares its length or streams it chunked. A declared length is refused before any byte is read; a body without
  one is read (up to the limit) before the app sees it, so no route ever fails half-way through a body: BentoML
  would turn that into a 500, and python-multipart into a 400. After a 413 the rest of the body is drained for a
  bounded time ("lingering close"), so the client reads the 413 instead of a connection reset.
* ReadinessMiddleware: ``GET /readyz`` answered from the worker's Runtime (503 with the reason until every
  adapter has a version serving; 200 with what is degraded otherwise).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from models import settings

DRAIN_SECONDS = 2.0  # how long a refused body is read and dropped before the connection closes


async def _send_json(send: Any, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes or settings.load().max_body_bytes

    async def _reject(self, send: Any, receive: Any, size: int | str, more_body: bool) -> None:
        message = f"request body of {size} bytes exceeds the limit of {self.max_bytes} (ADAPTSERVE_MAX_BODY_BYTES)"
        await _send_json(send, 413, {"error": message}, {"connection": "close"})
        deadline = time.monotonic() + DRAIN_SECONDS
        while more_body and (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                return
            more_body = message.get("type") == "http.request" and message.get("more_body", False)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > self.max_bytes:  # a client waiting for "100 Continue" has sent nothing to drain
                return await self._reject(send, receive, int(length), b"expect" not in headers)
            return await self.app(scope, receive, send)  # the server delivers at most Content-Length bytes
        chunks, seen = [], 0
        while True:  # no declared length (chunked): read it all, within the limit, before the app runs
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            more = message.get("more_body", False)
            if seen > self.max_bytes:
                return await self._reject(send, receive, f"more than {self.max_bytes}", more)
            if not more:
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        return await self.app(scope, replay, send)


class ReadinessMiddleware:
    """``GET /readyz`` from `probe()`: (ready, payload), or None while the worker's service is not built yet."""

    probe: Callable[[], tuple[bool, dict] | None] | None = None  # set by the service when its Runtime exists

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") != "/readyz" or scope.get("method") not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        state = ReadinessMiddleware.probe() if ReadinessMiddleware.probe is not None else None
        if state is None:
            return await _send_json(send, 503, {"ready": False, "reason": "the service is starting"})
        ready, payload = state
        await _send_json(send, 200 if ready else 503, {"ready": ready, **payload})
