"""ASGI pieces of the service: a request-body size limit that answers 413 before reading the body."""

from __future__ import annotations

import json
import os
from typing import Any

DEFAULT_MAX_BODY = 64 * 2**20


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 with a JSON message when Content-Length (or the streamed body) exceeds ADAPTSERVE_MAX_BODY_BYTES."""

    def __init__(self, app: Any, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes or int(os.environ.get("ADAPTSERVE_MAX_BODY_BYTES", DEFAULT_MAX_BODY))

    async def _reject(self, send: Any, size: int | str) -> None:
        message = f"request body of {size} bytes exceeds the limit of {self.max_bytes} (ADAPTSERVE_MAX_BODY_BYTES)"
        body = json.dumps({"error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send, int(length))
        seen = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send, f"more than {self.max_bytes}")
