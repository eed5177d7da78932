"""One error map for every route: an exception's class says its HTTP status, one handler writes the response.

The shape MLServer uses (mlserver/errors.py + rest/errors.py): errors are classes carrying `status_code`, and a
single handler turns any of them into ``{"error": message}`` with that status, so no route has a try-block of
its own. Domain errors (registry, archives, jobs, labels, monitor, decode) declare their `status_code` where
they are defined; the classes below are the ones that belong to the HTTP layer itself. What a client sends
must never produce a 5xx: a library error that reaches here unmapped is a bug, answered 500 and logged.

`ValueError` and `LookupError` that carry no status are client errors (400 and 404): our validation raises
them with a message meant for the client. `OverflowError` (an integer past 64 bits reaching SQLite) is a 400.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from starlette.responses import JSONResponse

log = logging.getLogger("adaptserve")

P = ParamSpec("P")
R = TypeVar("R")


class ServiceError(Exception):
    """Base of the HTTP layer's own errors; `headers` go on the response."""

    status_code = 500
    headers: dict[str, str] = {}

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        if headers is not None:
            self.headers = headers


class BadRequestError(ServiceError, ValueError):
    status_code = 400


class UnauthorizedError(ServiceError):
    """No credentials, or wrong ones (401, with the scheme to use)."""

    status_code = 401
    headers = {"WWW-Authenticate": 'Bearer realm="adaptserve"'}


class ForbiddenError(ServiceError):
    """Valid credentials of a role that may not do this (403)."""

    status_code = 403


class NotFoundError(ServiceError, LookupError):
    status_code = 404


class ConflictError(ServiceError):
    status_code = 409


class PayloadTooLargeError(ServiceError):
    status_code = 413


class UnknownAdapterError(NotFoundError):
    """A prediction named an adapter that has no serving version."""


class OverloadedError(ServiceError):
    """The batcher shed this request: waiting would exceed ADAPTSERVE_MAX_LATENCY_MS (503 with Retry-After)."""

    status_code = 503
    headers = {"Retry-After": "1"}


# Library errors that mean "the client sent something unusable" and carry no status of their own.
_FALLBACK: tuple[tuple[type[BaseException], int], ...] = (
    (OverflowError, 400),
    (LookupError, 404),
    (ValueError, 400),
)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status `exc` maps to, or None when nothing maps it (a server error)."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    for cls, code in _FALLBACK:
        if isinstance(exc, cls):
            return code
    return None


def message_of(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text.strip() or type(exc).__name__


def response_for(exc: BaseException) -> JSONResponse:
    """The one place an exception becomes an HTTP response."""
    status = status_of(exc)
    if status is None:
        log.error("unhandled error (answered 500)", exc_info=exc)
        return JSONResponse({"error": "internal server error; see the service log"}, status_code=500)
    if status >= 500 and not isinstance(exc, OverloadedError):
        log.error("server error %s: %s", status, exc, exc_info=exc)
    headers = dict(getattr(exc, "headers", None) or {})
    return JSONResponse({"error": message_of(exc)}, status_code=status, headers=headers)


async def handle(_request: Any, exc: Exception) -> JSONResponse:
    """Starlette/FastAPI exception handler (registered for Exception on the admin/read app)."""
    return response_for(exc)


def validation_message(errors: list[dict[str, Any]]) -> str:
    """FastAPI's RequestValidationError list as one sentence: 'body.version: must be <= 9223372036854775807'."""
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


async def handle_validation(_request: Any, exc: Any) -> JSONResponse:
    return JSONResponse({"error": validation_message(exc.errors())}, status_code=400)


def mapped(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R | JSONResponse]]:
    """For BentoML API methods, which BentoML wraps itself: any exception becomes response_for(exc).

    BentoML answers every exception that is not one of its own with a 500, so its APIs cannot rely on the
    FastAPI app's handlers; this decorator is the same map applied at the method."""

    @wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | JSONResponse:
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:  # the one handler: every status comes from the error map
            response = response_for(exc)
            ctx = kwargs.get("ctx")
            if ctx is not None:  # BentoML sets the status of an API with a context parameter from the context
                ctx.response.status_code = response.status_code
            return response

    return wrapper


async def handle_http(_request: Any, exc: Any) -> JSONResponse:
    """Starlette's own HTTP errors (unknown route 404, wrong method 405) in the same `{"error": ...}` shape."""
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


class ErrorMiddleware:
    """Innermost ASGI middleware of the FastAPI app: an exception a route raises becomes response_for(exc).

    Starlette's handler for `Exception` answers and then re-raises (to the server's error log); this one answers
    and stops, so the status comes from the error map alone."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # the one handler of the admin/read app
            if started:
                raise
            await response_for(exc)(scope, receive, send)
